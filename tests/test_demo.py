"""The demo (`make demo`) at toy size, and its corpus / tokenizer.

The full demo (300 steps, d=128, ~5 minutes) is run by hand; here it runs end to end with a
tiny model through the same launcher, and the table, results and plot are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))

import data  # noqa: E402  (examples/data.py)

TINY = ["--steps", "6", "--vocab-size", "128", "--max-tokens", "20000", "--seq-len", "16",
        "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--micro-batch", "2"]


def _demo(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_tokenizer_is_deterministic_and_ranks_by_frequency(tmp_path: Path) -> None:
    words = "b a c a b a <unk> z".split()
    assert data.build_vocab(words, 4) == ["<unk>", "a", "b", "c"]  # c and z tie: alphabetical
    assert data.build_vocab("y x y x".split(), 3) == ["<unk>", "x", "y"]  # tie: alphabetical
    assert data.encode(["a", "q", "c"], ["<unk>", "a", "b", "c"]).tolist() == [1, 0, 3]
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1  # word word word\n" * 200)
    first = data.load(data.prepare(tmp_path / "one", paths=[text], vocab_size=16))
    second = data.load(data.prepare(tmp_path / "two", paths=[tmp_path], vocab_size=16))
    assert first.vocab == second.vocab and np.array_equal(first.tokens_N, second.tokens_N)
    assert first.counts_V.sum() == first.n_train and first.vocab[1] == "word"


def test_no_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(b"\x89PNG\0\0")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.NoTextError, match="holds no text"):
        data.find_text_files([tmp_path])
    with pytest.raises(data.NoTextError, match="does not exist"):
        data.find_text_files([tmp_path / "missing"])
    proc = _demo("--data", str(tmp_path), "--out", str(tmp_path / "out"), timeout=60)
    assert proc.returncode != 0 and "holds no text" in proc.stderr
    assert not (tmp_path / "out" / "AdamW").exists()


def _assert_quiet(proc: subprocess.CompletedProcess, out: Path) -> None:
    """What a newcomer reads: one short line per run, bars without nan, no warnings; the full
    launch commands and every rank's output are in OUT/<optimizer>/launch.log."""
    shown = proc.stdout + proc.stderr
    for name in ("AdamW", "CoupledAdam"):
        [header] = [line for line in shown.splitlines() if line.startswith(f"== {name}:")]
        assert "--" not in header, header  # no command line
        log = (out / name / "launch.log").read_text()
        assert "demo.py runs:\n" in log and "deepspeed.sh runs:\n" in log, log[:2000]
        for noise in ("FutureWarning", "Attempting to get learning rate"):
            assert noise not in log, noise  # from DeepSpeed under our engine.step(), filtered
    assert "val=" in shown and "=nan" not in shown, shown[-3000:]
    assert "Warning" not in shown and "WARNING" not in shown, shown[-3000:]
    assert "train_ds.py --config" not in shown and "[train_ds] done" not in shown, shown[-3000:]


@pytest.mark.slow
def test_demo_smoke(tmp_path: Path) -> None:
    """Both optimizers through launch/deepspeed.sh on 2 CPU ranks; the table and files appear."""
    out = tmp_path / "demo"
    proc = _demo("--out", str(out), "--min-ratio", "0", "--eval-interval", "3", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_quiet(proc, out)
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["AdamW", "CoupledAdam"]
    for name, m in results.items():
        assert m["optimizer"] == name and m["steps"] == 6 and m["world_size"] == 2
        assert m["zero_stage"] == 2 and np.isfinite(m["val_loss"]) and m["mu_norm_rel"] > 0
        row = next(line for line in proc.stdout.splitlines() if line.startswith(name))
        assert f"{m['mu_norm_rel']:.4f}" in row and f"{m['val_loss']:.3f}" in row
    assert results["AdamW"]["val_loss"] != results["CoupledAdam"]["val_loss"]
    for header in ("val loss", "Iso", "||mu||^r", "kappa", "rho"):
        assert header in proc.stdout
    assert "AdamW / CoupledAdam" in proc.stdout
    assert (out / "compare.png").stat().st_size > 0
    # The report reads the ZeRO-2 checkpoint shards, the table the live model: same matrices.
    report_rows = {line.split()[0]: line.split()[1:]
                   for line in (out / "report.txt").read_text().splitlines() if line.strip()}
    for column, name in enumerate(("AdamW", "CoupledAdam")):
        for key in ("iso", "mu_norm_rel", "kappa", "rho"):
            assert report_rows[key][column] == f"{results[name][key]:.4g}", (name, key)
