"""Embedding metrics while training: every N optimizer steps, to the engine's loggers and JSONL.

DeepSpeed (events go through ``engine.monitor``, i.e. whatever ``"tensorboard"``, ``"wandb"``,
``"csv_monitor"`` or ``"comet"`` the JSON config enables)::

    telemetry = EmbeddingTelemetry.for_deepspeed(engine, every=100, jsonl_path="emb.jsonl")
    for batch in loader:
        engine.backward(engine(batch)); engine.step()
        telemetry.after_step(engine.global_steps)

Megatron (TensorBoard / W&B writers of ``megatron.training``, where that rank has them)::

    telemetry = EmbeddingTelemetry.for_megatron(model, every=100, jsonl_path="emb.jsonl")
    ...  # after each train_step: telemetry.after_step(iteration)

PyTorch FSDP2 / DTensor tensor parallelism (the row blocks of each rank, reduced over the mesh
dimensions that split the rows; nothing is gathered)::

    telemetry = EmbeddingTelemetry.for_fsdp(model, every=100, jsonl_path="emb.jsonl",
                                            writers=[tensorboard_writer(summary_writer)])
    ...  # after each optimizer.step(), on every rank: telemetry.after_step(step)

Anything else: ``EmbeddingTelemetry([EmbeddingSource(name, tensor)], writers=[fn])`` where a
writer is a callable taking ``[(tag, value, step), ...]``.

Every rank must call :meth:`EmbeddingTelemetry.after_step` with the same step (sharded matrices
use collectives); ranks whose metrics need no collective return at once. Tags are
``embedding/<parameter name>/<metric>``; the JSONL file gets one object per matrix and log step:
``{"step": 100, "name": "...", "iso": ..., "mu_norm": ..., ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from coupled_ds import dtensor
from coupled_ds.geometry import ShardGeometry
from coupled_ds.groups import find_coupled_parameters
from coupled_ds.metrics import EmbeddingMetrics, embedding_metrics, sharded_embedding_metrics

__all__ = ["EmbeddingSource", "EmbeddingTelemetry", "Writer", "deepspeed_monitor_writer",
           "megatron_writers", "tensorboard_writer"]

logger = logging.getLogger(__name__)

Writer = Callable[[list[tuple[str, float, int]]], None]
"""Receives ``[(tag, value, step), ...]``: the event format of DeepSpeed's monitors."""


@dataclass
class EmbeddingSource:
    """One embedding matrix as this rank sees it.

    Attributes:
        name: Parameter name, used in tags.
        local: Returns this rank's tensor (called at every log step, because engines swap
            storage): the whole [V, H] matrix, a row block, or a flat slice.
        geometry: Where ``local`` sits in the full matrix; None = ``local`` is the whole matrix
            (no collectives; only writer ranks compute it).
    """

    name: str
    local: Callable[[], torch.Tensor]
    geometry: ShardGeometry | None = None

    @classmethod
    def from_parameter(cls, name: str, p: torch.Tensor) -> EmbeddingSource:
        """A model's [V, H] parameter: a DTensor's local row block with its geometry (see
        :mod:`coupled_ds.dtensor`), any other tensor as a whole matrix."""
        if dtensor.is_dtensor(p):
            return cls(name, lambda: dtensor.local(p.detach()), dtensor.geometry(p, name))
        return cls(name, lambda: p.detach())


class EmbeddingTelemetry:
    """Computes :class:`~coupled_ds.metrics.EmbeddingMetrics` every ``every`` steps and logs them.

    Args:
        sources: The matrices to watch.
        every: Log when ``step % every == 0``.
        jsonl_path: JSON-lines file the writer rank appends to (None: no file).
        writers: Callables receiving ``[(tag, value, step), ...]`` on the writer rank.
        log_freq_V: Log unigram frequency per token for ``rho`` (see
            :func:`coupled_ds.metrics.log_frequencies`); None: ``rho`` is not logged.
        vocab_size: Real vocabulary; rows at or beyond it are padding and are left out.
        is_writer: Whether this rank writes; default: global rank 0 (or the only process).
        prefix: First part of every tag.
    """

    def __init__(self, sources: Sequence[EmbeddingSource], *, every: int = 100,
                 jsonl_path: str | os.PathLike | None = None, writers: Sequence[Writer] = (),
                 log_freq_V: torch.Tensor | None = None, vocab_size: int | None = None,
                 is_writer: bool | None = None, prefix: str = "embedding") -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"EmbeddingTelemetry: every={every!r} must be an int >= 1 "
                             "(log every N optimizer steps).")
        if not sources:
            raise ValueError("EmbeddingTelemetry: sources is empty; no embedding matrix to watch.")
        # Sorted names: every rank enters the collectives of the matrices in the same order.
        self.sources = sorted(sources, key=lambda s: s.name)
        self.every = every
        self.jsonl_path = os.fspath(jsonl_path) if jsonl_path is not None else None
        self.writers = list(writers)
        self.log_freq_V = log_freq_V
        self.vocab_size = vocab_size
        self.is_writer = _global_rank() == 0 if is_writer is None else is_writer
        self.prefix = prefix
        if self.is_writer:
            logger.info("coupled_ds telemetry: %s every %d steps -> %d writer(s)%s",
                        ", ".join(s.name for s in self.sources), every, len(self.writers),
                        f" and {self.jsonl_path}" if self.jsonl_path else "")

    def after_step(self, step: int) -> dict[str, EmbeddingMetrics] | None:
        """Call after each optimizer step on every rank; logs when ``step % every == 0``.

        Returns the metrics by parameter name on a log step (on ranks that computed them),
        else None.
        """
        if step % self.every:
            return None
        results = self.compute()
        if self.is_writer and results:
            self.write(results, step)
        return results or None

    def compute(self) -> dict[str, EmbeddingMetrics]:
        """The metrics of every source this rank can compute (collectives for sharded ones)."""
        results = {}
        with torch.no_grad():
            for source in self.sources:
                if source.geometry is None:
                    if self.is_writer:
                        results[source.name] = embedding_metrics(
                            source.local(), log_freq_V=self.log_freq_V, vocab_size=self.vocab_size)
                else:
                    results[source.name] = sharded_embedding_metrics(
                        source.local(), source.geometry, log_freq_V=self.log_freq_V,
                        vocab_size=self.vocab_size)
        return results

    def write(self, results: dict[str, EmbeddingMetrics], step: int) -> None:
        """Send ``results`` to every writer and append them to the JSONL file."""
        events = [(f"{self.prefix}/{name}/{key}", value, step)
                  for name, metrics in results.items()
                  for key, value in metrics.as_dict().items() if value is not None]
        for writer in self.writers:
            writer(events)
        if self.jsonl_path is not None:
            directory = os.path.dirname(self.jsonl_path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                for name, metrics in results.items():
                    record = {"step": step, "name": name, **_json_safe(metrics.as_dict())}
                    f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------- engines

    @classmethod
    def for_deepspeed(cls, engine: Any, *, every: int = 100,
                      jsonl_path: str | os.PathLike | None = None,
                      names: Sequence[str] | None = None, **kwargs: Any) -> EmbeddingTelemetry:
        """Watch the embedding matrices of a DeepSpeed engine; log through ``engine.monitor``.

        ZeRO 0/1/2 keep the full (low-precision) weights on every rank, so rank 0 computes the
        metrics alone from ``engine.module``. ZeRO 3 partitions each weight: every rank computes
        on its ``param.ds_tensor`` slice (cut mid-row; copied to ``engine.device`` when
        offloaded to CPU) and the metrics reduce over ``param.ds_process_group``. Not
        supported (ValueError): tensor-parallel models (``engine.mpu``), whose
        vocabulary-sharded rows this helper does not map (build :class:`EmbeddingSource` s for
        them), and ZeRO 3 parameters offloaded to NVMe. Other keyword arguments go to
        :class:`EmbeddingTelemetry`.
        """
        if getattr(engine, "mpu", None) is not None:
            raise ValueError("EmbeddingTelemetry.for_deepspeed: engine.mpu is set (model "
                             "parallelism); the helper cannot map vocabulary-sharded rows. Pass "
                             "EmbeddingSource(name, local, ShardGeometry(...)) objects instead.")
        stage = engine.zero_optimization_stage()
        sources = (_zero3_sources(engine, names) if stage == 3
                   else _whole_sources(engine.module, names))
        writers = list(kwargs.pop("writers", ())) + [deepspeed_monitor_writer(engine)]
        return cls(sources, every=every, jsonl_path=jsonl_path, writers=writers, **kwargs)

    @classmethod
    def for_megatron(cls, model: nn.Module | Sequence[nn.Module], *, every: int = 100,
                     jsonl_path: str | os.PathLike | None = None,
                     names: Sequence[str] | None = None, **kwargs: Any) -> EmbeddingTelemetry:
        """Watch a Megatron model's embedding / output matrices (every model chunk).

        Megatron keeps full weights on every data-parallel rank and shards the vocabulary rows
        over the tensor-parallel group, so the metrics reduce over that group only. Writers: the
        rank with tensor- and data-parallel rank 0 of each pipeline stage that holds an
        embedding; it logs to ``megatron.training``'s TensorBoard / W&B writers when that rank
        has them (Megatron creates them on the last rank: with pipelining that stage holds the
        output layer, or the tied copy of the embedding) and to ``jsonl_path`` (with
        ``.stage<k>`` appended when there are several pipeline stages). Every rank must call
        :meth:`after_step`. Other keyword arguments go to :class:`EmbeddingTelemetry`.
        """
        from megatron.core import parallel_state as ps  # lazy: optional dependency

        chunks = list(model) if isinstance(model, Sequence) else [model]
        tp_group = ps.get_tensor_model_parallel_group()
        tp_rank = ps.get_tensor_model_parallel_rank()
        tp_size = ps.get_tensor_model_parallel_world_size()
        sources = []
        for i, chunk in enumerate(chunks):
            for name, p in find_coupled_parameters(chunk, names=names):
                label = name if len(chunks) == 1 else f"chunk{i}.{name}"
                sources.append(_megatron_source(label, p, tp_rank, tp_size, tp_group))
        writer_rank = tp_rank == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
        pp_size = ps.get_pipeline_model_parallel_world_size()
        if jsonl_path is not None and pp_size > 1:
            jsonl_path = f"{os.fspath(jsonl_path)}.stage{ps.get_pipeline_model_parallel_rank()}"
        if not sources:  # a middle pipeline stage: nothing to watch, nothing to reduce
            return _NoTelemetry()
        writers = list(kwargs.pop("writers", ())) + (megatron_writers() if writer_rank else [])
        return cls(sources, every=every, jsonl_path=jsonl_path, writers=writers,
                   is_writer=writer_rank, **kwargs)


    @classmethod
    def for_fsdp(cls, model: nn.Module, *, every: int = 100,
                 jsonl_path: str | os.PathLike | None = None,
                 names: Sequence[str] | None = None, **kwargs: Any) -> EmbeddingTelemetry:
        """Watch the embedding matrices of a model under FSDP2 (``fully_shard``) and/or DTensor
        tensor parallelism (``parallelize_module``).

        Each rank computes on its local row block of each DTensor and the metrics reduce over
        the mesh dimensions that split the rows (FSDP2 x TP: both); the matrix is never
        gathered. Plain (unsharded) parameters are computed whole by the writer rank (global
        rank 0 unless ``is_writer`` is given). Every rank must call :meth:`after_step`. Other
        keyword arguments (``writers``, ``log_freq_V``, ``vocab_size``, ...) go to
        :class:`EmbeddingTelemetry`.
        """
        return cls([EmbeddingSource.from_parameter(n, p) for n, p in _find(model, names)],
                   every=every, jsonl_path=jsonl_path, **kwargs)


class _NoTelemetry(EmbeddingTelemetry):
    """For ranks that hold no embedding matrix (middle pipeline stages)."""

    def __init__(self) -> None:  # noqa: D107 - nothing to set up
        self.sources, self.writers, self.every, self.is_writer = [], [], 1, False

    def after_step(self, step: int) -> None:
        return None


# ----------------------------------------------------------------------------- writers


def deepspeed_monitor_writer(engine: Any) -> Writer:
    """Events into ``engine.monitor`` (DeepSpeed writes them on rank 0 to every enabled monitor)."""

    def write(events: list[tuple[str, float, int]]) -> None:
        if engine.monitor.enabled:
            engine.monitor.write_events(events)

    return write


def tensorboard_writer(summary_writer: Any) -> Writer:
    """Events into a ``torch.utils.tensorboard.SummaryWriter`` (or anything with add_scalar)."""

    def write(events: list[tuple[str, float, int]]) -> None:
        for tag, value, step in events:
            summary_writer.add_scalar(tag, value, step)

    return write


def megatron_writers() -> list[Writer]:
    """Writers for ``megatron.training``'s TensorBoard and W&B loggers that exist on this rank.

    Empty when Megatron-LM's training package is not installed (megatron-core alone has none).
    """
    try:
        from megatron.training import get_tensorboard_writer, get_wandb_writer
    except ImportError:
        return []
    writers: list[Writer] = []
    tb = get_tensorboard_writer()
    if tb is not None:
        writers.append(tensorboard_writer(tb))
    wandb = get_wandb_writer()
    if wandb is not None:
        def write_wandb(events: list[tuple[str, float, int]]) -> None:
            if events:
                wandb.log({tag: value for tag, value, _ in events}, step=events[0][2])
        writers.append(write_wandb)
    return writers


# ----------------------------------------------------------------------------- sources


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _json_safe(values: dict[str, float | None]) -> dict[str, float | None]:
    """JSON has no NaN: write null for undefined values (e.g. rho with one token seen)."""
    return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
            for k, v in values.items()}


def _find(module: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Parameter]]:
    found = find_coupled_parameters(module, names=names)
    if not found:
        how = f"names={list(names)!r} matched no parameter" if names else "no embedding was found"
        raise ValueError(f"EmbeddingTelemetry: {how}. Pass names=[regex, ...] selecting the "
                         "[V, H] embedding / output matrices.")
    return found


def _whole_sources(module: nn.Module, names: Sequence[str] | None) -> list[EmbeddingSource]:
    return [EmbeddingSource(name, lambda p=p: p.detach()) for name, p in _find(module, names)]


def _zero3_sources(engine: Any, names: Sequence[str] | None) -> list[EmbeddingSource]:
    """Each rank's ``ds_tensor`` slice of each embedding, as a flat geometry over its group."""
    module = engine.module
    if names is None:
        found = _zero3_detect(module)
    else:
        found = _find(module, names)
    sources = []
    for name, p in found:
        if str(getattr(p.ds_tensor, "final_location", "")).endswith("nvme"):
            raise ValueError(f"EmbeddingTelemetry.for_deepspeed: {name} is offloaded to NVMe "
                             "(zero_optimization.offload_param.device='nvme'); its shard is not "
                             "resident between steps. Use offload_param device 'cpu' or 'none'.")
        V, H = p.ds_shape
        group = p.ds_process_group
        per_rank = p.ds_tensor.ds_numel
        start = dist.get_rank(group=group) * per_rank
        numel = max(0, min(V * H, start + per_rank) - start)
        geometry = ShardGeometry(name, V, H, start_global_flat=min(start, V * H), numel=numel,
                                 groups=(group,))
        device = engine.device

        def local(p: nn.Parameter = p, device: torch.device = device) -> torch.Tensor:
            return p.ds_tensor.detach().to(device)  # no copy unless the shard is offloaded

        sources.append(EmbeddingSource(name, local, geometry))
    return sources


def _zero3_detect(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Embedding detection for ZeRO 3, where ``p.shape`` is empty and ``p.ds_shape`` is real:
    token ``nn.Embedding`` weights (largest row count) and ``nn.Linear`` weights of that shape."""
    from coupled_ds.groups import _POSITIONAL  # same rule as find_coupled_parameters

    by_id = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    embeddings = [m.weight for n, m in module.named_modules()
                  if isinstance(m, nn.Embedding) and not _POSITIONAL.search(n)]
    if not embeddings:
        raise ValueError("EmbeddingTelemetry.for_deepspeed (ZeRO 3): no token nn.Embedding found; "
                         "pass names=[regex, ...] selecting the [V, H] embedding matrices.")
    rows = max(w.ds_shape[0] for w in embeddings)
    shapes = {tuple(w.ds_shape) for w in embeddings if w.ds_shape[0] == rows}
    chosen: dict[str, nn.Parameter] = {}
    candidates = embeddings + [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    for w in candidates:
        if tuple(w.ds_shape) in shapes and id(w) in by_id:
            chosen.setdefault(by_id[id(w)], w)
    return list(chosen.items())


def _megatron_source(name: str, p: nn.Parameter, tp_rank: int, tp_size: int,
                     tp_group: dist.ProcessGroup) -> EmbeddingSource:
    """A [V/tp, H] row block of a vocabulary-parallel weight, or a whole replicated matrix."""
    rows_local, H = p.shape
    sharded = getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", 0) == 0
    if not sharded or tp_size == 1:
        geometry = None  # replicated whole matrix: the writer rank computes it alone
    else:
        geometry = ShardGeometry(name, rows_local * tp_size, H,
                                 start_global_flat=tp_rank * rows_local * H,
                                 numel=rows_local * H, groups=(tp_group,))
    return EmbeddingSource(name, lambda p=p: p.detach(), geometry)
