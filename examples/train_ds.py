"""Train the tiny GPT under DeepSpeed: the script every DeepSpeed path in launch/ runs.

    # 2 local CPU ranks (what the demo does, through launch/deepspeed.sh):
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/train_ds.py \\
        --config launch/configs/zero2_cpu_coupled.json --save-dir runs/coupled
    # torchrun works too (RANK / LOCAL_RANK / WORLD_SIZE from the environment):
    torchrun --nproc_per_node 2 examples/train_ds.py --config ... --save-dir ...

The DeepSpeed JSON config decides the optimizer ("CoupledAdam" through ``coupled_ds.deepspeed``,
or "AdamW"), ZeRO stage, precision and schedule; ``--optimizer`` and ``--set key.path=value``
override it without editing the file. Batches are a pure function of (seed, step), so a run that
restarts from a checkpoint takes exactly the steps an uninterrupted run would have taken.

Outputs under ``--save-dir``: ``checkpoints/`` (DeepSpeed checkpoints, tag ``step<N>``, with
``latest``; a relaunch resumes from it), and on global rank 0 at the end ``final_model.pt``
(fp32 state dict), ``metrics.json`` (validation loss and embedding metrics) and
``token_counts.npy`` (training-token frequency of each id, for ``coupled_ds.report --freq``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import data as corpus_data  # noqa: E402  (examples/data.py)
from gpt import GPT, GPTConfig  # noqa: E402  (examples/gpt.py)

logger = logging.getLogger("train_ds")

# Keys of a CoupledAdam optimizer block that torch's AdamW does not take.
_COUPLED_ONLY_KEYS = ("embedding_weight_decay", "avg_scale", "vocab_size", "coupled_params")
_FAIL_MARKER = "fail_at_step.done"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="DeepSpeed JSON config")
    p.add_argument("--optimizer", choices=["config", "AdamW", "CoupledAdam"], default="config",
                   help="override the config's optimizer type (its other params are kept)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config entry; VALUE is JSON or a string, e.g. "
                        "--set zero_optimization.stage=3 --set bf16.enabled=false")
    p.add_argument("--lr", type=float, default=None, help="override optimizer.params.lr")
    corpus_data.add_corpus_and_model_args(p)
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per rank per micro-step (default: the config's)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save-dir", required=True, help="checkpoints and outputs")
    p.add_argument("--save-interval", type=int, default=0,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-interval", type=int, default=0,
                   help="validation loss every N steps (0: only at the end)")
    p.add_argument("--eval-seqs", type=int, default=64, help="validation sequences")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fail-at-step", type=int, default=None,
                   help="TEST ONLY: --fail-rank dies by SIGKILL on reaching this step, once per "
                        "save dir (a marker file there records it)")
    p.add_argument("--fail-rank", type=int, default=-1,
                   help="TEST ONLY: global rank that dies (-1: the last)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher")
    return p.parse_args(argv)


def _set_path(cfg: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to the nested config dict."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. bf16.enabled=false")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The DeepSpeed config: the JSON file plus the command line's overrides."""
    try:
        cfg = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--config {args.config}: cannot read it as JSON ({err}).") from err
    for assignment in args.set:
        _set_path(cfg, assignment)
    opt = cfg.setdefault("optimizer", {"type": "CoupledAdam", "params": {}})
    params = opt.setdefault("params", {})
    if args.optimizer != "config":
        opt["type"] = args.optimizer
    if args.lr is not None:
        params["lr"] = args.lr
    if opt["type"] == "AdamW":
        for key in _COUPLED_ONLY_KEYS:
            params.pop(key, None)
        params.setdefault("torch_adam", True)  # torch's AdamW: what CoupledAdam's other groups run
    if args.micro_batch is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    cfg.pop("train_batch_size", None)  # derived: micro batch x accumulation x world size
    sched = cfg.get("scheduler", {}).get("params")
    if sched is not None and sched.get("total_num_steps", "auto") == "auto":
        sched["total_num_steps"] = args.steps
    if sched is not None and sched.get("warmup_num_steps") == "auto":
        sched["warmup_num_steps"] = max(1, args.steps // 10)
    return cfg


def batch(train_N: np.ndarray, *, seed: int, step: int, micro: int, rank: int, world: int,
          B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's [B, T] inputs and targets: random windows drawn from (seed, step, micro)."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(train_N) - T - 1, size=B * world)[rank * B:(rank + 1) * B]
    x = np.stack([train_N[s:s + T] for s in starts]).astype(np.int64)
    y = np.stack([train_N[s + 1:s + T + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def validation_loss(engine: Any, val_N: np.ndarray, *, T: int, n_seqs: int, rank: int,
                    world: int) -> float:
    """Mean loss over ``n_seqs`` windows spread evenly over the validation split (split by rank)."""
    # Every rank must run the same number of forwards (ZeRO-3 gathers parameters in each one).
    n_seqs = max(world, min(n_seqs, (len(val_N) - 1) // T) // world * world)
    starts = np.linspace(0, len(val_N) - T - 1, n_seqs).astype(np.int64)
    total = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    for s in starts[rank::world]:
        x = torch.from_numpy(val_N[s:s + T].astype(np.int64))[None]
        y = torch.from_numpy(val_N[s + 1:s + T + 1].astype(np.int64))[None]
        total += torch.tensor([float(engine(x.to(engine.device), y.to(engine.device))), 1.0],
                              dtype=torch.float64)
    engine.train()
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _param_groups(model: torch.nn.Module, cfg: dict[str, Any]) -> Any:
    """What ``deepspeed.initialize`` gets as ``model_parameters``.

    AdamW gets the same decay split as CoupledAdam (decay on matrices, ``embedding_weight_decay``
    on the embedding, none on 1-D tensors), so the comparison changes only the coupling.
    """
    opt = cfg["optimizer"]
    if opt["type"] != "AdamW":
        return model.parameters()
    from coupled_ds.groups import coupled_param_groups

    params = opt["params"]
    groups = coupled_param_groups(model, weight_decay=params.get("weight_decay", 0.1),
                                  embedding_weight_decay=params.get("embedding_weight_decay", 0.0))
    return [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in groups]


def _postfix(loss: float | None, val: float | None) -> dict[str, str]:
    """Progress-bar fields: the last training and validation losses, each once measured."""
    return {k: f"{v:.3f}" for k, v in (("loss", loss), ("val", val)) if v is not None}


def _full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of every parameter, gathered first under ZeRO-3 (all ranks call this)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def embedding_summary(E_VH: torch.Tensor, counts_V: np.ndarray) -> dict[str, float | None]:
    """Embedding metrics of the final [V, H] matrix (``coupled_ds.metrics``)."""
    from coupled_ds.metrics import embedding_metrics, log_frequencies

    return embedding_metrics(E_VH, log_freq_V=log_frequencies(counts_V),
                             vocab_size=E_VH.shape[0]).as_dict()


def _skip_cpu_shm_op() -> None:
    """Skip DeepSpeed's CPU shared-memory all-reduce kernel.

    On CPU, DeepSpeed JIT-compiles it at init (a minute of C++ on a fresh machine); only its
    inference all-reduce uses it, so training loses nothing.
    """
    import importlib

    # By module path: the package attribute deepspeed.comm.torch is the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class _DropMessage(logging.Filter):
    """Drop log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _quiet_known_engine_warnings(ds_logger: logging.Logger) -> None:
    """Silence two warnings that DeepSpeed 0.19 raises on every healthy run (nothing else).

    * ZeRO 1/2 gather the updated partitions in ``engine.step()`` through
      ``torch.distributed.all_gather_into_tensor``, which torch 2.13 deprecates (FutureWarning,
      once per rank, from DeepSpeed's ``deepspeed/comm/torch.py``; our own code calls
      ``all_gather`` / ``all_reduce`` only). The filter matches that message alone, so any
      other deprecation still shows.
    * ``WarmupCosineLR.__init__`` asks its own ``get_lr()`` before step 0 and logs "Attempting to
      get learning rate from scheduler before it has started" on every fresh run.
    """
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")
    ds_logger.addFilter(_DropMessage("Attempting to get learning rate from scheduler before"))


def _maybe_fail(args: argparse.Namespace, step: int, rank: int, world: int) -> None:
    """Test-only fault injection: SIGKILL this process once, when it reaches ``--fail-at-step``."""
    fail_rank = args.fail_rank % world
    marker = Path(args.save_dir) / _FAIL_MARKER
    if args.fail_at_step == step and rank == fail_rank and not marker.exists():
        marker.write_text(f"rank {rank} killed at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def save_results(save_dir: Path, data_dir: Path, state: dict[str, torch.Tensor],
                 metrics: dict[str, Any], name: str) -> None:
    """What a finished run leaves in ``save_dir`` (rank 0): ``final_model.pt`` (the full state
    dict), ``token_counts.npy`` (for the frequency metrics), ``metrics.json``; one done line."""
    torch.save(state, save_dir / "final_model.pt")
    shutil.copyfile(data_dir / "token_counts.npy", save_dir / "token_counts.npy")
    (save_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"[{name}] done: {json.dumps(metrics)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg = build_config(args)
    save_dir = Path(args.save_dir)
    ckpt_dir = save_dir / "checkpoints"

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    _quiet_known_engine_warnings(ds_logger)
    if cfg["optimizer"]["type"] == "CoupledAdam":
        import coupled_ds.deepspeed  # noqa: F401  registers "CoupledAdam" with DeepSpeed

    if not torch.cuda.is_available():
        _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    data_dir = Path(args.data_dir) if args.data_dir else save_dir / "data"
    corpus_data.prepare(data_dir, paths=args.data, vocab_size=args.vocab_size,
                        max_tokens=args.max_tokens)
    corpus = corpus_data.load(data_dir)

    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(vocab_size=len(corpus.vocab), seq_len=args.seq_len, n_layer=args.n_layer,
                          n_head=args.n_head, d_model=args.d_model))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(model, cfg),
                                           config=cfg)
    B, T = engine.train_micro_batch_size_per_gpu(), args.seq_len
    gas = engine.gradient_accumulation_steps()

    start = 0
    if (ckpt_dir / "latest").exists():
        path, client = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise RuntimeError(f"{ckpt_dir}/latest exists but the checkpoint did not load.")
        start = int(client["step"])
        if rank == 0:
            print(f"[train_ds] resumed from {path} at step {start}", flush=True)

    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, desc=f"{cfg['optimizer']['type']:>11}",
                   dynamic_ncols=True, mininterval=1.0)
    # The last training and validation losses; None until measured (a relaunch that resumes at
    # the last step trains nothing), and the bar shows only what has been measured.
    t0, loss_value, val = time.time(), None, None
    for step in range(start, args.steps):
        if args.fail_at_step is not None:
            _maybe_fail(args, step, rank, world)
        for micro in range(gas):
            x, y = batch(corpus.train_N, seed=args.seed, step=step, micro=micro, rank=rank,
                         world=world, B=B, T=T)
            loss = engine(x.to(engine.device), y.to(engine.device))
            engine.backward(loss)
            engine.step()
        loss_value = float(loss.detach())
        done = step + 1
        if args.eval_interval and done % args.eval_interval == 0 and done < args.steps:
            val = validation_loss(engine, corpus.val_N, T=T, n_seqs=args.eval_seqs, rank=rank,
                                  world=world)
        if args.save_interval and done % args.save_interval == 0 and done < args.steps:
            engine.save_checkpoint(str(ckpt_dir), tag=f"step{done}", client_state={"step": done})
        if bar is not None:
            bar.set_postfix(_postfix(loss_value, val), refresh=False)
            bar.update(1)
    train_s = time.time() - t0

    if start < args.steps or not (ckpt_dir / "latest").exists():
        engine.save_checkpoint(str(ckpt_dir), tag=f"step{args.steps}",
                               client_state={"step": args.steps})
    val = validation_loss(engine, corpus.val_N, T=T, n_seqs=args.eval_seqs, rank=rank, world=world)
    if bar is not None:  # the bar's last line carries the final validation loss
        bar.set_postfix(_postfix(loss_value, val), refresh=False)
        bar.close()
    state = _full_state_dict(engine)
    if rank == 0:
        metrics = {"optimizer": cfg["optimizer"]["type"], "steps": args.steps, "world_size": world,
                   "zero_stage": engine.zero_optimization_stage(), "val_loss": val,
                   "train_loss": loss_value, "seconds_this_launch": train_s, "resumed_from": start,
                   **embedding_summary(state["wte.weight"], corpus.counts_V)}
        save_results(save_dir, data_dir, state, metrics, "train_ds")
    dist.barrier()
    # Tear the process group down before exit: a rank whose gloo threads still serve another at
    # interpreter exit can abort ("terminate called without an active exception").
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
