"""Geometry adapters for DeepSpeed's optimizer wrappers: where each flat partition the base
``CoupledAdam`` steps sits in its [V, H] matrix, and which process groups hold the other pieces.

Coordinate frames (DESIGN §5.1, checked in deepspeed 0.19.8):

* ZeRO 1/2 (``DeepSpeedZeroOptimizer``) and ZeRO 1 + bf16 (``BF16_Optimizer``): each param group
  is flattened (with alignment padding), cut into equal slices over the group's data-parallel
  group, and the base optimizer sees this rank's fp32 slice. ``p._hp_mapping`` says which part
  of ``p.flatten()`` (``lp_fragment_address``) lies where in the slice (``hp_fragment_address``);
  it is ``None`` on a rank whose slice holds none of ``p``.
* ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): every parameter is partitioned on its own; rank r
  of ``p.ds_process_group`` holds ``[r * ps, (r + 1) * ps)`` of ``p.flatten()`` (tail padding on
  the last rank). The base optimizer sees, during step only, one fp32 flat tensor per sub-group:
  the partitions of the sub-group's parameters, one after another.
* ZeRO 0 (plain, or bf16/fp16 wrappers that keep fp32 copies of each parameter's shape): every
  rank holds whole matrices; nothing to reduce.

Each coupled matrix has a param group of its own (``coupled_param_groups``), so one flat tensor
holds at most one coupled matrix; a rank that holds none of it still gets a ``numel=0`` geometry
on its (padding-only) slice, so it enters the column-sum all-reduce like every other rank.
Shapes in names: V vocabulary rows, H hidden columns.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from coupled_ds.geometry import ShardGeometry
from coupled_ds.optimizer import CoupledAdam

__all__ = ["attach_geometry", "pipeline_group", "pipeline_vocab_shape"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Matrix:
    """A coupled matrix as the model holds it, in the global (tensor-parallel-joined) frame."""

    key: str
    rows_local: int
    rows_global: int
    cols: int
    row_offset_global: int  # first row of this tensor-parallel rank's block
    tp_group: dist.ProcessGroup | None

    def geometry(self, start_local_flat: int, numel: int, offset_local: int,
                 dp_group: dist.ProcessGroup | None) -> ShardGeometry:
        groups = tuple(g for g in (self.tp_group, dp_group) if g is not None)
        start_global_flat = self.row_offset_global * self.cols + start_local_flat
        return ShardGeometry(self.key, self.rows_global, self.cols,
                             start_global_flat=start_global_flat, numel=numel,
                             offset_local=offset_local, groups=groups)


def _matrix(engine: Any, p: torch.Tensor, key: str, shape: torch.Size) -> _Matrix:
    """Global rows of ``p``: a vocabulary-parallel shard (Megatron marks it
    ``tensor_model_parallel`` with ``partition_dim == 0``) joins its tensor-parallel group."""
    if len(shape) != 2:
        raise ValueError(f"Coupled parameter {key!r} has shape {tuple(shape)}; coupled parameters "
                         "must be 2-D [V, H]. Fix optimizer.params.coupled_params.")
    rows, cols = shape
    if not getattr(p, "tensor_model_parallel", False) or engine.mpu is None:
        return _Matrix(key, rows, rows, cols, 0, None)
    if getattr(p, "partition_dim", 0) != 0:
        raise ValueError(
            f"Coupled parameter {key!r} is tensor-parallel along dim {p.partition_dim} (hidden "
            "columns); only vocabulary-parallel sharding (partition_dim=0) can be coupled.")
    mpu = engine.mpu
    get_group = (getattr(mpu, "get_tensor_model_parallel_group", None)
                 or mpu.get_model_parallel_group)
    tp_group = get_group()
    tp_rank, tp_world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    return _Matrix(key, rows, rows * tp_world, cols, rows * tp_rank, tp_group)


def _coupled_group_param(group: dict[str, Any], lp_params: list[torch.Tensor],
                         index: int) -> tuple[torch.Tensor, str]:
    """The one model parameter of a coupled group (several would share one flat tensor)."""
    names = group.get("coupled_names") or [f"coupled param group {index}"]
    if len(lp_params) != 1:
        raise ValueError(
            f"CoupledAdam param group {index} is coupled and holds {len(lp_params)} "
            "trainable tensors; under ZeRO each coupled matrix needs a param group of its own. "
            "Build the groups with coupled_ds.coupled_param_groups(model).")
    return lp_params[0], names[0]


def _attach_flat_partitions(engine: Any, opt: CoupledAdam, lp_groups: list[list[torch.Tensor]],
                            flat_partitions: list[torch.Tensor],
                            dp_groups: list[dist.ProcessGroup]) -> list[str]:
    """ZeRO 1/2 and BF16_Optimizer: one flat fp32 slice per param group, ``_hp_mapping`` links."""
    lines = []
    for index, group in enumerate(opt.param_groups):
        if not group["coupled"]:
            continue
        p, name = _coupled_group_param(group, lp_groups[index], index)
        matrix = _matrix(engine, p, name, p.shape)
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # this rank's slice is alignment padding or other parameters only
            geometry = matrix.geometry(0, 0, 0, dp_groups[index])
        else:
            geometry = matrix.geometry(mapping.lp_fragment_address.start,
                                       mapping.lp_fragment_address.numel,
                                       mapping.hp_fragment_address.start, dp_groups[index])
        opt.set_geometry(flat_partitions[index], geometry)
        lines.append(_describe(geometry, dp_groups[index], group["vocab_size"]))
    return lines


def _attach_stage3(engine: Any, zero_opt: Any, opt: CoupledAdam) -> list[str]:
    """ZeRO 3: per sub-group flat fp32 tensor; each parameter's partition inside it."""
    if getattr(zero_opt, "swap_optimizer", False):
        raise ValueError("ZeRO 3 with offload_optimizer.device='nvme' swaps the fp32 partitions "
                         "CoupledAdam steps; use offload_optimizer.device='cpu' or 'none'.")
    if zero_opt.offload_optimizer and getattr(zero_opt, "partial_offload", 1.0) != 1.0:
        raise ValueError("ZeRO 3 offload_optimizer.ratio < 1 steps part of the model with a "
                         "second (uncoupled) optimizer; set offload_optimizer.ratio to 1.0 with "
                         "CoupledAdam.")
    lines = []
    for sub_index, params in enumerate(zero_opt.fp16_groups):
        group_index = zero_opt.sub_group_to_group_id[sub_index]
        group = opt.param_groups[group_index]
        if not group["coupled"]:
            continue
        p, name = _coupled_group_param(group, params, group_index)
        matrix = _matrix(engine, p, name, p.ds_shape)
        ps = p.partition_numel()
        rank = dist.get_rank(p.ds_process_group)
        owned = max(0, min(ps, p.ds_numel - rank * ps))
        geometry = matrix.geometry(rank * ps if owned else 0, owned, 0, p.ds_process_group)
        opt.set_geometry(zero_opt.fp32_partitioned_groups_flat[sub_index], geometry)
        lines.append(_describe(geometry, p.ds_process_group, group["vocab_size"]))
    return lines


def _attach_whole_matrices(engine: Any, opt: CoupledAdam, wrapped: bool) -> list[str]:
    """ZeRO 0: each rank holds whole [V, H] matrices (replicated data parallelism).

    A vocabulary-parallel shard still needs its tensor-parallel group; the fp16/bf16 wrappers
    step fp32 copies that lose Megatron's markers, so that combination is refused.
    """
    lines = []
    for index, group in enumerate(opt.param_groups):
        if not group["coupled"]:
            continue
        for p, name in zip(group["params"], group.get("coupled_names") or [f"group {index}"]):
            matrix = _matrix(engine, p, name, p.shape)
            if matrix.tp_group is not None:
                opt.set_geometry(p, matrix.geometry(0, p.numel(), 0, None))
            elif wrapped and engine.mpu is not None:
                raise ValueError(
                    "CoupledAdam without ZeRO under fp16/bf16 with an mpu cannot see which "
                    "coupled matrices are vocabulary-parallel; use zero_optimization.stage >= 1.")
            rows = group["vocab_size"] or p.shape[0]
            lines.append(f"{name} {list(p.shape)}, column mean over {rows} of {p.shape[0]} rows; "
                         "whole on every data-parallel rank")
    return lines


def _describe(geometry: ShardGeometry, dp_group: dist.ProcessGroup, vocab_size: int | None) -> str:
    """One line for the setup summary: the matrix, the rows in its mean, where it is cut."""
    end = geometry.start_global_flat + geometry.numel
    rows = geometry.rows_global if vocab_size is None else vocab_size
    return (f"{geometry.key} [{geometry.rows_global}, {geometry.cols}], column mean over {rows} "
            f"of {geometry.rows_global} rows; flat partitions over data-parallel size "
            f"{dist.get_world_size(dp_group)} (rank 0 holds [{geometry.start_global_flat}, {end})), "
            f"[H] column sums all-reduced over {len(geometry.groups)} group(s)")


def _announce(how: str, lines: list[str]) -> None:
    """Rank 0 says at setup what was coupled, on stderr: DeepSpeed's logger stays at WARNING by
    default and Hugging Face Trainer sets it to its own level, so an INFO line would go unseen.
    ``COUPLED_DS_QUIET=1`` keeps it to the ``coupled_ds.zero`` logger."""
    text = f"coupled_ds: CoupledAdam under DeepSpeed {how}; " + (
        "; ".join(lines) or "no coupled matrix on the optimizer")
    logger.info("%s", text)
    if os.environ.get("COUPLED_DS_QUIET", "0") in ("", "0"):
        print("\n  ".join(["[coupled_ds] CoupledAdam under DeepSpeed " + how + ":",
                            *(lines or ["no coupled matrix on the optimizer"])]),
              file=sys.stderr, flush=True)


def attach_geometry(engine: Any) -> None:
    """Register the geometry of every coupled tensor the engine's base optimizer will step.

    Raises:
        ValueError: The engine wrapped the optimizer in a way CoupledAdam cannot couple under
            (the message names the config key to change).
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt, wrapper = engine.basic_optimizer, engine.optimizer
    if not isinstance(opt, CoupledAdam):
        raise ValueError(f"coupled_ds: DeepSpeed built {type(opt).__name__}, not CoupledAdam "
                         "(e.g. offload_optimizer with zero_force_ds_cpu_optimizer); refusing to "
                         "train uncoupled.")
    opt.clear_geometry()
    if getattr(engine, "zenflow", False):
        raise ValueError("zero_optimization.zenflow steps with ZenFlowCPUAdam, which cannot "
                         "couple; remove the zenflow section to use CoupledAdam.")
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        how = f"ZeRO stage {engine.zero_optimization_stage()}"
        lines = _attach_flat_partitions(engine, opt, wrapper.bit16_groups,
                                        wrapper.single_partition_of_fp32_groups,
                                        wrapper.real_dp_process_group)
    elif isinstance(wrapper, BF16_Optimizer):
        how = "BF16_Optimizer (ZeRO stage 1, bf16)"
        lines = _attach_flat_partitions(engine, opt, wrapper.bf16_groups,
                                        wrapper.fp32_groups_flat_partition,
                                        wrapper.real_dp_process_group)
    elif isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        if type(wrapper) is not DeepSpeedZeroOptimizer_Stage3:
            raise ValueError(f"{type(wrapper).__name__} (zero_optimization.super_offload) steps "
                             "with a CPU Adam kernel that cannot couple; disable super_offload.")
        how = "ZeRO stage 3"
        lines = _attach_stage3(engine, wrapper, opt)
    elif wrapper is opt or isinstance(wrapper, FP16_Optimizer | FP16_UnfusedOptimizer):
        how = "no ZeRO" if wrapper is opt else f"no ZeRO, {type(wrapper).__name__}"
        lines = _attach_whole_matrices(engine, opt, wrapper is not opt)
    else:
        raise ValueError(f"coupled_ds: DeepSpeed wrapped CoupledAdam in {type(wrapper).__name__}, "
                         "for which no geometry adapter exists; refusing to train uncoupled.")
    _check_pipeline(engine, opt, wrapper)
    if engine.zero_use_cpu_optimizer():
        how += ", optimizer state offloaded to CPU (stepped by CoupledAdam)"
    if dist.get_rank() == 0:
        _announce(how, lines)


# ---------------------------------------------------------------------- pipeline parallelism
# A deepspeed.pipe.PipelineModule stage holds only its own layers: the first stage the token
# embedding, middle stages none, the last stage the output layer (a tied copy of the embedding,
# whose gradient DeepSpeed all-reduces with the first stage's before the step, or an untied
# projection). Each stage couples what it holds over its own data-parallel group; a tied copy
# steps exactly like the original because it has the same gradient and state.
def pipeline_group(module: Any) -> dist.ProcessGroup | None:
    """The pipe-parallel group of a ``PipelineModule`` stage with more than one stage, else None."""
    from deepspeed.pipe import PipelineModule

    if not isinstance(module, PipelineModule) or module._grid.pipe_parallel_size < 2:
        return None
    return module._grid.get_pipe_parallel_group()


def pipeline_vocab_shape(module: Any, group: dist.ProcessGroup) -> tuple[int, int] | None:
    """[V, H] of the token embedding held by some stage of the pipeline (a collective over the
    pipe-parallel group: every stage calls it), so a stage with only the output projection can
    detect it."""
    from coupled_ds.groups import token_embedding_shape

    shape = torch.tensor(token_embedding_shape(module) or (0, 0), dtype=torch.int64)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=group)
    return (int(shape[0]), int(shape[1])) if shape[0] > 0 else None


def _check_pipeline(engine: Any, opt: CoupledAdam, wrapper: Any) -> None:
    """Every stage decides together: some stage couples a matrix (else all raise), and every
    stage enters ZeRO 1's per-group gradient-norm collectives equally often."""
    from coupled_ds.groups import NoEmbeddingFoundError

    group = pipeline_group(engine.module)
    if group is None:
        return
    coupled = torch.tensor(sum(bool(g["coupled"]) for g in opt.param_groups), dtype=torch.int64)
    dist.all_reduce(coupled, group=group)
    if int(coupled) == 0:
        raise NoEmbeddingFoundError(
            "CoupledAdam under DeepSpeed pipeline parallelism: no stage holds a token embedding "
            "or output projection. Name them with optimizer.params.coupled_params=[regex, ...].")
    if dist.get_rank() == 0:
        logger.info("coupled_ds: pipeline of %d stages; %d coupled matrices over all stages (a "
                    "tied copy on the last stage counts again; stages without one train as AdamW)",
                    dist.get_world_size(group), int(coupled))
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        _balance_norm_collectives(wrapper)


def _balance_norm_collectives(zero_opt: Any) -> None:
    """ZeRO 1/2 computes the gradient norm group by group, each with an all-reduce over the
    model-parallel group (all pipeline stages). Stages with fewer param groups (a middle stage
    has no coupled group) would stop early and the others wait forever. A stage with fewer groups
    adds all-reduces of an empty group's zero; the norm is the same on every stage, because the
    groups' squared norms are summed in the end and which groups share an all-reduce does not
    change the sum.
    """
    from deepspeed.runtime.utils import combine_grad_norm_groups

    group = zero_opt.model_parallel_group
    if group is None or dist.get_world_size(group) < 2:
        return
    count = torch.tensor(len(zero_opt.bit16_groups), dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    missing = int(count) - len(zero_opt.bit16_groups)
    if missing == 0:
        return
    original = zero_opt.scaled_global_norm

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        norm = original(norm_type)
        empty = [zero_opt.get_grad_norm_direct([], [], norm_type) for _ in range(missing)]
        return combine_grad_norm_groups([norm, *empty], norm_type=norm_type)

    zero_opt.scaled_global_norm = scaled_global_norm
