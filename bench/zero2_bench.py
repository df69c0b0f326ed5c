"""ZeRO-2 step time: CoupledAdam vs AdamW on the same small GPT, 2 CPU ranks, one run.

    DS_ACCELERATOR=cpu python bench/zero2_bench.py            # 4 layers, d=256, V=8192
    DS_ACCELERATOR=cpu python bench/zero2_bench.py --steps 40 --layers 2

Both engines get the same param groups (embedding alone, decayed matrices, the rest), so ZeRO
lays out identical flat partitions and the only difference is the coupling: CoupledAdam's
shared column denominator and one all-reduce of H float32 column sums per coupled matrix.
Steps of the two engines are interleaved in rounds so that load from other processes hits both
alike; the script prints median per-step times, their ratio, and the bytes the coupling adds.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _ranks import add_gpt_args, init_rank, paired_rounds, spawn  # noqa: E402  (bench/_ranks.py)
from gpt import GPT, GPTConfig  # noqa: E402  (examples/gpt.py, the demo's model)


def _groups(model: nn.Module, coupled: bool) -> list[dict]:
    from coupled_ds import coupled_param_groups

    groups = coupled_param_groups(model, weight_decay=0.1)
    if not coupled:  # same layout, plain AdamW semantics
        extra = ("coupled", "coupled_names", "vocab_size")
        groups = [{k: v for k, v in g.items() if k not in extra} for g in groups]
    return groups


def _engine(args: argparse.Namespace, coupled: bool):
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.block, n_layer=args.layers,
                          n_head=args.heads, d_model=args.d))
    params = {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    optimizer = ({"type": "CoupledAdam", "params": params} if coupled
                 else {"type": "AdamW", "params": {**params, "torch_adam": True}})
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "zero_optimization": {"stage": 2},
           "optimizer": optimizer, "steps_per_print": 10**9}
    if coupled:  # the JSON path builds its own groups from the model
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=_groups(model, False),
                                          config=cfg)
    return engine


def _step(engine, ids, targets) -> tuple[float, float]:
    start = time.perf_counter()
    loss = engine(ids, targets)
    engine.backward(loss)
    mid = time.perf_counter()
    engine.step()
    end = time.perf_counter()
    return end - start, end - mid


def _rank(rank: int, world: int, args: argparse.Namespace, port: str, queue) -> None:
    init_rank(rank, world, port, args.threads)
    engines = {"AdamW": _engine(args, False), "CoupledAdam": _engine(args, True)}
    times = paired_rounds({name: functools.partial(_step, e) for name, e in engines.items()},
                          args, torch.Generator().manual_seed(rank))
    coupled_bytes = engines["CoupledAdam"].basic_optimizer.last_reduce_bytes
    if rank == 0:
        queue.put((times, coupled_bytes))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpt_args(parser, vocab=8192, d=256, heads=4, batch=4, steps=20)
    parser.add_argument("--port", default=None, help="default: a free port")
    args = parser.parse_args()
    times, coupled_bytes = spawn(_rank, 2, args, port=args.port)
    med = {name: (statistics.median(t), statistics.median(o)) for name, (t, o) in times.items()}
    best = {name: (min(t), min(o)) for name, (t, o) in times.items()}
    print(f"ZeRO-2, 2 CPU ranks, GPT {args.layers} layers d={args.d} V={args.vocab} "
          f"T={args.block} micro-batch {args.batch}, {args.steps} timed steps each")
    for name, (total, opt) in med.items():
        print(f"  {name:12s} median step {total * 1e3:7.1f} ms (optimizer step {opt * 1e3:6.1f} ms)"
              f"; fastest step {best[name][0] * 1e3:7.1f} ms")
    ratio = med["CoupledAdam"][0] / med["AdamW"][0]
    opt_ratio = med["CoupledAdam"][1] / med["AdamW"][1]
    print(f"  per-step time ratio CoupledAdam / AdamW: median {ratio:.3f}, fastest "
          f"{best['CoupledAdam'][0] / best['AdamW'][0]:.3f} (target <= 1.05); optimizer step "
          f"alone {opt_ratio:.3f}")
    print(f"  bytes the coupling adds per step and rank: {coupled_bytes} "
          f"({args.d} float32 column sums, one all-reduce)")


if __name__ == "__main__":
    main()
