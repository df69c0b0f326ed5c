"""``"compact_coupled_state": true`` in the DeepSpeed config's ``optimizer.params``: the same
trajectory as full state under ZeRO 0-3 and offload on 2 gloo ranks, exact resume from a
DeepSpeed checkpoint, and a universal checkpoint (saved at 2 ranks, resumed at 3)."""

from __future__ import annotations

import os
from typing import Any

import pytest

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from tests import ds_helpers as H  # noqa: E402
from tests import test_deepspeed_checkpoint as C  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

N, K = C.N, C.K      # steps in all, steps before the checkpoint
LAYOUTS = {"zero0": (0, False), "zero1": (1, False), "zero2": (2, False),
           "zero2-offload": (2, True), "zero3": (3, False), "zero3-offload": (3, True)}
SAVED = ("zero2", "zero3-offload")          # checkpoint + resume; also converted to universal
pytestmark = pytest.mark.slow


def _config(label: str, world: int, compact: bool = True, universal: bool = False
            ) -> dict[str, Any]:
    stage, offload = LAYOUTS[label]
    cfg = H.ds_config(stage, world=world, offload=offload, compact_coupled_state=compact)
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def _train_and_save(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in LAYOUTS:
        engine = C._engine(_config(label, world))
        state = engine.basic_optimizer.state
        H.train(engine, rank, 0, K)
        if label in SAVED:
            engine.save_checkpoint(os.path.join(root, label), tag="k")
        H.train(engine, rank, K, N - K)
        out["compact", label] = any("exp_avg_sq_col_mean" in s for s in state.values())
        out[label] = H.full_params(engine)
        engine.destroy()
    return out if rank == 0 else {}


def _resume(rank: int, world: int, root: str, universal: bool) -> dict[str, Any]:
    out = {}
    for label in SAVED:
        engine = C._engine(_config(label, world, universal=universal))
        path, _ = engine.load_checkpoint(os.path.join(root, label),
                                         tag="k_universal" if universal else "k")
        assert path is not None, f"{label}: nothing loaded"
        H.train(engine, rank, K, N - K)
        out[label] = H.full_params(engine)
        engine.destroy()
    return out if rank == 0 else {}


def test_compact_state_from_config(tmp_path):
    got = run_on_ranks(2, _train_and_save, str(tmp_path), env=H.DS_ENV, timeout=420)[0]
    want = H.reference(N, 2)  # full-state CoupledAdam, one process
    for label in LAYOUTS:
        assert got["compact", label], f"{label}: the state is not compact"
        diff = H.max_rel_diff(got[label], want)
        print(f"compact {label}: max relative difference to full state {diff:.2e}")
        assert diff <= 1e-6, f"compact {label}: {diff:.2e}"
    resumed = run_on_ranks(2, _resume, str(tmp_path), False, env=H.DS_ENV, timeout=420)[0]
    for label in SAVED:
        diff = H.max_rel_diff(resumed[label], got[label])
        print(f"compact {label}: resumed vs straight {diff:.2e}")
        assert diff <= 1e-6, f"compact {label}: resume differs by {diff:.2e}"
    for label in SAVED:
        C._to_universal(tmp_path, label)
    universal = run_on_ranks(3, _resume, str(tmp_path), True, env=H.DS_ENV, timeout=420)[0]
    want = H.reference(N, [2] * K + [3] * (N - K))
    for label in SAVED:
        diff = H.max_rel_diff(universal[label], want)
        print(f"compact {label}: universal 2 -> 3 ranks {diff:.2e}")
        assert diff <= 1e-5, f"compact {label}: universal resume differs by {diff:.2e}"
