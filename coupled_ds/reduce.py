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
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
            sent += buffer.numel() * buffer.element_size()
        if len(parts) > 1:
            offset = 0
            for part in parts:
                part.copy_(buffer[offset : offset + part.numel()])
                offset += part.numel()
    return sent
