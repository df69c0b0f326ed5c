"""CoupledAdam on one process: AdamW equivalence, the exact coupled math, the paper's property,
exact resume and input validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from coupled_ds import CoupledAdam, ShardGeometry
from tests.reference import coupled_adam_reference, max_relative_error

SHAPES = [(7, 5), (33,), (4, 3, 2), (1,), (64, 16)]
PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]


def _random_grads(shapes, steps, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]


def _run(opt_factory, init, grads_per_step):
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = opt_factory(params)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("path", PATHS, ids=["single", "foreach", "fused"])
@pytest.mark.parametrize("extra", [{}, {"amsgrad": True}, {"maximize": True}], ids=["plain", "amsgrad", "maximize"])
def test_uncoupled_groups_match_torch_adamw(path, extra):
    init = [torch.randn(s) for s in SHAPES]
    grads = _random_grads(SHAPES, 50)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **extra, **path)
    ours, _ = _run(lambda ps: CoupledAdam(ps, **hp), init, grads)
    theirs, _ = _run(lambda ps: torch.optim.AdamW(ps, **hp), init, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "reference"])
@pytest.mark.parametrize("vocab_size,avg_scale", [(None, 1.0), (45, 1.0), (None, 2.0**-3), (50, 0.5)])
def test_coupled_group_matches_float64_reference(blocked, vocab_size, avg_scale):
    V, H, steps = 53, 12, 30
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    init = torch.randn(V, H)
    # Column scales differ so a per-matrix scalar mean would fail; rows differ so Adam would too.
    scale = torch.logspace(-2, 1, H) * torch.linspace(0.5, 2.0, V)[:, None]
    grads = [[g[0] * scale] for g in _random_grads([(V, H)], steps, seed=1)]
    got, _ = _run(lambda ps: CoupledAdam(
        [{"params": ps, "coupled": True, "vocab_size": vocab_size, "avg_scale": avg_scale}],
        blocked=blocked, **hp), [init], grads)
    want = coupled_adam_reference(init, [g[0] for g in grads], avg_scale=avg_scale,
                                  vocab_size=vocab_size, **hp)
    assert max_relative_error(got[0], want) <= 1e-5


def test_blocked_path_matches_reference_path_on_a_mid_row_slice():
    V, H = 29, 7
    geometry = ShardGeometry("E", V, H, start_global_flat=10, numel=150, offset_local=3)
    init = torch.randn(160)
    grads = _random_grads([(160,)], 10, seed=2)

    def make(blocked):
        def factory(ps):
            return CoupledAdam([{"params": ps, "coupled": True, "vocab_size": 25}], lr=1e-2,
                               geometries=[(ps[0], geometry)], blocked=blocked)
        return factory

    a, _ = _run(make(True), [init], grads)
    b, _ = _run(make(False), [init], grads)
    assert max_relative_error(a[0], b[0]) <= 1e-6
    # Engine padding around the owned slice is never touched.
    assert torch.equal(a[0][:3], init[:3]) and torch.equal(a[0][153:], init[153:])


def test_mixed_groups_couple_only_the_embedding():
    V, H = 31, 8
    emb, lin = torch.randn(V, H), torch.randn(H, H)
    grads = _random_grads([(V, H), (H, H)], 20, seed=3)
    hp = dict(lr=5e-3, betas=(0.9, 0.95), eps=1e-8)

    def factory(ps):
        return CoupledAdam([{"params": [ps[0]], "coupled": True, "weight_decay": 0.0},
                            {"params": [ps[1]], "weight_decay": 0.1}], **hp)

    got, _ = _run(factory, [emb, lin], grads)
    want_emb = coupled_adam_reference(emb, [g[0] for g in grads], weight_decay=0.0, **hp)
    want_lin, _ = _run(lambda ps: torch.optim.AdamW(ps, weight_decay=0.1, **hp), [lin],
                       [[g[1]] for g in grads])
    assert max_relative_error(got[0], want_emb) <= 1e-5
    torch.testing.assert_close(got[1], want_lin[0], rtol=0, atol=1e-6)


def _train_output_layer(coupled: bool, steps: int = 100):
    """An untied output matrix fed only softmax cross-entropy gradients, no weight decay."""
    V, H, B = 64, 16, 32
    gen = torch.Generator().manual_seed(4)
    W = torch.nn.Parameter(torch.randn(V, H, generator=gen) * 0.1)
    hp = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    if coupled:
        opt = CoupledAdam([{"params": [W], "coupled": True}], **hp)
    else:
        opt = torch.optim.AdamW([W], **hp)
    W0 = W.detach().clone()
    for _ in range(steps):
        h = torch.randn(B, H, generator=gen)
        # Zipf-like targets: frequent tokens get positive gradient, rare ones only negative.
        targets = torch.multinomial(1.0 / torch.arange(1, V + 1).float(), B, True, generator=gen)
        opt.zero_grad()
        F.cross_entropy(h @ W.T, targets).backward()
        opt.step()
    moved = W.detach() - W0  # [V, H] total update of every row over all steps
    return moved.mean(0).norm(), moved.norm(dim=1).mean()


def test_coupled_adam_keeps_the_mean_embedding_still():
    """The property behind the paper: the column sums of a softmax gradient are zero, so with a
    shared second moment the mean row cannot move; with Adam's per-element one it drifts."""
    coupled_shift, coupled_row = _train_output_layer(coupled=True)
    adam_shift, adam_row = _train_output_layer(coupled=False)
    assert coupled_shift < 1e-6 * coupled_row  # float32 rounding is all that is left
    assert adam_shift > 1e-2 * adam_row  # Adam's drift is a sizeable part of a row's motion
    assert adam_shift > 1e4 * coupled_shift


@pytest.mark.parametrize("coupled", [True, False])
def test_state_dict_resume_is_exact(coupled):
    V, H = 23, 6
    grads = _random_grads([(V, H), (H,)], 20, seed=5)
    init = [torch.randn(V, H), torch.randn(H)]

    def factory(ps):
        return CoupledAdam([{"params": [ps[0]], "coupled": coupled, "vocab_size": 20},
                            {"params": [ps[1]], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1)

    straight, _ = _run(factory, init, grads)
    first, opt = _run(factory, init, grads[:10])
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert saved["state"][0]["exp_avg_sq"].shape == (V, H)
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = factory(params)
    resumed.load_state_dict(saved)
    for grads_t in grads[10:]:
        for p, g in zip(params, grads_t):
            p.grad = g.clone()
        resumed.step()
    for a, b in zip(params, straight):
        assert torch.equal(a, b)


def test_parameter_without_gradient_is_skipped():
    a, b = torch.nn.Parameter(torch.randn(9, 4)), torch.nn.Parameter(torch.randn(9, 4))
    opt = CoupledAdam([{"params": [a], "coupled": True}, {"params": [b]}], lr=0.1)
    before = b.detach().clone()
    a.grad = torch.randn(9, 4)
    opt.step()
    assert torch.equal(b, before) and b not in opt.state


# ---------------------------------------------------------------- bad input


def _coupled(p, **group):
    return [{"params": [p], "coupled": True, **group}]


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(avg_scale=0.0), "avg_scale"),
    (dict(foreach=True, fused=True), "foreach=True and fused=True"),
])
def test_invalid_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoupledAdam([torch.nn.Parameter(torch.randn(3, 3))], **kwargs)


def test_coupled_tensor_must_be_2d():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=r"'tok_emb.weight' has shape \(10,\).*2-D"):
        CoupledAdam(_coupled(p, coupled_names=["tok_emb.weight"]))


def test_flat_coupled_tensor_is_fine_with_a_geometry():
    p = torch.nn.Parameter(torch.randn(10))
    CoupledAdam(_coupled(p), geometries=[(p, ShardGeometry("E", 5, 2))])


def test_flat_coupled_tensor_swapped_in_later_without_geometry_fails_at_step():
    p = torch.nn.Parameter(torch.randn(5, 2))
    opt = CoupledAdam(_coupled(p))
    flat = torch.nn.Parameter(torch.randn(10))
    opt.param_groups[0]["params"] = [flat]  # what an engine that flattens does
    flat.grad = torch.randn(10)
    with pytest.raises(ValueError, match="2-D"):
        opt.step()


def test_amsgrad_on_a_coupled_group_is_refused():
    with pytest.raises(ValueError, match="amsgrad=True"):
        CoupledAdam(_coupled(torch.nn.Parameter(torch.randn(4, 4))), amsgrad=True)


def test_vocab_size_larger_than_rows_is_refused():
    with pytest.raises(ValueError, match="vocab_size=9 is larger than its 4 rows"):
        CoupledAdam(_coupled(torch.nn.Parameter(torch.randn(4, 4)), vocab_size=9))


def test_sparse_gradient_is_refused():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = CoupledAdam(_coupled(emb.weight, coupled_names=["emb.weight"]))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'emb.weight' has a sparse gradient"):
        opt.step()


def test_geometry_that_does_not_fit_is_refused():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="has only 10 elements"):
        CoupledAdam(_coupled(p), geometries=[(p, ShardGeometry("E", 5, 4))])


@pytest.mark.parametrize("kwargs,match", [
    (dict(rows_global=0, cols=3), "must be positive"),
    (dict(rows_global=3, cols=3, start_global_flat=8, numel=2), "run past the end"),
    (dict(rows_global=3, cols=3, numel=-5), ">= 0"),
])
def test_bad_geometry_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ShardGeometry("E", **kwargs)


def _record_order(monkeypatch, events):
    """Record when the column-sum reduction starts and finishes and when AdamW groups step."""
    from coupled_ds import optimizer as optimizer_module

    start = optimizer_module.start_allreduce_column_sums_
    adamw = optimizer_module.torch_adamw.adamw

    def started(sums):
        events.append("start reduction")
        pending = start(sums)
        wait = pending.wait

        def waited():
            events.append("finish reduction")
            return wait()

        pending.wait = waited
        return pending

    def stepped(*args, **kwargs):
        events.append("adamw")
        return adamw(*args, **kwargs)

    monkeypatch.setattr(optimizer_module, "start_allreduce_column_sums_", started)
    monkeypatch.setattr(optimizer_module.torch_adamw, "adamw", stepped)


def test_adamw_groups_step_while_the_column_sums_are_reduced(monkeypatch):
    """The all-reduce of the column sums is in flight while the AdamW groups step, and the
    coupled update comes after it (the order that hides the collective's latency)."""
    emb, dense = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = CoupledAdam([{"params": [emb], "coupled": True}, {"params": [dense]}], lr=1e-2)
    emb.grad, dense.grad = torch.randn(16, 8), torch.randn(8, 8)
    before = emb.detach().clone()
    events = []
    _record_order(monkeypatch, events)
    opt.step()
    assert events == ["start reduction", "adamw", "finish reduction"]
    assert not torch.equal(emb, before)  # and the coupled update ran after it


def test_error_in_an_adamw_group_still_finishes_the_reduction(monkeypatch):
    """Every rank has started the collective before the AdamW groups: an error there must not
    leave it pending (the next collective would pair with it), and the coupled update is skipped."""
    emb = torch.nn.Parameter(torch.randn(16, 8))
    table = torch.nn.Embedding(8, 4, sparse=True)
    opt = CoupledAdam([{"params": [emb], "coupled": True}, {"params": [table.weight]}], lr=1e-2)
    emb.grad = torch.randn(16, 8)
    table(torch.tensor([1, 2])).sum().backward()
    before = emb.detach().clone()
    events = []
    _record_order(monkeypatch, events)
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert events == ["start reduction", "finish reduction"]
    assert torch.equal(emb, before)
