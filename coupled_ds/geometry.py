"""Shard geometry: where the elements of a local tensor sit in a coupled [V, H] matrix.

Engines hand the optimizer many shapes of the same matrix: the whole [V, H] block (plain
PyTorch, DDP), a block of rows (tensor-parallel vocabulary sharding), or a 1-D flat slice that
starts and ends mid-row (ZeRO 1/2/3 partitions, Megatron's distributed optimizer). One record,
:class:`ShardGeometry`, describes all of them, so the update math never needs to know which
engine it runs under.

Coordinate frames (the suffix of every index says which one it is in):

* ``_global_flat``: index into the full matrix flattened row-major, ``row * H + col``.
* ``_local``: index into the tensor the optimizer holds, flattened.

Shapes in names: V vocabulary rows (padding included), H hidden columns, N local elements.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["RowPiece", "ShardGeometry", "full_matrix_geometry"]


@dataclass(frozen=True)
class RowPiece:
    """A run of local elements that lies inside one row, or a run of whole rows.

    ``rows == 0`` means a partial row: ``length`` elements of columns
    ``[col_start, col_start + length)``. ``rows > 0`` means ``rows`` whole rows
    (``length == rows * H``, ``col_start == 0``) that can be viewed as ``[rows, H]``.
    """

    start_local: int
    length: int
    col_start: int
    rows: int


@dataclass(frozen=True)
class ShardGeometry:
    """The part of one coupled matrix that a local tensor holds.

    The owned elements are contiguous in the global flat frame:
    ``[start_global_flat, start_global_flat + numel)``; they sit in the local tensor at
    ``[offset_local, offset_local + numel)``. Local elements outside that range are engine
    padding (ZeRO alignment, a partition tail): the optimizer neither reads nor updates them.

    Attributes:
        key: Names the full matrix. Every piece of one matrix, on every rank, uses the same key;
            keys order the collectives, so they must be identical strings on all ranks.
        rows_global: V, rows of the full matrix, padded vocabulary rows included.
        cols: H, columns of the full matrix (one shared second moment per column).
        start_global_flat: Global flat index of the first owned element.
        numel: Number of owned elements (0: this rank holds none but still takes part in the
            column-sum reduction).
        offset_local: Local flat index of the first owned element.
        groups: Process groups that hold the other pieces. The [H] column sums are all-reduced
            over each of them in turn (e.g. the tensor-parallel group, then the data-parallel
            shard group); the pieces must be disjoint across the product of the groups.
    """

    key: str
    rows_global: int
    cols: int
    start_global_flat: int = 0
    numel: int = -1
    offset_local: int = 0
    groups: tuple[dist.ProcessGroup | None, ...] = field(default=())

    def __post_init__(self) -> None:
        total = self.rows_global * self.cols
        if self.numel == -1:
            object.__setattr__(self, "numel", total - self.start_global_flat)
        if self.rows_global <= 0 or self.cols <= 0:
            raise ValueError(
                f"ShardGeometry {self.key!r}: rows_global={self.rows_global} and cols={self.cols} "
                "must be positive (the full coupled matrix is [V, H])."
            )
        if self.start_global_flat < 0 or self.numel < 0 or self.offset_local < 0:
            raise ValueError(
                f"ShardGeometry {self.key!r}: start_global_flat={self.start_global_flat}, "
                f"numel={self.numel} and offset_local={self.offset_local} must be >= 0."
            )
        if self.start_global_flat + self.numel > total:
            raise ValueError(
                f"ShardGeometry {self.key!r}: elements [{self.start_global_flat}, "
                f"{self.start_global_flat + self.numel}) run past the end of the "
                f"[{self.rows_global}, {self.cols}] matrix ({total} elements)."
            )

    @property
    def distributed(self) -> bool:
        """Whether other pieces of this matrix live in other processes."""
        return len(self.groups) > 0

    def check_fits(self, tensor: torch.Tensor, name: str) -> None:
        """Raise if ``tensor`` is too small to hold the owned elements."""
        if self.offset_local + self.numel > tensor.numel():
            raise ValueError(
                f"Coupled parameter {name}: its geometry {self.key!r} places {self.numel} elements "
                f"at local offset {self.offset_local}, but the tensor has only {tensor.numel()} "
                f"elements (shape {tuple(tensor.shape)}). The engine adapter built a wrong geometry."
            )

    def pieces(self, rows_limit: int | None = None) -> Iterator[RowPiece]:
        """Split the owned elements into at most three runs: a head partial row, whole rows,
        and a tail partial row.

        Args:
            rows_limit: Only yield elements of rows ``< rows_limit`` (e.g. the real vocabulary);
                default: all rows.
        """
        H = self.cols
        start = self.start_global_flat
        end = start + self.numel
        if rows_limit is not None:
            end = min(end, rows_limit * H)
        to_local = self.offset_local - start
        if end <= start:
            return
        head_col = start % H
        if head_col:
            head_end = min(end, start - head_col + H)
            yield RowPiece(start + to_local, head_end - start, head_col, 0)
            start = head_end
        body_rows = (end - start) // H
        if body_rows:
            yield RowPiece(start + to_local, body_rows * H, 0, body_rows)
            start += body_rows * H
        if end > start:
            yield RowPiece(start + to_local, end - start, 0, 0)


def full_matrix_geometry(tensor: torch.Tensor, key: str) -> ShardGeometry:
    """Geometry of a whole, unsharded [V, H] matrix held by one process."""
    rows, cols = tensor.shape
    return ShardGeometry(key=key, rows_global=rows, cols=cols)
