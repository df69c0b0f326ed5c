"""Loading DeepSpeed checkpoints into a CoupledAdam run: resume, or adopt an AdamW run's state.

DeepSpeed hands the base optimizer whatever the checkpoint holds, in three ways (0.19.8):

* regular checkpoints, ZeRO 0/1/2/3: ``base_optimizer.load_state_dict(saved)``; torch then
  *replaces* every group's options by the saved ones (an AdamW checkpoint has no ``coupled``
  key: ``KeyError`` at the first step; a CoupledAdam one silently overrides a changed
  ``vocab_size``). ZeRO 1/2 first compare their alignment padding, which fails with a message
  about ``parameter_alignment`` when the param groups differ.
* universal checkpoints, ZeRO 1/2 (``load_hp_checkpoint_state_from_checkpoint_dir``): every
  parameter's fp32 weight and moments are read by name (layout-free), but the groups are walked
  in ``zip(ours, saved)``, which stops at the shorter list (parameters of the remaining groups
  stay unrestored) and copies the saved groups' options into ours.
* universal checkpoints, ZeRO 3 (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``):
  every parameter by name, but param group 0's options are copied into every group (every group
  would be coupled, with the embedding's weight decay), and one ``step`` tensor object is stored
  in every sub-group's state (an in-place ``step += 1`` would count once per group).

:func:`guard_checkpoint_loads` wraps those entry points on the engine's optimizer objects so that a
load either continues exactly or raises before the first step:

* a CoupledAdam checkpoint resumes as saved, unless the config's ``vocab_size``,
  ``embedding_weight_decay`` or ``avg_scale`` differs from the checkpoint's: that raises, naming
  both values (no silent override);
* an AdamW (any torch-style Adam) checkpoint is taken over — ``exp_avg`` and the per-element
  ``exp_avg_sq`` mean the same thing in Coupled Adam, which averages v only when it reads it —
  when every parameter can be matched: regular checkpoints with the same param groups (same
  parameters in the same groups, e.g. ``examples/train_ds.py --optimizer AdamW``), and universal
  checkpoints of any grouping. The group options (hyperparameters) then come from this run's
  config, except the scheduled ``lr``, which is the checkpoint's. Any other layout raises,
  saying what was found and what to do.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from coupled_ds.optimizer import CoupledAdam

__all__ = ["CheckpointMismatchError", "guard_checkpoint_loads"]

logger = logging.getLogger(__name__)

# Group option -> the DeepSpeed config key that sets it (for coupled groups).
_COUPLED_OPTIONS = {"vocab_size": "vocab_size", "weight_decay": "embedding_weight_decay",
                    "avg_scale": "avg_scale"}
_FIX_FRESH = ("engine.load_checkpoint(dir, load_optimizer_states=False) (restores the weights, "
              "starts the optimizer moments at zero)")


class CheckpointMismatchError(ValueError):
    """A checkpoint's optimizer state cannot be loaded into this CoupledAdam run as it is."""


def _options(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def _describe_groups(groups: list[dict[str, Any]]) -> str:
    parts = []
    for index, group in enumerate(groups):
        n = len(group["params"])
        if group.get("coupled"):
            parts.append(f"{index}: coupled {group.get('coupled_names') or n}")
        else:
            parts.append(f"{index}: {n} tensor(s), weight_decay={group.get('weight_decay')}")
    return f"{len(groups)} param group(s) [" + "; ".join(parts) + "]"


def _is_coupled_checkpoint(saved_groups: list[dict[str, Any]]) -> bool:
    return bool(saved_groups) and all("coupled" in g for g in saved_groups)


def _check_same_settings(ours: list[dict[str, Any]], saved: list[dict[str, Any]],
                         where: str) -> None:
    """A CoupledAdam checkpoint: same coupled groups, and the config agrees with it."""
    if [bool(g.get("coupled")) for g in saved] != [bool(g["coupled"]) for g in ours]:
        raise CheckpointMismatchError(
            f"{where}: the checkpoint's CoupledAdam has {_describe_groups(saved)}, this run "
            f"{_describe_groups(ours)}; the coupled matrices or the grouping changed. Load with "
            f"{_FIX_FRESH}, or convert it with ds_to_universal and load it with "
            "checkpoint.load_universal=true (matches parameters by name).")
    for index, (mine, theirs) in enumerate(zip(ours, saved)):
        if not mine["coupled"]:
            continue
        for option, key in _COUPLED_OPTIONS.items():
            if option in theirs and theirs[option] != mine[option]:
                raise CheckpointMismatchError(
                    f"{where}: optimizer.params.{key}={mine[option]!r} in this run's config, but "
                    f"the checkpoint's coupled group {index} {mine.get('coupled_names')} was "
                    f"trained with {option}={theirs[option]!r}; loading would silently replace "
                    f"the config's value. Set optimizer.params.{key}={theirs[option]!r} to resume "
                    f"as saved, or, to change it, load with {_FIX_FRESH}.")


def _other_layout(where: str, found: str, ours: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{where}: the checkpoint's optimizer state was written by a plain Adam/AdamW optimizer "
        f"with {found}; this run has {ours}. Its moments cannot be matched to this run's "
        "parameters (a regular checkpoint continues only with the same param groups, as an AdamW "
        "run grouped by coupled_ds.coupled_param_groups has, e.g. examples/train_ds.py "
        "--optimizer AdamW). Either convert it with ds_to_universal --inject_missing_state and "
        "load it with checkpoint.load_universal=true (moments matched by parameter name and "
        f"taken over), or load with {_FIX_FRESH}.")


def _take_scheduled_lr(groups: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    """The saved ``lr`` (and ``initial_lr``): DeepSpeed restores a scheduler's position but not
    the groups' lr, so the first step after a load runs at the lr the checkpoint's groups hold.
    Group by group where the groups correspond, else the one lr all saved groups share."""
    for key in ("lr", "initial_lr"):
        values = [g[key] for g in saved if key in g]
        if len(saved) == len(groups) and len(values) == len(saved):
            for group, value in zip(groups, values):
                group[key] = value
        elif values and all(v == values[0] for v in values):
            for group in groups:
                group[key] = values[0]
        elif values:
            logger.warning("coupled_ds: the checkpoint's %d param groups have different %s %s; "
                           "this run's %d groups keep the config's until the scheduler sets it",
                           len(saved), key, values, len(groups))


def _normalise_steps(opt: CoupledAdam) -> None:
    """AdamW-style states may hold ``step`` as a Python number (DeepSpeed's FusedAdam) or one
    tensor shared by several states; CoupledAdam increments its own float32 tensor in place."""
    for state in opt.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.detach().to(torch.float32).cpu().clone().reshape(())
        elif step is not None:
            state["step"] = torch.tensor(float(step), dtype=torch.float32)


def _saved_shapes(state_dict: dict[str, Any]) -> list[list[tuple[int, ...] | None]]:
    states = state_dict["state"]
    return [[tuple(states[i]["exp_avg"].shape) if "exp_avg" in states.get(i, {}) else None
             for i in group["params"]] for group in state_dict["param_groups"]]


def _base_load(opt: CoupledAdam, original: Any, state_dict: dict[str, Any]) -> None:
    """``CoupledAdam.load_state_dict`` as DeepSpeed calls it for regular checkpoints."""
    saved = state_dict["param_groups"]
    where = "DeepSpeed checkpoint load (CoupledAdam)"
    if _is_coupled_checkpoint(saved):
        _check_same_settings(opt.param_groups, saved, where)
        original(state_dict)
        _normalise_steps(opt)
        return
    ours = [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups]
    theirs = _saved_shapes(state_dict)
    same = len(ours) == len(theirs) and all(
        len(a) == len(b) and all(s is None or s == t for s, t in zip(b, a))
        for a, b in zip(ours, theirs))
    if not same:
        raise _other_layout(where, f"{len(saved)} param group(s) (tensor shapes {theirs})",
                            f"{_describe_groups(opt.param_groups)} (shapes {ours})")
    options = [_options(g) for g in opt.param_groups]
    original(state_dict)
    for group, own in zip(opt.param_groups, options):
        params = group["params"]
        group.clear()
        group.update(own, params=params)
    _take_scheduled_lr(opt.param_groups, saved)
    _normalise_steps(opt)
    logger.info("coupled_ds: took over an AdamW checkpoint's exp_avg / exp_avg_sq for %s; "
                "hyperparameters come from this run's config", _describe_groups(opt.param_groups))


def _zero12_load(zero_opt: Any, original: Any, state_dict_list: list[dict[str, Any]],
                 load_optimizer_states: bool = True, *args: Any, **kwargs: Any) -> None:
    """ZeRO 1/2 ``load_state_dict``: compare the groups by parameter name before DeepSpeed's
    alignment check, which would report a differing grouping as a ``parameter_alignment``
    problem."""
    checkpoint_folder = kwargs.get("checkpoint_folder", args[1] if len(args) > 1 else None)
    if load_optimizer_states and not checkpoint_folder:
        import torch.distributed as dist
        from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS

        saved = state_dict_list[dist.get_rank(group=zero_opt.dp_process_group)]
        theirs = [list(m) for m in saved.get(PARAM_SLICE_MAPPINGS) or []]
        ours = [list(m) for m in zero_opt._param_slice_mappings]  # this rank's partition
        if theirs and theirs != ours:
            where = "DeepSpeed ZeRO checkpoint load (CoupledAdam)"
            found = (f"{len(theirs)} param group(s) (this rank's partition holds {theirs}, "
                     f"here {ours})")
            groups = zero_opt.optimizer.param_groups
            base = saved.get(BASE_OPTIMIZER_STATE)
            if isinstance(base, dict) and _is_coupled_checkpoint(base["param_groups"]):
                _check_same_settings(groups, base["param_groups"], where)
                raise CheckpointMismatchError(
                    f"{where}: the checkpoint's CoupledAdam holds {found}; this run has "
                    f"{_describe_groups(groups)}. Load with {_FIX_FRESH}, or convert it with "
                    "ds_to_universal and load with checkpoint.load_universal=true.")
            raise _other_layout(where, found, _describe_groups(groups))
    original(state_dict_list, load_optimizer_states, *args, **kwargs)


def _universal_groups(checkpoint_dir: str) -> list[dict[str, Any]]:
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    sd = torch.load(os.path.join(checkpoint_dir, "zero", "optimizer_state.pt"), weights_only=False)
    groups = sd.get("param_groups")
    if groups is None:
        groups = sd[OPTIMIZER_STATE_DICT]["param_groups"]
    return groups


def _zero12_universal(zero_opt: Any, original: Any, lp_groups_name: str,
                      checkpoint_dir: str) -> None:
    """ZeRO 1/2 universal load, one of our groups at a time, so that no group is skipped
    whatever the checkpoint's grouping; each group keeps this run's options."""
    opt = zero_opt.optimizer
    saved = _universal_groups(checkpoint_dir)
    if _is_coupled_checkpoint(saved) and len(saved) == len(opt.param_groups):
        _check_same_settings(opt.param_groups, saved, "DeepSpeed universal checkpoint load")
    groups, lp_groups = opt.param_groups, getattr(zero_opt, lp_groups_name)
    options = [_options(g) for g in groups]
    try:
        for index in range(len(groups)):
            opt.param_groups = [groups[index]]
            setattr(zero_opt, lp_groups_name, [lp_groups[index]])
            original(lp_groups_name, checkpoint_dir)
    finally:
        opt.param_groups = groups
        setattr(zero_opt, lp_groups_name, lp_groups)
    for group, own in zip(groups, options):
        group.update(own)
    _take_scheduled_lr(groups, saved)
    _normalise_steps(opt)


def _stage3_universal(zero_opt: Any, original: Any, checkpoint_dir: str) -> None:
    """ZeRO 3 universal load: the config must agree with a CoupledAdam checkpoint; each group
    keeps this run's options and each state its own ``step``."""
    saved = _universal_groups(checkpoint_dir)
    opt = zero_opt.optimizer
    if _is_coupled_checkpoint(saved) and len(saved) == len(opt.param_groups):
        _check_same_settings(opt.param_groups, saved, "DeepSpeed universal checkpoint load")
    options = [_options(g) for g in opt.param_groups]
    original(checkpoint_dir)
    for group, own in zip(opt.param_groups, options):
        group.update(own)
    _take_scheduled_lr(opt.param_groups, saved)
    _normalise_steps(opt)


def _wrap(owner: Any, name: str, hook: Any) -> None:
    """Replace ``owner.name`` (an instance's bound method) by ``hook(owner, original, ...)``."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_coupled_ds_guard", False):
        return

    @functools.wraps(original)
    def method(*args: Any, **kwargs: Any) -> Any:
        return hook(owner, original, *args, **kwargs)

    method._coupled_ds_guard = True
    setattr(owner, name, method)


def guard_checkpoint_loads(engine: Any) -> None:
    """Check or adapt every way ``engine.load_checkpoint`` feeds state to CoupledAdam."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt, wrapper = engine.basic_optimizer, engine.optimizer
    _wrap(opt, "load_state_dict", _base_load)
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        _wrap(wrapper, "load_state_dict", _zero12_load)
    if isinstance(wrapper, DeepSpeedZeroOptimizer_Stage3):
        _wrap(wrapper, "load_hp_checkpoint_state_from_checkpoint_dir_stage3", _stage3_universal)
    elif wrapper is not opt:
        _wrap(wrapper, "load_hp_checkpoint_state_from_checkpoint_dir", _zero12_universal)
