"""``CoupledAdam``: AdamW whose embedding matrices share one second moment per hidden column.

Every hyperparameter lives in the param groups, as in ``torch.optim.AdamW``. Groups without
``"coupled": True`` are stepped by torch's own AdamW functional (foreach, fused or single-tensor,
as chosen), so they match ``torch.optim.AdamW`` bit for bit. Coupled groups go through
:mod:`coupled_ds.kernels`; where the pieces of a coupled matrix live is described by
:class:`~coupled_ds.geometry.ShardGeometry`, attached by engine adapters with
:meth:`CoupledAdam.set_geometry`, or derived by :mod:`coupled_ds.dtensor` for parameters that
carry their own sharding (DTensors under FSDP2 / tensor parallelism); the kernels then step their
local shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import adamw as torch_adamw
from torch.utils.weak import WeakIdKeyDictionary

from coupled_ds import cpu_kernels, dtensor, hugepages, kernels
from coupled_ds.geometry import ShardGeometry, full_matrix_geometry
from coupled_ds.reduce import ColumnSums, PendingReduction, start_allreduce_column_sums_

__all__ = ["CoupledAdam"]


def _check_hyperparameters(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                           avg_scale: float, where: str) -> None:
    if not (isinstance(lr, float | int) and lr >= 0.0):
        raise ValueError(f"CoupledAdam {where}: invalid lr={lr!r}; expected a number >= 0.")
    if not (isinstance(eps, float | int) and eps >= 0.0):
        raise ValueError(f"CoupledAdam {where}: invalid eps={eps!r}; expected a number >= 0.")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"CoupledAdam {where}: invalid betas={betas!r}; expected two numbers in [0, 1).")
    if not weight_decay >= 0.0:
        raise ValueError(f"CoupledAdam {where}: invalid weight_decay={weight_decay!r}; expected >= 0.")
    if not avg_scale > 0.0:
        raise ValueError(f"CoupledAdam {where}: invalid avg_scale={avg_scale!r}; expected > 0 "
                         "(Scaled Coupled Adam uses 2**-n).")


class CoupledAdam(torch.optim.Optimizer):
    r"""Coupled Adam (Stollenwerk & Stollenwerk, ACL 2025).

    For a param group with ``"coupled": True`` whose tensors are [V, H] embedding matrices
    (rows = vocabulary), with gradient g, step t::

        p     <- p (1 - lr wd)
        m     <- beta1 m + (1 - beta1) g
        v     <- beta2 v + (1 - beta2) g^2                     (kept full size)
        vbar  = avg_scale * mean over rows i < vocab_size of v[i, :]        [H]
        p     <- p - lr / (1 - beta1^t) * m / (sqrt(vbar / (1 - beta2^t)) + eps)

    Every other group is exactly ``torch.optim.AdamW``.

    Args:
        params: Tensors or param-group dicts. Group keys beyond AdamW's: ``coupled`` (bool),
            ``vocab_size`` (rows counted in the mean; rows at or beyond it are padding; default
            all rows), ``avg_scale`` (multiplies vbar), ``coupled_names`` (names for messages).
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.
        avg_scale: Default ``avg_scale`` of coupled groups (Scaled Coupled Adam: 2**-n).
        amsgrad: AMSGrad for uncoupled groups only; a coupled group with it raises.
        maximize: Maximize instead of minimize.
        foreach, fused: Implementation of the uncoupled groups, as in ``torch.optim.AdamW``.
        blocked: The fast coupled kernels (one pass per tensor per phase: C on CPU, Triton on
            CUDA, else torch ops on cache-sized row chunks) rather than the whole-tensor
            reference ops (see :mod:`coupled_ds.kernels`).
        compact_coupled_state: Coupled tensors keep only the [H] column mean of v
            (state key ``exp_avg_sq_col_mean``, float32) instead of a full ``exp_avg_sq``,
            halving their optimizer state. :meth:`state_dict` still writes a full-size
            ``exp_avg_sq`` (every row = the column mean); a loaded full ``exp_avg_sq`` is reduced
            back, exactly and across ranks, at the next step. Off by default: Megatron's
            distributed optimizer reads ``exp_avg_sq`` from the state directly, and per-element v
            cannot be inspected.
        geometries: (tensor, ShardGeometry) pairs for coupled tensors that are pieces of a larger
            matrix (see :meth:`set_geometry`).

    State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` with the parameter's own shape, so
    DeepSpeed's and Megatron's checkpoint tools read it unchanged.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        avg_scale: float = 1.0,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        blocked: bool = True,
        geometries: Iterable[tuple[torch.Tensor, ShardGeometry]] = (),
        compact_coupled_state: bool = False,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, avg_scale, "defaults")
        if fused and foreach:
            raise ValueError("CoupledAdam: foreach=True and fused=True cannot both be set; pick one.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        avg_scale=avg_scale, amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                        fused=fused, coupled=False, vocab_size=None, coupled_names=None)
        self.blocked = blocked
        self.compact_coupled_state = compact_coupled_state
        if blocked:
            cpu_kernels.library()  # build or load the C kernels now, not inside the first step()
        self._geometry: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for tensor, geometry in geometries:
            self.set_geometry(tensor, geometry)
        self._empty_pieces: list[tuple[ShardGeometry, torch.device]] = []
        # What the last step's cross-rank reduction of column sums sent, and how long the step
        # spent starting it and waiting for it (the wait includes the slowest rank; the AdamW
        # groups step while it is in flight), for benchmarks and profiling.
        self.last_reduce_bytes = 0
        self.last_reduce_seconds = 0.0
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups and geometry
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                               group["avg_scale"], where)
        if group["coupled"]:
            self._check_coupled_group(group, where)

    def _check_coupled_group(self, group: dict[str, Any], where: str) -> None:
        if group["amsgrad"]:
            raise ValueError(
                f"CoupledAdam {where}: amsgrad=True is not defined for coupled groups (the max of "
                "a shared second moment is not the paper's method). Set amsgrad=False for the "
                "coupled group, or move these parameters out of it.")
        vocab_size = group["vocab_size"]
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
            raise ValueError(f"CoupledAdam {where}: vocab_size={vocab_size!r} must be a positive int.")
        for index, p in enumerate(group["params"]):
            name = self._name(group, index)
            geometry = self._geometry.get(p)
            if geometry is None and dtensor.is_dtensor(p):  # a tensor that knows its sharding
                geometry = self._geometry[p] = dtensor.geometry(p, self._key(group, index))
            if geometry is None and p.dim() != 2:
                raise ValueError(
                    f"Coupled parameter {name} has shape {tuple(p.shape)}; coupled parameters must "
                    "be 2-D [V, H] (rows = vocabulary), or be given a flat-slice geometry with "
                    "CoupledAdam.set_geometry(). Move it out of the coupled group, or fix the "
                    "coupled-parameter selection (coupled_param_groups(names=...)).")
            rows = geometry.rows_global if geometry is not None else p.shape[0]
            if vocab_size is not None and vocab_size > rows:
                raise ValueError(
                    f"Coupled parameter {name}: vocab_size={vocab_size} is larger than its "
                    f"{rows} rows. vocab_size is the real vocabulary; it must be <= the rows.")

    @staticmethod
    def _name(group: dict[str, Any], index: int) -> str:
        names = group.get("coupled_names")
        if names and index < len(names):
            return repr(names[index])
        return f"#{index} of a coupled group"

    def _key(self, group: dict[str, Any], index: int) -> str:
        """A name for a coupled matrix that is the same on every rank (orders collectives)."""
        names = group.get("coupled_names")
        if names and index < len(names):
            return str(names[index])
        group_index = next(i for i, g in enumerate(self.param_groups) if g is group)
        return f"param group {group_index} #{index}"

    def set_geometry(self, tensor: torch.Tensor, geometry: ShardGeometry) -> None:
        """Declare where ``tensor`` (a coupled tensor this optimizer steps) sits in its matrix.

        Engine adapters call this for every coupled shard. Without it a coupled tensor must be a
        whole [V, H] matrix held by this process alone.
        """
        geometry.check_fits(tensor, geometry.key)
        self._geometry[tensor] = geometry

    def geometry_of(self, tensor: torch.Tensor) -> ShardGeometry:
        """The geometry of a coupled tensor (a whole local matrix unless one was set)."""
        geometry = self._geometry.get(tensor)
        if geometry is None and dtensor.is_dtensor(tensor):
            return dtensor.geometry(tensor, key=f"local-{id(tensor)}")
        if geometry is None:
            if tensor.dim() != 2:
                raise ValueError(
                    f"A coupled tensor of shape {tuple(tensor.shape)} has no geometry. Coupled "
                    "tensors must be 2-D [V, H] or be registered with CoupledAdam.set_geometry(); "
                    "this usually means an engine flattened the parameters without the coupled_ds "
                    "adapter (e.g. DeepSpeed without `import coupled_ds.deepspeed`).")
            geometry = full_matrix_geometry(tensor, key=f"local-{id(tensor)}")
        return geometry

    def add_empty_piece(self, geometry: ShardGeometry, device: torch.device | str = "cpu") -> None:
        """Take part in the reduction of a matrix this rank holds no element of.

        Needed where an engine gives a rank no tensor at all for a matrix (Megatron's distributed
        optimizer): the collective still needs this rank's zeros. ``geometry.numel`` must be 0;
        ``device`` is where the collective's buffer lives (the NCCL device on GPUs).
        """
        if geometry.numel != 0:
            raise ValueError(f"add_empty_piece({geometry.key!r}): numel must be 0, got {geometry.numel}.")
        self._empty_pieces.append((geometry, torch.device(device)))

    def clear_geometry(self) -> None:
        """Forget all geometries and empty pieces (an adapter re-partitioning calls this)."""
        self._geometry = WeakIdKeyDictionary()
        self._empty_pieces = []

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if len(state) == 0:
            # Same layout as torch AdamW (non-capturable, non-fused): a float32 CPU scalar step.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = hugepages.zeros_like(p)
            state["exp_avg_sq"] = hugepages.zeros_like(p)
        return state

    def _init_coupled_state(self, p: torch.Tensor, geometry: ShardGeometry) -> dict[str, Any]:
        """Full state as AdamW, or with compact state an [H] float32 column mean instead of v."""
        if not self.compact_coupled_state:
            return self._init_state(p)
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = hugepages.zeros_like(p)
            state["exp_avg_sq_col_mean"] = torch.zeros(geometry.cols, dtype=torch.float32,
                                                       device=p.device)
        return state

    def state_dict(self) -> dict[str, Any]:
        """As torch's, but compact coupled state is written as a full-size ``exp_avg_sq`` (each
        owned element = its column's mean, engine padding 0), so every checkpoint tool reads it."""
        packed = super().state_dict()
        index_of: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                index_of.setdefault(id(p), len(index_of))
                state = self.state.get(p)
                if state is None or "exp_avg_sq_col_mean" not in state:
                    continue
                entry = dict(packed["state"][index_of[id(p)]])
                col_mean_H = entry.pop("exp_avg_sq_col_mean")
                entry["exp_avg_sq"] = dtensor.wrap_like(p, kernels.expand_column_mean(
                    col_mean_H, dtensor.local(p), self.geometry_of(p)))
                packed["state"][index_of[id(p)]] = entry
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's; large CPU state tensors then move into huge pages in place (see
        :mod:`coupled_ds.hugepages`), so a resumed run steps as fast as a fresh one."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    hugepages.advise(value)

    def _check_grad(self, group: dict[str, Any], index: int, p: torch.Tensor) -> None:
        if p.grad is not None and p.grad.is_sparse:
            name = self._name(group, index) if group["coupled"] else f"#{index} of param group"
            raise ValueError(
                f"Parameter {name} has a sparse gradient; CoupledAdam does not support sparse "
                "gradients. Use nn.Embedding(sparse=False).")

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (one collective per group list for coupled groups)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        coupled = [group for group in self.param_groups if group["coupled"]]
        # Coupled groups first: their column sums are then in flight (all-reduce started) while
        # the AdamW groups step, and the updates that need the sums come last.
        started = self._coupled_groups(coupled) if coupled or self._empty_pieces else None
        try:
            for group in self.param_groups:
                if not group["coupled"]:
                    self._adamw_group(group)
        finally:
            if started is not None:  # every rank started this collective: finish it even on error
                pending = started[2]
                self.last_reduce_bytes = pending.wait()
                self.last_reduce_seconds = pending.seconds
        if started is not None:
            self._coupled_updates(*started[:2])
        return loss

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            self._check_grad(group, index, p)
            state = self._init_state(p)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = hugepages.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        torch_adamw.adamw(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
            foreach=group["foreach"], fused=group["fused"],
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"])

    def _coupled_groups(self, groups: list[dict[str, Any]]
                        ) -> tuple[list[tuple], dict[str, ColumnSums], PendingReduction]:
        """Moments and column sums per piece, and the start of one reduction for all coupled
        matrices: (pieces, their column sums, the reduction to wait for before
        :meth:`_coupled_updates`)."""
        pieces = []  # (group, local p, state, local views of the state, geometry, local grad)
        for group in groups:
            self._check_coupled_group(group, "coupled group")
            for index, p in enumerate(group["params"]):
                self._check_grad(group, index, p)
                geometry = self.geometry_of(p)
                state = self._init_coupled_state(p, geometry)
                # The kernels see local tensors: a DTensor's own shard, anything else as it is.
                grad = None if p.grad is None else dtensor.local_grad(p, self._name(group, index))
                local_state = {k: dtensor.local(v) for k, v in state.items()}
                pieces.append((group, dtensor.local(p), state, local_state, geometry, grad))
        # A piece without a gradient still reports its (unchanged) v: the other pieces of the
        # matrix need the whole column mean, and every rank must enter the collective.
        sums: dict[str, ColumnSums] = {}
        for group, p, _, local_state, geometry, grad in pieces:
            entry = self._column_sums_entry(sums, geometry, p.device)
            self._moments_and_column_sums(entry.col_sum_H, group, grad, local_state, geometry)
        for geometry, device in self._empty_pieces:
            self._column_sums_entry(sums, geometry, device)
        return pieces, sums, start_allreduce_column_sums_(sums)

    def _coupled_updates(self, pieces: list[tuple], sums: dict[str, ColumnSums]) -> None:
        """Phase 2 of every piece, with the reduced column sums."""
        for group, p, state, local_state, geometry, grad in pieces:
            col_sum_H = sums[geometry.key].col_sum_H
            if self.compact_coupled_state:
                state.pop("exp_avg_sq", None)
                state["exp_avg_sq_col_mean"] = col_sum_H / self._rows_counted(group, geometry)
            if grad is not None:
                self._apply(group, p, local_state, geometry, col_sum_H)

    def _moments_and_column_sums(self, col_sum_H: torch.Tensor, group: dict[str, Any],
                                 grad: torch.Tensor | None, state: dict[str, Any],
                                 geometry: ShardGeometry) -> None:
        """Phase 1 for one piece: update m and v (if it has a gradient) and add the column sums
        of the new v over real-vocabulary rows to ``col_sum_H``."""
        if self.compact_coupled_state:
            self._compact_column_sums(col_sum_H, group, grad, state, geometry)
            return
        beta1, beta2 = group["betas"]
        rows_limit = self._rows_counted(group, geometry)
        if self.blocked:  # one pass over m, v and g
            kernels.moments_and_column_sums_(
                col_sum_H, state["exp_avg"], state["exp_avg_sq"], grad, geometry, beta1=beta1,
                beta2=beta2, maximize=group["maximize"], rows_limit=rows_limit)
            return
        if grad is not None:
            kernels.update_moments_([kernels.owned_view(state["exp_avg"], geometry)],
                                    [kernels.owned_view(state["exp_avg_sq"], geometry)],
                                    [kernels.owned_view(grad, geometry)], beta1=beta1,
                                    beta2=beta2, maximize=group["maximize"])
        kernels.accumulate_column_sums_(col_sum_H, state["exp_avg_sq"], geometry,
                                        rows_limit=rows_limit)

    def _compact_column_sums(self, col_sum_H: torch.Tensor, group: dict[str, Any],
                             grad: torch.Tensor | None, state: dict[str, Any],
                             geometry: ShardGeometry) -> None:
        """Add this piece's share of sum_i v_new[i, :] using only the [H] mean (DESIGN §2).

        The piece's current v sums to count_H * mean_H per column (every row of the compact v is
        the mean); a full v loaded from a checkpoint is summed as it is, which reduces it back
        exactly. With a gradient, v_new = beta2 v + (1 - beta2) g^2, so its sum needs only the
        column sums of g^2; without one, v is unchanged, as in the full-state step.
        """
        beta1, beta2 = group["betas"]
        rows_limit = self._rows_counted(group, geometry)
        if "exp_avg_sq" in state:
            old_sum_H = torch.zeros_like(col_sum_H)
            kernels.accumulate_column_sums_(old_sum_H, state["exp_avg_sq"], geometry,
                                            rows_limit=rows_limit)
        else:
            counts_H = kernels.column_counts(geometry, rows_limit, device=col_sum_H.device)
            old_sum_H = counts_H * state["exp_avg_sq_col_mean"].to(col_sum_H.device)
        if grad is None:
            col_sum_H += old_sum_H
            return
        grad_sq_sum_H = torch.zeros_like(col_sum_H)
        if self.blocked:
            kernels.moments_and_column_sums_(
                grad_sq_sum_H, state["exp_avg"], None, grad, geometry, beta1=beta1,
                beta2=beta2, maximize=group["maximize"], rows_limit=rows_limit)
        else:
            kernels.update_moments_([kernels.owned_view(state["exp_avg"], geometry)], [],
                                    [kernels.owned_view(grad, geometry)], beta1=beta1,
                                    beta2=beta2, maximize=group["maximize"])
            kernels.accumulate_column_sums_(grad_sq_sum_H, grad, geometry,
                                            rows_limit=rows_limit, square=True)
        col_sum_H += beta2 * old_sum_H + (1.0 - beta2) * grad_sq_sum_H

    @staticmethod
    def _column_sums_entry(sums: dict[str, ColumnSums], geometry: ShardGeometry,
                           device: torch.device) -> ColumnSums:
        entry = sums.get(geometry.key)
        if entry is None:
            col_sum_H = torch.zeros(geometry.cols, dtype=torch.float32, device=device)
            entry = sums[geometry.key] = ColumnSums(col_sum_H, geometry.groups)
        return entry

    @staticmethod
    def _rows_counted(group: dict[str, Any], geometry: ShardGeometry) -> int:
        vocab_size = group["vocab_size"]
        return geometry.rows_global if vocab_size is None else vocab_size

    def _apply(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any],
               geometry: ShardGeometry, col_sum_H: torch.Tensor) -> None:
        state["step"] += 1
        step = state["step"].item()
        beta1, beta2 = group["betas"]
        denom_H = kernels.column_denominator(
            col_sum_H, count=self._rows_counted(group, geometry), avg_scale=group["avg_scale"],
            bias_correction2=1.0 - beta2**step, eps=group["eps"])
        kernels.apply_coupled_update_(
            p, state["exp_avg"], denom_H, geometry, step_size=group["lr"] / (1.0 - beta1**step),
            decay=1.0 - group["lr"] * group["weight_decay"], blocked=self.blocked)
