"""Run a function on N CPU ranks with gloo: the one spawn helper of every distributed test.

    from tests.dist import run_on_ranks
    results = run_on_ranks(2, my_fn, arg1, arg2)   # my_fn(rank, world_size, *args) -> picklable

``my_fn`` must be importable at module level (it is pickled by reference). Each rank gets a
process with the default group initialised (gloo, a file store in a fresh temp dir), its return
value comes back in rank order, and any rank's exception fails the call with that rank's
traceback. A run that exceeds ``timeout`` seconds kills every rank and fails.
"""

from __future__ import annotations

import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import multiprocessing as mp

__all__ = ["RankFailure", "run_on_ranks"]


class RankFailure(RuntimeError):
    """A rank raised, died, or the run timed out."""


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed on CPU JIT-compiles a shared-memory op at init that only its inference
    all-reduce uses; training collectives go through torch.distributed. Skipping it saves about a
    minute on a fresh machine and a stale build lock if a rank is killed mid-build."""
    import importlib

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _entry(rank: int, world_size: int, init_file: str, fn: Callable[..., Any],
           args: tuple, env: dict[str, str], results: Any) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    try:
        import torch

        torch.set_num_threads(1)
        if env.get("DS_ACCELERATOR") == "cpu":
            _skip_deepspeed_shm_build()
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size)
        # Plain pickle bytes: tensors are copied, not shared through file descriptors that die
        # with this process.
        out = pickle.dumps(fn(rank, world_size, *args))
        results.put((rank, "ok", out))
    except BaseException:  # report everything, including SystemExit from engines
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    Args:
        world_size: Number of processes.
        fn: Module-level function.
        args: Picklable arguments.
        timeout: Seconds for the whole run.
        env: Extra environment variables for the ranks (e.g. ``DS_ACCELERATOR=cpu``).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        base_env = {"MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        base_env.update(env or {})
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, base_env,
                                                  results), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outcomes: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outcomes) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RankFailure(f"run_on_ranks: timed out after {timeout:.0f}s; "
                                      f"ranks finished: {sorted(outcomes)}")
                try:
                    rank, status, payload = results.get(timeout=min(remaining, 1.0))
                    outcomes[rank] = (status, payload)
                    if status == "error":
                        raise RankFailure(f"rank {rank} of {world_size} failed:\n{payload}")
                except queue.Empty:
                    dead = [i for i, p in enumerate(procs)
                            if not p.is_alive() and p.exitcode not in (0, None) and i not in outcomes]
                    if dead:
                        raise RankFailure(f"rank(s) {dead} died with exit codes "
                                          f"{[procs[i].exitcode for i in dead]}") from None
        finally:
            for p in procs:
                p.join(timeout=5 if len(outcomes) == world_size else 0.1)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
