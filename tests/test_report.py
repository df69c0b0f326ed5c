"""The report command: a real ZeRO 2 checkpoint (written by tests/test_telemetry.py's DeepSpeed
run, shared within a session) gives the table and a PNG; bad input exits 2 with a message."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from coupled_ds.metrics import embedding_metrics, log_frequencies, save_token_counts
from coupled_ds.report import main
from tests.test_telemetry import H, V, deepspeed_run


def _table_values(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("iso", "mu_norm", "mu_norm_rel", "kappa", "rho", "mean_cosine"):
            rows[parts[0]] = parts[1:]
    return rows


def _assert_png(path, min_width: int) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= min_width, img.shape
    rgb = img[..., :3]
    non_white = (rgb < 0.95).any(axis=-1).mean()
    assert non_white > 0.02 and rgb.std() > 0.05, "the figure is blank"


@pytest.mark.slow
def test_zero2_checkpoint_table_and_plot(tmp_path, capsys):
    root, _ = deepspeed_run()
    ckpt, counts = os.path.join(root, "ckpt_zero2"), os.path.join(root, "counts.npy")
    png = tmp_path / "one.png"
    assert main([ckpt, "--freq", counts, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = _table_values(out)
    assert "wte.weight tied to lm_head.weight" in out
    last = [json.loads(line) for line in open(os.path.join(root, "zero2.jsonl"))][-1]
    for metric, cells in rows.items():  # the checkpoint's fp32 weights = the last logged step
        assert float(cells[0]) == pytest.approx(last[metric], rel=1e-3, abs=1e-6), metric
    _assert_png(png, min_width=450)


@pytest.mark.slow
def test_two_checkpoints_side_by_side(tmp_path, capsys):
    root, _ = deepspeed_run()
    ckpt = os.path.join(root, "ckpt_zero2")
    gen = torch.Generator().manual_seed(0)
    shifted = torch.randn(V, H, generator=gen) * 0.1 + 1.0  # strongly anisotropic
    torch.save({"model": {"wte.weight": shifted, "wpe.weight": torch.randn(8, H)}},
               tmp_path / "other.pt")
    png = tmp_path / "two.png"
    assert main([ckpt, str(tmp_path / "other.pt"), "--plot", str(png)]) == 0
    rows = _table_values(capsys.readouterr().out)
    want = embedding_metrics(shifted)
    assert float(rows["mu_norm_rel"][-1]) == pytest.approx(want.mu_norm_rel, rel=1e-3)
    assert float(rows["iso"][-1]) == pytest.approx(want.iso, rel=1e-3, abs=1e-6)
    assert rows["rho"] == ["-", "(no", "--freq)"] * 2
    _assert_png(png, min_width=900)


def test_plain_state_dict_names_and_vocab_size(tmp_path, capsys):
    E = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    torch.save({"enc.tokens.weight": E, "other.weight": torch.randn(40, 6)}, tmp_path / "sd.pt")
    counts = np.arange(36)
    save_token_counts(tmp_path / "c.json", counts)
    args = [str(tmp_path / "sd.pt"), "--names", "tokens", "--vocab-size", "36",
            "--freq", str(tmp_path / "c.json")]
    assert main(args) == 0
    rows = _table_values(capsys.readouterr().out)
    want = embedding_metrics(E, vocab_size=36, log_freq_V=log_frequencies(counts))
    assert float(rows["rho"][0]) == pytest.approx(want.rho, rel=1e-3)
    assert float(rows["kappa"][0]) == pytest.approx(want.kappa, rel=1e-3)


def _error(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    torch.save({"fc.weight": torch.randn(3, 4)}, tmp_path / "no_emb.pt")
    torch.save({"wte.weight": torch.randn(10, 4)}, tmp_path / "a.pt")
    torch.save({"wte.weight": torch.randn(12, 4)}, tmp_path / "b.pt")
    np.save(tmp_path / "short.npy", np.ones(5))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    os.makedirs(tmp_path / "empty_dir")
    a = str(tmp_path / "a.pt")
    assert "no 2-D tensor has an embedding name" in _error([str(tmp_path / "no_emb.pt")], capsys)
    assert "--names" in _error([a, "--names", "nothing"], capsys)
    assert "differ" in _error([a, str(tmp_path / "b.pt")], capsys)
    assert "has 5 counts" in _error([a, "--freq", str(tmp_path / "short.npy")], capsys)
    assert "does not exist" in _error([str(tmp_path / "missing.pt")], capsys)
    assert "could not be read" in _error([str(tmp_path / "garbage.pt")], capsys)
    assert "not a DeepSpeed checkpoint" in _error([str(tmp_path / "empty_dir")], capsys)
    assert "--vocab-size 11" in _error([a, "--vocab-size", "11"], capsys)
    with pytest.raises(SystemExit) as exit_info:
        main([a, a, a])
    assert exit_info.value.code == 2
