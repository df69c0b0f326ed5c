"""Embedding metrics: known answers, a brute-force float64 reference, and sharded == whole on 2
and 3 gloo ranks (row blocks and flat slices cut mid-row), with a no-reduction negative control."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from coupled_ds import ShardGeometry
from coupled_ds.metrics import (EmbeddingMetrics, embedding_metrics, load_token_counts,
                                log_frequencies, save_token_counts, sharded_embedding_metrics)
from tests.dist import run_on_ranks

FIELDS = ["iso", "mu_norm", "mu_norm_rel", "kappa", "rho", "mean_cosine"]


def _reference(E, counts=None, vocab_size=None):
    """Brute force in float64 numpy: SVD, full cosine matrix, np.corrcoef."""
    E = E.double().numpy()[:vocab_size]
    V = E.shape[0]
    _, C = np.linalg.eigh(E.T @ E)
    Z = np.exp(np.concatenate([E @ C, -E @ C], axis=1)).sum(0)
    s = np.linalg.svd(E, compute_uv=False)
    norms = np.linalg.norm(E, axis=1)
    unit = E / norms[:, None]
    mu = E.mean(0)
    out = dict(iso=Z.min() / Z.max(), mu_norm=np.linalg.norm(mu),
               mu_norm_rel=np.linalg.norm(mu) / norms.mean(), kappa=s.min() / s.max(),
               mean_cosine=((unit @ unit.T).sum() - V) / (V * (V - 1)), rho=None)
    if counts is not None:
        seen = counts[:V] > 0
        out["rho"] = np.corrcoef(norms[seen], np.log(counts[:V][seen]))[0, 1]
    return out


def _assert_metrics(got: EmbeddingMetrics, want: dict, rtol=1e-7):
    for name in FIELDS:
        g, w = getattr(got, name), want[name]
        if w is None:
            assert g is None, name
        else:
            assert g == pytest.approx(w, rel=rtol, abs=1e-12), name


def _counts(V, seed=1):
    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(seed)).double()
    counts[::7] = 0.0  # unseen tokens are left out of rho
    return counts.numpy()


# ----------------------------------------------------------------------------- known answers


def test_isotropic_gaussian_is_isotropic():
    E = 0.1 * torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    m = embedding_metrics(E)
    assert m.iso > 0.97
    assert m.mu_norm_rel < 0.05
    assert abs(m.mean_cosine) < 0.01
    assert 0.5 < m.kappa < 1.0


def test_shift_by_known_vector_gives_exact_mu_norm_rel():
    """Rows b ± r f_k with f_k orthonormal and orthogonal to b: mu = b, every ||e_i|| equal."""
    H, r = 8, 2.0
    basis = torch.linalg.qr(torch.randn(H, H, generator=torch.Generator().manual_seed(3),
                                        dtype=torch.float64))[0]
    b = 1.5 * basis[:, 0]
    offsets = torch.cat([r * basis[:, 1:].T, -r * basis[:, 1:].T])  # [2(H-1), H], mean 0
    E = b + offsets
    n = E.shape[0]
    m = embedding_metrics(E)
    assert m.mu_norm == pytest.approx(1.5, rel=1e-12)
    assert m.mu_norm_rel == pytest.approx(1.5 / math.hypot(1.5, r), rel=1e-12)
    assert m.mean_cosine == pytest.approx((1.5**2 - r**2 / (n - 1)) / (1.5**2 + r**2), rel=1e-12)
    assert m.iso < 0.1  # the shift shows up as anisotropy


def test_gaussian_shifted_by_known_vector():
    gen = torch.Generator().manual_seed(4)
    H = 16
    b = torch.zeros(H, dtype=torch.float64)
    b[3] = 2.0
    E = 0.5 * torch.randn(8192, H, generator=gen, dtype=torch.float64) + b
    m = embedding_metrics(E)
    assert m.mu_norm == pytest.approx(2.0, abs=0.02)
    assert m.mu_norm_rel == pytest.approx(2.0 / math.sqrt(4.0 + 0.25 * H), rel=0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_matrix_has_kappa_zero(dtype):
    gen = torch.Generator().manual_seed(5)
    low_rank = (torch.randn(300, 4, generator=gen, dtype=torch.float64)
                @ torch.randn(4, 24, generator=gen, dtype=torch.float64))
    duplicated = torch.randn(300, 24, generator=gen).to(dtype)
    duplicated[:, 1] = duplicated[:, 0]  # exactly rank-deficient in any dtype
    for E in ([low_rank, duplicated] if dtype == torch.float64 else [duplicated]):
        assert embedding_metrics(E).kappa == 0.0
    assert embedding_metrics(torch.randn(300, 24, generator=gen, dtype=dtype)).kappa > 0.1
    # fewer rows than columns: kappa of the [V, H] matrix's min(V, H) singular values
    wide = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(wide)
    assert embedding_metrics(wide).kappa == pytest.approx((s.min() / s.max()).item(), rel=1e-6)


def test_rho_is_one_when_norms_follow_log_frequency():
    gen = torch.Generator().manual_seed(6)
    counts = torch.randint(1, 1000, (500,), generator=gen).double()
    counts[::5] = 0.0
    log_f = log_frequencies(counts)
    unit = torch.nn.functional.normalize(torch.randn(500, 12, generator=gen, dtype=torch.float64))
    E = unit * (1.0 + 0.3 * torch.nan_to_num(log_f, neginf=-50.0)).unsqueeze(1)
    m = embedding_metrics(E, log_freq_V=log_f)
    assert m.rho == pytest.approx(1.0, abs=1e-12)
    negated = torch.where(torch.isfinite(log_f), -log_f, log_f)  # unseen stay unseen
    assert embedding_metrics(E, log_freq_V=negated).rho == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("vocab_size", [None, 90])
def test_matches_brute_force_reference(vocab_size):
    gen = torch.Generator().manual_seed(7)
    E = torch.randn(100, 10, generator=gen) * torch.linspace(0.5, 2.0, 10) + 0.3
    if vocab_size:
        E[vocab_size:] = 1e3  # padding rows: would dominate every metric if counted
    counts = _counts(100)
    got = embedding_metrics(E, log_freq_V=log_frequencies(counts), vocab_size=vocab_size)
    _assert_metrics(got, _reference(E, counts, vocab_size))
    assert embedding_metrics(E, vocab_size=vocab_size).rho is None
    assert set(got.as_dict()) == set(FIELDS)


def test_bad_input_raises_value_error():
    E = torch.randn(10, 4)
    with pytest.raises(ValueError, match="log_freq_V"):
        embedding_metrics(E, log_freq_V=torch.zeros(7))
    with pytest.raises(ValueError, match="vocab_size=11"):
        embedding_metrics(E, vocab_size=11)
    with pytest.raises(ValueError, match="2-D"):
        embedding_metrics(torch.randn(10))
    with pytest.raises(ValueError, match="1-D"):
        log_frequencies(torch.ones(2, 2))


@pytest.mark.parametrize("ext", [".npy", ".json"])
def test_token_counts_round_trip(tmp_path, ext):
    counts = np.array([3, 0, 7, 1])
    save_token_counts(tmp_path / f"c{ext}", counts)
    np.testing.assert_array_equal(load_token_counts(tmp_path / f"c{ext}"), counts)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be read"):
        load_token_counts(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- sharded

V, H, VOCAB = 37, 6, 33
# Cut points in the global flat frame (rank r owns [cuts[r], cuts[r+1])).
CASES = {
    2: {"rows": [0, 20 * H, V * H], "flat": [0, 113, V * H], "empty_rank": [0, V * H, V * H]},
    3: {"rows": [0, 12 * H, 25 * H, V * H], "flat": [0, 75, 149, V * H],
        "tiny_middle": [0, 100, 103, V * H],       # rank 1: end of row 16 + start of row 17
        "row_over_3_ranks": [0, 97, 100, V * H]},  # row 16 is cut into 3 pieces
}


def _matrix():
    gen = torch.Generator().manual_seed(11)
    E = torch.randn(V, H, generator=gen) * torch.linspace(0.5, 2.0, H) + 0.4
    E[VOCAB:] = 50.0
    return E


def _local_piece(E, rank, cuts, layout):
    """The rank's tensor and geometry: a [R, H] block, or a padded 1-D slice (garbage around)."""
    start, end = cuts[rank], cuts[rank + 1]
    if layout == "rows":
        return E[start // H : end // H].clone(), start, end - start, 0
    local = torch.full((end - start + 5,), 1e6)  # engine padding: must never be read
    local[2 : 2 + end - start] = E.reshape(-1)[start:end]
    return local, start, end - start, 2


def _sharded_cases(rank, world):
    E, counts = _matrix(), _counts(V)
    log_f = log_frequencies(counts)
    out = {}
    for name, cuts in CASES[world].items():
        cuts_a_row = any(c % H for c in cuts)
        assert name in ("rows", "empty_rank") or cuts_a_row, "a flat case must cut a row"
        local, start, numel, offset = _local_piece(E, rank, cuts, name)
        for reduce in (True, False):
            geometry = ShardGeometry("E", V, H, start_global_flat=start, numel=numel,
                                     offset_local=offset,
                                     groups=(dist.group.WORLD,) if reduce else ())
            for vocab_size, lf in ((None, None), (VOCAB, log_f)):
                m = sharded_embedding_metrics(local, geometry, log_freq_V=lf,
                                              vocab_size=vocab_size)
                out[(name, reduce, vocab_size)] = m.as_dict()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_whole_matrix(world):
    results = run_on_ranks(world, _sharded_cases)
    E, counts = _matrix(), _counts(V)
    whole = {vs: embedding_metrics(E, log_freq_V=log_frequencies(counts) if vs else None,
                                   vocab_size=vs).as_dict() for vs in (None, VOCAB)}
    _assert_metrics(EmbeddingMetrics(**whole[VOCAB]), _reference(E, counts, VOCAB))
    for name in CASES[world]:
        for vocab_size in (None, VOCAB):
            for rank in range(world):
                got = results[rank][(name, True, vocab_size)]
                _assert_metrics(EmbeddingMetrics(**got), whole[vocab_size], rtol=1e-9)
            # Negative control: without the reduction, some rank sees only its own piece.
            unreduced = [results[r][(name, False, vocab_size)] for r in range(world)]
            assert any(abs(u["mu_norm"] - whole[vocab_size]["mu_norm"]) > 1e-3
                       or abs(u["iso"] - whole[vocab_size]["iso"]) > 1e-3 for u in unreduced), name
