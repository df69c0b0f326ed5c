"""One optimizer step, Coupled Adam against the alternatives, side by side in one process.

    make bench                                   # default: about 2-3 minutes on 2 cores
    .venv/bin/python bench/step_bench.py --shapes 50304x768,50304x4096,128256x4096 --steps 9
    .venv/bin/python bench/step_bench.py --only matrix --threads 1
    .venv/bin/python bench/step_bench.py --threads 1 --clock thread   # on a busy shared machine
    .venv/bin/python bench/step_bench.py --deepspeed   # also JIT-build DeepSpeedCPUAdam (minutes)

Sections (``--only`` picks some): ``matrix`` (one [V, H] step per implementation, then the first
shape again in bf16 unless ``--no-bf16``), ``gpt2`` (the whole parameter set of a
GPT-2-small-shaped model, only the embedding coupled), ``dist`` (2 gloo ranks: what the
cross-rank reduction adds, in time and bytes).

How it measures, and why:

* Time: median of ``--steps`` steps after 2 warm-up steps. This machine is shared, so every
  candidate is timed in rounds with torch's fused AdamW on a matrix of the same shape and the
  two copy references below (the order rotates each round), and its ratio is the median of the
  per-round ratios: a load spike slows a whole round; "fastest" is the ratio of the two fastest
  steps (the least disturbed ones, the steadier figure on a loaded machine). A second fused
  AdamW instance is timed the same way as a control: its ratios show the noise of the
  measurement. The load average is printed at start and end.
* Roofline: the step is memory-bound, so each row also gives its bandwidth, the bytes its
  algorithm must move (tensor passes x tensor bytes: 7 for AdamW, 8 for coupled full state, 6
  for compact, 5 / 3 / 3 for the C phase kernels alone) over its median time, and that as a
  fraction of a copy's bandwidth measured in the same rounds ("% of copy"). Where a core's
  traffic is limited by the reads it can have in flight rather than by the memory bus, writing
  back a line just read costs little, and reads are what count: AdamW reads 4 tensors per
  element, coupled full state 5, compact 4. "% of R/W" is the row's time against that model
  (reads and write-backs each priced by a read-only and an in-place pass in the same rounds),
  and the footer gives the floors both models set (see :class:`Roofline`). Numbers from
  different machines compare through these columns. The header names the SIMD level the C
  kernels dispatched to on this CPU and the transparent-huge-page setting (CoupledAdam puts
  its state in huge pages, :mod:`coupled_ds.hugepages`; the row "torch AdamW fused, its state
  in huge pages" shows what that placement alone gives torch's AdamW); the coupled steps are
  also timed on every other variant the CPU runs ("same, avx2 kernels" on an AVX-512 machine).
* Peak memory of a step: tracemalloc cannot see torch's allocations, so the bench resets the
  kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets VmHWM) right before one
  step and reports VmHWM minus the RSS before it. Tensors of a matrix's size are far above
  glibc's mmap threshold (32 MiB at most), so each temporary of that size shows up in full;
  small temporaries may be served from already-resident heap and read as 0. "state" is the
  persistent optimizer state (sum of the state tensors' bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from coupled_ds import CoupledAdam, ShardGeometry, cpu_kernels, hugepages, kernels  # noqa: E402

HP = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
# What the rounds are timed with: wall time, or with --clock thread (one thread only) the CPU
# time of the calling thread, which leaves out the time the OS gave the core to other jobs.
CLOCK: Callable[[], float] = time.perf_counter
MiB = 1 << 20


# ---------------------------------------------------------------------------- machine
def describe_machine() -> list[str]:
    model, cpus = platform.processor() or "?", os.cpu_count()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict((k.strip(), v.strip()) for k, v in
                      (line.split(":", 1) for line in lscpu.splitlines() if ":" in line))
        model = fields.get("Model name", model)
        cpus = fields.get("CPU(s)", cpus)
        caches = ", ".join(f"{k.split()[0]} {fields[k]}" for k in ("L2 cache", "L3 cache")
                           if k in fields)
    except (OSError, subprocess.SubprocessError):
        caches = "?"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lib = cpu_kernels.library()
    if lib is None:
        native = f"unavailable ({cpu_kernels.unavailable_reason()})"
    else:
        native = (f"loaded, SIMD {cpu_kernels.simd_level()} (variants this CPU runs: "
                  f"{', '.join(cpu_kernels.simd_levels())}), "
                  + ("OpenMP on torch's thread pool" if lib.coupled_uses_openmp() else "pthreads"))
    return [f"CPU: {model}, {cpus} CPUs ({caches}); load average {load}",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"SIMD {torch.backends.cpu.get_cpu_capability()}, Python {platform.python_version()}",
            f"coupled_ds C kernels: {native}", hugepages.status()]


def c_build_seconds() -> float | None:
    """Cold build time of the C kernels (the one-off cost of the first CoupledAdam)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            cpu_kernels._compile(Path(tmp) / "probe.so")
        except (OSError, RuntimeError, subprocess.SubprocessError):
            return None
        return time.perf_counter() - start


# ---------------------------------------------------------------------------- measuring
def _rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def step_peak_bytes(step: Callable[[], object]) -> int | None:
    """Peak RSS above the RSS before one step (None where /proc cannot reset the peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_bytes("VmRSS")
    step()
    peak = _rss_bytes("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def time_rounds(members: list[Callable[[], object]], steps: int) -> list[list[float]]:
    """Seconds per call of each member, timed in rounds that call every member once.

    The order rotates from round to round (A B C, B C A, C A B, then reversed), so no member
    always runs first or after the same neighbour, and a load spike hits a whole round.
    """
    for _ in range(2):
        for fn in members:
            fn()
    times: list[list[float]] = [[] for _ in members]
    k = len(members)
    for i in range(steps):
        order = [(j + i) % k for j in range(k)]
        if (i // k) % 2:
            order.reverse()
        for j in order:
            t0 = CLOCK()
            members[j]()
            times[j].append(CLOCK() - t0)
    return times


class Roofline:
    """What a plain streaming pass costs on this machine, measured next to each row, in two models.

    Bytes: ``dst.copy_(src)`` and an in-place pass ``x.mul_(1)`` over a tensor of the matrix's
    size, both counted as one read and one write. On a write-allocate cache a copy also reads its
    destination (read-for-ownership) unless it uses non-temporal stores, so on some machines the
    in-place pass is the faster one; in-place optimizers read every tensor they write, so the
    faster of the two is the bound they can reach. A row's "% of copy" is its bytes per second
    (the bytes its algorithm must move, over its time) against that bound in the same round.

    Reads and writes: a read-only pass (the faster of ``x.sum()`` and ``x.amax()``) gives the
    time of reading one tensor, t_r; the in-place pass minus it gives what writing the tensor
    back adds, t_w. Where a core's memory traffic is limited by the lines it can have in flight
    (reads), write-backs of lines just read ride along and t_w is near 0; where the memory bus
    itself is the limit, t_w is near t_r and this model becomes the bytes model. A step with R
    tensor reads and W tensor writes per element then takes at least R t_r + W t_w ("% of R/W"),
    and the coupled steps' floors against fused AdamW follow from the measured t_w / t_r:
    (5 t_r + 3 t_w) / (4 t_r + 3 t_w) for full state, (4 t_r + 2 t_w) / (4 t_r + 3 t_w) compact.
    """

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32) -> None:
        self.src = torch.ones(numel, dtype=dtype)
        self.dst = torch.zeros(numel, dtype=dtype)
        self.bytes = 2 * numel * self.src.element_size()
        self.best_gbs: list[float] = []
        self.read_s: list[float] = []
        self.write_s: list[float] = []

    def members(self) -> list[Callable[[], object]]:
        return [lambda: self.dst.copy_(self.src), lambda: self.src.mul_(1.0),
                lambda: self.src.sum(), lambda: self.src.amax()]

    def round_bandwidths(self, copy_s: list[float], inplace_s: list[float]) -> list[float]:
        """Bytes per second of the faster reference, per round."""
        out = [self.bytes / min(c, p) for c, p in zip(copy_s, inplace_s)]
        self.best_gbs += [b / 1e9 for b in out]
        return out

    def round_read_write(self, inplace_s: list[float], sum_s: list[float], amax_s: list[float]
                         ) -> list[tuple[float, float]]:
        """(t_r, t_w) per round: seconds to read one tensor, and what writing it back adds. A
        read-only reference slower than the in-place pass is compute-bound; t_r is then the
        in-place pass's time and t_w 0."""
        out = []
        for inplace, a, b in zip(inplace_s, sum_s, amax_s):
            t_r = min(a, b, inplace)
            out.append((t_r, inplace - t_r))
        self.read_s += [r for r, _ in out]
        self.write_s += [w for _, w in out]
        return out

    def write_share(self) -> float:
        """Median t_w / t_r: 0 where write-backs ride along with reads, 1 where bytes count."""
        return statistics.median(w / r for r, w in zip(self.read_s, self.write_s))

    def floor(self, reads: float, writes: float, base_reads: float, base_writes: float) -> float:
        """The R/W model's floor of one step against another, with the median t_w / t_r."""
        w = self.write_share()
        return (reads + writes * w) / (base_reads + base_writes * w)

    def describe(self) -> str:
        if not self.best_gbs:
            return "not measured"
        gbs = sorted(self.best_gbs)
        return (f"{statistics.median(gbs):.1f} GB/s median over {len(gbs)} rounds "
                f"(range {gbs[0]:.1f}-{gbs[-1]:.1f})")

    def describe_read_write(self) -> str:
        if not self.read_s:
            return "not measured"
        numel_bytes = self.bytes / 2
        return (f"reading a tensor {statistics.median(self.read_s) * 1e3:.2f} ms "
                f"({numel_bytes / statistics.median(self.read_s) / 1e9:.1f} GB/s), writing it "
                f"back adds {self.write_share():.0%} of that")


def time_against(step: Callable[[], object], baseline: Callable[[], object], steps: int,
                 roofline: Roofline | None = None, traffic: tuple[float, float] | None = None,
                 tensor_bytes: int = 0) -> tuple:
    """(candidate ms, baseline ms, median ratio candidate/baseline per round, ratio of the
    fastest candidate step to the fastest baseline step, candidate GB/s, median fraction of the
    copy bound per round, median fraction of the R/W bound per round; the last three None
    without a roofline). ``traffic`` is (tensor reads, tensor writes) per element of a tensor of
    ``tensor_bytes``. On a loaded machine the fastest steps are the ones least disturbed, so the
    second ratio is the steadier one."""
    members = [step, baseline] + (roofline.members() if roofline else [])
    times = time_rounds(members, steps)
    cand, base = times[0], times[1]
    ratio = statistics.median(c / b for c, b in zip(cand, base))
    gbs = frac = frac_rw = None
    if roofline is not None and traffic:
        reads, writes = traffic
        step_bytes = (reads + writes) * tensor_bytes
        bound = roofline.round_bandwidths(times[2], times[3])
        gbs = step_bytes / statistics.median(cand) / 1e9
        frac = statistics.median(step_bytes / c / b for c, b in zip(cand, bound))
        rw = roofline.round_read_write(times[3], times[4], times[5])
        frac_rw = statistics.median((reads * t_r + writes * t_w) / c
                                    for c, (t_r, t_w) in zip(cand, rw))
    return (statistics.median(cand) * 1e3, statistics.median(base) * 1e3, ratio,
            min(cand) / min(base), gbs, frac, frac_rw)


# ---------------------------------------------------------------------------- candidates
class AuthorsForeachCoupled:
    """The authors' algorithm written the straightforward way (their code is a copy of torch
    2.4's foreach AdamW): full v, mean over rows at read time, full-size denominators."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float = 0.0) -> None:
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0
        self.state = {i: {"exp_avg": m, "exp_avg_sq": v} for i, (m, v) in enumerate(zip(self.m, self.v))}

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        grads = [p.grad for p in self.params]
        torch._foreach_mul_(self.params, 1 - self.lr * self.wd)
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, 1 - b2)
        vbar = [v.mean(0, keepdim=True).expand_as(v) for v in self.v]
        denom = torch._foreach_sqrt(vbar)  # full size, as torch 2.4's foreach AdamW
        torch._foreach_div_(denom, (1 - b2**self.t) ** 0.5)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, self.m, denom, -self.lr / (1 - b1**self.t))


def deepspeed_candidates(allow_build: bool) -> tuple[dict[str, Callable], list[str]]:
    """DeepSpeed's FusedAdam / DeepSpeedCPUAdam where their ops are built (or --deepspeed builds
    them), and why not otherwise. With DS_ACCELERATOR=cpu both are DeepSpeed's CPU C++ ops."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    notes: list[str] = []
    out: dict[str, Callable] = {}
    try:
        import torch.utils.cpp_extension as cpp_extension
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
        from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
    except Exception as exc:  # noqa: BLE001 - any import failure is a reportable outcome
        return {}, [f"DeepSpeed optimizers: import failed ({type(exc).__name__}: {exc})"]
    makers = {
        "DeepSpeed FusedAdam": (FusedAdamBuilder(),
                                lambda ps: FusedAdam(ps, **HP, weight_decay=0.0, adam_w_mode=True)),
        "DeepSpeedCPUAdam": (CPUAdamBuilder(),
                             lambda ps: DeepSpeedCPUAdam(ps, **HP, weight_decay=0.0, adamw_mode=True)),
    }
    for label, (builder, make) in makers.items():
        build_dir = Path(cpp_extension._get_build_directory(builder.name, False))
        if not builder.is_compatible(verbose=False):
            notes.append(f"{label}: its op is not compatible with this machine")
            continue
        if not (any(build_dir.glob("*.so")) or allow_build):
            notes.append(f"{label}: not run (its C++ op is not built here; pass --deepspeed to "
                         "JIT-build it: about 4 minutes on 2 cores)")
            continue
        try:
            probe = torch.nn.Parameter(torch.zeros(4))
            probe.grad = torch.zeros(4)
            make([probe]).step()
            out[label] = make
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{label}: failed to build or run ({type(exc).__name__}: {str(exc)[:160]})")
    return out, notes


# Tensor reads and writes each algorithm must make per element (an in-place write of a tensor
# just read is one write): AdamW reads p, g, m, v and writes p, m, v; coupled full state reads m
# once more (the column means must be complete before any row is updated, so phase 1 reads g, m,
# v and writes m, v, phase 2 reads p, m and writes p); compact state drops v (2 + 1, then 2 + 1).
ADAMW_RW, COUPLED_RW, COMPACT_RW = (4, 3), (5, 3), (4, 2)
ADAMW_PASSES, COUPLED_PASSES, COMPACT_PASSES = (sum(rw) for rw in
                                                (ADAMW_RW, COUPLED_RW, COMPACT_RW))


class AdamWStateInHugePages(torch.optim.AdamW):
    """torch's fused AdamW with its state moved to huge pages as CoupledAdam allocates its own
    (coupled_ds.hugepages): the control that shows what placement alone is worth."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__(params, **HP, weight_decay=0.0, fused=True)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        fresh = not self.state
        out = super().step(closure)
        if fresh:
            for state in self.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    moved = hugepages.zeros_like(state[key])
                    state[key] = moved.copy_(state[key])
        return out


def matrix_candidates(allow_ds_build: bool, full: bool = True
                      ) -> tuple[dict[str, tuple[Callable, tuple[int, int]]], list[str]]:
    """name -> (maker of an optimizer over a param list, (tensor reads, tensor writes) its
    algorithm needs per element)."""
    def coupled(**kw):
        return lambda ps: CoupledAdam([{"params": ps, "coupled": True}], **HP, weight_decay=0.0, **kw)

    out = {
        "torch AdamW fused": (lambda ps: torch.optim.AdamW(ps, **HP, weight_decay=0.0, fused=True),
                              ADAMW_RW),
        "torch AdamW fused, its state in huge pages": (AdamWStateInHugePages, ADAMW_RW),
        "torch AdamW foreach": (lambda ps: torch.optim.AdamW(ps, **HP, weight_decay=0.0,
                                                             foreach=True), ADAMW_RW),
        "authors-style foreach coupled": (lambda ps: AuthorsForeachCoupled(ps, **HP),
                                          COUPLED_RW),
        "CoupledAdam fast (default)": (coupled(), COUPLED_RW),
        "CoupledAdam compact state": (coupled(compact_coupled_state=True), COMPACT_RW),
        "CoupledAdam reference ops": (coupled(blocked=False), COUPLED_RW),
        # run with the C kernels switched off
        "CoupledAdam torch-chunked fallback": (coupled(), COUPLED_RW),
    }
    if not full:
        return {k: out[k] for k in ("torch AdamW fused", "CoupledAdam fast (default)",
                                    "CoupledAdam compact state")}, []
    if not hugepages.enabled():
        del out["torch AdamW fused, its state in huge pages"]
    ds, notes = deepspeed_candidates(allow_ds_build)
    out.update((name, (make, ADAMW_RW)) for name, make in ds.items())
    return out, notes


def kernel_candidates(opt: CoupledAdam, p: torch.Tensor
                      ) -> dict[str, tuple[Callable, tuple[int, int]]]:
    """Each C kernel alone on the matrix and state of a full-state CoupledAdam (where time goes
    inside the step): phase 1 with and without v, phase 2."""
    state = opt.state[p]
    m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
    V, H = p.shape
    acc_H = torch.zeros(H, dtype=torch.float64)
    denom_H = torch.full((H,), 1e-3)
    kw = dict(rows=V, H=H, rows_acc=V, beta1=HP["betas"][0], beta2=HP["betas"][1],
              maximize=False)
    return {
        "C phase 1: m, v and column sums of v": (
            lambda: cpu_kernels.phase1_rows_(acc_H, m, v, g, **kw), (3, 2)),
        "C phase 1, compact: m and column sums of g^2": (
            lambda: cpu_kernels.phase1_rows_(acc_H, m, None, g, **kw), (2, 1)),
        "C phase 2: p from m and the [H] denominator": (
            lambda: cpu_kernels.phase2_rows_(p.data, m, denom_H, rows=V, H=H, step_size=0.0,
                                             decay=1.0), (2, 1)),
    }


# ---------------------------------------------------------------------------- sections
def _table(rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))))


SLOW = ("CoupledAdam reference ops", "CoupledAdam torch-chunked fallback", "torch AdamW foreach")
HEADER = ("ms", "fused AdamW ms (paired)", "ratio", "fastest", "GB/s", "% of copy", "% of R/W",
          "step peak MiB", "state MiB")


def _row(name: str, timing: tuple, peak: int | None, state: int | None) -> tuple:
    ms, base_ms, ratio, fastest, gbs, frac, frac_rw = timing
    return (name, f"{ms:.1f}", f"{base_ms:.1f}", f"{ratio:.2f}x", f"{fastest:.2f}x",
            "" if gbs is None else f"{gbs:.1f}", "" if frac is None else f"{frac:.0%}",
            "" if frac_rw is None else f"{frac_rw:.0%}",
            "n/a" if peak is None else f"{peak / MiB:.0f}",
            "" if state is None else f"{state / MiB:.0f}")


def bench_matrix(V: int, H: int, steps: int, allow_ds_build: bool, slow: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
    size = torch.finfo(dtype).bits // 8
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    print(f"\n## One step on a [{V}, {H}] {name} matrix ({V * H * size / MiB:.0f} MiB per tensor)")
    torch.manual_seed(0)
    base_p = torch.nn.Parameter((torch.randn(V, H) * 0.02).to(dtype))
    base_p.grad = (torch.randn(V, H) * 1e-3).to(dtype)
    baseline = torch.optim.AdamW([base_p], **HP, weight_decay=0.0, fused=True)
    baseline.step()
    p = torch.nn.Parameter((torch.randn(V, H) * 0.02).to(dtype))
    p.grad = base_p.grad
    roofline = Roofline(V * H, dtype)
    candidates, notes = matrix_candidates(allow_ds_build, full=dtype == torch.float32)
    rows = []
    tensor_bytes = V * H * size
    for label, (make, traffic) in candidates.items():
        if label in SLOW and not slow:
            continue
        opt = make([p])
        saved = dict(cpu_kernels._state)
        if "fallback" in label:
            cpu_kernels._state.update(lib=None, reason="switched off by the bench")
        try:
            opt.step()  # state allocated outside the measurements
            peak = step_peak_bytes(opt.step)
            timing = time_against(opt.step, baseline.step, steps, roofline, traffic,
                                  tensor_bytes)
        finally:
            cpu_kernels._state.clear()
            cpu_kernels._state.update(saved)
        rows.append(_row(label, timing, peak, state_bytes(opt)))
        native = label in ("CoupledAdam fast (default)", "CoupledAdam compact state")
        if native and cpu_kernels.library() is not None:
            best = cpu_kernels.simd_level()
            for level in [lv for lv in cpu_kernels.simd_levels() if lv != best][::-1]:
                try:  # the same step on the other instruction-set variants this CPU runs
                    cpu_kernels.set_simd_level(level)
                    timing = time_against(opt.step, baseline.step, steps, roofline,
                                          traffic, tensor_bytes)
                finally:
                    cpu_kernels.set_simd_level(best)
                rows.append(_row(f"  same, {level} kernels", timing, None, None))
        if label == "CoupledAdam fast (default)" and cpu_kernels.library() is not None:
            for kernel, (fn, (reads, writes)) in kernel_candidates(opt, p).items():
                timing = time_against(fn, baseline.step, steps, roofline, (reads, writes),
                                      tensor_bytes)
                rows.append(_row(f"  {kernel} ({reads} reads, {writes} writes)", timing, None,
                                 None))
        del opt
    _table(rows, ("implementation", *HEADER))
    print(f"  copy bandwidth (the faster of dst.copy_(src) and an in-place x.mul_(1), paired "
          f"with the rows): {roofline.describe()}")
    print(f"  bytes each step must move: {ADAMW_PASSES} tensor passes for AdamW, "
          f"{COUPLED_PASSES} for coupled full state, {COMPACT_PASSES} for compact state; at "
          f"equal bandwidth the floor is {COUPLED_PASSES / ADAMW_PASSES:.3f}x and "
          f"{COMPACT_PASSES / ADAMW_PASSES:.3f}x fused AdamW")
    print(f"  reads and writes (R/W, paired with the rows): {roofline.describe_read_write()}; "
          f"so the floor here is {roofline.floor(*COUPLED_RW, *ADAMW_RW):.3f}x fused AdamW for "
          f"full state ({COUPLED_RW[0]} reads + {COUPLED_RW[1]} writes against "
          f"{ADAMW_RW[0]} + {ADAMW_RW[1]}) and {roofline.floor(*COMPACT_RW, *ADAMW_RW):.3f}x "
          f"for compact ({COMPACT_RW[0]} + {COMPACT_RW[1]})")
    for note in notes:
        print(f"  note: {note}")


def gpt2_small_params() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(tied embedding [50304, 768], matrices with decay, vectors and positions without)."""
    gen = torch.Generator().manual_seed(0)

    def t(*shape):
        p = torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.02)
        p.grad = torch.randn(*shape, generator=gen) * 1e-3
        return p

    wte, decay, no_decay = t(50304, 768), [], [t(1024, 768)]
    for _ in range(12):
        decay += [t(2304, 768), t(768, 768), t(3072, 768), t(768, 3072)]
        no_decay += [t(768), t(768), t(2304), t(768), t(768), t(768), t(3072), t(768)]
    no_decay += [t(768), t(768)]
    return wte, decay, no_decay


def bench_gpt2(steps: int) -> None:
    wte, decay, no_decay = gpt2_small_params()
    n = sum(p.numel() for p in [wte, *decay, *no_decay])
    print(f"\n## GPT-2-small parameter set ({n / 1e6:.1f}M params, tied [50304, 768] embedding "
          "coupled, the rest AdamW)")

    def groups(coupled):
        return [{"params": [wte], "weight_decay": 0.0, "coupled": coupled},
                {"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]

    baseline = torch.optim.AdamW(groups(False), **HP, fused=True)  # ignores the "coupled" key
    candidates = {
        "torch AdamW fused (second instance)": lambda: torch.optim.AdamW(groups(False), **HP,
                                                                         fused=True),
        "CoupledAdam fast, fused AdamW for the rest": lambda: CoupledAdam(groups(True), **HP,
                                                                          fused=True),
        "CoupledAdam compact, fused AdamW for the rest": lambda: CoupledAdam(
            groups(True), **HP, fused=True, compact_coupled_state=True),
    }
    roofline = Roofline(wte.numel())
    # Reads and writes in units of one embedding-sized tensor: AdamW's on every parameter, and
    # what the coupled embedding changes (one more read; compact: one write less).
    scale = n / wte.numel()
    adamw = (ADAMW_RW[0] * scale, ADAMW_RW[1] * scale)
    traffic = {name: (adamw[0] + r - ADAMW_RW[0], adamw[1] + w - ADAMW_RW[1])
               for name, (r, w) in (("torch AdamW fused (second instance)", ADAMW_RW),
                                    ("CoupledAdam fast, fused AdamW for the rest", COUPLED_RW),
                                    ("CoupledAdam compact, fused AdamW for the rest", COMPACT_RW))}
    baseline.step()
    rows = []
    for name, make in candidates.items():
        opt = make()
        opt.step()
        peak = step_peak_bytes(opt.step)
        timing = time_against(opt.step, baseline.step, steps, roofline, traffic[name],
                              wte.numel() * 4)
        rows.append(_row(name, timing, peak, state_bytes(opt)))
        del opt
    _table(rows, ("whole optimizer", *HEADER))
    full, compact = (traffic[f"CoupledAdam {kind}, fused AdamW for the rest"]
                     for kind in ("fast", "compact"))
    print(f"  copy bandwidth (on a tensor of the embedding's size): {roofline.describe()}; "
          f"floor at equal bandwidth: {sum(full) / sum(adamw):.3f}x full state, "
          f"{sum(compact) / sum(adamw):.3f}x compact")
    print(f"  R/W: {roofline.describe_read_write()}; floor {roofline.floor(*full, *adamw):.3f}x "
          f"full state, {roofline.floor(*compact, *adamw):.3f}x compact")


def _rank_step_costs(rank: int, world: int, V: int, H: int, steps: int) -> dict:
    """One rank's flat slice (cut mid-row): the coupled step with and without the reduction, and
    the time spent inside the reduction (which includes waiting for the slower rank)."""
    total = V * H
    per_rank = -(-total // world) + 3  # + 3: the cut between ranks falls mid-row
    start = min(total, rank * per_rank)
    numel = min(total, start + per_rank) - start
    gen = torch.Generator().manual_seed(rank)
    out = {"start": start}
    for name, groups in (("coupled step, with all-reduce", (dist.group.WORLD,)),
                         ("coupled step, no reduction", ())):
        p = torch.nn.Parameter(torch.randn(numel, generator=gen) * 0.02)
        p.grad = torch.randn(numel, generator=gen) * 1e-3
        geometry = ShardGeometry("E", V, H, start_global_flat=start, numel=numel, groups=groups)
        opt = CoupledAdam([{"params": [p], "coupled": True}], **HP, weight_decay=0.0,
                          geometries=[(p, geometry)])
        times, reduce_times = [], []
        for _ in range(steps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            reduce_times.append(opt.last_reduce_seconds)
        out[name] = (statistics.median(times[2:]) * 1e3, opt.last_reduce_bytes)
        if groups:
            out["reduction inside the step"] = (statistics.median(reduce_times[2:]) * 1e3,
                                                opt.last_reduce_bytes)
    return out


def bench_dist(V: int, H: int, steps: int, world: int = 2) -> None:
    from tests.dist import run_on_ranks

    print(f"\n## {world} gloo ranks, [{V}, {H}] cut into flat slices (mid-row), 1 thread per rank")
    results = run_on_ranks(world, _rank_step_costs, V, H, steps, timeout=600)
    rows = []
    for name in ("coupled step, with all-reduce", "coupled step, no reduction",
                 "reduction inside the step"):
        ms = [r[name][0] for r in results]
        rows.append((name, " / ".join(f"{x:.2f}" for x in ms), str(results[0][name][1])))
    _table(rows, ("per rank", "ms (rank 0 / rank 1)", "bytes sent per rank per step"))
    print(f"  coupling across ranks adds one all-reduce of {H} float32 "
          f"({results[0]['reduction inside the step'][1]} bytes) per step and rank, against "
          f"{V * H * 4 / world / MiB:.0f} MiB of gradient per rank for DDP/ZeRO; its time includes "
          "waiting for the slower rank")


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="50304x768,128256x768",
                        help="comma-separated VxH matrices (e.g. add 50304x4096,128256x4096; "
                             "each needs ~6 tensors of V*H*4 bytes)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per candidate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", default="matrix,gpt2,dist", help="sections to run")
    parser.add_argument("--dist-shape", default="50304x768")
    parser.add_argument("--all", action="store_true",
                        help="time the slow candidates (%s) on every shape, not only the first"
                        % ", ".join(SLOW))
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="time with the wall clock, or (with --threads 1) the thread's CPU "
                             "time: steadier on a machine shared with other jobs")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bf16 run of the first shape (params, grads and state bf16)")
    parser.add_argument("--deepspeed", action="store_true",
                        help="JIT-build DeepSpeedCPUAdam if it is not built yet (minutes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            parser.error("--clock thread times the calling thread only: add --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    sections = set(args.only.split(","))
    start = time.perf_counter()
    print(f"# coupled_ds step benchmark ({args.clock} clock)")
    for line in describe_machine():
        print(f"  {line}")
    build = c_build_seconds()
    print(f"  C kernels cold build: {'failed' if build is None else f'{build:.2f} s'} "
          "(once per machine; cached afterwards)")
    if "matrix" in sections:
        shapes = [tuple(int(x) for x in shape.lower().split("x"))
                  for shape in args.shapes.split(",")]
        for index, (V, H) in enumerate(shapes):
            bench_matrix(V, H, args.steps, args.deepspeed, slow=index == 0 or args.all)
        if not args.no_bf16:
            bench_matrix(*shapes[0], args.steps, args.deepspeed, dtype=torch.bfloat16)
    if "gpt2" in sections:
        bench_gpt2(args.steps)
    if "dist" in sections:
        V, H = (int(x) for x in args.dist_shape.lower().split("x"))
        bench_dist(V, H, args.steps)
    print(f"\n(total {time.perf_counter() - start:.0f} s; load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
