"""The one cross-rank operation of Coupled Adam: summing [H] column sums over the pieces of a
matrix.

Every rank that holds (or could hold) a piece of a coupled matrix must enter the same
collectives in the same order, including ranks whose piece is empty. Matrices are therefore
visited in sorted key order, and all matrices reduced over the same groups share one flat buffer,
so a step costs one all-reduce per distinct group list, of ``sum(H)`` float32 values.
:func:`start_allreduce_column_sums_` starts them and returns what finishes them, so an optimizer
can step its other parameters while the sums are in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ColumnSums", "PendingReduction", "start_allreduce_column_sums_"]


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


def _allreduce_now(buffer: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    device = _collective_device(group, buffer)
    if device == buffer.device:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    else:
        moved = buffer.to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        buffer.copy_(moved)


class PendingReduction:
    """All-reduces started by :func:`start_allreduce_column_sums_`; :meth:`wait` finishes them.

    The first group of each batch runs asynchronously (``async_op=True``), so the caller can do
    other work (the AdamW groups of the same step) while the sums travel and the slower ranks
    catch up; any further groups of a batch (a 2-D mesh reduces over each of its dimensions in
    turn) run in :meth:`wait`, after the first.
    """

    def __init__(self) -> None:
        # (buffer, the tensor on the collective's device, pending work, the remaining groups,
        #  the parts to copy the result back into)
        self._batches: list[tuple] = []
        self.sent = 0  # bytes this rank sent into all-reduces
        self.seconds = 0.0  # spent starting them and in wait() (which includes slower ranks)

    def wait(self) -> int:
        """Finish every reduction, leave the sums in the callers' tensors; returns bytes sent."""
        start = time.perf_counter()
        batches, self._batches = self._batches, []
        for buffer, moved, work, rest, parts in batches:
            work.wait()
            if moved is not buffer:
                buffer.copy_(moved)
            for group in rest:
                _allreduce_now(buffer, group)
                self.sent += buffer.numel() * buffer.element_size()
            if len(parts) > 1:
                offset = 0
                for part in parts:
                    part.copy_(buffer[offset : offset + part.numel()])
                    offset += part.numel()
        self.seconds += time.perf_counter() - start
        return self.sent


def start_allreduce_column_sums_(sums_by_key: dict[str, ColumnSums]) -> PendingReduction:
    """Start the all-reduce (sum) of every distributed entry over its groups; the sums are
    complete, in place, once the returned :class:`PendingReduction` has been waited for."""
    batches: dict[tuple[int, ...], list[str]] = {}
    group_lists: dict[tuple[int, ...], tuple[dist.ProcessGroup | None, ...]] = {}
    for key in sorted(sums_by_key):
        groups = sums_by_key[key].groups
        if not groups:
            continue
        batch_id = tuple(id(g) for g in groups)
        batches.setdefault(batch_id, []).append(key)
        group_lists[batch_id] = groups
    pending = PendingReduction()
    start = time.perf_counter()
    for batch_id, keys in batches.items():
        parts = [sums_by_key[k].col_sum_H for k in keys]
        buffer = torch.cat(parts) if len(parts) > 1 else parts[0]
        first, *rest = group_lists[batch_id]
        device = _collective_device(first, buffer)
        moved = buffer if device == buffer.device else buffer.to(device)
        work = dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=first, async_op=True)
        pending.sent += moved.numel() * moved.element_size()
        pending._batches.append((buffer, moved, work, rest, parts))
    pending.seconds = time.perf_counter() - start
    return pending
