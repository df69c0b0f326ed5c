"""Embedding-quality metrics of a [V, H] matrix, whole or sharded over ranks (DESIGN §3).

With E the embedding matrix restricted to the real vocabulary (rows ``< vocab_size``; padded
rows are left out), e_i its rows and mu = mean_i e_i:

* ``iso``: Iso(E) = min_c Z(c) / max_c Z(c), Z(c) = sum_i exp(c . e_i), c over the unit
  eigenvectors of E^T E. Both signs of each eigenvector are used (2H directions): an
  eigenvector's sign is arbitrary, and fixing one would make the number depend on the
  eigensolver. 1 = isotropic; a shifted mean drives it towards 0.
* ``mu_norm``: ||mu||.  ``mu_norm_rel``: ||mu|| / mean_i ||e_i|| (the paper's headline measure).
* ``kappa``: sigma_min / sigma_max of E (0 when E is numerically rank-deficient, see below).
* ``rho``: Pearson correlation of ||e_i|| with log unigram frequency over tokens seen (count > 0);
  ``None`` when no frequencies are given.
* ``mean_cosine``: mean cosine similarity over pairs of distinct rows (a zero row counts 0).

Every quantity is a sum over rows, so a sharded matrix needs only sums across ranks: one packed
all-reduce of E^T E [H, H] with the [H] row sums and a few scalars, then two [2H] all-reduces
(max, then rescaled sums) for the log-sum-exp of Z(c). A row split between ranks (flat ZeRO /
distributed-optimizer slices cut mid-row) is completed on the rank that holds its column 0:
every rank all-gathers its at most two partial rows ([2, H + 1] per rank, skipped when no row
is split). The whole-matrix function runs the same code with no groups, so both give the
same numbers.

kappa comes from the eigenvalues of E^T E computed in float64, which resolve sigma_min / sigma_max
only down to about sqrt(max(V, H) * eps64) (~1e-6); anything below is reported as exactly 0.

Shapes in names: V vocabulary rows, H hidden columns, N local flat elements, R rows of a block.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from coupled_ds import dtensor
from coupled_ds.geometry import ShardGeometry

__all__ = [
    "EmbeddingMetrics",
    "embedding_metrics",
    "load_token_counts",
    "log_frequencies",
    "save_token_counts",
    "sharded_embedding_metrics",
]

_CHUNK_ROWS = 4096  # rows converted to float64 at a time: bounds the extra memory
_N_SCALARS = 8      # sum_norm, nonzero, rho count, sx, sy, sxx, syy, sxy


@dataclass(frozen=True)
class EmbeddingMetrics:
    """The embedding-quality numbers of one matrix (definitions in the module docstring)."""

    iso: float
    mu_norm: float
    mu_norm_rel: float
    kappa: float
    rho: float | None
    mean_cosine: float

    def as_dict(self) -> dict[str, float | None]:
        """Field name -> value, in declaration order."""
        return dataclasses.asdict(self)


def embedding_metrics(E_VH: torch.Tensor, *, log_freq_V: torch.Tensor | None = None,
                      vocab_size: int | None = None) -> EmbeddingMetrics:
    """Metrics of a whole [V, H] matrix held by this process (no collectives).

    A DTensor (FSDP2, tensor parallelism) is not gathered: each rank computes on its local row
    block and the sums are reduced over the mesh dimensions that split the rows, so every rank
    of the mesh must call this (see :func:`coupled_ds.dtensor.geometry`).

    Args:
        E_VH: The embedding matrix, any float dtype and device, or a DTensor of it.
        log_freq_V: Log unigram frequency per token, shape [vocab_size] or [V]; ``-inf`` (or
            nan) marks tokens never seen, which ``rho`` leaves out. See :func:`log_frequencies`.
        vocab_size: Real vocabulary; rows at or beyond it are padding and are left out.
    """
    if E_VH.dim() != 2:
        raise ValueError(f"embedding_metrics: E_VH has shape {tuple(E_VH.shape)}; expected a 2-D "
                         "[V, H] matrix with one row per token.")
    if dtensor.is_dtensor(E_VH):
        geometry = dtensor.geometry(E_VH.detach(), "embedding")
        return sharded_embedding_metrics(dtensor.local(E_VH.detach()), geometry,
                                         log_freq_V=log_freq_V, vocab_size=vocab_size)
    V, H = E_VH.shape
    geometry = ShardGeometry("embedding", V, H)
    return sharded_embedding_metrics(E_VH, geometry, log_freq_V=log_freq_V, vocab_size=vocab_size)


def sharded_embedding_metrics(local: torch.Tensor, geometry: ShardGeometry, *,
                              log_freq_V: torch.Tensor | None = None,
                              vocab_size: int | None = None) -> EmbeddingMetrics:
    """The same metrics from this rank's piece of the matrix, reducing over ``geometry.groups``.

    Every rank in the groups must call this, in the same order, even with ``geometry.numel == 0``.

    Args:
        local: This rank's tensor: a [R, H] row block or a flat slice; the owned elements are
            ``local.flatten()[offset_local : offset_local + numel]`` (the rest is engine padding).
        geometry: Where the owned elements sit in the full [V, H] matrix.
        log_freq_V: As :func:`embedding_metrics`; the full vector on every rank.
        vocab_size: As :func:`embedding_metrics`.
    """
    V, H = geometry.rows_global, geometry.cols
    n_rows = _check_vocab_size(vocab_size, V)
    geometry.check_fits(local, geometry.key)
    log_freq = _check_log_freq(log_freq_V, n_rows, V)
    flat_N = local.detach().reshape(-1)
    device = flat_N.device
    if log_freq is not None:
        log_freq = log_freq.to(device=device, dtype=torch.float64)
    body, tail = _split_rows(flat_N, geometry, n_rows)
    tail = _complete_tail_row(tail, H, geometry.groups, device)
    blocks = _OwnedRows(body, tail)

    stats = _first_pass(blocks, H, log_freq, device)
    _all_reduce(stats, geometry.groups, dist.ReduceOp.SUM)
    scalars, sum_H, unit_sum_H, gram_HH = _unpack(stats, H)
    eigenvalues_H, eigenvectors_HH = torch.linalg.eigh(gram_HH)
    log_z_2H = _log_partition(blocks, eigenvectors_HH, geometry.groups, device)
    return _finish(scalars, sum_H, unit_sum_H, eigenvalues_H, log_z_2H, n_rows, H,
                   with_rho=log_freq is not None)


# ----------------------------------------------------------------------------- validation


def _check_vocab_size(vocab_size: int | None, V: int) -> int:
    if vocab_size is None:
        return V
    if not (isinstance(vocab_size, int) and 1 <= vocab_size <= V):
        raise ValueError(f"embedding metrics: vocab_size={vocab_size!r} must be an int in "
                         f"[1, {V}] (the matrix has {V} rows; rows >= vocab_size are padding).")
    return vocab_size


def _check_log_freq(log_freq_V: torch.Tensor | None, n_rows: int, V: int) -> torch.Tensor | None:
    if log_freq_V is None:
        return None
    log_freq_V = torch.as_tensor(log_freq_V)
    if log_freq_V.dim() != 1 or log_freq_V.numel() not in (n_rows, V):
        raise ValueError(
            f"embedding metrics: log_freq_V has shape {tuple(log_freq_V.shape)}; expected a 1-D "
            f"vector of length {n_rows} (the vocabulary) or {V} (all rows). Count the tokens "
            "with the tokenizer of this model.")
    return log_freq_V[:n_rows]


# ----------------------------------------------------------------------------- rows


@dataclass
class _OwnedRows:
    """The complete rows this rank accounts for: those whose column 0 it holds.

    ``body`` is (first global row, [R, H] view of whole local rows) or None; ``tail`` is
    (global row, [H] float64 row completed from every rank's pieces) or None.
    """

    body: tuple[int, torch.Tensor] | None
    tail: tuple[int, torch.Tensor] | None

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first global row, [R, H] float64 rows), at most ``_CHUNK_ROWS`` rows each."""
        if self.body is not None:
            row0, rows_RH = self.body
            for i in range(0, rows_RH.shape[0], _CHUNK_ROWS):
                yield row0 + i, rows_RH[i : i + _CHUNK_ROWS].to(torch.float64)
        if self.tail is not None:
            row, row_H = self.tail
            yield row, row_H.unsqueeze(0)


@dataclass
class _PartialRow:
    row: int
    col_start: int
    values: torch.Tensor


def _split_rows(flat_N: torch.Tensor, geometry: ShardGeometry, n_rows: int
                ) -> tuple[tuple[int, torch.Tensor] | None, tuple[list[_PartialRow], int | None]]:
    """Whole local rows as a [R, H] view, and the partial rows (head / tail) of this slice.

    Returns the body and (partial rows, global row of the tail piece that starts at column 0,
    or None). Only that tail row is owned here; a head piece (column > 0) belongs to the rank
    holding its column 0.
    """
    H = geometry.cols
    to_global = geometry.start_global_flat - geometry.offset_local
    body = None
    partials: list[_PartialRow] = []
    owned_tail = None
    for piece in geometry.pieces(rows_limit=n_rows):
        values = flat_N[piece.start_local : piece.start_local + piece.length]
        row = (piece.start_local + to_global) // H
        if piece.rows:
            body = (row, values.view(piece.rows, H))
        else:
            partials.append(_PartialRow(row, piece.col_start, values))
            if piece.col_start == 0:
                owned_tail = row
    return body, (partials, owned_tail)


def _all_gather_over(t: torch.Tensor, groups: Sequence[dist.ProcessGroup | None]) -> torch.Tensor:
    """Concatenation of ``t`` from every rank of the product of ``groups`` (gathered in turn)."""
    for group in groups:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        t = torch.cat(parts)
    return t


def _complete_tail_row(tail: tuple[list[_PartialRow], int | None], H: int,
                       groups: Sequence[dist.ProcessGroup | None], device: torch.device
                       ) -> tuple[int, torch.Tensor] | None:
    """Sum every rank's pieces of the row this rank owns but holds only in part.

    Each rank packs its <= 2 partial rows as [2, H + 1] (global row id, then the values at their
    columns, zeros elsewhere). Row ids are gathered first ([2] per rank); the rows themselves
    only if some rank has a split row, so row-block sharding (tensor parallel) sends no rows.
    """
    partials, owned_row = tail
    packed = torch.zeros(2, H + 1, dtype=torch.float64, device=device)
    packed[:, 0] = -1.0
    for slot, p in enumerate(partials):
        packed[slot, 0] = p.row
        packed[slot, 1 + p.col_start : 1 + p.col_start + p.values.numel()] = p.values.double()
    if groups:
        row_ids = _all_gather_over(packed[:, 0].clone(), groups)
        if bool((row_ids >= 0).any()):
            packed = _all_gather_over(packed, groups)
    if owned_row is None:
        return None
    mine = packed[:, 0] == owned_row
    return owned_row, packed[mine, 1:].sum(0)


# ----------------------------------------------------------------------------- passes


def _first_pass(blocks: _OwnedRows, H: int, log_freq: torch.Tensor | None,
                device: torch.device) -> torch.Tensor:
    """This rank's sums packed as [scalars, sum_H, unit_sum_H, gram_HH.flatten()]."""
    scalars = torch.zeros(_N_SCALARS, dtype=torch.float64, device=device)
    sum_H = torch.zeros(H, dtype=torch.float64, device=device)
    unit_sum_H = torch.zeros(H, dtype=torch.float64, device=device)
    gram_HH = torch.zeros(H, H, dtype=torch.float64, device=device)
    for row0, X_RH in blocks.chunks():
        gram_HH.addmm_(X_RH.T, X_RH)
        sum_H += X_RH.sum(0)
        norm_R = X_RH.norm(dim=1)
        nonzero_R = norm_R > 0
        unit_sum_H += (X_RH / torch.where(nonzero_R, norm_R, 1.0).unsqueeze(1)).sum(0)
        scalars[0] += norm_R.sum()
        scalars[1] += nonzero_R.sum()
        if log_freq is not None:
            y = log_freq[row0 : row0 + X_RH.shape[0]]
            seen = torch.isfinite(y)
            x, y = norm_R[seen], y[seen]
            scalars[2:] += torch.stack([seen.sum().double(), x.sum(), y.sum(), (x * x).sum(),
                                        (y * y).sum(), (x * y).sum()])
    return torch.cat([scalars, sum_H, unit_sum_H, gram_HH.flatten()])


def _unpack(stats: torch.Tensor, H: int) -> tuple[list[float], torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    s = _N_SCALARS
    return (stats[:s].tolist(), stats[s : s + H], stats[s + H : s + 2 * H],
            stats[s + 2 * H :].view(H, H))


def _all_reduce(t: torch.Tensor, groups: Sequence[dist.ProcessGroup | None],
                op: dist.ReduceOp) -> None:
    for group in groups:
        dist.all_reduce(t, op=op, group=group)


def _log_partition(blocks: _OwnedRows, eigenvectors_HH: torch.Tensor,
                   groups: Sequence[dist.ProcessGroup | None], device: torch.device
                   ) -> torch.Tensor:
    """log Z(c) for c = +eigenvectors then -eigenvectors, [2H].

    One pass over the rows with a running log-sum-exp (local max ``max_2H``, ``sum_2H`` =
    sum exp(p - max_2H)); ranks then agree on the global max and rescale their sums to it.
    """
    H = eigenvectors_HH.shape[0]
    max_2H = torch.full((2 * H,), -math.inf, dtype=torch.float64, device=device)
    sum_2H = torch.zeros(2 * H, dtype=torch.float64, device=device)
    for _, X_RH in blocks.chunks():
        P_RH = X_RH @ eigenvectors_HH
        P_R2H = torch.cat([P_RH, -P_RH], dim=1)
        new_max_2H = torch.maximum(max_2H, P_R2H.amax(0))
        sum_2H = sum_2H * _exp_shift(max_2H, new_max_2H) + (P_R2H - new_max_2H).exp().sum(0)
        max_2H = new_max_2H
    if groups:
        global_max_2H = max_2H.clone()
        _all_reduce(global_max_2H, groups, dist.ReduceOp.MAX)
        sum_2H = sum_2H * _exp_shift(max_2H, global_max_2H)
        _all_reduce(sum_2H, groups, dist.ReduceOp.SUM)
        max_2H = global_max_2H
    return max_2H + sum_2H.log()


def _exp_shift(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """exp(old - new), with exp(-inf - x) = 0 also when both are -inf (no rows yet)."""
    return torch.where(torch.isinf(old), torch.zeros_like(old), (old - new).exp())


def _finish(scalars: list[float], sum_H: torch.Tensor, unit_sum_H: torch.Tensor,
            eigenvalues_H: torch.Tensor, log_z_2H: torch.Tensor, n_rows: int, H: int, *,
            with_rho: bool) -> EmbeddingMetrics:
    sum_norm, nonzero, count, sx, sy, sxx, syy, sxy = scalars
    mu_norm = (sum_H / n_rows).norm().item()
    mean_norm = sum_norm / n_rows
    mu_norm_rel = mu_norm / mean_norm if mean_norm > 0 else 0.0
    iso = math.exp((log_z_2H.min() - log_z_2H.max()).item())
    pairs = n_rows * (n_rows - 1)
    mean_cosine = ((unit_sum_H.square().sum().item() - nonzero) / pairs) if pairs else math.nan
    return EmbeddingMetrics(iso=iso, mu_norm=mu_norm, mu_norm_rel=mu_norm_rel,
                            kappa=_kappa(eigenvalues_H, n_rows, H), rho=_pearson(
                                count, sx, sy, sxx, syy, sxy) if with_rho else None,
                            mean_cosine=mean_cosine)


def _kappa(eigenvalues_H: torch.Tensor, n_rows: int, H: int) -> float:
    """sigma_min / sigma_max from the eigenvalues of E^T E (ascending); 0 below resolution."""
    top = eigenvalues_H[-min(n_rows, H):].clamp_min(0.0)
    lam_min, lam_max = top[0].item(), top[-1].item()
    if lam_max <= 0.0 or lam_min <= lam_max * max(n_rows, H) * torch.finfo(torch.float64).eps:
        return 0.0
    return math.sqrt(lam_min / lam_max)


def _pearson(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
    if n < 2 or var_x <= 0 or var_y <= 0:
        return math.nan
    return (n * sxy - sx * sy) / math.sqrt(var_x * var_y)


# ----------------------------------------------------------------------------- frequencies


def log_frequencies(counts_V: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    """log(count) per token as float64, ``-inf`` for tokens never seen (left out of ``rho``).

    Counts or relative frequencies both work: the Pearson correlation ignores the offset.
    """
    counts = torch.as_tensor(np.asarray(counts_V, dtype=np.float64))
    if counts.dim() != 1 or bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"log_frequencies: counts of shape {tuple(counts.shape)} must be a 1-D "
                         "vector of finite numbers >= 0, one per token id.")
    return torch.where(counts > 0, counts.log(), torch.full_like(counts, -math.inf))


def save_token_counts(path: str | os.PathLike, counts_V: torch.Tensor | np.ndarray
                      | Sequence[float]) -> None:
    """Write token counts (index = token id) as ``.npy`` or ``.json`` (a list), by extension."""
    counts = np.asarray(counts_V.cpu() if isinstance(counts_V, torch.Tensor) else counts_V)
    path = os.fspath(path)
    if path.endswith(".npy"):
        np.save(path, counts)
    elif path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(counts.tolist(), f)
    else:
        raise ValueError(f"save_token_counts: path={path!r} must end in .npy or .json.")


def load_token_counts(path: str | os.PathLike) -> np.ndarray:
    """Read token counts written by :func:`save_token_counts` (or by hand), as float64 [V].

    Formats, by extension: ``.npy`` (1-D array), ``.json`` (a list of numbers, or an object
    with a ``"counts"`` list), ``.pt`` (a 1-D tensor), anything else: text, one number per
    line. Index = token id; 0 = never seen.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".npy"):
            counts = np.load(path, allow_pickle=False)
        elif path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
            counts = np.asarray(data["counts"] if isinstance(data, dict) else data)
        elif path.endswith(".pt"):
            counts = torch.load(path, map_location="cpu", weights_only=True).numpy()
        else:
            counts = np.loadtxt(path, ndmin=1)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"token counts file {path!r} could not be read ({err}). Expected .npy, "
                         ".json (list of counts), .pt (1-D tensor) or text (one count per line).")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"token counts file {path!r} holds shape {counts.shape}; expected a "
                         "1-D vector with one count per token id.")
    return counts
