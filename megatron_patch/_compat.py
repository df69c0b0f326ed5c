"""Everything that depends on megatron-core's internals, for the supported range only.

megatron-core has no optimizer plugin API, so the patch reaches into three private places; each
is named here and nowhere else:

* ``megatron.core.optimizer._get_megatron_optimizer_based_on_param_groups`` (looked up by
  ``get_megatron_optimizer`` at call time): replaced by a wrapper that builds our inner optimizer
  when ``config.optimizer == "coupled_adam"`` and then wraps it exactly as 0.16's own code does
  (:func:`wrap_like_megatron`, a copy of its wrapper section).
* ``megatron.core.optimizer.distrib_optimizer.Adam``: the ``DistributedOptimizer`` constructor
  asserts ``isinstance(optimizer, (Adam, torch.optim.AdamW, ...))`` "due to checkpointing
  requirements"; :func:`distributed_optimizer_accepts` widens that name for the construction only.
* The wrappers' private parallel lists (``float16_groups`` / ``fp32_from_float16_groups``,
  ``model_*_groups`` / ``shard_*_groups``, ``_get_model_param_range_map``), read by
  :func:`inner_tensors` to find which inner tensor is which model parameter, and which flat range
  of it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Supported megatron-core versions: [MIN, MAX). Checked: 0.16.1 (the newest for Python 3.11).
MEGATRON_CORE_MIN = (0, 16, 0)
MEGATRON_CORE_MAX = (0, 17, 0)
SUPPORTED_RANGE = ">=0.16.0,<0.17"


class UnsupportedMegatronError(ValueError):
    """The installed megatron-core, or a configuration flag, is outside what the patch supports."""


def megatron_core_version() -> tuple[int, int, int]:
    from megatron.core import package_info

    return (package_info.MAJOR, package_info.MINOR, package_info.PATCH)


def check_version() -> None:
    """Raise unless the installed megatron-core is in the supported range."""
    version = megatron_core_version()
    if not MEGATRON_CORE_MIN <= version < MEGATRON_CORE_MAX:
        raise UnsupportedMegatronError(
            f"megatron_patch supports megatron-core {SUPPORTED_RANGE}; found "
            f"{'.'.join(map(str, version))}. Install a supported version "
            "(pip install 'megatron-core>=0.16,<0.17') or use coupled_ds.CoupledAdam directly.")


def optimizer_module():
    import megatron.core.optimizer as module

    return module


@contextlib.contextmanager
def distributed_optimizer_accepts(cls: type) -> Iterator[None]:
    """Let ``DistributedOptimizer.__init__``'s inner-optimizer type assertion accept ``cls``."""
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer.Adam
    distrib_optimizer.Adam = (original, cls)  # isinstance() accepts nested tuples
    try:
        yield
    finally:
        distrib_optimizer.Adam = original


def wrap_like_megatron(inner: torch.optim.Optimizer, init_state_fn, *, config, model_chunks,
                       per_model_buffers, model_parallel_group, data_parallel_group,
                       data_parallel_group_gloo, data_parallel_group_idx, intra_dist_opt_group,
                       distributed_optimizer_instance_id, pg_collection, **_unused):
    """Wrap ``inner`` in DistributedOptimizer / Float16OptimizerWithFloat16Params / FP32Optimizer.

    A copy of the wrapper section of megatron-core 0.16's
    ``_get_megatron_optimizer_based_on_param_groups`` (grad scaler choice, wrapper choice, the
    ``grad_stats_parallel_group`` and ``tp_group`` attributes), so everything but the inner
    optimizer is Megatron's own path.
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    if config.fp16 or config.bf16 or config.use_distributed_optimizer:
        grad_scaler = None
        if config.loss_scale:
            grad_scaler = ConstantGradScaler(config.loss_scale)
        elif config.fp16:
            grad_scaler = DynamicGradScaler(
                initial_scale=config.initial_loss_scale, min_scale=config.min_loss_scale,
                growth_factor=2.0, backoff_factor=0.5, growth_interval=config.loss_scale_window,
                hysteresis=config.hysteresis)
        optimizer_args = [inner, config, grad_scaler, init_state_fn]
        if config.use_distributed_optimizer:
            with distributed_optimizer_accepts(type(inner)):
                optimizer = coupled_distributed_optimizer_class()(
                    *optimizer_args, model_chunks=model_chunks,
                    per_model_buffers=per_model_buffers, data_parallel_group=data_parallel_group,
                    data_parallel_group_gloo=data_parallel_group_gloo,
                    data_parallel_group_idx=data_parallel_group_idx,
                    distributed_optimizer_instance_id=distributed_optimizer_instance_id)
            optimizer.grad_stats_parallel_group = intra_dist_opt_group
        else:
            optimizer = Float16OptimizerWithFloat16Params(*optimizer_args)
            optimizer.grad_stats_parallel_group = model_parallel_group
    else:
        optimizer = FP32Optimizer(inner, config, init_state_fn)
        optimizer.grad_stats_parallel_group = model_parallel_group
    if pg_collection is None or not hasattr(pg_collection, "tp"):
        optimizer.tp_group = parallel_state.get_tensor_model_parallel_group()
    else:
        optimizer.tp_group = pg_collection.tp
    return optimizer


def coupled_distributed_optimizer_class():
    """DistributedOptimizer whose checkpoint loading tolerates a per-parameter ``step``.

    0.16's ``_set_main_param_and_optimizer_states`` copies every key of the inner state from
    the loaded tensors, but its checkpoint formats keep ``step`` in the param groups (as TE's
    FusedAdam does): fully_reshardable omits it (KeyError), dp_reshardable hands back the
    current, not the saved, step. CoupledAdam keeps ``step`` per parameter like
    torch.optim.AdamW, so it is skipped here and restored from the param groups (see
    MegatronCoupledAdam.load_state_dict). The copy also runs under no_grad: fp32 shards are
    views of parameters that require grad.
    """
    global _COUPLED_DISTRIBUTED_OPTIMIZER
    if _COUPLED_DISTRIBUTED_OPTIMIZER is None:
        from megatron.core.optimizer import DistributedOptimizer

        class CoupledDistributedOptimizer(DistributedOptimizer):
            @torch.no_grad()
            def _set_main_param_and_optimizer_states(self, model_param, tensors):
                if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                    group_index, group_order = self.model_param_group_index_map[model_param]
                    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
                    dst_tensors = {"param": main_param, **self.optimizer.state[main_param]}
                    for key, dst in dst_tensors.items():
                        if key == "step":
                            continue  # not in the buffers; a dp_reshardable load hands back
                            # this rank's current (pre-load) step as a non-persistent object
                        dst.copy_(tensors[key])
                    return
                super()._set_main_param_and_optimizer_states(model_param, tensors)

        _COUPLED_DISTRIBUTED_OPTIMIZER = CoupledDistributedOptimizer
    return _COUPLED_DISTRIBUTED_OPTIMIZER


_COUPLED_DISTRIBUTED_OPTIMIZER = None


def tensor_parallel_group(pg_collection):
    """The tensor-parallel group that splits vocabulary rows."""
    from megatron.core import parallel_state

    if pg_collection is not None and hasattr(pg_collection, "tp"):
        return pg_collection.tp
    return parallel_state.get_tensor_model_parallel_group()


@dataclass(frozen=True)
class InnerTensor:
    """One tensor the inner optimizer steps, and the model parameter it stands for.

    ``start_flat``/``end_flat``: the elements of ``model_param.view(-1)`` that ``tensor`` holds
    (Megatron's "param" Range); ``dp_group``: the group the other DP shards live in (None when
    every DP rank holds the whole parameter).
    """

    tensor: torch.Tensor | None
    model_param: torch.nn.Parameter
    start_flat: int
    end_flat: int
    dp_group: Any


def inner_tensors(optimizer) -> Iterator[InnerTensor]:
    """Every model parameter the wrapper manages, with its inner tensor (None: no shard here)."""
    from megatron.core.optimizer import DistributedOptimizer, Float16OptimizerWithFloat16Params

    if isinstance(optimizer, DistributedOptimizer):
        yield from _distributed_inner_tensors(optimizer)
    elif isinstance(optimizer, Float16OptimizerWithFloat16Params):
        for models, mains in zip(optimizer.float16_groups, optimizer.fp32_from_float16_groups):
            for model_param, main in zip(models, mains):
                yield InnerTensor(main, model_param, 0, model_param.numel(), None)
        for group in optimizer.fp32_from_fp32_groups:
            for p in group:
                yield InnerTensor(p, p, 0, p.numel(), None)
    else:  # FP32Optimizer steps the model parameters themselves
        for group in optimizer.optimizer.param_groups:
            for p in group["params"]:
                yield InnerTensor(p, p, 0, p.numel(), None)


def _distributed_inner_tensors(optimizer) -> Iterator[InnerTensor]:
    owned = {}
    for models, shards in zip(optimizer.model_float16_groups,
                              optimizer.shard_fp32_from_float16_groups):
        owned.update({id(m): s for m, s in zip(models, shards)})
    for models, shards in zip(optimizer.model_fp32_groups, optimizer.shard_fp32_groups):
        owned.update({id(m): s for m, s in zip(models, shards)})
    for buffer in optimizer.buffers:
        for model_param in buffer.param_index_map:
            if id(model_param) in owned:
                param_range = optimizer._get_model_param_range_map(model_param)["param"]
                yield InnerTensor(owned[id(model_param)], model_param, param_range.start,
                                  param_range.end, buffer.data_parallel_group)
            else:
                yield InnerTensor(None, model_param, 0, 0, buffer.data_parallel_group)


def is_dense_call(arguments: dict[str, Any]) -> bool:
    """Whether this factory call builds the dense (non-expert) optimizer.

    ``get_megatron_optimizer`` calls the factory once for the dense parameters on every rank
    (twice only with overlap_param_gather_with_optimizer_step, which coupled_adam refuses) and
    once more, only where expert-parallel parameters exist, with groups marked
    ``is_expert_parallel``: the dense call is the one every rank makes.
    """
    return not any(group.get("is_expert_parallel", False) for group in arguments["param_groups"])


def refuse_unsupported(config, model_chunks) -> None:
    """Raise UnsupportedMegatronError naming the first unsupported flag."""
    checks = [
        (config.use_precision_aware_optimizer, "use_precision_aware_optimizer=True",
         "it keeps the optimizer state inside TransformerEngine's FusedAdam",
         "drop --use-precision-aware-optimizer"),
        (config.optimizer_cpu_offload, "optimizer_cpu_offload=True",
         "HybridDeviceOptimizer steps with its own Adam", "drop --optimizer-cpu-offload"),
        (not config.decoupled_weight_decay, "decoupled_weight_decay=False",
         "Coupled Adam is AdamW (decoupled decay)", "set decoupled_weight_decay=True"),
        (config.overlap_param_gather_with_optimizer_step,
         "overlap_param_gather_with_optimizer_step=True", "this split of the model chunks is "
         "not tested with coupled_adam", "drop --overlap-param-gather-with-optimizer-step"),
    ]
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        checks.append((ddp_config is not None and getattr(ddp_config, "use_megatron_fsdp", False),
                       "use_megatron_fsdp=True", "Megatron-FSDP shards parameters as DTensors",
                       "drop --use-megatron-fsdp (use --use-distributed-optimizer)"))
        checks.append((type(chunk).__name__ == "TorchFullyShardedDataParallel",
                       "use_torch_fsdp2=True", "FSDP2 shards parameters as DTensors",
                       "drop --use-torch-fsdp2 (use --use-distributed-optimizer)"))
    for bad, flag, why, fix in checks:
        if bad:
            raise UnsupportedMegatronError(
                f"optimizer='coupled_adam' does not support {flag}: {why}. Fix: {fix}, or use "
                "optimizer='adam'.")
