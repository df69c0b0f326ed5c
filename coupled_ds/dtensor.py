"""Geometry adapter for PyTorch DTensors: FSDP2 (``fully_shard``) and tensor parallelism
(``parallelize_module`` with ``RowwiseParallel`` / ``ColwiseParallel``).

Under these a coupled [V, H] matrix is a ``DTensor`` on a device mesh. Its local shard is a
contiguous block of vocabulary rows: ``Shard(0)`` on each mesh dimension that splits rows, with
``torch.chunk`` semantics (V=37 on 3 ranks: 13/13/11 rows), and FSDP2 on top of tensor
parallelism splits the tensor-parallel block again (``_StridedShard(0)`` on the data-parallel
dimension). ``Replicate`` dimensions hold copies of the same rows (DDP, HSDP replicas, a
tensor-parallel-only mesh's data dimension) and are not reduced.

:func:`geometry` turns a DTensor's mesh and placements into a :class:`ShardGeometry` record for
its local shard; the optimizer then steps ``to_local()`` views with the unchanged math, and the
[H] column sums are all-reduced over the process groups of exactly the row-splitting mesh
dimensions. Refused with an error naming the parameter: hidden columns split (``Shard(1)``: a
column block of the matrix is not a ShardGeometry), ``Partial`` parameters or gradients (not yet
reduced), and any placement this module does not know.

Everything here imports ``torch.distributed.tensor`` lazily; a torch without it simply has no
DTensors. Shapes in names: V vocabulary rows, H hidden columns.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from coupled_ds.geometry import ShardGeometry

__all__ = ["geometry", "is_dtensor", "local", "local_grad", "wrap_like"]

logger = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()  # (key, layout) pairs rank 0 has logged


def _dtensor_module() -> Any | None:
    try:
        import torch.distributed.tensor as dtensor_module
    except ImportError:  # torch built without distributed, or older than 2.5
        return None
    return dtensor_module


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (parameters included)."""
    if not isinstance(tensor, torch.Tensor) or type(tensor) in (torch.Tensor, torch.nn.Parameter):
        return False
    module = _dtensor_module()
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: Any) -> Any:
    """The local shard of a DTensor (a view sharing its storage), anything else unchanged."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def wrap_like(reference: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (shaped like ``reference``'s shard) as a DTensor laid out like
    ``reference``; ``local_tensor`` itself when ``reference`` is not a DTensor."""
    if not is_dtensor(reference):
        return local_tensor
    return _dtensor_module().DTensor.from_local(
        local_tensor, reference.device_mesh, reference.placements, run_check=False,
        shape=reference.shape, stride=reference.stride())


def _describe(tensor: torch.Tensor) -> str:
    mesh = tensor.device_mesh
    names = mesh.mesh_dim_names or tuple(f"dim{d}" for d in range(mesh.ndim))
    return (f"placements {tuple(tensor.placements)} on mesh {tuple(mesh.shape)} "
            f"(dims {tuple(names)})")


def _row_split_dims(tensor: torch.Tensor, name: str, what: str) -> list[int]:
    """Mesh dimensions whose placement splits dim 0 (vocabulary rows); raise on anything else."""
    dims = []
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        shard_dim = getattr(placement, "dim", None)
        if placement.is_partial() or shard_dim is None:
            raise ValueError(
                f"Coupled parameter {name}: its {what} is a DTensor with {_describe(tensor)}; "
                f"{placement} on mesh dim {mesh_dim} is not reduced yet, so its column sums "
                "would be wrong. CoupledAdam couples DTensors whose placements are Shard(0) "
                f"(vocabulary rows) or Replicate; reduce the {what} (e.g. let FSDP2 / DDP "
                "reduce-scatter gradients) before optimizer.step().")
        if shard_dim % tensor.dim() != 0:
            raise ValueError(
                f"Coupled parameter {name}: DTensor with {_describe(tensor)} splits dim "
                f"{shard_dim} (hidden columns) on mesh dim {mesh_dim}. Only vocabulary-row "
                "sharding (Shard(0): FSDP2, RowwiseParallel on nn.Embedding, ColwiseParallel on "
                "the output nn.Linear) can be coupled; shard this matrix on dim 0 instead.")
        dims.append(mesh_dim)
    _check_strided(tensor, dims, name)
    return dims


def _check_strided(tensor: torch.Tensor, row_dims: list[int], name: str) -> None:
    """A ``_StridedShard(0, split_factor=k)`` leaves each shard one contiguous block of rows only
    as FSDP2 uses it over tensor parallelism: the later mesh dims that split rows hold k pieces
    between them. Anything else interleaves rows from several blocks."""
    mesh = tensor.device_mesh
    for i, mesh_dim in enumerate(row_dims):
        split_factor = getattr(tensor.placements[mesh_dim], "split_factor", None)
        if split_factor is None:
            continue
        later = math.prod(mesh.size(d) for d in row_dims[i + 1:])
        if split_factor != later:
            raise ValueError(
                f"Coupled parameter {name}: DTensor with {_describe(tensor)}: "
                f"{tensor.placements[mesh_dim]} on mesh dim {mesh_dim} does not leave each shard "
                "one contiguous block of rows. CoupledAdam supports the layouts of FSDP2, tensor "
                "parallelism and FSDP2 applied over tensor parallelism.")


def geometry(tensor: torch.Tensor, key: str) -> ShardGeometry:
    """The :class:`ShardGeometry` of a coupled DTensor's local shard.

    Args:
        tensor: A 2-D [V, H] DTensor (its ``shape`` is global).
        key: Names the matrix in messages and collectives; identical on every rank.

    Raises:
        ValueError: Not 2-D, hidden columns split, ``Partial``, or a local shard that is not the
            contiguous row block torch's own layout computation says it is.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tensor.dim() != 2:
        raise ValueError(f"Coupled parameter {key}: DTensor of shape {tuple(tensor.shape)}; "
                         "coupled parameters must be 2-D [V, H] (rows = vocabulary).")
    row_dims = _row_split_dims(tensor, key, "parameter")
    V, H = tensor.shape
    shard = local(tensor)
    shape_local, offset_global = compute_local_shape_and_global_offset(
        tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shard.shape) != tuple(shape_local) or (shard.numel() and not shard.is_contiguous()):
        raise ValueError(
            f"Coupled parameter {key}: DTensor with {_describe(tensor)} has a local shard of shape "
            f"{tuple(shard.shape)} (contiguous: {shard.is_contiguous()}), but its layout says "
            f"{tuple(shape_local)} rows from row {offset_global[0]}. CoupledAdam needs each "
            "shard to be one contiguous block of whole rows.")
    rows_local = shape_local[0]
    start_row = min(offset_global[0], V) if rows_local else 0
    mesh = tensor.device_mesh
    layout = _describe(tensor)
    if torch.distributed.get_rank() == 0 and (key, layout) not in _announced:  # once, at setup
        _announced.add((key, layout))
        names = mesh.mesh_dim_names or tuple(f"dim{d}" for d in range(mesh.ndim))
        logger.info("coupled_ds: %s [%d, %d] is a DTensor with %s; rank 0 holds rows [%d, %d); "
                    "column sums are reduced over mesh dims %s", key, V, H, layout,
                    start_row, start_row + rows_local, [names[d] for d in row_dims])
    return ShardGeometry(key, V, H, start_global_flat=start_row * H, numel=rows_local * H,
                         groups=tuple(mesh.get_group(d) for d in row_dims))


def local_grad(param: torch.Tensor, name: str) -> torch.Tensor:
    """The local gradient shard of a coupled parameter, laid out like the parameter's shard.

    A DTensor gradient may come back ``Replicate`` where the parameter is ``Shard(0)`` (tensor
    parallelism alone: ``nn.Embedding`` under ``RowwiseParallel``); its rows are then taken
    locally, as torch's own optimizers do, without communication. ``Partial`` gradients (not yet
    reduced) and gradients sharded differently from the parameter are refused.
    """
    grad = param.grad
    if not is_dtensor(param):
        return grad
    if not is_dtensor(grad) or grad.device_mesh != param.device_mesh:
        got = _describe(grad) if is_dtensor(grad) else f"a plain {type(grad).__name__}"
        raise ValueError(
            f"Coupled parameter {name}: the parameter is a DTensor with {_describe(param)}, its "
            f"gradient has {got}. Give it a gradient on the parameter's mesh.")
    if tuple(grad.placements) == tuple(param.placements):
        return local(grad)
    _row_split_dims(grad, name, "gradient")  # names Partial / column splits precisely
    for g_place, p_place in zip(grad.placements, param.placements):
        if g_place != p_place and not g_place.is_replicate():
            raise ValueError(
                f"Coupled parameter {name}: its gradient has {_describe(grad)}, the parameter "
                f"{_describe(param)}. Redistribute the gradient to the parameter's placements "
                "before optimizer.step().")
    # Only Replicate where the parameter is sharded: a local slice, no collective.
    return local(grad.redistribute(param.device_mesh, param.placements))
