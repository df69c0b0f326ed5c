"""Run an unmodified training script with ``"type": "CoupledAdam"`` available to DeepSpeed.

DeepSpeed has no optimizer plugin registry, so the name ``CoupledAdam`` exists only after
``import coupled_ds.deepspeed``. Where the script cannot be edited (Hugging Face ``run_clm.py``,
GPT-NeoX, Megatron-DeepSpeed), put this module in front of it; it imports that one module, then
runs the script exactly as ``python script.py`` would (``__name__ == "__main__"``, the script's
folder first on ``sys.path``, its own arguments in ``sys.argv``)::

    python -m coupled_ds.run train.py --deepspeed ds_config.json ...
    deepspeed --num_gpus 8 --module coupled_ds.run train.py ...     # DeepSpeed's launcher
    torchrun --nproc-per-node 8 -m coupled_ds.run train.py ...
    accelerate launch -m coupled_ds.run train.py ...
    python -m coupled_ds.run -m package.module ...                  # a module, like python -m

Nothing else changes: no environment variable, no startup hook, no patch beyond the documented
one that ``import coupled_ds.deepspeed`` makes (see :mod:`coupled_ds.deepspeed`).
"""

from __future__ import annotations

import os
import runpy
import sys

__all__ = ["main"]

USAGE = ("usage: python -m coupled_ds.run SCRIPT.py [ARGS...]\n"
         "       python -m coupled_ds.run -m MODULE [ARGS...]\n"
         "Runs SCRIPT (or MODULE) with DeepSpeed's optimizer name \"CoupledAdam\" registered.")


def _split_launcher_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``deepspeed --module coupled_ds.run script.py`` starts ``python -m coupled_ds.run
    --local_rank=N script.py ...``: the launcher's own options come first; hand them to the
    script, where DeepSpeed's launcher would have put them (right after its name)."""
    launcher = []
    while argv and argv[0].startswith("--local_rank"):
        launcher.append(argv.pop(0))
        if launcher[-1] == "--local_rank" and argv:
            launcher.append(argv.pop(0))
    return launcher, argv


def main(argv: list[str] | None = None) -> None:
    """Register CoupledAdam with DeepSpeed, then run the target as ``__main__``."""
    launcher, argv = _split_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help") or argv == ["-m"]:
        print(USAGE, file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] != "-m" and not os.path.isfile(argv[0]):
        raise SystemExit(f"coupled_ds.run: no such script {argv[0]!r}.\n{USAGE}")
    try:
        import coupled_ds.deepspeed  # noqa: F401  (registers "CoupledAdam")
    except ImportError as err:
        raise SystemExit(f"coupled_ds.run: cannot register CoupledAdam with DeepSpeed ({err}). "
                         "Install DeepSpeed: pip install 'coupled-ds[deepspeed]'.") from err
    if argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        sys.argv = [module, *launcher, *rest]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, rest = argv[0], argv[1:]
    sys.argv = [script, *launcher, *rest]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python script.py` sets it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
