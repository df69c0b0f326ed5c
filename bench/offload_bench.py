"""ZeRO-Offload: CoupledAdam against DeepSpeedCPUAdam on the CPU side of a ZeRO-2 training step.

    DS_ACCELERATOR=cpu .venv/bin/python bench/offload_bench.py                # fp32 and bf16
    DS_ACCELERATOR=cpu .venv/bin/python bench/offload_bench.py --dtypes bf16 --steps 20 --ranks 1

Under ``zero_optimization.offload_optimizer: {device: cpu}`` every optimizer step of a run is a
CPU step on the flat fp32 master partition of each rank, and the optimizer a user would otherwise
get there is DeepSpeedCPUAdam (DeepSpeed's default for ``"type": "AdamW"`` under offload, an
AVX-512 / AVX2 C++ kernel built with ``-march=native``). One process per rank trains the demo's GPT
(``examples/gpt.py``) with three engines side by side, on the same data and the same param
groups (embedding alone, decayed matrices, the rest), so ZeRO lays out identical partitions:

* ``DeepSpeedCPUAdam``: ``"type": "AdamW"`` (JIT-builds DeepSpeed's cpu_adam op the first time,
  a few minutes; it is cached under ``~/.cache/torch_extensions`` afterwards. Never kill the
  process while it builds: a killed build leaves a lock there that hangs every later build);
* ``CoupledAdam (JSON)``: ``"type": "CoupledAdam"``, as a user gets it from the config;
* ``CoupledAdam, fused rest``: the same optimizer passed as a callable with ``fused=True`` (the
  ``optimizer=`` route). The JSON path now also runs torch's fused AdamW for the uncoupled groups
  on CPU (it used torch's single-tensor default there, several whole-tensor passes per op), so
  the two CoupledAdam rows should agree; a gap between them is noise.

With ``bf16`` the model's parameters are bf16 and the optimizer steps fp32 master weights; in
DeepSpeed 0.19.8 ZeRO-2 copies the stepped fp32 partition back to the bf16 parameters after the
optimizer for every optimizer alike (the in-kernel copy of DeepSpeedCPUAdam is disabled there).

Timed per engine on rank 0 (ranks are in lockstep through the collectives): the whole training
step (forward, backward, ``engine.step()``), ``engine.step()`` (gradient norm, clipping, the
optimizer, the copy back to the model's parameters), the base optimizer's own ``step()`` calls
inside it, and then the optimizer alone: the base optimizer stepping the engine's flat fp32
master partitions group by group as ZeRO-2 does, with fixed gradients, back to back (a tighter
pairing than steps a second of forward and backward apart). Engines take turns in rounds (the
order rotates), and each ratio is the median of per-round ratios against DeepSpeedCPUAdam, so
load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
from _ranks import add_gpt_args, init_rank, spawn  # noqa: E402  (bench/_ranks.py)
from gpt import GPT, GPTConfig  # noqa: E402  (examples/gpt.py, the demo's model)

ENGINES = ("DeepSpeedCPUAdam", "CoupledAdam (JSON)", "CoupledAdam, fused rest")
HP = {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


def _model(args: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.block, n_layer=args.layers,
                         n_head=args.heads, d_model=args.d))


def _engine(args: argparse.Namespace, kind: str, dtype: str):
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401  (registers "CoupledAdam")
    from coupled_ds import CoupledAdam, coupled_param_groups

    model = _model(args)
    groups = coupled_param_groups(model, weight_decay=HP["weight_decay"])
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
           "gradient_clipping": 1.0, "steps_per_print": 10**9,
           "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    optimizer = None
    if kind == "DeepSpeedCPUAdam":  # same groups without the coupling keys: same partitions
        extra = ("coupled", "coupled_names", "vocab_size", "avg_scale")
        groups = [{k: v for k, v in g.items() if k not in extra} for g in groups]
        cfg["optimizer"] = {"type": "AdamW", "params": HP}
    elif kind == "CoupledAdam (JSON)":
        cfg["optimizer"] = {"type": "CoupledAdam", "params": HP}
    else:
        def optimizer(params):
            return CoupledAdam(params, lr=HP["lr"], betas=tuple(HP["betas"]), eps=HP["eps"],
                               weight_decay=HP["weight_decay"], fused=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg,
                                      optimizer=optimizer)
    base = engine.basic_optimizer
    want = "DeepSpeedCPUAdam" if kind == "DeepSpeedCPUAdam" else "CoupledAdam"
    if type(base).__name__ != want or not engine.zero_cpu_offload():
        raise RuntimeError(f"{kind}: DeepSpeed built {type(base).__name__} (offload "
                           f"{engine.zero_cpu_offload()}), expected {want} under offload")
    return engine


def _timed_base_step(engine) -> list[float]:
    """Wrap the base optimizer's step() to record its seconds per engine step (it is called
    once per param group under ZeRO-2)."""
    base = engine.basic_optimizer
    inner = base.step
    spent = [0.0]

    def step(*a, **kw):
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        spent[0] += time.perf_counter() - t0
        return out

    base.step = step
    return spent


def _optimizer_only(engine, seed: int, reduce_s: list[float] | None = None):
    """The base optimizer's steps as ZeRO-2 makes them (one call per param group, with
    ``param_groups`` set to that group), on the engine's flat fp32 master partitions with fixed
    gradients: the optimizer step alone, repeatable without forward and backward. With
    ``reduce_s`` (CoupledAdam), each step appends the seconds it spent in the column-sum
    all-reduce."""
    zero, base = engine.optimizer, engine.basic_optimizer
    gen = torch.Generator().manual_seed(seed)
    for flat in zero.single_partition_of_fp32_groups:
        flat.grad = torch.randn(flat.shape, generator=gen) * 1e-3

    def step() -> None:
        groups, spent = base.param_groups, 0.0
        try:
            for group in groups:
                base.param_groups = [group]
                if reduce_s is not None:  # a group without coupled matrices reduces nothing
                    base.last_reduce_seconds = 0.0
                base.step()
                if reduce_s is not None:
                    spent += base.last_reduce_seconds
        finally:
            base.param_groups = groups
        if reduce_s is not None:
            reduce_s.append(spent)

    return step


def _rounds(fns: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, in rounds with a rotating order. Every call starts
    after a barrier, so a coupled step's all-reduce does not also time how far behind the other
    rank was (DeepSpeedCPUAdam has no collective inside its step)."""
    names = list(fns)
    out = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        if (index // len(names)) % 2:
            order.reverse()
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            fns[name]()
            if index >= warmup:
                out[name].append(time.perf_counter() - t0)
    return out


def _rank(rank: int, world: int, args: argparse.Namespace, port: str, queue) -> None:
    init_rank(rank, world, port, args.threads)
    from coupled_ds import cpu_kernels

    results = {"simd": cpu_kernels.simd_level(), "dtypes": {}}
    for dtype in args.dtypes.split(","):
        engines = {kind: _engine(args, kind, dtype) for kind in ENGINES}
        spent = {kind: _timed_base_step(engine) for kind, engine in engines.items()}
        gen = torch.Generator().manual_seed(rank)
        times = {kind: {"train step": [], "engine.step()": [], "optimizer step()": []}
                 for kind in ENGINES}
        for round_index in range(args.warmup + args.steps):
            ids = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=gen)
            shift = round_index % len(ENGINES)
            order = list(ENGINES[shift:] + ENGINES[:shift])
            if (round_index // len(ENGINES)) % 2:
                order.reverse()
            for kind in order:
                engine = engines[kind]
                spent[kind][0] = 0.0
                t0 = time.perf_counter()
                engine.backward(engine(ids[:, :-1], ids[:, 1:]))
                t1 = time.perf_counter()
                engine.step()
                t2 = time.perf_counter()
                if round_index >= args.warmup:
                    times[kind]["train step"].append(t2 - t0)
                    times[kind]["engine.step()"].append(t2 - t1)
                    times[kind]["optimizer step()"].append(spent[kind][0])
        # The optimizer alone, back to back (tighter pairs than inside a training step), and
        # how much of a CoupledAdam step is the all-reduce of the column sums.
        reduce_s = {kind: [] for kind in ENGINES if kind != "DeepSpeedCPUAdam"}
        alone = _rounds({kind: _optimizer_only(engine, rank, reduce_s.get(kind))
                         for kind, engine in engines.items()}, args.opt_rounds, 2)
        for kind in ENGINES:
            times[kind]["optimizer alone"] = alone[kind]
            if kind in reduce_s:  # the 2 warm-up rounds are not kept
                times[kind]["of which the all-reduce"] = reduce_s[kind][2:]
        numel = sum(p.numel() for p in engines[ENGINES[0]].module.parameters())
        results["dtypes"][dtype] = {"times": times, "params": numel}
        del engines
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def _table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))


def _cpu_adam_note() -> str:
    """Whether DeepSpeed's cpu_adam op is built already (else the first engine builds it)."""
    try:
        import torch.utils.cpp_extension as cpp_extension
        from deepspeed.ops.op_builder import CPUAdamBuilder

        build_dir = Path(cpp_extension._get_build_directory(CPUAdamBuilder().name, False))
        if any(build_dir.glob("*.so")):
            return f"DeepSpeed cpu_adam op: built ({build_dir})"
    except Exception as exc:  # noqa: BLE001 - a note, not a failure
        return f"DeepSpeed cpu_adam op: unknown ({type(exc).__name__}: {exc})"
    return ("DeepSpeed cpu_adam op: not built yet; the first engine JIT-builds it (a few "
            "minutes; do not interrupt it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_gpt_args(parser, vocab=32768, d=384, heads=6, batch=2, steps=12, steps_help="timed rounds")
    parser.add_argument("--opt-rounds", type=int, default=15,
                        help="rounds of the optimizer step alone, back to back")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16", help="model parameter dtypes to run")
    args = parser.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# ZeRO-2 offload_optimizer=cpu: {args.ranks} CPU ranks x {args.threads} thread(s), GPT "
          f"{args.layers} layers d={args.d} V={args.vocab} T={args.block} micro-batch "
          f"{args.batch}; {args.steps} timed rounds; load average {load}")
    print(f"  {_cpu_adam_note()}")
    start = time.perf_counter()
    results = spawn(_rank, args.ranks, args, timeout=7200)
    print(f"  coupled_ds C kernels: SIMD {results['simd']}")
    for dtype, result in results["dtypes"].items():
        times = result["times"]
        master = "fp32 params" if dtype == "fp32" else "bf16 params, fp32 master weights"
        print(f"\n## {dtype} ({master}; {result['params'] / 1e6:.1f}M parameters)")
        for what in times[ENGINES[0]]:
            rows = []
            for kind in ENGINES:
                cand, base = times[kind][what], times[ENGINES[0]][what]
                ratio = statistics.median(c / b for c, b in zip(cand, base))
                rows.append((kind, f"{statistics.median(cand) * 1e3:.1f}", f"{ratio:.3f}x",
                             f"{min(cand) / min(base):.3f}x"))
            _table(rows, (what, "ms (median)", "ratio", "fastest"))
            print()
        if args.ranks > 1:
            base = times[ENGINES[0]]["optimizer alone"]
            for kind in ENGINES[1:]:
                spent = times[kind]["of which the all-reduce"]
                rest = [t - r for t, r in zip(times[kind]["optimizer alone"], spent)]
                without = statistics.median(r / b for r, b in zip(rest, base))
                print(f"  {kind}, optimizer alone: the all-reduce of the [H] column sums (gloo, "
                      f"including the wait for the other rank) took "
                      f"{statistics.median(spent) * 1e3:.2f} ms of each step; without it "
                      f"{without:.3f}x")
            print()
    print("targets: training step <= 1.05x and optimizer step <= 1.15x DeepSpeedCPUAdam's; "
          "ratio: median of per-round ratios; fastest: fastest step over fastest step (the "
          "steadier figure on a loaded machine)")
    print(f"(total {time.perf_counter() - start:.0f} s; load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
