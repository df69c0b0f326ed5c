"""Embedding metrics and pictures of one or two saved checkpoints (e.g. Adam vs Coupled Adam).

    python -m coupled_ds.report CKPT [CKPT2] [--freq counts.npy] [--plot out.png]
                                [--names REGEX ...] [--vocab-size N]

CKPT is a DeepSpeed checkpoint directory (the ``save_checkpoint`` directory with its ``latest``
file, or one tag directory inside it; ZeRO 1/2/3 shards are consolidated with DeepSpeed's own
``zero_to_fp32``) or a PyTorch file holding a state_dict (also ``{"model": ...}``,
``{"module": ...}`` or ``{"state_dict": ...}``). The embedding matrices are found by name
(``--names`` overrides); an output matrix tied to the input embedding is reported once.

``--freq`` reads token counts, index = token id (``.npy``, ``.json`` list, ``.pt`` tensor, or text
with one count per line; see :func:`coupled_ds.metrics.save_token_counts`); its length must be
the vocabulary size or the matrix's row count. ``--plot`` writes, per checkpoint, the rows
projected on the top two right-singular vectors of E (uncentred PCA: a common offset of all
rows, the anisotropy Coupled Adam removes, stays visible as distance from the origin, marked
+), coloured by log frequency, and below them the normalised singular-value spectra.

Exit status 2 with a message for unusable input (missing path, no embedding, mismatched shapes,
wrong frequency length).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from coupled_ds.metrics import (EmbeddingMetrics, embedding_metrics, load_token_counts,
                                log_frequencies)

__all__ = ["ReportError", "find_embeddings", "load_state_dict", "main", "plot", "report"]

logger = logging.getLogger(__name__)

# Token embedding / vocabulary output names of common codebases (nanoGPT, HF, Megatron).
_EMBEDDING_NAMES = re.compile(
    r"(^|\.)(wte|embed_tokens|word_embeddings|tok_embeddings|token_embedding|tok_emb|embed_in|"
    r"embedding|lm_head|output_layer|embed_out)(\.weight)?$")
_POSITIONAL = re.compile(
    r"(^|[._])(wpe|pos|position|positional|pos_emb|position_embeddings)([._]|$)")
_WRAPPERS = ("module", "model", "state_dict")


class ReportError(ValueError):
    """Input the report cannot use; the message says what to change."""


@dataclass
class Embedding:
    """One embedding matrix of one checkpoint."""

    checkpoint: str
    name: str
    E_VH: torch.Tensor
    tied_to: list[str]


# ----------------------------------------------------------------------------- loading


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors by name from a DeepSpeed checkpoint directory or a PyTorch state_dict file."""
    if not os.path.exists(path):
        raise ReportError(f"checkpoint {path!r} does not exist.")
    if os.path.isdir(path):
        return _load_deepspeed(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ReportError(f"checkpoint {path!r} could not be read as a PyTorch state_dict "
                          f"({type(err).__name__}: {err}).") from err
    return _tensors(data, path)


def _tensors(data: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(data, dict):
        for key in _WRAPPERS:
            if isinstance(data.get(key), dict):
                return _tensors(data[key], path)
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ReportError(f"checkpoint {path!r} holds no state_dict (a dict of tensors, possibly "
                      f"under one of the keys {list(_WRAPPERS)}).")


def _load_deepspeed(path: str) -> dict[str, torch.Tensor]:
    """Consolidate with DeepSpeed's zero_to_fp32; a checkpoint without ZeRO shards holds the
    full weights in ``mp_rank_00_model_states.pt``."""
    root, tag = path, None
    if not os.path.isfile(os.path.join(path, "latest")):
        if not any(f.endswith("model_states.pt") for f in os.listdir(path)):
            raise ReportError(f"checkpoint directory {path!r} has neither a 'latest' file nor "
                              "*model_states.pt files: not a DeepSpeed checkpoint.")
        root, tag = os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    if tag is None:
        with open(os.path.join(root, "latest")) as f:
            tag = f.read().strip()
    tag_dir = os.path.join(root, tag)
    if not os.path.isdir(tag_dir):
        raise ReportError(f"checkpoint {path!r}: 'latest' names tag {tag!r}, but {tag_dir!r} "
                          "does not exist.")
    files = os.listdir(tag_dir)
    if any(re.match(r".*zero_pp_rank_\d+.*optim_states\.pt$", f) for f in files):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as err:
            raise ReportError(f"checkpoint {path!r} is ZeRO-sharded; reading it needs DeepSpeed "
                              "(pip install 'coupled-ds[deepspeed]').") from err
        # Its progress prints would mix with the table on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            return dict(get_fp32_state_dict_from_zero_checkpoint(root, tag=tag))
    model_files = sorted(f for f in files if f.endswith("model_states.pt"))
    if not model_files:
        raise ReportError(f"checkpoint {tag_dir!r} holds no *model_states.pt file.")
    data = torch.load(os.path.join(tag_dir, model_files[0]), map_location="cpu",
                      weights_only=False)  # DeepSpeed's own files pickle its config objects
    return _tensors(data, tag_dir)


def find_embeddings(state: dict[str, torch.Tensor], names: Sequence[str] | None = None,
                    checkpoint: str = "") -> list[Embedding]:
    """The embedding matrices of a state_dict; a tensor equal to an earlier one is folded in
    as ``tied_to`` (tied input / output embeddings are saved under both names)."""
    if names:
        patterns = [re.compile(n) for n in names]
        chosen = [k for k in state if any(p.search(k) for p in patterns)]
    else:
        chosen = [k for k in state if _EMBEDDING_NAMES.search(k) and not _POSITIONAL.search(k)]
    chosen = [k for k in chosen if state[k].dim() == 2]
    if not chosen:
        how = f"--names {' '.join(names)} matched no 2-D tensor" if names else (
            "no 2-D tensor has an embedding name "
            "(wte, embed_tokens, word_embeddings, lm_head, ...)")
        raise ReportError(f"checkpoint {checkpoint!r}: {how}. Pass --names REGEX selecting the "
                          f"[V, H] embedding; 2-D tensors: {_two_d(state)}.")
    found: list[Embedding] = []
    for key in chosen:
        E = state[key].detach().float()
        twin = next((f for f in found if f.E_VH.shape == E.shape and torch.equal(f.E_VH, E)), None)
        if twin is not None:
            twin.tied_to.append(key)
        else:
            found.append(Embedding(checkpoint, key, E, []))
    return found


def _two_d(state: dict[str, torch.Tensor]) -> str:
    listed = [f"{k} {tuple(v.shape)}" for k, v in state.items() if v.dim() == 2]
    return ", ".join(listed[:8]) + (" ..." if len(listed) > 8 else "") or "none"


def _log_freq(path: str | None, V: int, vocab_size: int | None) -> torch.Tensor | None:
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ReportError(f"--freq {path!r} does not exist.")
    counts = load_token_counts(path)
    allowed = sorted({V, vocab_size or V})
    if counts.shape[0] not in allowed:
        raise ReportError(f"--freq {path!r} has {counts.shape[0]} counts, but the embedding has "
                          f"{V} rows{f' and --vocab-size {vocab_size}' if vocab_size else ''}; "
                          f"expected {' or '.join(map(str, allowed))} (one count per token id).")
    return log_frequencies(counts)


# ----------------------------------------------------------------------------- report


def report(paths: Sequence[str], *, freq: str | None = None, names: Sequence[str] | None = None,
           vocab_size: int | None = None) -> tuple[list[list[Embedding]],
                                                   list[list[EmbeddingMetrics]], str,
                                                   torch.Tensor | None]:
    """Load, check and measure; returns (embeddings, metrics, table text, log frequencies)."""
    embeddings = [find_embeddings(load_state_dict(p), names, p) for p in paths]
    if len(embeddings) == 2:
        _check_same_shapes(embeddings)
    V = embeddings[0][0].E_VH.shape[0]
    for found in embeddings:
        for e in found:
            if vocab_size is not None and not 1 <= vocab_size <= e.E_VH.shape[0]:
                raise ReportError(f"--vocab-size {vocab_size} must be in [1, {e.E_VH.shape[0]}] "
                                  f"(rows of {e.name} in {e.checkpoint!r}).")
    log_freq = _log_freq(freq, V, vocab_size)
    metrics = [[embedding_metrics(e.E_VH, log_freq_V=log_freq, vocab_size=vocab_size)
                for e in found] for found in embeddings]
    return embeddings, metrics, _table(embeddings, metrics), log_freq


def _check_same_shapes(embeddings: list[list[Embedding]]) -> None:
    a, b = ([(e.name, tuple(e.E_VH.shape)) for e in found] for found in embeddings)
    shapes_a, shapes_b = [s for _, s in a], [s for _, s in b]
    if shapes_a != shapes_b:
        raise ReportError(
            f"the checkpoints' embeddings differ: {embeddings[0][0].checkpoint!r} has {a}, "
            f"{embeddings[1][0].checkpoint!r} has {b}. Compare runs of the same model "
            "(same vocabulary and hidden size), or select matching matrices with --names.")


def _table(embeddings: list[list[Embedding]], metrics: list[list[EmbeddingMetrics]]) -> str:
    columns = [(f"{chr(65 + i)}: {e.name} {list(e.E_VH.shape)}", m)
               for i, (found, ms) in enumerate(zip(embeddings, metrics))
               for e, m in zip(found, ms)]
    lines = [f"{chr(65 + i)} = {found[0].checkpoint}"
             + "".join(f"\n    {e.name} tied to {', '.join(e.tied_to)}" for e in found if e.tied_to)
             for i, found in enumerate(embeddings)]
    width = max(14, *(len(h) for h, _ in columns))
    lines.append("")
    lines.append(f"{'metric':<12}" + "".join(f"  {h:>{width}}" for h, _ in columns))
    for field in ("iso", "mu_norm", "mu_norm_rel", "kappa", "rho", "mean_cosine"):
        cells = [_fmt(getattr(m, field)) for _, m in columns]
        lines.append(f"{field:<12}" + "".join(f"  {c:>{width}}" for c in cells))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None:
        return "- (no --freq)"
    return "nan" if math.isnan(value) else f"{value:.4g}"


# ----------------------------------------------------------------------------- pictures


def plot(embeddings: Sequence[Embedding], out: str, *, log_freq: torch.Tensor | None = None,
         vocab_size: int | None = None, dpi: int = 110) -> None:
    """PCA scatter per checkpoint (top row) and their singular-value spectra (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    n = len(embeddings)
    fig = plt.figure(figsize=(5.2 * n, 8.4), constrained_layout=True)
    grid = fig.add_gridspec(2, n, height_ratios=[3, 2])
    spectrum_ax = fig.add_subplot(grid[1, :])
    for i, e in enumerate(embeddings):
        E = e.E_VH[:vocab_size].double()
        gram_eigenvalues, axes_HH = torch.linalg.eigh(E.T @ E)
        xy = (E @ axes_HH[:, -2:].flip(1)).numpy()  # top two right-singular vectors
        ax = fig.add_subplot(grid[0, i])
        _scatter(fig, ax, xy, log_freq, E.shape[0])
        ax.set_title(f"{chr(65 + i)}: {_short(e.checkpoint)}\n{e.name} {list(e.E_VH.shape)}",
                     fontsize=9)
        sigma = gram_eigenvalues.clamp_min(0).sqrt().flip(0).numpy()
        sigma = sigma[: min(E.shape)]
        spectrum_ax.semilogy(np.arange(1, sigma.size + 1), sigma / sigma[0],
                             label=f"{chr(65 + i)}: {_short(e.checkpoint)}")
    spectrum_ax.set_xlabel("index i")
    spectrum_ax.set_ylabel("sigma_i / sigma_1")
    spectrum_ax.set_title("singular values of E", fontsize=9)
    spectrum_ax.legend(fontsize=8)
    spectrum_ax.grid(True, which="both", alpha=0.3)
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _scatter(fig, ax, xy: np.ndarray, log_freq: torch.Tensor | None, rows: int) -> None:
    if log_freq is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6, color="tab:blue", linewidths=0)
        ax.text(0.01, 0.01, "no --freq: uncoloured", transform=ax.transAxes, fontsize=7)
    else:
        lf = log_freq[:rows].numpy()
        seen = np.isfinite(lf)
        ax.scatter(xy[~seen, 0], xy[~seen, 1], s=4, color="lightgrey", linewidths=0,
                   label="never seen")
        points = ax.scatter(xy[seen, 0], xy[seen, 1], c=lf[seen], s=5, cmap="viridis",
                            linewidths=0)
        fig.colorbar(points, ax=ax, label="log token frequency", shrink=0.8)
    ax.scatter([0], [0], marker="+", s=120, color="red", label="origin")
    ax.set_xlabel("PC 1 (uncentred)")
    ax.set_ylabel("PC 2 (uncentred)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(fontsize=7, loc="upper right")


def _short(path: str) -> str:
    parts = os.path.normpath(path).split(os.sep)
    return os.sep.join(parts[-2:])


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coupled-ds-report",
        description="Embedding-quality metrics (Iso, ||mu||, ||mu||_rel, kappa, rho, mean cosine) "
                    "and pictures of one or two checkpoints.")
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="DeepSpeed checkpoint directory or PyTorch state_dict file (1 or 2)")
    parser.add_argument("--freq", help="token counts file (.npy, .json list, .pt, or text)")
    parser.add_argument("--plot", metavar="OUT.png", help="write the PCA + spectrum figure here")
    parser.add_argument("--names", nargs="+", metavar="REGEX",
                        help="select the embedding tensors by name (re.search)")
    parser.add_argument("--vocab-size", type=int,
                        help="real vocabulary; rows at or beyond it are padding and left out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m coupled_ds.report`` / ``coupled-ds-report``; returns the exit
    status (2 for unusable input, with the reason on stderr)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if len(args.checkpoints) > 2:
        parser.error(f"at most two checkpoints, got {len(args.checkpoints)}")
    try:
        embeddings, _, table, log_freq = report(args.checkpoints, freq=args.freq,
                                                names=args.names, vocab_size=args.vocab_size)
        print(table)
        if args.plot:
            plot([found[0] for found in embeddings], args.plot, log_freq=log_freq,
                 vocab_size=args.vocab_size)
            print(f"\nwrote {args.plot}")
    except (ValueError, OSError) as err:
        print(f"coupled-ds-report: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
