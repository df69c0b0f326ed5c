"""Train the tiny GPT with PyTorch FSDP2 and DTensor tensor parallelism (torchtitan's recipe).

    # 4 CPU ranks on one machine: a 2 x 2 mesh, FSDP2 over "dp", vocabulary-parallel TP over "tp"
    torchrun --nproc_per_node 4 examples/train_fsdp2.py --tp 2 --save-dir runs/fsdp2
    # FSDP2 alone on 2 ranks, the same model with AdamW for comparison
    torchrun --nproc_per_node 2 examples/train_fsdp2.py --optimizer AdamW --save-dir runs/adamw
    # many nodes: launch/torchrun_fsdp2.sh (one command per node, resumes on relaunch)

The mesh is [dp, tp] with dp = world / tp. ``parallelize`` applies, in torchtitan's order:
1. tensor parallelism on the tied vocabulary matrix (``RowwiseParallel`` on ``wte``,
   ``ColwiseParallel`` on ``lm_head``: the [V, H] weight split by rows over "tp");
2. FSDP2 (``fully_shard``) on every block, then on the root, over "dp".
Then ``CoupledAdam(coupled_param_groups(model))`` — no other call: the optimizer reads each
DTensor's mesh and placements and reduces the [H] column sums over the mesh dimensions that split
the vocabulary rows. Batches are a pure function of (seed, step, data rank), so a resumed run
takes exactly the steps an uninterrupted one would.

Outputs under ``--save-dir``: ``checkpoints/step<N>/`` (torch.distributed.checkpoint of model and
optimizer via ``get_state_dict``; ``checkpoints/latest`` names the newest; a relaunch resumes
from it, at any world size), ``embedding.jsonl`` (embedding metrics every ``--telemetry-every``
steps, computed on the shards), and on rank 0 at the end ``final_model.pt`` (full fp32 state
dict), ``metrics.json`` and ``token_counts.npy``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data as corpus_data  # noqa: E402  (examples/data.py)
from gpt import GPT, GPTConfig  # noqa: E402  (examples/gpt.py)
from train_ds import batch, save_results  # noqa: E402  (as the DeepSpeed example)

from coupled_ds import CoupledAdam, coupled_param_groups  # noqa: E402
from coupled_ds.metrics import embedding_metrics, log_frequencies  # noqa: E402
from coupled_ds.telemetry import EmbeddingTelemetry  # noqa: E402

logger = logging.getLogger("train_fsdp2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", choices=["CoupledAdam", "AdamW"], default="CoupledAdam")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (divides the world)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak lr (warmup, then cosine)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="non-embedding matrices")
    p.add_argument("--compact-state", action="store_true",
                   help="CoupledAdam keeps only the [H] column mean of v for coupled matrices")
    corpus_data.add_corpus_and_model_args(p)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per data rank per step")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save-dir", required=True, help="checkpoints and outputs")
    p.add_argument("--save-interval", type=int, default=0,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--telemetry-every", type=int, default=50,
                   help="embedding metrics every N steps into SAVE_DIR/embedding.jsonl (0: off)")
    p.add_argument("--eval-seqs", type=int, default=64, help="validation sequences")
    return p.parse_args(argv)


def build_mesh(world: int, tp: int, device: str) -> DeviceMesh:
    if tp < 1 or world % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world}.")
    return init_device_mesh(device, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def parallelize(model: GPT, mesh: DeviceMesh) -> GPT:
    """Tensor parallelism on the vocabulary matrices, then FSDP2, in place (torchtitan order)."""
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    if tp_mesh.size() > 1:
        parallelize_module(model, tp_mesh, {
            "wte": RowwiseParallel(input_layouts=Replicate()),      # token ids arrive whole
            "lm_head": ColwiseParallel(output_layouts=Replicate()),  # full logits for the loss
        })
        # Each plan registered its own Parameter of the shared weight: tie them again.
        model.lm_head.weight = model.wte.weight
    if dp_mesh.size() > 1:
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def lr_at(step: int, *, peak: float, steps: int) -> float:
    """Linear warmup over the first 10% of steps, then cosine to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    groups = coupled_param_groups(model, weight_decay=args.weight_decay,
                                  embedding_weight_decay=0.0)
    hp = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if args.optimizer == "AdamW":  # the same decay split; only the coupling differs
        return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                                  for g in groups], **hp)
    return CoupledAdam(groups, **hp, compact_coupled_state=args.compact_state)


def latest_step(ckpt_dir: Path) -> int:
    latest = ckpt_dir / "latest"
    return int(latest.read_text().strip().removeprefix("step")) if latest.exists() else 0


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer
                    ) -> None:
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir / f"step{step}"))
    dist.barrier()
    if dist.get_rank() == 0:  # "latest" moves only once every rank has written its shards
        tmp = ckpt_dir / f"latest.{os.getpid()}.tmp"
        tmp.write_text(f"step{step}\n")
        os.replace(tmp, ckpt_dir / "latest")
    dist.barrier()


def load_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer
                    ) -> None:
    """Load into the current sharding (DCP reshards: the world size may have changed)."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt_dir / f"step{step}"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


@torch.no_grad()
def validation_loss(model: nn.Module, val_N: np.ndarray, *, T: int, n_seqs: int,
                    dp_rank: int, dp: int, device: torch.device) -> float:
    """Mean loss over ``n_seqs`` windows spread over the validation split, split by data rank
    (every rank runs the same number of forwards: FSDP2 gathers parameters in each)."""
    n_seqs = max(dp, min(n_seqs, (len(val_N) - 1) // T) // dp * dp)
    starts = np.linspace(0, len(val_N) - T - 1, n_seqs).astype(np.int64)[dp_rank::dp]
    x = torch.from_numpy(np.stack([val_N[s:s + T] for s in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([val_N[s + 1:s + T + 1] for s in starts]).astype(np.int64))
    model.eval()
    loss = model(x.to(device), y.to(device)).double().reshape(1)
    model.train()
    dist.all_reduce(loss)  # every TP rank of a data rank holds the same loss: divide by world
    return float(loss) / dist.get_world_size()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = build_mesh(world, args.tp, device.type)
    dp_rank, dp = mesh.get_local_rank("dp"), mesh["dp"].size()

    save_dir = Path(args.save_dir)
    ckpt_dir = save_dir / "checkpoints"
    data_dir = Path(args.data_dir) if args.data_dir else save_dir / "data"
    corpus_data.prepare(data_dir, paths=args.data, vocab_size=args.vocab_size,
                        max_tokens=args.max_tokens)
    corpus = corpus_data.load(data_dir)
    V = len(corpus.vocab)

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = GPT(GPTConfig(vocab_size=V, seq_len=args.seq_len, n_layer=args.n_layer,
                              n_head=args.n_head, d_model=args.d_model))
    parallelize(model, mesh)
    opt = build_optimizer(model, args)
    if rank == 0:
        logger.info("mesh %s (dp=%d, tp=%d); %s on %d ranks", tuple(mesh.shape), dp,
                    mesh["tp"].size(), args.optimizer, world)
    telemetry = None
    if args.telemetry_every:
        telemetry = EmbeddingTelemetry.for_fsdp(
            model, every=args.telemetry_every, jsonl_path=save_dir / "embedding.jsonl",
            log_freq_V=log_frequencies(corpus.counts_V), vocab_size=V)

    start = latest_step(ckpt_dir)
    if start:
        load_checkpoint(ckpt_dir, start, model, opt)
        if rank == 0:
            logger.info("resumed from %s at step %d", ckpt_dir / f"step{start}", start)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    t0, loss_value = time.time(), math.nan
    for step in range(start, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak=args.lr, steps=args.steps)
        x, y = batch(corpus.train_N, seed=args.seed, step=step, micro=0, rank=dp_rank, world=dp,
                     B=args.micro_batch, T=args.seq_len)
        loss = model(x.to(device), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        done = step + 1
        if telemetry is not None:
            telemetry.after_step(done)
        if args.save_interval and done % args.save_interval == 0 and done < args.steps:
            save_checkpoint(ckpt_dir, done, model, opt)
        if rank == 0 and (done % 50 == 0 or done == args.steps):
            logger.info("step %d/%d loss %.4f", done, args.steps, loss_value)
    train_s = time.time() - t0
    if start < args.steps or latest_step(ckpt_dir) != args.steps:
        save_checkpoint(ckpt_dir, args.steps, model, opt)

    val = validation_loss(model, corpus.val_N, T=args.seq_len, n_seqs=args.eval_seqs,
                          dp_rank=dp_rank, dp=dp, device=device)
    quality = embedding_metrics(model.wte.weight, log_freq_V=log_frequencies(corpus.counts_V),
                                vocab_size=V).as_dict()  # on the shards, every rank
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if rank == 0:
        metrics = {"optimizer": args.optimizer, "steps": args.steps, "world_size": world,
                   "dp": dp, "tp": mesh["tp"].size(), "val_loss": val, "train_loss": loss_value,
                   "seconds_this_launch": train_s, "resumed_from": start, **quality}
        save_results(save_dir, data_dir, {k: v.float() for k, v in full.items()}, metrics,
                     "train_fsdp2")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
