"""Megatron-LM's pretrain_gpt.py with ``--optimizer coupled_adam`` available.

Usage: your usual Megatron-LM command with this script instead of pretrain_gpt.py::

    MEGATRON_LM_PATH=/path/to/Megatron-LM \\
    torchrun --nproc-per-node 8 launch/pretrain_gpt_coupled.py \\
        <your pretrain_gpt.py arguments> \\
        --optimizer coupled_adam [--coupled-adam-avg-scale 1.0] \\
        [--coupled-adam-count-padded-rows] [--coupled-adam-vocab-size N]

It applies :mod:`megatron_patch` (megatron-core optimizer factory + Megatron-LM argument
hooks) and then runs ``pretrain_gpt.py`` as ``__main__``, so everything else (parallelism,
data, checkpoints, logging) is Megatron-LM's own.

Environment:
    MEGATRON_LM_PATH  Megatron-LM checkout holding pretrain_gpt.py (default: the directory above
                      an importable ``megatron/training`` package).
    COUPLED_DS_DRY_RUN=1  Parse and validate the arguments, build the tokenizer as Megatron-LM
                      does, print the optimizer config and the vocabulary (tokenizer rows and
                      Megatron's padded rows) the run will use, and exit (no model, no data, one
                      CPU; no Megatron-LM checkout needed from megatron-core 0.17).
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository


def megatron_lm_root(*, required: bool) -> Path | None:
    """The Megatron-LM checkout: $MEGATRON_LM_PATH, else where megatron.training lives."""
    env = os.environ.get("MEGATRON_LM_PATH")
    if env:
        root = Path(env).resolve()
    else:
        spec = importlib.util.find_spec("megatron.training")
        if spec is None or spec.origin is None:
            raise SystemExit("pretrain_gpt_coupled.py: set MEGATRON_LM_PATH to a Megatron-LM "
                             "checkout (megatron.training is in the megatron-core wheel only "
                             "from 0.17).")
        root = Path(spec.origin).resolve().parents[2]
    if required and not (root / "pretrain_gpt.py").is_file():
        raise SystemExit(f"pretrain_gpt_coupled.py: {root}/pretrain_gpt.py not found; set "
                         "MEGATRON_LM_PATH to a Megatron-LM checkout matching megatron-core "
                         "(the megatron-core wheel ships megatron.training, not pretrain_gpt.py).")
    return root if (root / "megatron" / "training").is_dir() else None


def dry_run() -> None:
    """Parse + validate the command line, build the tokenizer as Megatron-LM does, and print the
    optimizer config and the vocabulary the run will use, without training."""
    from megatron.training import arguments, global_vars, training

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    args = arguments.parse_args()
    arguments.validate_args(args)
    try:
        global_vars.build_tokenizer(args)  # as Megatron-LM's initialisation; pads the vocabulary
        vocabulary = (f"{args.padded_vocab_size} rows per vocabulary matrix after Megatron's "
                      f"padding (--make-vocab-size-divisible-by "
                      f"{args.make_vocab_size_divisible_by} x TP "
                      f"{args.tensor_model_parallel_size})")
    except Exception as error:  # the builders raise many kinds: report, never guess
        vocabulary = (f"unknown - building the tokenizer (--tokenizer-type {args.tokenizer_type}) "
                      f"the way Megatron-LM does failed: {type(error).__name__}: {error}. The run "
                      "builds the same tokenizer first; fix its arguments")
        if (getattr(args, "coupled_adam", False) and args.coupled_adam_vocab_size is None
                and not args.coupled_adam_count_padded_rows):
            print(f"optimizer=coupled_adam use_distributed_optimizer="
                  f"{args.use_distributed_optimizer} coupled_adam_vocab_size=unknown")
            print(f"vocabulary: {vocabulary}, or pass --coupled-adam-vocab-size N")
            return
    config, _ = training.get_megatron_optimizer_config(args)
    vocab_size = getattr(config, "coupled_adam_vocab_size", None)
    print(f"optimizer={config.optimizer} use_distributed_optimizer="
          f"{config.use_distributed_optimizer} coupled_adam_vocab_size={vocab_size} "
          f"coupled_adam_avg_scale={getattr(config, 'coupled_adam_avg_scale', None)} "
          f"coupled_adam_count_padded_rows="
          f"{getattr(config, 'coupled_adam_count_padded_rows', None)}")
    counted = "all of them" if vocab_size is None else f"the first {vocab_size}"
    print(f"vocabulary: {vocabulary}; Coupled Adam's column means count {counted}")


def main() -> None:
    dry = os.environ.get("COUPLED_DS_DRY_RUN") == "1"
    root = megatron_lm_root(required=not dry)
    if root is not None:
        sys.path.insert(0, str(root))  # pretrain_gpt imports gpt_builders, model_provider there
    import megatron_patch

    megatron_patch.apply(training=True)
    if dry:
        dry_run()
        return
    script = root / "pretrain_gpt.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
