"""Megatron-LM training side: ``--optimizer coupled_adam`` from the command line to the factory.

Megatron-LM's ``megatron/training`` (in the megatron-core wheel from 0.17; a Megatron-LM checkout
before) restricts ``--optimizer`` to its own names, ``validate_args`` treats every name but
adam/sgd as an emerging optimizer from 0.17 on (turning ``--use-distributed-optimizer`` into the
layer-wise optimizer), and ``get_megatron_optimizer_config`` builds the config from the args.
Two module attributes are wrapped, both looked up at call time:

* ``megatron.training.arguments.add_megatron_arguments``: ``--optimizer coupled_adam`` is parsed
  as ``optimizer="adam"`` plus ``coupled_adam=True`` (so every check of ``validate_args`` is the
  adam path's, in every version), and the ``--coupled-adam-*`` flags are added (so
  ``parse_args`` accepts them whatever ``extra_args_provider`` the entry point passes);
* ``megatron.training.training.get_megatron_optimizer_config``: Megatron's adam config, renamed
  ``coupled_adam``, with the coupled settings attached (the vocabulary from the tokenizer Megatron
  built, else one built the way Megatron-LM builds it).
"""

from __future__ import annotations

import argparse
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


class _OptimizerAction(argparse._StoreAction):
    """``--optimizer coupled_adam`` stores ``optimizer="adam"`` and ``coupled_adam=True``."""

    def __call__(self, parser, namespace, values, option_string=None):
        coupled = values == OPTIMIZER_NAME
        setattr(namespace, "coupled_adam", coupled)
        super().__call__(parser, namespace, "adam" if coupled else values, option_string)


def add_coupled_adam_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept ``--optimizer coupled_adam`` and add the Coupled Adam flags."""
    for action in parser._actions:
        if "--optimizer" in action.option_strings and type(action) is argparse._StoreAction:
            action.__class__ = _OptimizerAction  # same fields; only __call__ differs
        if ({"--optimizer", "--muon-scalar-optimizer"} & set(action.option_strings)
                and action.choices is not None and OPTIMIZER_NAME not in action.choices):
            action.choices = [*action.choices, OPTIMIZER_NAME]
    if any("--coupled-adam-avg-scale" in a.option_strings for a in parser._actions):
        return parser
    group = parser.add_argument_group(title="coupled adam (coupled_ds)")
    group.set_defaults(coupled_adam=False)
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


def tokenizer_vocab_size(args) -> int:
    """The rows of real vocabulary: ``--coupled-adam-vocab-size``, else the tokenizer's.

    The tokenizer is the one Megatron-LM built at initialisation; where there is none yet (a dry
    run), it is built the way Megatron-LM builds it (``global_vars.build_tokenizer``, which also
    sets ``args.padded_vocab_size``). Raises if that cannot be done: guessing from
    ``--vocab-size`` would be wrong for tokenizers that add tokens (NullTokenizer adds one).
    """
    if args.coupled_adam_vocab_size is not None:
        return args.coupled_adam_vocab_size
    from megatron.training import global_vars

    try:
        return int(global_vars.get_tokenizer().vocab_size)
    except AssertionError:  # not built yet
        pass
    try:
        tokenizer = global_vars.build_tokenizer(args)
    except Exception as error:  # the builder raises many kinds; say which and how to go on
        raise ValueError(
            f"--optimizer coupled_adam needs the vocabulary size; building the tokenizer "
            f"(--tokenizer-type {getattr(args, 'tokenizer_type', None)}) the way Megatron-LM "
            f"does failed: {type(error).__name__}: {error}. Fix the tokenizer arguments or pass "
            "--coupled-adam-vocab-size N (the tokenizer's vocabulary, without padding).") from error
    return int(tokenizer.vocab_size)


def refuse_unsupported_args(args) -> None:
    for dest, flag in REFUSED_FLAGS.items():
        if getattr(args, dest, False):
            raise UnsupportedMegatronError(
                f"--optimizer coupled_adam does not support {flag}; drop {flag} or use "
                "--optimizer adam.")


def wrap_get_megatron_optimizer_config(original):
    def get_megatron_optimizer_config(args):
        scalar = getattr(args, "muon_scalar_optimizer", None) == OPTIMIZER_NAME
        if not (getattr(args, "coupled_adam", False) or scalar):
            return original(args)
        refuse_unsupported_args(args)
        config, config_overrides = original(args)
        if not scalar:  # under Muon the config stays muon; its scalar optimizer is ours
            config.optimizer = OPTIMIZER_NAME
        config.coupled_adam_avg_scale = args.coupled_adam_avg_scale
        config.coupled_adam_count_padded_rows = args.coupled_adam_count_padded_rows
        config.coupled_adam_vocab_size = (None if args.coupled_adam_count_padded_rows
                                          else tokenizer_vocab_size(args))
        settings(config)
        return config, config_overrides

    get_megatron_optimizer_config.__wrapped__ = original
    return get_megatron_optimizer_config
