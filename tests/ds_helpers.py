"""Shared pieces of the DeepSpeed tests: a tiny tied-embedding model, deterministic data, config
builders, a DeepSpeed training loop for one rank, and the single-process CoupledAdam reference.

Sizes are chosen so ZeRO slices cut the [V, H] = [37, 8] embedding mid-row on 2 and 3 ranks and
the last slice holds alignment padding (296 elements: 148 + 148, or 100 + 100 + 96 + 4 padding).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coupled_ds import CoupledAdam, coupled_param_groups

V, H, T, B = 37, 8, 4, 2          # vocabulary rows, hidden, sequence length, micro-batch size
REAL_VOCAB = 33                   # tokens in the data; rows 33..36 are vocabulary padding
HP = dict(lr=2e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
DS_ENV = {"DS_ACCELERATOR": "cpu", "MASTER_PORT": "29511"}


class TinyLM(nn.Module):
    """Token embedding tied to the output layer, one mixing layer, and a parameter that never
    receives a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, V, bias=False)
        self.head.weight = self.tok.weight
        self.unused = nn.Parameter(torch.zeros(5))

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        x = self.norm(x + torch.tanh(self.mix(x)))
        logits = self.head(x).float()
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


def make_model(dtype: torch.dtype = torch.float32) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(dtype)


def micro_batch(step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (ids, targets) of one micro-batch, identical wherever it is computed."""
    gen = torch.Generator().manual_seed(100_000 * step + 1_000 * micro + rank)
    ids = torch.randint(0, REAL_VOCAB, (B, T + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def ds_config(stage: int, *, world: int, gas: int = 1, clip: float = 0.0, offload: bool = False,
              bf16: bool = False, optimizer: bool = True, **params: Any) -> dict[str, Any]:
    """A DeepSpeed config for TinyLM with ``"type": "CoupledAdam"``."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": B,
        "gradient_accumulation_steps": gas,
        "train_batch_size": B * gas * world,
        "gradient_clipping": clip,  # DeepSpeed's default is 1.0
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10_000,
    }
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    if optimizer:
        hp = dict(HP, betas=list(HP["betas"]), embedding_weight_decay=0.0, **params)
        cfg["optimizer"] = {"type": "CoupledAdam", "params": hp}
    return cfg


def full_params(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter, whole and in fp32 (gathered under ZeRO 3), keyed by name."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def train(engine: Any, rank: int, first_step: int, steps: int) -> None:
    gas = engine.gradient_accumulation_steps()
    for step in range(first_step, first_step + steps):
        for micro in range(gas):
            ids, targets = micro_batch(step, micro, rank)
            loss = engine(ids, targets)
            engine.backward(loss)
            engine.step()


def drop_reduction(engine: Any) -> None:
    """Negative control (test only): each rank averages only its own slice of the matrix."""
    opt = engine.basic_optimizer
    for tensor, geometry in list(opt._geometry.items()):
        opt.set_geometry(tensor, dataclasses.replace(geometry, groups=()))


def reference(steps: int, world: int | list[int], *, gas: int = 1, clip: float = 0.0,
              vocab_size: int | None = None, dtype: torch.dtype = torch.float32,
              make: Any = make_model) -> dict[str, torch.Tensor]:
    """Single-process CoupledAdam on the same data: the mean loss over every rank's micro-batches.

    ``world`` may be a list, one data-parallel size per step (a run resumed at another size).
    ``make(dtype)`` builds the model (default: the tied TinyLM).
    """
    worlds = world if isinstance(world, list) else [world] * steps
    model = make(dtype)
    opt = CoupledAdam(coupled_param_groups(model, weight_decay=HP["weight_decay"],
                                           embedding_weight_decay=0.0, vocab_size=vocab_size),
                      lr=HP["lr"], betas=HP["betas"], eps=HP["eps"])
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        parts = [micro_batch(step, m, r) for m in range(gas) for r in range(worlds[step])]
        loss = sum(model(ids, tg) for ids, tg in parts) / len(parts)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def max_rel_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest |got - want| / max|want| over parameters."""
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)).item()
               for n in want)


def clone_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(cfg)


def _launched_main() -> None:
    """Entry point for DeepSpeed's own launcher (the launcher appends ``--local_rank=N``)::

        DS_ACCELERATOR=cpu python -m deepspeed.launcher.runner --num_gpus 2 tests/ds_helpers.py \\
            --out params.pt --steps 3 --stage 2
    """
    import argparse

    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    from tests.dist import _skip_deepspeed_shm_build

    _skip_deepspeed_shm_build()  # as on every other test rank: the suite compiles no C++ op
    deepspeed.init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(args.stage, world=world))
    train(engine, rank, 0, args.steps)
    params = full_params(engine)
    if rank == 0:
        torch.save({"world": world, "optimizer": type(engine.basic_optimizer).__name__,
                    "params": params}, args.out)
    # Leave together, process group torn down: a rank that exits while its gloo threads still
    # serve the other can abort in C++ teardown ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _launched_main()
