"""Ten-line float64 references that the tests treat as ground truth (DESIGN §2)."""

from __future__ import annotations

import torch


def coupled_adam_reference(p, grads, *, lr, betas, eps, weight_decay, avg_scale=1.0,
                           vocab_size=None):
    """Coupled Adam on a whole [V, H] matrix in float64; ``grads`` is a list, one per step."""
    p = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    rows = p.shape[0] if vocab_size is None else vocab_size
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p *= 1 - lr * weight_decay
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        vbar = avg_scale * v[:rows].mean(0)                                   # [H]
        p -= lr / (1 - betas[0] ** t) * m / ((vbar / (1 - betas[1] ** t)).sqrt() + eps)
    return p


def max_relative_error(got, want) -> float:
    """max |got - want| / max |want|: relative error on the matrix scale (an element-wise ratio is
    meaningless for entries that pass through zero)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max()).item()
