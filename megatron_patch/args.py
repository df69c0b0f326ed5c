"""Megatron-LM training side: ``--optimizer coupled_adam`` from the command line to the factory.

Megatron-LM's ``megatron/training`` (not part of the megatron-core wheel) restricts
``--optimizer`` to adam/sgd/muon/dist_muon, and ``get_megatron_optimizer_config`` raises on any
other name. Two module attributes are wrapped, both looked up at call time:

* ``megatron.training.arguments.add_megatron_arguments``: adds ``coupled_adam`` to the
  ``--optimizer`` choices and the ``--coupled-adam-*`` flags (so ``parse_args`` accepts them
  whatever ``extra_args_provider`` the entry point passes);
* ``megatron.training.training.get_megatron_optimizer_config``: builds Megatron's Adam config
  from the args, renames it to ``coupled_adam`` and attaches the coupled settings, so
  ``setup_model_and_optimizer`` calls ``get_megatron_optimizer`` (not the Muon path) with
  ``use_distributed_optimizer`` as the user set it.

``validate_args`` needs no hook: in 0.16 it only special-cases names containing "muon".
"""

from __future__ import annotations

import argparse
import copy
import logging

from megatron_patch._compat import UnsupportedMegatronError
from megatron_patch.core import OPTIMIZER_NAME, settings

logger = logging.getLogger(__name__)

#: Flags that ``--optimizer coupled_adam`` cannot be combined with, and why.
REFUSED_FLAGS = {
    "use_precision_aware_optimizer": "--use-precision-aware-optimizer",
    "optimizer_cpu_offload": "--optimizer-cpu-offload",
    "use_megatron_fsdp": "--use-megatron-fsdp",
    "use_torch_fsdp2": "--use-torch-fsdp2",
    "overlap_param_gather_with_optimizer_step": "--overlap-param-gather-with-optimizer-step",
}


def add_coupled_adam_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept ``--optimizer coupled_adam`` and add the Coupled Adam flags."""
    for action in parser._actions:
        if "--optimizer" in action.option_strings and action.choices is not None:
            if OPTIMIZER_NAME not in action.choices:
                action.choices = [*action.choices, OPTIMIZER_NAME]
    if any("--coupled-adam-avg-scale" in a.option_strings for a in parser._actions):
        return parser
    group = parser.add_argument_group(title="coupled adam (coupled_ds)")
    group.add_argument("--coupled-adam-avg-scale", type=float, default=1.0,
                       help="Scaled Coupled Adam: multiply the shared second moment by this "
                            "(2**-n); 1.0 is the paper's method.")
    group.add_argument("--coupled-adam-count-padded-rows", action="store_true",
                       help="Average the second moment over Megatron's padded vocabulary rows "
                            "too (default: tokenizer rows only, independent of TP).")
    group.add_argument("--coupled-adam-vocab-size", type=int, default=None,
                       help="Rows counted in the mean (default: the tokenizer's vocab size).")
    return parser


def wrap_add_megatron_arguments(original):
    def add_megatron_arguments(parser):
        return add_coupled_adam_arguments(original(parser))

    add_megatron_arguments.__wrapped__ = original
    return add_megatron_arguments


def _tokenizer_vocab_size(args) -> int | None:
    if args.coupled_adam_vocab_size is not None:
        return args.coupled_adam_vocab_size
    try:
        from megatron.training.global_vars import get_tokenizer

        return int(get_tokenizer().vocab_size)
    except (AssertionError, AttributeError, ImportError):
        return getattr(args, "vocab_size", None)


def refuse_unsupported_args(args) -> None:
    for dest, flag in REFUSED_FLAGS.items():
        if getattr(args, dest, False):
            raise UnsupportedMegatronError(
                f"--optimizer coupled_adam does not support {flag}; drop {flag} or use "
                "--optimizer adam.")


def wrap_get_megatron_optimizer_config(original):
    def get_megatron_optimizer_config(args):
        if getattr(args, "optimizer", None) != OPTIMIZER_NAME:
            return original(args)
        refuse_unsupported_args(args)
        adam_args = copy.copy(args)
        adam_args.optimizer = "adam"
        config, config_overrides = original(adam_args)
        config.optimizer = OPTIMIZER_NAME
        config.coupled_adam_avg_scale = args.coupled_adam_avg_scale
        config.coupled_adam_count_padded_rows = args.coupled_adam_count_padded_rows
        config.coupled_adam_vocab_size = _tokenizer_vocab_size(args)
        settings(config)
        return config, config_overrides

    get_megatron_optimizer_config.__wrapped__ = original
    return get_megatron_optimizer_config
