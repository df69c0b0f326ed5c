"""Everything that depends on megatron-core's internals, for the supported range only.

megatron-core has no optimizer plugin API, so the patch reaches into a few private places; each
is named here and nowhere else:

* ``megatron.core.optimizer._get_megatron_optimizer_based_on_param_groups`` (looked up by
  ``get_megatron_optimizer`` at call time, and by 0.19's Muon path for its scalar optimizer):
  replaced by a wrapper that, for ``coupled_adam``, lets Megatron build its own ``adam``
  optimizer -- grad scaler, DistributedOptimizer / Float16OptimizerWithFloat16Params /
  FP32Optimizer, process-group attributes -- and then puts our inner optimizer in place of
  Megatron's AdamW over the very param groups the wrapper gave it (:func:`replace_inner`). No
  wrapper code is copied; the wrappers' constructors only read the inner optimizer's
  ``param_groups``.
* From 0.17, ``get_megatron_optimizer`` sends every name but adam/sgd to its emerging-optimizer
  path, so it is wrapped too (:func:`make_router`; where ``megatron.training.training`` bound it
  at import, there as well) to hand ``coupled_adam`` to the standard path as an ``adam`` config
  that carries :data:`ROUTED`. ``_get_megatron_emerging_optimizer`` is guarded so that a copy of
  ``get_megatron_optimizer`` imported before :func:`megatron_patch.apply` raises instead of
  failing obscurely.
* The wrappers' private parallel lists (``float16_groups`` / ``fp32_from_float16_groups``,
  ``model_*_groups`` / ``shard_*_groups``, ``_get_model_param_range_map``), read by
  :func:`inner_tensors` to find which inner tensor is which model parameter, and which flat range
  of it.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "coupled_adam"

#: Supported megatron-core versions: [MIN, MAX). Tested: 0.16.1 (Python 3.11) and 0.19.2
#: (Python 3.12, the newest release).
MEGATRON_CORE_MIN = (0, 16, 0)
MEGATRON_CORE_MAX = (0, 20, 0)
SUPPORTED_RANGE = ">=0.16.0,<0.20"
#: From this version on, get_megatron_optimizer routes unknown names to emerging optimizers.
_ROUTING_FROM = (0, 17, 0)
#: Attribute on the ``adam`` config that :func:`make_router` hands to the standard path.
ROUTED = "coupled_adam_routed"


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
            "(pip install 'megatron-core>=0.16,<0.20') or use coupled_ds.CoupledAdam directly.")


def optimizer_module():
    import megatron.core.optimizer as module

    return module


def wants_coupled_adam(config) -> bool:
    """Whether a factory call is for coupled_adam (by name, or routed as ``adam``)."""
    return getattr(config, "optimizer", None) == OPTIMIZER_NAME or getattr(config, ROUTED, False)


def as_adam(config):
    """A shallow copy of ``config`` that Megatron's factory builds as its own ``adam`` path."""
    adam = copy.copy(config)
    adam.optimizer = "adam"
    return adam


def routing_patches(training_module) -> list[tuple[Any, str, Callable]]:
    """(module, attribute, make_wrapper) for the versions whose dispatch needs routing."""
    if megatron_core_version() < _ROUTING_FROM:
        return []
    core = optimizer_module()
    patches = [(core, "get_megatron_optimizer", make_router),
               (core, "_get_megatron_emerging_optimizer", _guard_emerging)]
    if training_module is not None and hasattr(training_module, "get_megatron_optimizer"):
        patches.append((training_module, "get_megatron_optimizer", make_router))
    return patches


def make_router(original):
    """0.17+: ``coupled_adam`` enters get_megatron_optimizer's standard (adam/sgd) path."""

    @functools.wraps(original)
    def get_megatron_optimizer(config, *args, **kwargs):
        if getattr(config, "optimizer", None) == OPTIMIZER_NAME:
            config = as_adam(config)
            setattr(config, ROUTED, True)
        return original(config, *args, **kwargs)

    get_megatron_optimizer._coupled_ds_patch = True
    return get_megatron_optimizer


def _guard_emerging(original):
    @functools.wraps(original)
    def _get_megatron_emerging_optimizer(config, *args, **kwargs):
        if getattr(config, "optimizer", None) == OPTIMIZER_NAME:
            raise UnsupportedMegatronError(
                "optimizer='coupled_adam' reached megatron-core's emerging-optimizer path: this "
                "get_megatron_optimizer was imported before megatron_patch.apply(). Call "
                "megatron_patch.apply() before importing it (or call "
                "megatron.core.optimizer.get_megatron_optimizer).")
        return original(config, *args, **kwargs)

    return _get_megatron_emerging_optimizer


def replace_inner(optimizer, inner: torch.optim.Optimizer, init_state_fn) -> None:
    """Put ``inner`` where Megatron's wrapper holds its own (``.optimizer``).

    ``inner`` must have been built over ``optimizer.optimizer.param_groups`` (the groups as the
    wrapper left them: fp32 main params or distributed-optimizer shards).
    """
    from megatron.core.optimizer import DistributedOptimizer

    optimizer.optimizer = inner
    optimizer.init_state_fn = init_state_fn
    if type(optimizer) is DistributedOptimizer:
        optimizer.__class__ = coupled_distributed_optimizer_class()


def coupled_distributed_optimizer_class():
    """DistributedOptimizer whose checkpoint loading tolerates a per-parameter ``step``.

    Installed by :func:`replace_inner` as the class of Megatron's own instance (it only
    overrides one method). 0.16's and 0.19's ``_set_main_param_and_optimizer_states`` copy
    every key of the inner state from the loaded tensors, but their checkpoint formats keep
    ``step`` in the param groups (as TE's FusedAdam does): fully_reshardable omits it
    (KeyError), dp_reshardable hands back the current, not the saved, step. CoupledAdam keeps
    ``step`` per parameter like torch.optim.AdamW, so it is skipped here and restored from the
    param groups (see MegatronCoupledAdam.load_state_dict). The copy also runs under no_grad:
    fp32 shards are views of parameters that require grad.
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


def refuse_unsupported(config, model_chunks, *, skip_megatron_wrapping: bool = False) -> None:
    """Raise UnsupportedMegatronError naming the first unsupported flag."""
    checks = [
        (config.use_precision_aware_optimizer, "use_precision_aware_optimizer=True",
         "it keeps the optimizer state inside TransformerEngine's FusedAdam",
         "drop --use-precision-aware-optimizer"),
        (config.optimizer_cpu_offload, "optimizer_cpu_offload=True",
         "HybridDeviceOptimizer steps with its own Adam", "drop --optimizer-cpu-offload"),
        (not config.decoupled_weight_decay, "decoupled_weight_decay=False",
         "Coupled Adam is AdamW (decoupled decay)", "set decoupled_weight_decay=True"),
        (getattr(config, "optimizer_cuda_graph", False), "optimizer_cuda_graph=True",
         "the inner optimizer would have to be capturable", "drop --optimizer-cuda-graph"),
        (skip_megatron_wrapping, "use_layer_wise_distributed_optimizer=True",
         "LayerWiseDistributedOptimizer wraps the raw optimizer itself",
         "use --use-distributed-optimizer without the layer-wise optimizer"),
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
