"""The Triton (GPU) path against torch ops and the float64 reference.

Runs on a CUDA GPU where there is one. Without one, tests/test_kernels.py runs this module in a
subprocess with TRITON_INTERPRET=1, where Triton's interpreter executes the same kernels on CPU
tensors; the variable has to be set before Triton is first imported, so this module skips in a
process that has neither.
"""

from __future__ import annotations

import os

import pytest
import torch

from coupled_ds import kernels, triton_kernels
from tests.reference import coupled_adam_reference
from tests.test_kernels import HP, _data, _run, _run_pieces

ON_GPU = torch.cuda.is_available()
if not triton_kernels.available() or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs Triton and a CUDA GPU (without a GPU, tests/test_kernels.py runs this "
                "module under TRITON_INTERPRET=1)", allow_module_level=True)
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    """Launch blocks smaller than the test matrix: partial blocks in rows and in columns."""
    monkeypatch.setattr(triton_kernels, "ROWS", 4)
    monkeypatch.setattr(triton_kernels, "BLOCK_COLS", 4)
    monkeypatch.setattr(triton_kernels, "ROWS_PHASE2", 2)
    monkeypatch.setattr(triton_kernels, "BLOCK_COLS_PHASE2", 4)
    if not ON_GPU:  # the interpreter runs on CPU tensors, which would otherwise take the C path
        monkeypatch.setattr(kernels, "backend_for", lambda *tensors: "triton")


@pytest.mark.parametrize("compact", [False, True])
def test_kernels_match_torch_ops(compact):
    rows, cols, rows_acc = 150, 300, 131  # partial blocks in both directions, masked rows
    gen = torch.Generator().manual_seed(1)
    p, g, m, v = (torch.randn(rows, cols, generator=gen).to(DEVICE) for _ in range(4))
    v = v.abs()
    m_ref, v_ref, p_ref = m.clone(), v.clone(), p.clone()
    acc = torch.zeros(cols, device=DEVICE)
    triton_kernels.phase1_rows_(acc, m, None if compact else v, g, rows=rows, H=cols,
                                rows_acc=rows_acc, beta1=0.9, beta2=0.95, maximize=False)
    m_ref.lerp_(g, 0.1)
    v_ref.mul_(0.95).addcmul_(g, g, value=0.05)
    expected = (g * g if compact else v_ref)[:rows_acc].sum(0)
    torch.testing.assert_close(m, m_ref)
    torch.testing.assert_close(v, v if compact else v_ref)
    torch.testing.assert_close(acc, expected, rtol=1e-5, atol=1e-4)
    denom = torch.rand(cols, generator=gen).to(DEVICE) + 0.5
    triton_kernels.phase2_rows_(p, m, denom, rows=rows, H=cols, step_size=1e-2, decay=0.999)
    torch.testing.assert_close(p, p_ref.mul(0.999).addcdiv(m_ref, denom, value=-1e-2))


@pytest.mark.parametrize("case", ["whole", "vocab", "maximize", "pieces", "compact-pieces"])
def test_optimizer_step_matches_float64(case, small_blocks):
    """The whole coupled step through the kernels: mid-row flat pieces (each its own launch, of
    part of a row), masked vocabulary rows, maximize, compact state."""
    init, grads = _data(steps=6)
    vocab_size = None if case in ("whole", "maximize") else 33
    if case.endswith("pieces"):
        got, _, _ = _run_pieces(init, grads, vocab_size=vocab_size, device=DEVICE,
                                compact_coupled_state=case.startswith("compact"))
    else:
        got, _ = _run(init, grads, vocab_size=vocab_size, device=DEVICE,
                      maximize=case == "maximize")
    sign = -1 if case == "maximize" else 1
    exact = coupled_adam_reference(init, [sign * g for g in grads], **HP, vocab_size=vocab_size)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_bf16_step_matches_float64_within_rounding(small_blocks):
    init, grads = _data(steps=6)
    init = init.bfloat16().float()
    got, opt = _run(init, grads, vocab_size=33, dtype=torch.bfloat16, device=DEVICE)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"].dtype == torch.bfloat16
    exact = coupled_adam_reference(init, [g.bfloat16() for g in grads], **HP, vocab_size=33)
    # GPUs round float32 -> bf16 to nearest; Triton's interpreter truncates (its cast_impl), which
    # doubles the rounding error per stored value.
    rtol = 2e-2 if ON_GPU else 4e-2
    torch.testing.assert_close(got.double(), exact, rtol=rtol, atol=2e-2)
