"""The one cross-rank operation of Coupled Adam: summing [H] column sums over the pieces of a
matrix.

Every rank that holds (or could hold) a piece of a coupled matrix must enter the same
collectives in the same order, including ranks whose piece is empty. Matrices are therefore
visited in sorted key order, and all matrices reduced over the same groups share one flat buffer,
so a step costs one all-reduce per distinct group list, of ``sum(H)`` float32 values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ColumnSums", "allreduce_column_sums_"]


@dataclass
class ColumnSums:
    """This rank's partial [H] column sums of one coupled matrix."""

    col_sum_H: torch.Tensor
    groups: tuple[dist.ProcessGroup | None, ...]


def _collective_device(group: dist.ProcessGroup | None, buffer: torch.Tensor) -> torch.device:
    """Where the all-reduce must run: NCCL takes CUDA tensors only, so an offloaded optimizer
    (CPU state, e.g. ZeRO offload_optimizer) under NCCL sends its [H] sums through the GPU."""
    if buffer.device.type == "cpu" and str(dist.get_backend(group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return buffer.device


def allreduce_column_sums_(sums_by_key: dict[str, ColumnSums]) -> int:
    """All-reduce (sum) every distributed entry in place over its groups.

    Returns the number of bytes this rank sent into all-reduces (for benchmarks).
    """
    batches: dict[tuple[int, ...], list[str]] = {}
    group_lists: dict[tuple[int, ...], tuple[dist.ProcessGroup | None, ...]] = {}
    for key in sorted(sums_by_key):
        groups = sums_by_key[key].groups
        if not groups:
            continue
        batch_id = tuple(id(g) for g in groups)
        batches.setdefault(batch_id, []).append(key)
        group_lists[batch_id] = groups
    sent = 0
    for batch_id, keys in batches.items():
        parts = [sums_by_key[k].col_sum_H for k in keys]
        buffer = torch.cat(parts) if len(parts) > 1 else parts[0]
        for group in group_lists[batch_id]:
            device = _collective_device(group, buffer)
            if device == buffer.device:
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            else:
                moved = buffer.to(device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
                buffer.copy_(moved)
            sent += buffer.numel() * buffer.element_size()
        if len(parts) > 1:
            offset = 0
            for part in parts:
                part.copy_(buffer[offset : offset + part.numel()])
                offset += part.numel()
    return sent
