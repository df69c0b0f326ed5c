"""ShardGeometry records for Megatron's embedding and output-layer tensors.

Coordinate frames (as in Megatron's ``distrib_optimizer.py`` and :mod:`coupled_ds.geometry`):

* model parameter: ``[V/tp, H]`` rows of the padded ``[V_pad, H]`` vocabulary matrix; tensor
  parallel rank r holds rows ``[r V_pad/tp, (r+1) V_pad/tp)`` (``partition_dim == 0``).
* param flat range ``[start_flat, end_flat)``: the elements of ``model_param.view(-1)`` that one
  inner tensor holds. Whole parameter without the distributed optimizer; a DP rank's shard of it
  (possibly starting and ending mid-row, possibly empty) with it.
* global flat: ``row * H + col`` in ``[V_pad, H]``; ``start_global_flat = r (V_pad/tp) H +
  start_flat``.

The column sums are all-reduced over the tensor-parallel group (other row blocks) and then over
the distributed optimizer's DP shard group (other slices of the same rows): the pieces are
disjoint over that product, so the sum covers each element of ``[V_pad, H]`` exactly once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from coupled_ds.geometry import ShardGeometry

from megatron_patch._compat import InnerTensor, UnsupportedMegatronError


#: The parameter attributes that mark a copy of a vocabulary matrix (a custom model sets one).
MARKERS = ("is_embedding_or_output_parameter", "shared_embedding")


def is_coupled_parameter(param: torch.nn.Parameter) -> bool:
    """Any copy of a vocabulary matrix, by Megatron's markers.

    ``is_embedding_or_output_parameter``: ``embedding.word_embeddings.weight`` where
    ``pre_process``, ``output_layer.weight`` where ``post_process``. ``shared_embedding``: the
    copies kept in step with stage 0's embedding by the embedding-group gradient all-reduce -- the
    tied output matrix on the last stage, and the multi-token-prediction copy of the word
    embedding there, which megatron-core 0.16 marks with nothing else
    (``LanguageModule.setup_embeddings_and_output_layer``; 0.19 marks it both ways).
    """
    return any(getattr(param, marker, False) for marker in MARKERS)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def row_block(model_param: torch.nn.Parameter, tp_group, name: str) -> tuple[int, int]:
    """(V_pad rows of the full matrix, first global row of this TP rank's block)."""
    if model_param.dim() != 2:
        raise UnsupportedMegatronError(
            f"Coupled parameter {name} has shape {tuple(model_param.shape)}; Megatron's embedding "
            "and output weights must be 2-D [V/tp, H].")
    rows_local = model_param.shape[0]
    if not getattr(model_param, "tensor_model_parallel", False) or _group_size(tp_group) == 1:
        return rows_local, 0
    if getattr(model_param, "partition_dim", 0) != 0:
        raise UnsupportedMegatronError(
            f"Coupled parameter {name} is tensor-parallel along dim "
            f"{model_param.partition_dim}; coupled_adam needs vocabulary rows split "
            "(partition_dim=0, VocabParallelEmbedding / ColumnParallelLinear output layer).")
    tp_size = dist.get_world_size(tp_group)
    return rows_local * tp_size, dist.get_rank(tp_group) * rows_local


def shard_geometry(piece: InnerTensor, *, key: str, tp_group, name: str) -> ShardGeometry:
    """Where ``piece.tensor`` (or, for an empty piece, nothing) sits in the full matrix."""
    rows_global, row_start = row_block(piece.model_param, tp_group, name)
    cols = piece.model_param.shape[1]
    tp = tp_group if getattr(piece.model_param, "tensor_model_parallel", False) else None
    groups = tuple(g for g in (tp, piece.dp_group) if _group_size(g) > 1)
    return ShardGeometry(key=key, rows_global=rows_global, cols=cols,
                         start_global_flat=row_start * cols + piece.start_flat,
                         numel=piece.end_flat - piece.start_flat, offset_local=0, groups=groups)
