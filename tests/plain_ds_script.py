"""A stock DeepSpeed training script that never imports coupled_ds (the no-edit path's fixture):
its JSON config names ``"type": "CoupledAdam"``, which DeepSpeed knows only when the script runs
under ``python -m coupled_ds.run``. Launched by tests/test_hf.py::test_unmodified_script.

    deepspeed --num_gpus 2 --module coupled_ds.run tests/plain_ds_script.py --out params.pt
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch
import torch.nn.functional as F
from torch import nn

V, H, T, B, STEPS = 37, 8, 4, 2, 6
CONFIG = {
    "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0, "steps_per_print": 10_000, "zero_optimization": {"stage": 2},
    "optimizer": {"type": "CoupledAdam",
                  "params": {"lr": 2e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.mix(self.tok(ids[:, :-1]))))
        return F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(97 * step + rank))


def main() -> None:
    import deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    # CPU only: skip the shared-memory op DeepSpeed would JIT-compile at init (only its inference
    # all-reduce uses it), as examples/train_ds.py does; tests build no DeepSpeed op.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    model = Model()
    cfg = dict(CONFIG, train_batch_size=B * torch.distributed.get_world_size())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    for step in range(STEPS):
        engine.backward(engine(batch(step, rank)))
        engine.step()
    if rank == 0:
        torch.save({"optimizer": type(engine.basic_optimizer).__name__,
                    "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
                   args.out)
        print(json.dumps({"local_rank": args.local_rank}))
    # Leave together, process group torn down: a rank that exits while its gloo threads still
    # serve the other can abort in C++ teardown ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
