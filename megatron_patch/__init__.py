"""Coupled Adam for Megatron: ``optimizer="coupled_adam"`` in megatron-core and Megatron-LM.

Usage (megatron-core)::

    import megatron_patch
    megatron_patch.apply()
    config = megatron_patch.coupled_adam_config(vocab_size=tokenizer.vocab_size, lr=3e-4,
                                                 adam_beta2=0.95, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(config, model_chunks)

Megatron-LM: ``launch/pretrain_gpt_coupled.py`` (same arguments as ``pretrain_gpt.py``, plus
``--optimizer coupled_adam``). Supported megatron-core: :data:`SUPPORTED_RANGE`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from megatron_patch._compat import SUPPORTED_RANGE, UnsupportedMegatronError
from megatron_patch.core import OPTIMIZER_NAME, MegatronCoupledAdam, coupled_adam_config

__all__ = ["OPTIMIZER_NAME", "SUPPORTED_RANGE", "MegatronCoupledAdam", "UnsupportedMegatronError",
           "apply", "coupled_adam_config", "is_applied", "undo"]

logger = logging.getLogger(__name__)

_PATCHES: list[tuple[object, str, object]] = []  # (module, attribute, original)


def _patch(module, attribute: str, make) -> None:
    original = getattr(module, attribute)
    setattr(module, attribute, make(original))
    _PATCHES.append((module, attribute, original))


def is_applied() -> bool:
    return bool(_PATCHES)


def apply(*, training: bool | None = None) -> None:
    """Register ``coupled_adam`` with megatron-core (and Megatron-LM's training code).

    Idempotent. Args:
        training: Also hook Megatron-LM's ``megatron.training`` (argument parsing and optimizer
            config). None: when it is importable; True: require it; False: never.
    """
    if _PATCHES:
        return
    from megatron_patch import _compat, args, core

    _compat.check_version()
    _patch(_compat.optimizer_module(), "_get_megatron_optimizer_based_on_param_groups",
           core.make_factory)
    if training is None:
        training = importlib.util.find_spec("megatron.training") is not None
    training_module = None
    if training:
        arguments = importlib.import_module("megatron.training.arguments")
        training_module = importlib.import_module("megatron.training.training")
        _patch(arguments, "add_megatron_arguments", args.wrap_add_megatron_arguments)
        _patch(training_module, "get_megatron_optimizer_config",
               args.wrap_get_megatron_optimizer_config)
    for module, attribute, make in _compat.routing_patches(training_module):
        _patch(module, attribute, make)
    logger.info("megatron_patch: optimizer 'coupled_adam' registered (megatron.training hooks: %s)",
                bool(training))


def undo() -> None:
    """Restore every patched attribute (for tests)."""
    while _PATCHES:
        module, attribute, original = _PATCHES.pop()
        setattr(module, attribute, original)
