"""Finding the embedding / unembedding matrices of a model and building CoupledAdam's groups."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["NoEmbeddingFoundError", "coupled_param_groups", "find_coupled_parameters"]

logger = logging.getLogger(__name__)

# Positional embeddings are nn.Embedding too, but they are not vocabulary matrices.
_POSITIONAL = re.compile(r"(^|[._])(wpe|pos|position|positional|pos_emb|position_embeddings)([._]|$)")


class NoEmbeddingFoundError(ValueError):
    """No parameter looked like a token embedding or output projection."""


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name; a tied tensor appears once, under its first name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


ShapeOf = Callable[[torch.Tensor], torch.Size]


def _own_shape(p: torch.Tensor) -> torch.Size:
    return p.shape


def _token_embeddings(model: nn.Module) -> list[nn.Embedding]:
    return [m for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and not _POSITIONAL.search(name)]


def token_embedding_shape(model: nn.Module, shape_of: ShapeOf = _own_shape
                          ) -> tuple[int, int] | None:
    """[V, H] of the largest token embedding in ``model`` (frozen or not), or None."""
    shapes = [tuple(shape_of(m.weight)) for m in _token_embeddings(model)]
    return max(shapes) if shapes else None


def _detect(model: nn.Module, params: dict[str, nn.Parameter],
            vocab_shape: tuple[int, int] | None = None, shape_of: ShapeOf = _own_shape
            ) -> list[str]:
    """Names of token-embedding and vocabulary-output matrices, by module type and shape.

    ``vocab_shape`` is the [V, H] of the token embedding where ``model`` does not hold one (a
    pipeline stage with only the output layer), so that the output projection is still found.
    ``shape_of`` gives a parameter's logical shape (see :func:`find_coupled_parameters`).
    """
    by_id = {id(p): n for n, p in params.items()}
    chosen: list[str] = []

    def take(p: torch.Tensor) -> None:
        name = by_id.get(id(p))
        if name is not None and name not in chosen:
            chosen.append(name)

    for p in params.values():
        if getattr(p, "is_embedding_or_output_parameter", False) and len(shape_of(p)) == 2:
            take(p)
    embeddings = _token_embeddings(model)
    shapes = [shape_of(m.weight) for m in embeddings]
    vocab_rows = max((shape[0] for shape in shapes), default=None)
    hidden = {shape[1] for shape in shapes if shape[0] == vocab_rows}
    if vocab_rows is None and vocab_shape is not None:
        vocab_rows, hidden = vocab_shape[0], {vocab_shape[1]}
    for m, shape in zip(embeddings, shapes):
        if shape[0] == vocab_rows:
            take(m.weight)
    if vocab_rows is not None:
        for _, m in model.named_modules():
            weight = getattr(m, "weight", None)
            if not isinstance(m, nn.Linear) or weight is None:
                continue
            rows, cols = shape_of(weight)
            if rows == vocab_rows and cols in hidden:
                take(weight)
    return chosen


def find_coupled_parameters(
    model: nn.Module,
    *,
    names: Sequence[str] | None = None,
    vocab_shape: tuple[int, int] | None = None,
    shape_of: ShapeOf = _own_shape,
) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs Coupled Adam should couple.

    Detected: ``nn.Embedding`` token weights (not positional ones), the output projection
    (``nn.Linear`` with ``out_features`` equal to the embedding's rows), a tied ``lm_head`` (once),
    and parameters marked ``is_embedding_or_output_parameter`` (Megatron).

    Args:
        model: The model.
        names: Regexes over parameter names (``re.search``); when given, they alone decide.
        vocab_shape: [V, H] of the token embedding when ``model`` holds none (a pipeline stage
            with only the output projection).
        shape_of: The logical shape of a parameter (an engine that has already partitioned the
            parameters passes the full shape it recorded; default ``p.shape``).
    """
    params = _named_params(model)
    return [(n, params[n]) for n in _choose(model, params, names, vocab_shape, shape_of)]


def _choose(model: nn.Module, params: dict[str, nn.Parameter], names: Sequence[str] | None,
            vocab_shape: tuple[int, int] | None = None, shape_of: ShapeOf = _own_shape
            ) -> list[str]:
    if names is None:
        return _detect(model, params, vocab_shape, shape_of)
    patterns = [re.compile(n) for n in names]
    return [n for n in params if any(p.search(n) for p in patterns)]


def _raise_if_frozen(model: nn.Module, names: Sequence[str] | None, shape_of: ShapeOf) -> None:
    """Nothing trainable was found: say so if the embedding is there but frozen."""
    every = dict(model.named_parameters())
    frozen = [n for n in _choose(model, every, names, shape_of=shape_of)
              if not every[n].requires_grad]
    if frozen:
        shown = ", ".join(f"{n} {tuple(shape_of(every[n]))}" for n in frozen)
        raise NoEmbeddingFoundError(
            f"coupled_param_groups: the embedding matrices {shown} are frozen "
            "(requires_grad=False), so there is nothing to couple. Unfreeze them "
            "(p.requires_grad_(True)) to train them with Coupled Adam, or pass "
            "allow_no_embedding=True to train the rest with plain AdamW.")


def coupled_param_groups(
    model: nn.Module,
    *,
    weight_decay: float = 0.1,
    embedding_weight_decay: float = 0.0,
    names: Sequence[str] | None = None,
    vocab_size: int | None = None,
    avg_scale: float | None = None,
    allow_no_embedding: bool = False,
    vocab_shape: tuple[int, int] | None = None,
    shape_of: ShapeOf = _own_shape,
) -> list[dict[str, Any]]:
    """Param groups for :class:`~coupled_ds.CoupledAdam`: coupled, decay and no-decay.

    Each coupled matrix gets a group of its own (``"coupled": True``), so that engines that
    flatten a group into one buffer (ZeRO) hold at most one coupled matrix per buffer. Other
    parameters with >= 2 dims get ``weight_decay``; biases, norms and other 1-D ones get none.

    Args:
        model: The model.
        weight_decay: Decay of the non-embedding matrices (paper: 0.1).
        embedding_weight_decay: Decay of the coupled matrices (paper: 0).
        names: Regexes over parameter names that select the coupled matrices, overriding detection.
        vocab_size: The real vocabulary; rows at or beyond it are padding and are left out of the
            column mean. Default: every row counts.
        avg_scale: ``avg_scale`` of the coupled groups (default: the optimizer's).
        allow_no_embedding: Return plain AdamW groups instead of raising when nothing is found.
        vocab_shape: [V, H] of the token embedding when ``model`` holds none (see
            :func:`find_coupled_parameters`).
        shape_of: The logical shape of a parameter, as in :func:`find_coupled_parameters`.

    Raises:
        NoEmbeddingFoundError: Nothing matched and ``allow_no_embedding`` is False.
        ValueError: A selected parameter is not 2-D, or ``vocab_size`` exceeds its rows.
    """
    coupled = find_coupled_parameters(model, names=names, vocab_shape=vocab_shape,
                                      shape_of=shape_of)
    if not coupled and not allow_no_embedding:
        _raise_if_frozen(model, names, shape_of)
        how = f"names={list(names)!r} matched no parameter" if names is not None else (
            "no nn.Embedding, output projection or is_embedding_or_output_parameter was found")
        raise NoEmbeddingFoundError(
            f"coupled_param_groups: {how}. Pass names=[regex, ...] to select the embedding "
            "matrices, or allow_no_embedding=True to train without coupling.")
    groups: list[dict[str, Any]] = []
    coupled_ids = set()
    for name, p in coupled:
        shape = shape_of(p)
        if len(shape) != 2:
            raise ValueError(
                f"Coupled parameter {name!r} has shape {tuple(shape)}; coupled parameters must be "
                "2-D [V, H] with rows = vocabulary. Narrow names=[...] to the embedding matrices.")
        if vocab_size is not None and vocab_size > shape[0]:
            raise ValueError(
                f"Coupled parameter {name!r}: vocab_size={vocab_size} is larger than its "
                f"{shape[0]} rows. Pass the real vocabulary size (<= the rows).")
        group: dict[str, Any] = {"params": [p], "coupled": True, "coupled_names": [name],
                                 "weight_decay": embedding_weight_decay, "vocab_size": vocab_size}
        if avg_scale is not None:
            group["avg_scale"] = avg_scale
        groups.append(group)
        coupled_ids.add(id(p))
    decay, no_decay = [], []
    for name, p in _named_params(model).items():
        if id(p) not in coupled_ids:
            (decay if len(shape_of(p)) >= 2 else no_decay).append((name, p))
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd})
    logger.info(
        "coupled_ds: coupling %s; %d decayed and %d undecayed other tensors",
        ", ".join(f"{n} {tuple(shape_of(p))}" for n, p in coupled) or "nothing",
        len(decay), len(no_decay))
    return groups
