"""FSDP2 step time: CoupledAdam vs torch AdamW on the same FSDP2 GPT, CPU ranks, one run.

    python bench/fsdp2_bench.py                        # 2 ranks, FSDP2, 4 layers, d=256, V=8192
    python bench/fsdp2_bench.py --ranks 4 --tp 2       # 2 x 2 mesh: FSDP2 x vocabulary TP
    python bench/fsdp2_bench.py --steps 40 --layers 2

Both models are built, sharded and grouped identically (examples/train_fsdp2.py's
``parallelize`` and ``coupled_param_groups``); one is stepped by CoupledAdam, the other by
``torch.optim.AdamW`` (foreach, torch's default) with the same groups, so the only difference is
the coupling: the local coupled kernels on each rank's row block and one all-reduce of H float32
column sums per coupled matrix. Steps of the two are interleaved in rounds (who goes first
alternates) so load from other processes hits both alike; the script prints median per-step
times (forward + backward + step), the median of the per-round ratios (each CoupledAdam step
over the AdamW step of the same round: the pairing cancels slow phases of the machine), the
optimizer step alone, the bytes the coupling adds, and the load average at the start and end.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _ranks import add_gpt_args, init_rank, paired_rounds, spawn  # noqa: E402  (bench/_ranks.py)


def _model_and_optimizer(args: argparse.Namespace, mesh, coupled: bool):
    from gpt import GPT, GPTConfig  # examples/gpt.py
    from train_fsdp2 import parallelize  # examples/train_fsdp2.py

    from coupled_ds import CoupledAdam, coupled_param_groups

    torch.manual_seed(0)
    model = parallelize(GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.block,
                                      n_layer=args.layers, n_head=args.heads, d_model=args.d)),
                        mesh)
    groups = coupled_param_groups(model, weight_decay=0.1)
    hp = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    if coupled:
        return model, CoupledAdam(groups, **hp)
    return model, torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                     for g in groups], **hp)


def _step(model, opt, ids, targets) -> tuple[float, float]:
    start = time.perf_counter()
    model(ids, targets).backward()
    mid = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return end - start, end - mid


def _rank(rank: int, world: int, args: argparse.Namespace, port: str, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    init_rank(rank, world, port, args.threads)
    mesh = init_device_mesh("cpu", (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
    runs = {"AdamW": _model_and_optimizer(args, mesh, False),
            "CoupledAdam": _model_and_optimizer(args, mesh, True)}
    gen = torch.Generator().manual_seed(mesh.get_local_rank("dp"))
    times = paired_rounds({name: functools.partial(_step, *run) for name, run in runs.items()},
                          args, gen)
    if rank == 0:
        queue.put((times, runs["CoupledAdam"][1].last_reduce_bytes))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    add_gpt_args(parser, vocab=8192, d=256, heads=4, batch=4, steps=20)
    parser.add_argument("--port", default=None, help="default: a free port")
    args = parser.parse_args()
    if args.ranks % args.tp:
        parser.error(f"--tp {args.tp} must divide --ranks {args.ranks}")
    load_start = os.getloadavg()[0]
    times, coupled_bytes = spawn(_rank, args.ranks, args, port=args.port)
    med = {name: (statistics.median(t), statistics.median(o)) for name, (t, o) in times.items()}
    print(f"FSDP2, {args.ranks} CPU ranks (mesh dp={args.ranks // args.tp} x tp={args.tp}), GPT "
          f"{args.layers} layers d={args.d} V={args.vocab} T={args.block} micro-batch "
          f"{args.batch}, {args.steps} timed steps each, {args.threads} thread(s) per rank")
    for name, (total, opt) in med.items():
        print(f"  {name:12s} median step {total * 1e3:7.1f} ms "
              f"(optimizer step {opt * 1e3:6.1f} ms)")
    paired = [c / a for c, a in zip(times["CoupledAdam"][0], times["AdamW"][0])]
    paired_opt = [c / a for c, a in zip(times["CoupledAdam"][1], times["AdamW"][1])]
    print(f"  per-step time ratio CoupledAdam / AdamW: median of paired rounds "
          f"{statistics.median(paired):.3f} (target <= 1.10), ratio of medians "
          f"{med['CoupledAdam'][0] / med['AdamW'][0]:.3f}; optimizer step alone "
          f"{statistics.median(paired_opt):.3f}")
    print(f"  bytes the coupling adds per step and rank: {coupled_bytes} "
          f"(H={args.d} float32 column sums per coupled matrix)")
    print(f"  load average (1 min): {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at "
          "the end")


if __name__ == "__main__":
    main()
