"""The prepared GPU check: run once on a machine with a CUDA GPU and Triton, then copy the
printed table into README "Performance". Takes about 1-2 minutes (mostly Triton compiles).

    python bench/gpu_check.py                 # writes $OUT/gpu_check.json when $OUT is set
    python bench/gpu_check.py --quick         # correctness only
    python bench/gpu_check.py --sweep         # also time alternative Triton launch shapes

It checks, in order:
1. tests/test_triton.py (the kernels and the whole step against torch ops and float64);
2. CoupledAdam on CUDA (fast = Triton, compact, reference torch ops) against the float64
   reference, fp32 and bf16, with vocab_size masking;
3. one step on [50304, 768] and [128256, 4096] fp32: CoupledAdam fast / compact / reference vs
   torch AdamW fused and foreach (CUDA events, median of 20 steps after 3 warm-up), and the
   achieved bandwidth: bytes that must cross HBM per step (coupled: 8 tensor passes, 5 reads
   + 3 writes; compact: 6; AdamW: 7) / time, against a device-to-device copy's bandwidth and the
   nominal peak (--peak-gbs, default 4800 GB/s for an H200).
Targets (issue 7): coupled step <= 1.15x fused AdamW; >= 80% of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from coupled_ds import CoupledAdam, kernels, triton_kernels  # noqa: E402
from tests.reference import coupled_adam_reference  # noqa: E402

HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def check_correctness() -> dict:
    """CoupledAdam on CUDA vs the float64 reference; returns max errors by configuration."""
    gen = torch.Generator().manual_seed(0)
    V, H, steps = 1000, 768, 10
    init = torch.randn(V, H, generator=gen)
    grads = [torch.randn(V, H, generator=gen) * (1 + torch.arange(H) / 100) for _ in range(steps)]
    exact = coupled_adam_reference(init, grads, **HP, vocab_size=977)
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, options in (("fast", {}), ("compact", {"compact_coupled_state": True}),
                              ("reference", {"blocked": False})):
            p = torch.nn.Parameter(init.to(dtype).cuda())
            opt = CoupledAdam([{"params": [p], "coupled": True, "vocab_size": 977}], **HP, **options)
            for g in grads:
                p.grad = g.to(dtype).cuda()
                opt.step()
            err = (p.detach().double().cpu() - exact).abs().max().item()
            errors[f"{name} {str(dtype).split('.')[-1]}"] = err
    assert kernels.backend_for(torch.zeros(1, device="cuda")) == "triton", "Triton path not taken"
    bad = {k: e for k, e in errors.items() if e > (1e-5 if "float32" in k else 3e-2)}
    if bad:
        raise SystemExit(f"GPU correctness FAILED: {bad}")
    return errors


def _median_ms(fn, steps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_shape(V: int, H: int, peak_gbs: float) -> list[dict]:
    n = V * H
    p = torch.nn.Parameter(torch.randn(V, H, device="cuda") * 0.02)
    p.grad = torch.randn(V, H, device="cuda") * 1e-3
    src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    copy_ms = _median_ms(lambda: dst.copy_(src))
    copy_gbs = 2 * n * 4 / copy_ms / 1e6
    hp = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    candidates = {
        "torch AdamW fused": (lambda: torch.optim.AdamW([p], **hp, fused=True), 7),
        "torch AdamW foreach": (lambda: torch.optim.AdamW([p], **hp, foreach=True), 7),
        "CoupledAdam fast (Triton)": (lambda: CoupledAdam([{"params": [p], "coupled": True}], **hp), 8),
        "CoupledAdam compact": (lambda: CoupledAdam([{"params": [p], "coupled": True}], **hp,
                                                     compact_coupled_state=True), 6),
        "CoupledAdam reference ops": (lambda: CoupledAdam([{"params": [p], "coupled": True}], **hp,
                                                           blocked=False), 8),
    }
    rows, fused_ms = [], None
    for name, (make, passes) in candidates.items():
        opt = make()
        opt.step()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        ms = _median_ms(opt.step)
        fused_ms = fused_ms or ms
        gbs = passes * n * 4 / ms / 1e6
        rows.append(dict(shape=f"{V}x{H}", name=name, ms=ms, ratio=ms / fused_ms, gbs=gbs,
                         of_copy=gbs / copy_gbs, of_peak=gbs / peak_gbs,
                         step_extra_mib=extra / 2**20))
        del opt
    rows.append(dict(shape=f"{V}x{H}", name="device copy (bandwidth probe)", ms=copy_ms, ratio=None,
                     gbs=copy_gbs, of_copy=1.0, of_peak=copy_gbs / peak_gbs, step_extra_mib=0))
    return rows


_LAUNCH_KNOBS = ("ROWS", "BLOCK_COLS", "WARPS_PHASE1", "ROWS_PHASE2", "BLOCK_COLS_PHASE2",
                 "WARPS_PHASE2")


def sweep_launch_shapes(V: int, H: int) -> list[tuple]:
    """Phase-1 and phase-2 time for alternative launch shapes of the Triton kernels."""
    m, v, g = (torch.rand(V, H, device="cuda") for _ in range(3))
    p = torch.randn(V, H, device="cuda")
    acc = torch.zeros(H, device="cuda")
    denom = torch.rand(H, device="cuda") + 0.5
    defaults = {name: getattr(triton_kernels, name) for name in _LAUNCH_KNOBS}
    out = []
    try:
        for rows in (32, 64, 128):
            for block in (256, 512, 1024):
                for warps in (2, 4, 8):
                    triton_kernels.ROWS, triton_kernels.BLOCK_COLS = rows, block
                    triton_kernels.WARPS_PHASE1 = warps
                    ms = _median_ms(lambda: triton_kernels.phase1_rows_(
                        acc, m, v, g, rows=V, H=H, rows_acc=V, beta1=0.9, beta2=0.95,
                        maximize=False), steps=10)
                    out.append(("phase1", rows, block, warps, ms, 5 * V * H * 4 / ms / 1e6))
        for rows in (4, 8, 16):
            for block in (128, 256, 512):
                for warps in (4, 8):
                    triton_kernels.ROWS_PHASE2, triton_kernels.BLOCK_COLS_PHASE2 = rows, block
                    triton_kernels.WARPS_PHASE2 = warps
                    ms = _median_ms(lambda: triton_kernels.phase2_rows_(
                        p, m, denom, rows=V, H=H, step_size=1e-4, decay=1.0), steps=10)
                    out.append(("phase2", rows, block, warps, ms, 3 * V * H * 4 / ms / 1e6))
    finally:
        for name, value in defaults.items():
            setattr(triton_kernels, name, value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-gbs", type=float, default=4800.0)
    parser.add_argument("--shapes", default="50304x768,128256x4096")
    parser.add_argument("--sweep", action="store_true",
                        help="also time alternative Triton launch shapes on [128256, 4096]")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not triton_kernels.available():
        raise SystemExit(f"needs CUDA and Triton (cuda={torch.cuda.is_available()}, "
                         f"triton={triton_kernels.available()})")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x",
                          str(ROOT / "tests/test_triton.py")], cwd=ROOT)
    if rc != 0:
        raise SystemExit("Triton kernel tests FAILED")
    errors = check_correctness()
    print("max |error| vs float64 reference after 10 steps:",
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    result = {"device": torch.cuda.get_device_name(), "errors": errors, "rows": []}
    if not args.quick:
        for shape in args.shapes.split(","):
            V, H = (int(x) for x in shape.split("x"))
            result["rows"] += bench_shape(V, H, args.peak_gbs)
        print("\n| shape | implementation | ms | vs fused AdamW | GB/s | of copy BW | of peak | "
              "step extra MiB |\n|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            print(f"| {r['shape']} | {r['name']} | {r['ms']:.2f} | {ratio} | {r['gbs']:.0f} | "
                  f"{r['of_copy']:.0%} | {r['of_peak']:.0%} | {r['step_extra_mib']:.0f} |")
    if args.sweep:
        result["sweep"] = sweep_launch_shapes(128256, 4096)
        print("\n| kernel | ROWS | BLOCK | warps | ms | GB/s |\n|---|---|---|---|---|---|")
        for kernel, rows, block, warps, ms, gbs in sorted(result["sweep"], key=lambda r: (r[0], r[4])):
            print(f"| {kernel} | {rows} | {block} | {warps} | {ms:.3f} | {gbs:.0f} |")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
