"""The shard-geometry seam: a matrix split over gloo ranks by rows or by flat slices that start
mid-row steps exactly like one process on the whole matrix, and fails without the reduction."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from coupled_ds import CoupledAdam, ShardGeometry
from tests.dist import run_on_ranks
from tests.reference import max_relative_error

V, H, STEPS = 37, 6, 12
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _data(vocab_size):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(V, H, generator=gen)
    grads = [torch.randn(V, H, generator=gen) * (1 + torch.arange(H)) for _ in range(STEPS)]
    return init, grads


def _reference(vocab_size):
    init, grads = _data(vocab_size)
    p = torch.nn.Parameter(init.clone())
    opt = CoupledAdam([{"params": [p], "coupled": True, "vocab_size": vocab_size}], **HP)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def _flat_bounds(rank, world, pad_to):
    """ZeRO-like split: V*H elements padded to a multiple of world*pad_to, equal slices."""
    total = V * H
    padded = -(-total // (world * pad_to)) * world * pad_to
    per_rank = padded // world
    start = rank * per_rank
    return start, max(0, min(total, start + per_rank) - start), per_rank


def _sharded_one(rank, world, layout, vocab_size, reduce):
    init, grads = _data(vocab_size)
    group = (dist.group.WORLD,) if reduce else ()
    if layout == "rows":
        bounds = torch.linspace(0, V, world + 1).round().long().tolist()  # uneven rows
        r0, r1 = bounds[rank], bounds[rank + 1]
        local = torch.nn.Parameter(init[r0:r1].clone())
        geometry = ShardGeometry("E", V, H, start_global_flat=r0 * H, numel=(r1 - r0) * H,
                                 groups=group)
        slicer = lambda g: g[r0:r1].clone()  # noqa: E731
    else:
        start, numel, per_rank = _flat_bounds(rank, world, pad_to=5)
        local = torch.nn.Parameter(torch.full((per_rank,), 7.0))  # engine padding: never read
        local.data[:numel] = init.view(-1)[start : start + numel]
        geometry = ShardGeometry("E", V, H, start_global_flat=start, numel=numel, groups=group)

        def slicer(g):
            out = torch.zeros(per_rank)
            out[:numel] = g.reshape(-1)[start : start + numel]
            return out

    opt = CoupledAdam([{"params": [local], "coupled": True, "vocab_size": vocab_size}], **HP,
                      geometries=[(local, geometry)])
    for g in grads:
        local.grad = slicer(g)
        opt.step()
    return layout, local.detach(), geometry.start_global_flat, geometry.numel


CASES = [(layout, vocab_size, True) for layout in ("rows", "flat") for vocab_size in (None, 33)]
CASES += [(layout, None, False) for layout in ("rows", "flat")]  # negative controls


def _sharded(rank, world):
    """All cases in one spawn: starting processes costs far more than the steps."""
    return {case: _sharded_one(rank, world, *case) for case in CASES}


@pytest.fixture(scope="module", params=[2, 3])
def world_results(request):
    world = request.param
    per_rank = run_on_ranks(world, _sharded)
    return world, {case: [r[case] for r in per_rank] for case in CASES}


def _assemble(results):
    full = torch.zeros(V * H)
    for layout, local, start, numel in results:
        full[start : start + numel] = local.reshape(-1)[:numel]
        if layout == "flat":
            assert torch.all(local[numel:] == 7.0), "engine padding was touched"
    return full.view(V, H)


@pytest.mark.parametrize("layout", ["rows", "flat"])
@pytest.mark.parametrize("vocab_size", [None, 33])
def test_sharded_matches_single_process(world_results, layout, vocab_size):
    world, results = world_results
    if layout == "flat":
        start, _, _ = _flat_bounds(1, world, 5)
        assert start % H != 0, "the split must cut a row mid-way"
    else:
        assert V % world != 0, "the row split must be uneven"
    got = _assemble(results[(layout, vocab_size, True)])
    assert max_relative_error(got, _reference(vocab_size)) <= 1e-6


@pytest.mark.parametrize("layout", ["rows", "flat"])
def test_without_reduction_the_result_differs(world_results, layout):
    """Negative control: each rank averaging only its own piece must fail the comparison."""
    _, results = world_results
    got = _assemble(results[(layout, None, False)])
    assert max_relative_error(got, _reference(None)) > 1e-4
