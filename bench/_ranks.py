"""What the multi-rank benchmarks share (zero2_bench.py, fsdp2_bench.py, offload_bench.py): the
GPT-size flags, one gloo process per CPU rank on a free port, and paired timing rounds.

Each benchmark's ``rank_fn(rank, world, args, port, queue)`` calls :func:`init_rank` first and
puts its results on ``queue`` from rank 0; :func:`spawn` starts the ranks and returns that result.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["add_gpt_args", "free_port", "init_rank", "paired_rounds", "spawn"]

# (seconds of forward + backward + step, seconds of the optimizer step) for one batch
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[float, float]]


def add_gpt_args(parser: argparse.ArgumentParser, *, vocab: int, d: int, heads: int, batch: int,
                 steps: int, steps_help: str = "timed steps per optimizer") -> None:
    """The demo GPT's size, the batch and the timing rounds (defaults differ per benchmark)."""
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--d", type=int, default=d)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--block", type=int, default=64, help="sequence length")
    parser.add_argument("--batch", type=int, default=batch, help="micro-batch per data rank")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def init_rank(rank: int, world: int, port: str, threads: int) -> None:
    """The environment DeepSpeed and torch.distributed read, then the gloo default group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn(rank_fn: Callable, world: int, args: argparse.Namespace, *, port: str | None = None,
          timeout: float = 3600.0):
    """Run ``rank_fn(rank, world, args, port, queue)`` on ``world`` processes; return what rank 0
    put on the queue."""
    queue = mp.get_context("spawn").Queue()
    procs = mp.start_processes(rank_fn, args=(world, args, port or free_port(), queue),
                               nprocs=world, join=False, start_method="spawn")
    result = queue.get(timeout=timeout)
    procs.join()
    return result


def paired_rounds(step_fns: dict[str, StepFn], args: argparse.Namespace,
                  gen: torch.Generator) -> dict[str, tuple[list[float], list[float]]]:
    """Time every step function on the same random batch each round, who goes first alternating
    (caches and load from other processes hit all alike); ``args.warmup`` rounds are not kept."""
    times = {name: ([], []) for name in step_fns}
    for round_index in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (args.batch, args.block + 1), generator=gen)
        order = list(step_fns) if round_index % 2 == 0 else list(step_fns)[::-1]
        for name in order:
            total, opt = step_fns[name](ids[:, :-1], ids[:, 1:])
            if round_index >= args.warmup:
                times[name][0].append(total)
                times[name][1].append(opt)
    return times
