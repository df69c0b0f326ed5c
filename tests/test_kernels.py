"""The fast coupled kernels against the reference ops and the float64 reference; compact state
against full state (single process, flat mid-row pieces, 2 gloo ranks, checkpoints)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from coupled_ds import CoupledAdam, ShardGeometry, cpu_kernels, kernels, triton_kernels
from tests.dist import run_on_ranks
from tests.reference import coupled_adam_reference

V, H, STEPS = 37, 6, 12
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _data(steps=STEPS, rows=V, cols=H, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(rows, cols, generator=gen)
    # Column scales differ by 10x: a mean over the wrong axis (or a scalar) cannot pass.
    grads = [torch.randn(rows, cols, generator=gen) * (1 + torch.arange(cols)) for _ in range(steps)]
    return init, grads


def _run(init, grads, *, vocab_size=None, dtype=torch.float32, device="cpu", **options):
    p = torch.nn.Parameter(init.clone().to(device, dtype))
    opt = CoupledAdam([{"params": [p], "coupled": True, "vocab_size": vocab_size}], **HP, **options)
    for g in grads:
        p.grad = g.clone().to(device, dtype)
        opt.step()
    return p.detach().cpu(), opt


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the row-chunked torch form of the fast path (what runs where no C compiler works),
    with chunks small enough that every piece is cut into several."""
    monkeypatch.setattr(kernels, "backend_for", lambda *tensors: "torch")
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 4 * H)


@pytest.mark.parametrize("vocab_size", [None, 33])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_fast_matches_reference_and_float64(vocab_size, backend, request, monkeypatch):
    if backend == "torch":
        request.getfixturevalue("torch_backend")
    elif cpu_kernels.library() is None:
        pytest.skip(f"C kernels unavailable: {cpu_kernels.unavailable_reason()}")
    else:
        monkeypatch.setattr(cpu_kernels, "_CHUNK_ELEMENTS", 2 * H)  # many chunks, all threads
    init, grads = _data()
    assert kernels.backend_for(init) == backend
    fast, _ = _run(init, grads, vocab_size=vocab_size)
    reference, _ = _run(init, grads, vocab_size=vocab_size, blocked=False)
    exact = coupled_adam_reference(init, grads, **HP, vocab_size=vocab_size)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5)


def test_maximize_matches_reference():
    init, grads = _data()
    fast, _ = _run(init, grads, maximize=True)
    reference, _ = _run(init, grads, maximize=True, blocked=False)
    exact = coupled_adam_reference(init, [-g for g in grads], **HP)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5)


def test_bf16_params_match_float64_within_bf16_rounding():
    init, grads = _data()
    init = init.bfloat16().float()
    fast, opt = _run(init, grads, dtype=torch.bfloat16)
    reference, _ = _run(init, grads, dtype=torch.bfloat16, blocked=False)
    exact = coupled_adam_reference(init, [g.bfloat16() for g in grads], **HP)
    assert fast.dtype == torch.bfloat16
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"].dtype == torch.bfloat16
    # Each stored value is rounded to bf16 (2^-8 relative); errors do not compound much here.
    torch.testing.assert_close(fast.double(), exact, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast, reference, rtol=2e-2, atol=2e-2)


def _pieces(cuts, per_piece_pad=3):
    """One matrix cut into flat pieces at ``cuts`` (mid-row), each in its own padded tensor."""
    bounds = [0, *cuts, V * H]
    out = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        geometry = ShardGeometry("E", V, H, start_global_flat=start, numel=end - start,
                                 offset_local=per_piece_pad)
        out.append((start, end, geometry))
    return out


def _run_pieces(init, grads, *, vocab_size=None, cuts=(2 * H + 3, 21 * H + 5), device="cpu",
                **options):
    """Every piece of the matrix held by one optimizer, with no process group: their column sums
    share one accumulator, so this exercises mid-row geometry without spawning ranks."""
    params, geometries = [], []
    init = init.to(device)
    for start, end, geometry in _pieces(cuts):
        local = torch.full((geometry.offset_local + (end - start) + 2,), 7.0, device=device)
        local[geometry.offset_local : geometry.offset_local + end - start] = init.view(-1)[start:end]
        params.append(torch.nn.Parameter(local))
        geometries.append(geometry)
    opt = CoupledAdam([{"params": params, "coupled": True, "vocab_size": vocab_size}], **HP,
                      geometries=list(zip(params, geometries)), **options)
    for g in grads:
        for p, geometry in zip(params, geometries):
            p.grad = torch.zeros_like(p)
            kernels.owned_view(p.grad, geometry).copy_(
                g.view(-1)[geometry.start_global_flat : geometry.start_global_flat + geometry.numel])
        opt.step()
    full = torch.empty(V * H, device=device)
    for p, geometry in zip(params, geometries):
        assert torch.all(p.detach()[: geometry.offset_local] == 7.0), "engine padding was touched"
        assert torch.all(p.detach()[geometry.offset_local + geometry.numel :] == 7.0)
        full[geometry.start_global_flat : geometry.start_global_flat + geometry.numel] = \
            kernels.owned_view(p.detach(), geometry)
    return full.view(V, H).cpu(), opt, params


@pytest.mark.parametrize("vocab_size", [None, 33])
@pytest.mark.parametrize("options", [{}, {"compact_coupled_state": True},
                                     {"blocked": False, "compact_coupled_state": True}],
                         ids=["fast", "compact", "compact-reference"])
def test_flat_mid_row_pieces_match_whole_matrix(vocab_size, options):
    init, grads = _data()
    got, _, _ = _run_pieces(init, grads, vocab_size=vocab_size, **options)
    whole, _ = _run(init, grads, vocab_size=vocab_size, blocked=False)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)


def test_flat_pieces_with_torch_backend(torch_backend):
    init, grads = _data()
    got, _, _ = _run_pieces(init, grads, vocab_size=33, cuts=(H + 1, 9 * H + 4, 30 * H + 2))
    whole, _ = _run(init, grads, vocab_size=33, blocked=False)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("vocab_size", [None, 33])
def test_compact_equals_full_over_30_steps(vocab_size):
    init, grads = _data(steps=30)
    full, full_opt = _run(init, grads, vocab_size=vocab_size)
    compact, opt = _run(init, grads, vocab_size=vocab_size, compact_coupled_state=True)
    torch.testing.assert_close(compact, full, rtol=1e-6, atol=1e-6)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert "exp_avg_sq" not in state and state["exp_avg_sq_col_mean"].shape == (H,)
    v = full_opt.state[full_opt.param_groups[0]["params"][0]]["exp_avg_sq"]
    rows = V if vocab_size is None else vocab_size
    torch.testing.assert_close(state["exp_avg_sq_col_mean"], v[:rows].mean(0))


def test_compact_state_dict_is_full_size_and_round_trips():
    init, grads = _data(steps=20)
    first, later = grads[:10], grads[10:]
    _, compact_opt = _run(init, first, vocab_size=33, compact_coupled_state=True)
    packed = compact_opt.state_dict()
    v = packed["state"][0]["exp_avg_sq"]
    mean_H = compact_opt.state[compact_opt.param_groups[0]["params"][0]]["exp_avg_sq_col_mean"]
    assert v.shape == (V, H) and "exp_avg_sq_col_mean" not in packed["state"][0]
    torch.testing.assert_close(v, mean_H.expand(V, H))
    assert "exp_avg_sq_col_mean" in compact_opt.state[compact_opt.param_groups[0]["params"][0]]

    def resume(state_dict, **options):
        p = torch.nn.Parameter(compact_opt.param_groups[0]["params"][0].detach().clone())
        opt = CoupledAdam([{"params": [p], "coupled": True, "vocab_size": 33}], **HP, **options)
        opt.load_state_dict(copy.deepcopy(state_dict))  # torch shares tensors with the dict
        for g in later:
            p.grad = g.clone()
            opt.step()
        return p.detach()

    # A full-state optimizer reads the expanded v; a compact one reduces it back.
    torch.testing.assert_close(resume(packed), resume(packed, compact_coupled_state=True))
    uninterrupted, _ = _run(init, grads, vocab_size=33, compact_coupled_state=True)
    torch.testing.assert_close(resume(packed, compact_coupled_state=True), uninterrupted)


def test_compact_loads_a_full_state_checkpoint_exactly():
    """A full per-element v (rows differ) is reduced back exactly at the next step."""
    init, grads = _data(steps=20)
    p_full, full_opt = _run(init, grads[:10], vocab_size=33)
    p = torch.nn.Parameter(p_full.clone())
    opt = CoupledAdam([{"params": [p], "coupled": True, "vocab_size": 33}], **HP,
                      compact_coupled_state=True)
    opt.load_state_dict(copy.deepcopy(full_opt.state_dict()))
    q = full_opt.param_groups[0]["params"][0]
    for g in grads[10:]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        full_opt.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6)
    assert "exp_avg_sq" not in opt.state[p]


def test_compact_piece_state_holds_the_global_mean():
    init, grads = _data()
    _, opt, params = _run_pieces(init, grads, vocab_size=33, compact_coupled_state=True)
    _, full_opt = _run(init, grads, vocab_size=33)
    v = full_opt.state[full_opt.param_groups[0]["params"][0]]["exp_avg_sq"]
    for p in params:
        torch.testing.assert_close(opt.state[p]["exp_avg_sq_col_mean"], v[:33].mean(0))
    # The checkpoint form: every owned element is its column's global mean, padding 0.
    packed = opt.state_dict()
    geometry = opt.geometry_of(params[1])
    expanded = packed["state"][1]["exp_avg_sq"]
    assert expanded.shape == params[1].shape
    assert torch.all(expanded[: geometry.offset_local] == 0)
    cols = (torch.arange(geometry.numel) + geometry.start_global_flat) % H
    torch.testing.assert_close(kernels.owned_view(expanded, geometry), v[:33].mean(0)[cols])


# --------------------------------------------------------------------------- 2 gloo ranks
def _ranks_compact_vs_full(rank, world, steps):
    """On each rank: flat mid-row slices of one matrix, full and compact state, with and without
    the reduction, and a compact optimizer resumed from a full-state checkpoint."""
    init, grads = _data(steps=steps)
    per_rank = -(-V * H // world)
    start = rank * per_rank
    numel = min(V * H, start + per_rank) - start
    out = {}
    for name, compact, reduce in [("full", False, True), ("compact", True, True),
                                  ("compact-noreduce", True, False), ("resumed", True, True)]:
        groups = (dist.group.WORLD,) if reduce else ()
        local = torch.nn.Parameter(init.view(-1)[start : start + numel].clone())
        geometry = ShardGeometry("E", V, H, start_global_flat=start, numel=numel, groups=groups)
        opt = CoupledAdam([{"params": [local], "coupled": True, "vocab_size": 33}], **HP,
                          geometries=[(local, geometry)], compact_coupled_state=compact)
        if name == "resumed":  # 10 full-state steps, checkpoint, continue compact
            first = CoupledAdam([{"params": [local], "coupled": True, "vocab_size": 33}], **HP,
                                geometries=[(local, geometry)])
            for g in grads[:10]:
                local.grad = g.view(-1)[start : start + numel].clone()
                first.step()
            opt.load_state_dict(copy.deepcopy(first.state_dict()))
        for g in grads[10:] if name == "resumed" else grads:
            local.grad = g.view(-1)[start : start + numel].clone()
            opt.step()
        mean = opt.state[local].get("exp_avg_sq_col_mean")
        out[name] = (start, local.detach(), mean, opt.last_reduce_bytes)
    return out


def test_compact_sharded_on_two_ranks_matches_single_process():
    steps = 30
    results = run_on_ranks(2, _ranks_compact_vs_full, steps)
    assert results[0]["full"][0] == 0 and results[1]["full"][0] % H != 0, "cut must be mid-row"
    init, grads = _data(steps=steps)
    whole, whole_opt = _run(init, grads, vocab_size=33, blocked=False)
    global_mean_H = whole_opt.state[whole_opt.param_groups[0]["params"][0]]["exp_avg_sq"][:33].mean(0)

    def assemble(name):
        full = torch.empty(V * H)
        for result in results:
            start, local, _, _ = result[name]
            full[start : start + local.numel()] = local
        return full.view(V, H)

    for name in ("full", "compact", "resumed"):
        torch.testing.assert_close(assemble(name), whole, rtol=1e-6, atol=1e-6, msg=name)
    for result in results:  # every rank stores the global mean, and sends H floats per step
        torch.testing.assert_close(result["compact"][2], global_mean_H)
        assert result["compact"][3] == H * 4
    # Negative control: without the reduction each rank averages its own half.
    assert (assemble("compact-noreduce") - whole).abs().max() > 1e-4


# --------------------------------------------------------------------------- fallbacks, GPU
def test_without_c_compiler_the_torch_form_runs(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {"lib": None, "reason": "no C compiler"})
    init, grads = _data()
    assert kernels.backend_for(init) == "torch"
    got, _ = _run(init, grads, vocab_size=33)
    torch.testing.assert_close(got.double(), coupled_adam_reference(init, grads, **HP,
                                                                    vocab_size=33),
                               rtol=1e-5, atol=1e-5)


def test_pthread_build_matches_reference(monkeypatch, tmp_path):
    """The build used where the compiler has no OpenMP and no x86 target attributes: pthreads
    and only the baseline kernels, on 2 threads, many chunks."""
    try:
        cpu_kernels._compile(tmp_path / "pthreads.so", openmp=False, variants=False)
    except RuntimeError as exc:
        pytest.skip(f"no C compiler: {exc}")
    lib = cpu_kernels._open(tmp_path / "pthreads.so")
    assert lib.coupled_uses_openmp() == 0
    assert lib.coupled_simd_best() == 0 and lib.coupled_simd_select(1) == -1
    monkeypatch.setattr(cpu_kernels, "_state", {"lib": lib, "reason": None})
    monkeypatch.setattr(cpu_kernels, "_CHUNK_ELEMENTS", 2 * H)  # 3 rows a chunk
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        init, grads = _data()
        got, _ = _run(init, grads, vocab_size=33)
        got_pieces, _, _ = _run_pieces(init, grads, vocab_size=33)
    finally:
        torch.set_num_threads(threads)
    reference, _ = _run(init, grads, vocab_size=33, blocked=False)
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_pieces, reference, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- C kernels directly
@pytest.fixture
def simd_levels():
    """The instruction-set variants this CPU runs; the best one is restored afterwards."""
    if cpu_kernels.library() is None:
        pytest.skip(f"C kernels unavailable: {cpu_kernels.unavailable_reason()}")
    yield cpu_kernels.simd_levels()
    cpu_kernels.set_simd_level(None)


def _phase_inputs(rows, cols, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    scales = {"p": 1.0, "m": 1e-2, "v": 1e-4, "g": 1e-2}
    out = {k: torch.randn(rows, cols, generator=gen) * scale for k, scale in scales.items()}
    out["v"] = out["v"].abs()
    return {k: t.to(dtype) for k, t in out.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cols", [1, 7, 37, 67])  # below, inside, across 8- and 16-float vectors
def test_c_kernels_every_simd_level_same_bits_and_torch_math(dtype, cols, simd_levels,
                                                             monkeypatch):
    """Each variant this CPU runs (forced in turn) gives the same bits, and they are torch's
    math. 5-row chunks over 53 rows leave an odd row out of a chunk's row pairs and a short last
    chunk, and the counted rows (41) end inside a chunk."""
    monkeypatch.setattr(cpu_kernels, "_CHUNK_ELEMENTS", 5 * cols)
    rows, rows_acc, beta1, beta2 = 53, 41, 0.9, 0.95
    x = _phase_inputs(rows, cols, dtype, seed=cols)
    denom_H = torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.5
    out = {}
    for level in simd_levels:
        assert cpu_kernels.set_simd_level(level) == level == cpu_kernels.simd_level()
        m, v, m_max, p = x["m"].clone(), x["v"].clone(), x["m"].clone(), x["p"].clone()
        acc_H = torch.full((cols,), 0.5, dtype=torch.float64)  # the kernels add to it
        acc_g2_H = torch.zeros(cols, dtype=torch.float64)
        kw = dict(rows=rows, H=cols, rows_acc=rows_acc, beta1=beta1, beta2=beta2)
        cpu_kernels.phase1_rows_(acc_H, m, v, x["g"], maximize=False, **kw)
        cpu_kernels.phase1_rows_(acc_g2_H, m_max, None, x["g"], maximize=True, **kw)
        cpu_kernels.phase2_rows_(p, m, denom_H, rows=rows, H=cols, step_size=1e-2, decay=0.99)
        out[level] = (m, v, acc_H, m_max, acc_g2_H, p)
    for level, got in out.items():
        for name, a, b in zip(("m", "v", "acc", "m max", "acc g^2", "p"), got, out["baseline"]):
            assert torch.equal(a, b), f"{level} differs from baseline in {name}"
    m, v, acc_H, m_max, acc_g2_H, p = out["baseline"]
    f = {k: t.float() for k, t in x.items()}
    g = f["g"]
    tol = dict(rtol=1e-6, atol=1e-9) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-9)
    torch.testing.assert_close(m, f["m"].lerp(g, 1 - beta1).to(dtype), **tol)
    torch.testing.assert_close(m_max, f["m"].lerp(-g, 1 - beta1).to(dtype), **tol)
    torch.testing.assert_close(v, (f["v"] * beta2 + (1 - beta2) * g * g).to(dtype), **tol)
    # The sums are of the stored (rounded) v, over the counted rows only.
    torch.testing.assert_close(acc_H, 0.5 + v[:rows_acc].double().sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc_g2_H, (g * g)[:rows_acc].double().sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(p, (f["p"] * 0.99 - 1e-2 * (m.float() / denom_H)).to(dtype), **tol)


def test_c_kernels_round_bf16_as_torch_does(simd_levels):
    """With beta2 = 0 the new v is g^2, exact in float32 for bf16 g, so every variant must store
    torch's rounding of it bit for bit: ties to even, overflow to inf, NaN kept NaN."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(64, 64, generator=gen) * 2.0 ** torch.randint(-70, 70, (64, 64), generator=gen)
    g.view(-1)[:3] = torch.tensor([float("nan"), 1e20, -float("inf")])
    g = g.bfloat16()
    square = g.float() * g.float()
    ties = (square.view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 5, "the data must contain exact ties"
    want = square.bfloat16()
    nan = want.isnan()
    for level in simd_levels:
        cpu_kernels.set_simd_level(level)
        m, v = torch.zeros_like(g), torch.ones_like(g)
        cpu_kernels.phase1_rows_(torch.zeros(64, dtype=torch.float64), m, v, g, rows=64, H=64,
                                 rows_acc=64, beta1=0.9, beta2=0.0, maximize=False)
        assert torch.equal(v.isnan(), nan), level
        assert torch.equal(v[~nan].view(torch.int16), want[~nan].view(torch.int16)), level


def test_simd_level_choice_errors_name_the_setting(simd_levels, monkeypatch):
    with pytest.raises(ValueError, match=r"set_simd_level='sse9'.*baseline"):
        cpu_kernels.set_simd_level("sse9")
    assert cpu_kernels.simd_level() == simd_levels[-1], "a refused choice changes nothing"
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("COUPLED_DS_SIMD", "sse9")
    with pytest.raises(ValueError, match="COUPLED_DS_SIMD='sse9'"):
        cpu_kernels.library()
    with pytest.raises(ValueError, match="COUPLED_DS_SIMD='sse9'"):  # not only the first time
        cpu_kernels.library()
    monkeypatch.setenv("COUPLED_DS_SIMD", "baseline")
    assert cpu_kernels.library() is not None and cpu_kernels.simd_level() == "baseline"


def test_triton_tests_pass_under_the_interpreter():
    """tests/test_triton.py on CPU through Triton's interpreter, where there is no GPU (CI).

    A subprocess, because TRITON_INTERPRET must be set before Triton is first imported, and
    this process has imported it already (DeepSpeed does) for real GPUs.
    """
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: tests/test_triton.py runs on it directly")
    if not triton_kernels.available():
        pytest.skip("Triton is not installed (pip install triton)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_triton.py"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, summary


# --------------------------------------------------------------------------- memory
def _step_peak_bytes(opt):
    """Peak RSS above the RSS before one step (VmHWM is reset through /proc/self/clear_refs)."""
    def field(name):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(name))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = field("VmRSS:")
    opt.step()
    return field("VmHWM:") - before


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_fast_step_makes_no_matrix_sized_temporary():
    rows, cols = 16384, 1024  # 64 MiB per tensor: far above glibc's mmap threshold
    matrix_bytes = rows * cols * 4
    p = torch.nn.Parameter(torch.randn(rows, cols))
    p.grad = torch.randn(rows, cols)
    foreach = torch.optim.AdamW([p], foreach=True)  # allocates a full-size denominator
    fast = CoupledAdam([{"params": [p], "coupled": True}], compact_coupled_state=False)
    compact = CoupledAdam([{"params": [p], "coupled": True}], compact_coupled_state=True)
    for opt in (foreach, fast, compact):
        opt.step()  # state allocated outside the measurement
    assert _step_peak_bytes(foreach) > 0.9 * matrix_bytes, "the measurement must see temporaries"
    assert _step_peak_bytes(fast) < 0.1 * matrix_bytes
    assert _step_peak_bytes(compact) < 0.1 * matrix_bytes
