"""DeepSpeed integration: ``"type": "CoupledAdam"`` in the JSON config.

Usage (one import before ``deepspeed.initialize``)::

    import coupled_ds.deepspeed  # registers "CoupledAdam" with DeepSpeed
    cfg["optimizer"] = {"type": "CoupledAdam",
                        "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}}
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                             config=cfg)

DeepSpeed has no optimizer plugin registry (DESIGN §5.1), so importing this module patches
:class:`deepspeed.runtime.engine.DeepSpeedEngine` in three small places:

* ``_configure_basic_optimizer`` builds :class:`~coupled_ds.CoupledAdam` for the name, with its
  param groups found from ``engine.module``'s named parameters (one group per coupled matrix);
* ``CoupledAdam`` joins DeepSpeed's known names and ``ZERO_SUPPORTED_OPTIMIZERS``, so no
  ``zero_allow_untested_optimizer`` is needed;
* ``_configure_optimizer`` is followed by :func:`coupled_ds.zero.attach_geometry`, which tells
  the optimizer where each flat ZeRO partition sits in its [V, H] matrix and which process groups
  hold the other pieces. A ``CoupledAdam`` instance or callable passed as ``optimizer=`` gets the
  same treatment. Anything that cannot couple raises; nothing falls back to AdamW.

A model built under ``deepspeed.zero.Init`` (Hugging Face ``from_pretrained`` under ZeRO-3) holds
empty placeholders; its coupled matrices are found from DeepSpeed's ``ds_shape`` (see
:func:`logical_shape`), never by gathering. A script that cannot be edited runs under
``python -m coupled_ds.run script.py`` (:mod:`coupled_ds.run`), which makes the import for it.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from coupled_ds.geometry import ShardGeometry
from coupled_ds.groups import NoEmbeddingFoundError, coupled_param_groups, find_coupled_parameters
from coupled_ds.optimizer import CoupledAdam

__all__ = ["ACCEPTED_PARAMS", "OPTIMIZER_NAME", "build_optimizer", "register"]

logger = logging.getLogger(__name__)

OPTIMIZER_NAME = "CoupledAdam"
# Keys of cfg["optimizer"]["params"]; anything else is a typo and raises.
ACCEPTED_PARAMS = ("lr", "betas", "eps", "weight_decay", "embedding_weight_decay", "avg_scale",
                   "vocab_size", "coupled_params", "compact_coupled_state")
_OFFLOAD_KEY = "zero_force_ds_cpu_optimizer"


# Names accepted as cfg["optimizer"]["type"], compared lower-cased as DeepSpeed does: ours, and
# Megatron's spelling (--optimizer coupled_adam), deliberately, for people who use both.
ACCEPTED_NAMES = (OPTIMIZER_NAME.lower(), "coupled_adam")


def is_coupled_name(name: str | None) -> bool:
    """Whether a config ``optimizer.type`` names Coupled Adam (case-insensitive, as DeepSpeed)."""
    return isinstance(name, str) and name.lower() in ACCEPTED_NAMES


def _param_ids(model_parameters: Iterable[Any]) -> tuple[set[int], list[dict[str, Any]] | None]:
    """Ids of the parameters the user handed DeepSpeed, and their dict groups if any."""
    items = list(model_parameters)
    if items and isinstance(items[0], Mapping):
        return {id(p) for g in items for p in g["params"]}, [dict(g) for g in items]
    return {id(p) for p in items}, None


def _split_user_groups(user_groups: list[dict[str, Any]], coupled: list[tuple[str, nn.Parameter]],
                       embedding_weight_decay: float, vocab_size: int | None,
                       weight_decay: float) -> list[dict[str, Any]]:
    """Keep the user's groups but move each coupled matrix into a group of its own (ZeRO
    flattens a group into one buffer; one coupled matrix per buffer keeps its geometry simple).
    A group that sets no ``weight_decay`` (DeepSpeed's own MoE split of ``model.parameters()``
    into dense and expert groups) gets the usual decay / no-decay split."""
    names = {id(p): n for n, p in coupled}
    groups = []
    for user_group in user_groups:
        params = list(user_group["params"])
        options = {k: v for k, v in user_group.items() if k != "params"}
        for p in params:
            if id(p) in names:
                groups.append({**options, "params": [p], "coupled": True,
                               "coupled_names": [names[id(p)]], "vocab_size": vocab_size,
                               "weight_decay": embedding_weight_decay})
        rest = [p for p in params if id(p) not in names]
        groups += _decay_split(options, rest, weight_decay)
    return groups


def _decay_split(options: dict[str, Any], params: list[nn.Parameter],
                 weight_decay: float) -> list[dict[str, Any]]:
    """One group as given if it sets ``weight_decay``; else matrices with ``weight_decay`` and
    1-D tensors (biases, norms, expert biases) without, each keeping the group's other options
    (``moe`` and ``name`` for DeepSpeed's expert groups)."""
    if "weight_decay" in options:
        return [{**options, "params": params}] if params else []
    decay = [p for p in params if len(logical_shape(p)) >= 2]
    no_decay = [p for p in params if len(logical_shape(p)) < 2]
    return [{**options, "params": members, "weight_decay": wd}
            for members, wd in ((decay, weight_decay), (no_decay, 0.0)) if members]


# Options of DeepSpeed's Adam / AdamW that a config switched to CoupledAdam may still carry.
_ADAM_ONLY = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "bias_correction", "amsgrad")


def _adam_only_hint(unknown: list[str]) -> str:
    adam_only = [k for k in unknown if k in _ADAM_ONLY]
    if not adam_only:
        return ""
    return (f" {adam_only} choose the implementation of DeepSpeed's Adam/AdamW, which CoupledAdam "
            "replaces (it has its own kernels): remove them when switching from AdamW.")


_NUMBERS = {  # key: (lowest allowed value, strictly above it?, an example)
    "lr": (0.0, False, "3e-4"), "eps": (0.0, False, "1e-8"), "weight_decay": (0.0, False, "0.1"),
    "embedding_weight_decay": (0.0, False, "0.0"), "avg_scale": (0.0, True, "1.0 or 2**-n"),
}


def _config_error(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"DeepSpeed config optimizer.params.{key}={value!r} "
                      f"({type(value).__name__}): {expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _validate_params(params: Mapping[str, Any]) -> None:
    """Type and range of every ``cfg["optimizer"]["params"]`` value, before anything is built.

    Raises:
        ValueError: Naming the key, the value and what to write instead.
    """
    for key, (low, strict, example) in _NUMBERS.items():
        if key not in params:
            continue
        value = params[key]
        if not _is_number(value) or not (value > low if strict else value >= low):
            bound = f"> {low}" if strict else f">= {low}"
            hint = (" Write a JSON number, not a string." if isinstance(value, str) else "")
            if value == "auto":
                hint = (" 'auto' is filled in by Hugging Face's Trainer / Accelerate only; "
                        "outside them write the number.")
            raise _config_error(key, value, f"expected a number {bound}, e.g. {example}.{hint}")
    vocab_size = params.get("vocab_size")
    if vocab_size is not None and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool)
                                   or vocab_size <= 0):
        raise _config_error("vocab_size", vocab_size,
                            "expected a positive int, the real vocabulary size (rows at or "
                            "beyond it are padding, left out of the column mean), e.g. 50257; "
                            "leave the key out to count every row.")
    betas = params.get("betas")
    if betas is not None and (isinstance(betas, str) or not isinstance(betas, list | tuple)
                              or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1
                                                            for b in betas)):
        raise _config_error("betas", betas, "expected a list of two numbers in [0, 1), "
                            "e.g. [0.9, 0.95].")
    names = params.get("coupled_params")
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, list | tuple) or not all(
            isinstance(n, str) for n in names):
        raise _config_error("coupled_params", names, "must be a list of regex strings over "
                            "parameter names, e.g. ['embed', 'lm_head'].")
    for pattern in names:
        try:
            re.compile(pattern)
        except re.error as err:
            raise _config_error("coupled_params", names, f"{pattern!r} is not a valid regular "
                                f"expression ({err}); escape special characters, e.g. "
                                f"{re.escape(pattern)!r}.") from err


# "auto" values that Hugging Face fills in before DeepSpeed sees the config (DESIGN §5.4).
_TRAINER_FILLS = ("lr", "betas", "eps", "weight_decay")
_ACCELERATE_FILLS = ("lr", "weight_decay")


def _check_auto(params: Mapping[str, Any]) -> None:
    """Refuse ``"auto"`` left in ``optimizer.params``: nobody filled it in."""
    left = sorted(k for k, v in params.items() if v == "auto")
    if not left:
        return
    shown = ", ".join(f"optimizer.params.{k}='auto'" for k in left)
    ours = [k for k in left if k not in _TRAINER_FILLS]
    if ours:
        why = (f"{ours} cannot be 'auto': neither Hugging Face Trainer nor Accelerate fills "
               "them. Write their values in the config.")
    else:
        why = (f"Hugging Face Trainer fills {list(_TRAINER_FILLS)} from TrainingArguments, "
               f"Accelerate only {list(_ACCELERATE_FILLS)} (from DummyOptim), and nothing else "
               "does: write the values in the config.")
    raise ValueError(f"DeepSpeed config {shown} is still unfilled at deepspeed.initialize "
                     f"(type {OPTIMIZER_NAME!r}). {why}")


def _check_compact(params: Mapping[str, Any]) -> None:
    """``compact_coupled_state`` is a JSON boolean (the string "false" would switch it on)."""
    value = params.get("compact_coupled_state", False)
    if not isinstance(value, bool):
        raise ValueError(f"DeepSpeed config optimizer.params.compact_coupled_state={value!r} "
                         f"({type(value).__name__}): expected true or false (a JSON boolean).")


def build_optimizer(module: nn.Module, model_parameters: Iterable[Any],
                    params: Mapping[str, Any] | None, *, fused: bool | None = None
                    ) -> CoupledAdam:
    """``CoupledAdam`` from ``cfg["optimizer"]["params"]`` over the parameters DeepSpeed was given.

    Coupled matrices are found in ``module.named_parameters()`` (names ``coupled_params`` as
    regexes, else the core's detection). Parameters not in ``model_parameters`` are left out.
    ``fused`` is ``CoupledAdam(fused=...)``: the implementation of the uncoupled groups' AdamW
    (the engine hook passes True where torch has fused kernels for the partitions' device).

    Raises:
        ValueError: An unknown key under ``params`` (lists the accepted ones), a bad value, or a
            selected parameter that is not 2-D.
        NoEmbeddingFoundError: No embedding matrix was found.
    """
    params = dict(params or {})
    unknown = sorted(set(params) - set(ACCEPTED_PARAMS))
    if unknown:
        raise ValueError(
            f"DeepSpeed config optimizer.params has unknown key(s) {unknown} for type "
            f"{OPTIMIZER_NAME!r}. Accepted keys: {list(ACCEPTED_PARAMS)}. (Gradient clipping is "
            "the top-level 'gradient_clipping' key.)" + _adam_only_hint(unknown))
    _check_auto(params)
    _check_compact(params)
    _validate_params(params)
    names = params.get("coupled_params")
    weight_decay = params.get("weight_decay", 1e-2)
    embedding_wd = params.get("embedding_weight_decay", 0.0)
    vocab_size = params.get("vocab_size")
    # A vocabulary-parallel shard (Megatron marker) has V / tp rows but vocab_size counts all V:
    # it is set after construction and checked at step time against the geometry's global rows.
    tp_vocab = vocab_size is not None and any(getattr(p, "tensor_model_parallel", False)
                                              for p in module.parameters())
    given_ids, user_groups = _param_ids(model_parameters)
    pipe_group, vocab_shape = _pipeline_stage(module, names)
    vocab_size, global_vocab_size = (None, vocab_size) if tp_vocab else (vocab_size, None)
    try:
        if user_groups is None:
            groups = coupled_param_groups(module, weight_decay=weight_decay,
                                          embedding_weight_decay=embedding_wd, names=names,
                                          vocab_size=vocab_size, avg_scale=params.get("avg_scale"),
                                          allow_no_embedding=pipe_group is not None,
                                          vocab_shape=vocab_shape, shape_of=logical_shape)
        else:
            coupled = find_coupled_parameters(module, names=names, vocab_shape=vocab_shape,
                                              shape_of=logical_shape)
            coupled_param_groups(module, names=names, vocab_size=vocab_size,  # same checks
                                 allow_no_embedding=pipe_group is not None, vocab_shape=vocab_shape,
                                 shape_of=logical_shape)
            groups = _split_user_groups(user_groups, coupled, embedding_wd, vocab_size,
                                        weight_decay)
    except NoEmbeddingFoundError as err:
        raise NoEmbeddingFoundError(
            f"DeepSpeed optimizer {OPTIMIZER_NAME!r}: {err} In the DeepSpeed config this is "
            "optimizer.params.coupled_params=[regex, ...].") from err
    except ValueError as err:
        raise ValueError(f"DeepSpeed optimizer {OPTIMIZER_NAME!r} "
                         f"(optimizer.params.coupled_params={names!r}): {err}") from err
    groups = [{**g, "params": [p for p in g["params"] if id(p) in given_ids]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not any(g.get("coupled") for g in groups) and pipe_group is None:
        raise NoEmbeddingFoundError(
            f"DeepSpeed optimizer {OPTIMIZER_NAME!r}: the coupled matrices are not among the "
            "model_parameters given to deepspeed.initialize (frozen?). Pass "
            "model_parameters=model.parameters() or fix optimizer.params.coupled_params.")
    kwargs = {k: params[k] for k in ("lr", "eps", "avg_scale", "compact_coupled_state")
              if k in params}
    if "betas" in params:
        kwargs["betas"] = tuple(params["betas"])
    optimizer = CoupledAdam(groups, weight_decay=weight_decay, fused=fused,
                            geometries=_partitioned_placeholders(groups), **kwargs)
    for group in optimizer.param_groups:
        if group["coupled"] and global_vocab_size is not None:
            group["vocab_size"] = global_vocab_size
    return optimizer


def _pipeline_stage(module: nn.Module, names: list[str] | None
                    ) -> tuple[Any, tuple[int, int] | None]:
    """For a stage of a ``deepspeed.pipe.PipelineModule``: its pipe-parallel group, and the
    token embedding's [V, H] from whichever stage holds it (a collective; every stage builds its
    optimizer here). A stage may hold no embedding; that some stage does is checked together in
    :func:`coupled_ds.zero.attach_geometry`."""
    from coupled_ds import zero

    group = zero.pipeline_group(module)
    if group is None:
        return None, None
    return group, zero.pipeline_vocab_shape(module, group) if names is None else None


def logical_shape(p: torch.Tensor) -> torch.Size:
    """The full shape of ``p``, also when ``deepspeed.zero.Init`` has already partitioned it
    (then ``p`` holds an empty placeholder and DeepSpeed records the shape in ``ds_shape``)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _partitioned_placeholders(groups: list[dict[str, Any]]
                              ) -> list[tuple[torch.Tensor, ShardGeometry]]:
    """Geometries for coupled parameters that ``zero.Init`` already partitioned.

    Such a parameter holds no element (its data is an empty placeholder until ZeRO-3 gathers it),
    so it is declared as a ``numel=0`` piece of its [V, H] matrix; the ZeRO-3 adapter
    (:func:`coupled_ds.zero.attach_geometry`) replaces it with the fp32 partition's geometry
    before the first step.
    """
    pairs = []
    for group in groups:
        if not group.get("coupled"):
            continue
        for p, name in zip(group["params"], group["coupled_names"]):
            if hasattr(p, "ds_shape"):
                rows, cols = p.ds_shape
                pairs.append((p, ShardGeometry(name, rows, cols, start_global_flat=0, numel=0)))
    return pairs


def _check_partitioned(engine: Any) -> None:
    """A model built under ``deepspeed.zero.Init`` trains only under ZeRO stage 3."""
    partitioned = [n for n, p in engine.module.named_parameters() if hasattr(p, "ds_id")]
    if partitioned and engine.zero_optimization_stage() != 3:
        raise ValueError(
            f"DeepSpeed optimizer {OPTIMIZER_NAME!r}: the model was built under "
            f"deepspeed.zero.Init (e.g. {partitioned[0]!r} is partitioned) but "
            f"zero_optimization.stage={engine.zero_optimization_stage()}; such a model needs "
            "stage 3. Set zero_optimization.stage=3 or build the model outside zero.Init.")


# ---------------------------------------------------------------------- engine patches
def _check_offload(engine: Any) -> None:
    """Offload with CoupledAdam steps the CPU partitions with CoupledAdam itself.

    DeepSpeed's ``zero_force_ds_cpu_optimizer`` (default true) would demand DeepSpeedCPUAdam, an
    element-wise C++ kernel that cannot couple. Left at its default it is treated as false for
    CoupledAdam; set explicitly to true it is refused.
    """
    if not engine.zero_use_cpu_optimizer():
        return
    if engine._config._param_dict.get(_OFFLOAD_KEY) is True:
        raise ValueError(
            f"DeepSpeed config {_OFFLOAD_KEY}=true forces DeepSpeedCPUAdam under "
            "offload_optimizer, which cannot couple the embedding columns. Remove the key or set "
            f"it to false: {OPTIMIZER_NAME} then steps the offloaded CPU partitions itself.")
    engine.zero_force_ds_cpu_optimizer = lambda: False


def _configure_basic_optimizer(original, engine, model_parameters):
    if not is_coupled_name(engine.optimizer_name()) or engine.client_optimizer:
        return original(engine, model_parameters)
    _check_offload(engine)
    _check_partitioned(engine)
    return build_optimizer(engine.module, model_parameters, engine.optimizer_params(),
                           fused=_fused_adamw_available(engine))


def _fused_adamw_available(engine: Any) -> bool | None:
    """Whether the uncoupled groups can take torch's fused AdamW (one pass per tensor).

    Left to torch's default, CPU tensors (every ZeRO-Offload partition, and DS_ACCELERATOR=cpu)
    get its single-tensor loop, about ten whole-tensor passes each, where DeepSpeed's own
    "AdamW" would run one fused pass. torch has fused AdamW kernels for CPU and CUDA; elsewhere
    (other accelerators) torch's default stays.
    """
    from deepspeed.accelerator import get_accelerator

    if engine.zero_use_cpu_optimizer() or get_accelerator().device_name() in ("cpu", "cuda"):
        return True
    return None


def _configure_optimizer(original, engine, client_optimizer, model_parameters):
    coupled = is_coupled_name(engine.optimizer_name()) and client_optimizer is None
    if isinstance(client_optimizer, CoupledAdam):
        _check_offload(engine)
        coupled = True
    elif callable(client_optimizer) and not isinstance(client_optimizer, torch.optim.Optimizer):
        user_callable = client_optimizer

        @functools.wraps(user_callable)
        def client_optimizer(params):  # DeepSpeed checks offload right after this call
            built = user_callable(params)
            if isinstance(built, CoupledAdam):
                _check_offload(engine)
            return built

    original(engine, client_optimizer, model_parameters)
    if coupled or isinstance(engine.basic_optimizer, CoupledAdam):
        from coupled_ds import ds_checkpoint, zero

        zero.attach_geometry(engine)
        ds_checkpoint.guard_checkpoint_loads(engine)


def register() -> None:
    """Teach DeepSpeed the optimizer name ``CoupledAdam`` (idempotent; runs on import)."""
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import utils as zero_utils

    for name in ACCEPTED_NAMES:
        if name not in ds_config.DEEPSPEED_OPTIMIZERS:
            ds_config.DEEPSPEED_OPTIMIZERS.append(name)  # the engine holds the same list
    if CoupledAdam not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(CoupledAdam)
    _patch(DeepSpeedEngine, "_configure_basic_optimizer", _configure_basic_optimizer)
    _patch(DeepSpeedEngine, "_configure_optimizer", _configure_optimizer)


def _patch(cls: type, name: str, hook: Any) -> None:
    """Replace ``cls.name`` by ``hook(original, self, ...)`` once."""
    original = getattr(cls, name)
    if getattr(original, "_coupled_ds_original", None) is not None:
        return

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return hook(original, self, *args, **kwargs)

    method._coupled_ds_original = original
    setattr(cls, name, method)


register()
