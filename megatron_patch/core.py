"""megatron-core side: ``OptimizerConfig(optimizer="coupled_adam")`` in ``get_megatron_optimizer``.

The inner optimizer is one :class:`MegatronCoupledAdam` per Megatron optimizer. Megatron builds
its own ``adam`` optimizer (inner AdamW inside DistributedOptimizer,
Float16OptimizerWithFloat16Params or FP32Optimizer); ours then takes the AdamW's place over the
very param groups the wrapper gave it (so checkpoints match the ``adam`` path group for group),
see :func:`_compat.replace_inner`. Copies of a vocabulary matrix (:func:`is_coupled_parameter`)
are stepped with Coupled Adam, everything else with torch's AdamW functional, exactly as
Megatron's torch fallback ``torch.optim.AdamW`` would (with TransformerEngine installed
Megatron's own path is TE's FusedAdam: the same update, another kernel). Afterwards every coupled
inner tensor gets a ShardGeometry, and one all-reduce checks that some rank holds one.

Settings (attributes on the OptimizerConfig; :func:`coupled_adam_config` sets them):

* ``coupled_adam_vocab_size``: the tokenizer's vocabulary (rows counted in the mean);
* ``coupled_adam_count_padded_rows``: count Megatron's padded rows too (default False);
* ``coupled_adam_avg_scale``: multiplies the shared second moment (Scaled Coupled Adam, 2**-n).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from coupled_ds import CoupledAdam

from megatron_patch import _compat
from megatron_patch.geometry import MARKERS, is_coupled_parameter, shard_geometry

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = _compat.OPTIMIZER_NAME


class MegatronCoupledAdam(CoupledAdam):
    """CoupledAdam over Megatron's mixed param groups; coupling is per tensor (:meth:`couple`).

    Megatron's groups mix the embedding with other 2-D weights and are matched by
    (wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr) when checkpoints load, so they are
    kept as they are; each step splits them into uncoupled and coupled parts on the fly.
    Like TE's FusedAdam, every non-empty group also carries its ``step`` count, which
    DistributedOptimizer's checkpoint code reads when TransformerEngine or apex is installed.
    """

    def __init__(self, param_groups: list[dict[str, Any]], *, vocab_size: int | None,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self._coupled: WeakIdKeyDictionary = WeakIdKeyDictionary()
        super().__init__([{"params": []}], **kwargs)
        # The groups as a Megatron wrapper left them for its own AdamW: their params may be views
        # of model parameters (distributed-optimizer shards), which torch's add_param_group
        # refuses, so they are taken over as the wrapper itself assigns them.
        self.param_groups = [{**self.defaults, **group} for group in param_groups]

    def couple(self, tensor: torch.Tensor, geometry) -> None:
        """Step ``tensor`` with Coupled Adam; ``geometry`` says where it sits in its matrix."""
        self.set_geometry(tensor, geometry)
        self._coupled[tensor] = geometry.key

    def coupled_names(self) -> set[str]:
        """Keys (``chunk:parameter name``) of the coupled tensors on this rank."""
        return set(self._coupled.values()) | {g.key for g, _ in self._empty_pieces}

    def initialize_state(self, p: torch.Tensor) -> None:
        """Create ``step``/``exp_avg``/``exp_avg_sq`` (Megatron's init_state_fn calls this)."""
        self._init_state(p)

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = self._split_groups(groups)
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        self._record_group_steps()
        return loss

    def _split_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        split = []
        for group in groups:
            plain = [p for p in group["params"] if p not in self._coupled]
            coupled = [p for p in group["params"] if p in self._coupled]
            split.append({**group, "params": plain, "coupled": False})
            if coupled:
                split.append({**group, "params": coupled, "coupled": True, "amsgrad": False,
                              "vocab_size": self.vocab_size,
                              "coupled_names": [self._coupled[p] for p in coupled]})
        return split

    def _record_group_steps(self) -> None:
        for group in self.param_groups:
            steps = [self.state[p]["step"] for p in group["params"]
                     if "step" in self.state.get(p, {})]
            if steps:
                group["step"] = int(steps[0].item())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # A group's step is authoritative after a load: Megatron's TE/apex checkpoint paths
        # and its fully-reshardable format carry the step in the groups only.
        for group in self.param_groups:
            if "step" in group:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state:
                        state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def settings(config) -> dict[str, Any]:
    """The coupled_adam settings of an OptimizerConfig, validated."""
    vocab_size = getattr(config, "coupled_adam_vocab_size", None)
    count_padded = bool(getattr(config, "coupled_adam_count_padded_rows", False))
    avg_scale = float(getattr(config, "coupled_adam_avg_scale", 1.0))
    if vocab_size is None and not count_padded:
        raise ValueError(
            "optimizer='coupled_adam' needs the tokenizer's vocabulary size to leave Megatron's "
            "padded rows out of the mean: set config.coupled_adam_vocab_size (e.g. with "
            "megatron_patch.coupled_adam_config(vocab_size=...)), or set "
            "config.coupled_adam_count_padded_rows=True to average over the padded rows too.")
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
        raise ValueError(f"coupled_adam_vocab_size={vocab_size!r} must be a positive int.")
    return dict(vocab_size=None if count_padded else vocab_size, avg_scale=avg_scale)


def build_inner(config, param_groups: list[dict[str, Any]]) -> MegatronCoupledAdam:
    """The inner optimizer over the groups Megatron's wrapper gave its AdamW (same keys, so
    checkpoints match the ``adam`` path group for group), same hyperparameters."""
    options = settings(config)
    return MegatronCoupledAdam(
        param_groups, lr=config.lr, weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
        avg_scale=options["avg_scale"], vocab_size=options["vocab_size"])


def _init_state_fn(opt, config=None) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            opt.initialize_state(p)


def attach_geometries(optimizer, inner: MegatronCoupledAdam, model_chunks, tp_group) -> int:
    """Give every coupled inner tensor its geometry; empty DP pieces still join the reduction.

    Returns the number of coupled model parameters found.
    """
    names = {}
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            names.setdefault(id(param), f"{index}:{name.removeprefix('module.')}")
    found = 0
    for piece in _compat.inner_tensors(optimizer):
        if not is_coupled_parameter(piece.model_param):
            continue
        found += 1
        key = names.get(id(piece.model_param), "coupled-embedding")
        geometry = shard_geometry(piece, key=key, tp_group=tp_group, name=key)
        if _is_float8(piece.model_param):
            raise _compat.UnsupportedMegatronError(
                f"Coupled parameter {key} is an FP8 tensor; keep the embedding and output layer "
                "in bf16/fp32 (fp8 params for them are not supported by coupled_adam).")
        if piece.tensor is None or piece.tensor.numel() == 0:
            inner.add_empty_piece(geometry, device=piece.model_param.device)
        else:
            inner.couple(piece.tensor, geometry)
    return found


def _is_float8(param) -> bool:
    from megatron.core.fp8_utils import is_float8tensor

    return is_float8tensor(param)


def _log_summary(wrapper: str, found: int, found_everywhere: int,
                 inner: MegatronCoupledAdam | None) -> None:
    """One line on global rank 0 at setup."""
    import torch.distributed as dist

    if inner is None or (dist.is_initialized() and dist.get_rank() != 0):
        return
    vocab = "all rows" if inner.vocab_size is None else f"first {inner.vocab_size} rows"
    logger.info("coupled_adam: %d vocabulary matrix piece(s) coupled on all ranks, %d on rank 0 "
                "(%s) inside %s; column means over %s, avg_scale %s", found_everywhere, found,
                ", ".join(sorted(inner.coupled_names())) or "none", wrapper, vocab,
                inner.defaults["avg_scale"])


def _copy_elsewhere(model_chunks, here: set[int]) -> str | None:
    """Why a copy of a vocabulary matrix went to another optimizer of the run (Muon's matrix
    optimizer takes 2-D weights without ``is_embedding_or_output_parameter``), or None."""
    for index, chunk in enumerate(model_chunks):
        for name, param in chunk.named_parameters():
            if param.requires_grad and is_coupled_parameter(param) and id(param) not in here:
                return (
                    f"{index}:{name} (shape {tuple(param.shape)}) is a copy of a vocabulary "
                    f"matrix ({' / '.join(m for m in MARKERS if getattr(param, m, False))}) but "
                    "is stepped by another optimizer of this run, not coupled_adam. With Muon, "
                    "mark it is_embedding_or_output_parameter=True so that Muon hands it to its "
                    "scalar optimizer (muon_scalar_optimizer='coupled_adam').")
    return None


def check_coupled_somewhere(found: int, misplaced: str | None = None) -> int:
    """Sum ``found`` over every rank (one all-reduce); raise on every rank if it is 0, or if
    any rank has a vocabulary copy stepped by another optimizer (``misplaced``).

    Per rank, 0 is legitimate (a middle pipeline stage holds no vocabulary matrix); on all ranks
    together it means the model carries none of the markers and every parameter would be stepped
    with plain AdamW.
    """
    import torch.distributed as dist

    total, misplaced_ranks = found, int(misplaced is not None)
    if dist.is_initialized():
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        counts = torch.tensor([found, misplaced_ranks], dtype=torch.int64, device=device)
        dist.all_reduce(counts)
        total, misplaced_ranks = (int(c) for c in counts.tolist())
    if misplaced_ranks:
        raise _compat.UnsupportedMegatronError(
            misplaced or f"{misplaced_ranks} other rank(s) hold a copy of a vocabulary matrix "
            "that another optimizer of this run steps (see their error).")
    if total == 0:
        raise ValueError(
            "optimizer='coupled_adam' found no vocabulary matrix on any rank, so every parameter "
            "would be stepped with plain AdamW. Megatron's LanguageModule marks them; a custom "
            "model must set one of the attributes " + " / ".join(MARKERS) + " to True on its "
            "embedding and output weights (e.g. model.embedding.word_embeddings.weight."
            "is_embedding_or_output_parameter = True; shared_embedding on a copy kept in step "
            "with another stage's), or use optimizer='adam'.")
    return total


def make_factory(original):
    """Wrap ``_get_megatron_optimizer_based_on_param_groups``: coupled_adam here, rest unchanged."""
    signature = inspect.signature(original)

    def _get_megatron_optimizer_based_on_param_groups(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        config = arguments["config"]
        if not _compat.wants_coupled_adam(config):
            return original(*args, **kwargs)
        _compat.refuse_unsupported(config, arguments["model_chunks"],
                                   skip_megatron_wrapping=arguments.get("skip_megatron_wrapping",
                                                                        False))
        settings(config)  # before anything is built
        # The model parameters this call steps (the wrappers replace them in the groups).
        here = {id(p) for group in arguments["param_groups"] for p in group["params"]}
        # Megatron's own adam optimizer, then ours in place of its AdamW, over the same groups.
        optimizer = original(**{**arguments, "config": _compat.as_adam(config)})
        optimizer.config = config
        inner, found = None, 0
        if optimizer.optimizer is not None:
            inner = build_inner(config, optimizer.optimizer.param_groups)
            _compat.replace_inner(optimizer, inner, _init_state_fn)
            tp_group = _compat.tensor_parallel_group(arguments.get("pg_collection"))
            found = attach_geometries(optimizer, inner, arguments["model_chunks"], tp_group)
        if _compat.is_dense_call(arguments):  # every rank makes this call exactly once
            misplaced = _copy_elsewhere(arguments["model_chunks"], here)
            total = check_coupled_somewhere(found, misplaced)
            _log_summary(type(optimizer).__name__, found, total, inner)
        return optimizer

    _get_megatron_optimizer_based_on_param_groups.__wrapped__ = original
    _get_megatron_optimizer_based_on_param_groups._coupled_ds_patch = True
    return _get_megatron_optimizer_based_on_param_groups


def coupled_adam_config(*, vocab_size: int | None = None, count_padded_rows: bool = False,
                        avg_scale: float = 1.0, **optimizer_config_kwargs: Any):
    """``OptimizerConfig(optimizer="coupled_adam", **kwargs)`` with the coupled settings set.

    Args:
        vocab_size: The tokenizer's vocabulary (Megatron's padded rows beyond it are left out of
            the column means, so the result does not depend on the tensor-parallel degree).
        count_padded_rows: Average over all padded rows instead (the authors' nanoGPT behaviour).
        avg_scale: Scaled Coupled Adam factor (2**-n); 1.0 is the paper's default method.
    """
    from megatron.core.optimizer import OptimizerConfig

    optimizer_config_kwargs.setdefault("optimizer", OPTIMIZER_NAME)
    config = OptimizerConfig(**optimizer_config_kwargs)
    config.coupled_adam_vocab_size = vocab_size
    config.coupled_adam_count_padded_rows = count_padded_rows
    config.coupled_adam_avg_scale = avg_scale
    settings(config)
    return config
