"""DeepSpeed checkpoints with CoupledAdam: ``save_checkpoint`` / ``load_checkpoint`` resume exactly
in new processes, and a universal checkpoint (``ds_to_universal``) saved at 2 ranks resumes at 3
on the single-process trajectory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

N, K = 8, 4                      # steps in all, steps before the checkpoint
RESUME = {"zero2": 2, "zero3": 3, "zero2-offload": 2}
UNIVERSAL = {"zero2": 2, "zero3": 3}
pytestmark = pytest.mark.slow


def _config(label: str, stage: int, world: int) -> dict[str, Any]:
    return H.ds_config(stage, world=world, offload=label.endswith("offload"))


def _engine(cfg: dict[str, Any]) -> Any:
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    model = H.make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _straight_and_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """Per configuration: N steps straight (the reference), and K steps then a checkpoint."""
    out = {}
    for label, stage in {**RESUME, **{f"u-{k}": v for k, v in UNIVERSAL.items()}}.items():
        if not label.startswith("u-"):
            engine = _engine(_config(label, stage, world))
            H.train(engine, rank, 0, N)
            out[label] = H.full_params(engine)
            engine.destroy()
        engine = _engine(_config(label, stage, world))
        H.train(engine, rank, 0, K)
        engine.save_checkpoint(os.path.join(root, label), tag="k")
        engine.destroy()
    return out if rank == 0 else {}


def _load_and_continue(rank: int, world: int, root: str, labels: dict[str, int],
                       universal: bool) -> dict[str, Any]:
    out = {}
    for label, stage in labels.items():
        cfg = _config(label, stage, world)
        if universal:
            cfg["checkpoint"] = {"load_universal": True}
        engine = _engine(cfg)
        path, _ = engine.load_checkpoint(os.path.join(root, label), tag="k_universal" if universal
                                         else "k")
        assert path is not None, f"{label}: nothing loaded"
        H.train(engine, rank, K, N - K)
        out[label] = H.full_params(engine)
        engine.destroy()
    return out if rank == 0 else {}


def _to_universal(root: Path, label: str) -> None:
    """DeepSpeed's own converter, run as its module."""
    folder = root / label
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(folder / "k"), "--output_folder", str(folder / "k_universal"),
           "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    done = subprocess.run(cmd, env={**os.environ, **H.DS_ENV}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, \
        f"ds_to_universal failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_resume_and_universal_checkpoint(tmp_path):
    straight = run_on_ranks(2, _straight_and_save, str(tmp_path), env=H.DS_ENV, timeout=420)[0]
    resumed = run_on_ranks(2, _load_and_continue, str(tmp_path), RESUME, False, env=H.DS_ENV,
                           timeout=420)[0]
    for label in RESUME:
        diff = H.max_rel_diff(resumed[label], straight[label])
        print(f"resume {label}: max relative difference {diff:.2e}")
        assert diff <= 1e-6, f"{label}: resumed run differs from the straight run by {diff:.2e}"

    universal = {f"u-{k}": v for k, v in UNIVERSAL.items()}
    for label in universal:
        _to_universal(tmp_path, label)
    got = run_on_ranks(3, _load_and_continue, str(tmp_path), universal, True, env=H.DS_ENV,
                       timeout=420)[0]
    want = H.reference(N, [2] * K + [3] * (N - K))
    assert H.max_rel_diff(H.reference(N, 2), want) > 1e-4, "2->3 ranks must change the data"
    for label in universal:
        diff = H.max_rel_diff(got[label], want)
        print(f"universal {label} 2 -> 3 ranks: max relative difference {diff:.2e}")
        assert diff <= 1e-5, f"{label}: universal resume at 3 ranks differs by {diff:.2e}"
