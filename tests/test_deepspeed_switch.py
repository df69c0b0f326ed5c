"""Switching a DeepSpeed run from AdamW to CoupledAdam through a checkpoint.

An AdamW run (``"type": "AdamW"``) saves after K steps; a CoupledAdam run loads it and continues.
Either every parameter is restored bit for bit and AdamW's ``exp_avg`` / ``exp_avg_sq`` are taken
over (the continued run then equals single-process AdamW for K steps followed by CoupledAdam with
the same moments), or the load raises before the first step saying what was found and what to
do, and the documented alternative works:

* regular checkpoints with the same param groups (ZeRO 1, 2, 3): taken over;
* a regular checkpoint of one plain AdamW group: refused; ``load_optimizer_states=False`` then
  restores the weights exactly with fresh moments;
* the same checkpoint converted with ``ds_to_universal`` and loaded at 3 ranks: taken over
  (moments matched by parameter name);
* and back: a CoupledAdam checkpoint continued by AdamW with the same param groups.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from coupled_ds import CoupledAdam, coupled_param_groups  # noqa: E402
from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402
from tests.test_deepspeed_checkpoint import _to_universal  # noqa: E402

N, K = 8, 4                    # steps in all, AdamW steps before the switch
SAME_GROUPS = {"zero1": 1, "zero2": 2, "zero3": 3}
UNIVERSAL = {"zero2-one-group": 2, "zero3-one-group": 3}
SCHEDULED_LR = 5e-3            # where a schedule left the AdamW run (fast tests)


def _adamw_groups(model: torch.nn.Module, one_group: bool) -> list[dict[str, Any]]:
    """What an AdamW run hands DeepSpeed: coupled_ds's grouping without its keys, or one group."""
    if one_group:
        return [{"params": list(model.parameters())}]
    return [{"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in coupled_param_groups(model, weight_decay=H.HP["weight_decay"])]


def _adamw_config(stage: int, world: int) -> dict[str, Any]:
    cfg = H.ds_config(stage, world=world, optimizer=False)
    cfg["optimizer"] = {"type": "AdamW", "params": dict(
        H.HP, betas=list(H.HP["betas"]), torch_adam=True)}  # torch's AdamW: no op build
    return cfg


def _engine(cfg: dict[str, Any], model_parameters: Any = None) -> tuple[Any, torch.nn.Module]:
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    model = H.make_model()
    params = model.parameters() if model_parameters is None else model_parameters(model)
    return deepspeed.initialize(model=model, model_parameters=params, config=cfg)[0], model


def _adamw_runs(rank: int, world: int, root: str) -> dict[str, Any]:
    """K AdamW steps per layout, saved; rank 0 returns the saved weights."""
    out = {}
    for label, stage, one_group in [*[(k, s, False) for k, s in SAME_GROUPS.items()],
                                    ("zero2-one-group", 2, True), ("zero3-one-group", 3, True)]:
        engine, _ = _engine(_adamw_config(stage, world),
                            lambda m, one=one_group: _adamw_groups(m, one))
        H.train(engine, rank, 0, K)
        engine.save_checkpoint(os.path.join(root, label), tag="k")
        out[label] = H.full_params(engine)
        engine.destroy()
    engine, _ = _engine(H.ds_config(2, world=world))  # for the reverse switch
    H.train(engine, rank, 0, K)
    engine.save_checkpoint(os.path.join(root, "coupled-zero2"), tag="k")
    out["coupled-zero2"] = H.full_params(engine)
    engine.destroy()
    return out if rank == 0 else {}


def _load_and_continue(engine: Any, rank: int, folder: str, tag: str, **load: Any
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    path, _ = engine.load_checkpoint(folder, tag=tag, **load)
    assert path is not None, f"{folder}: nothing loaded"
    loaded = H.full_params(engine)
    H.train(engine, rank, K, N - K)
    return loaded, H.full_params(engine)


def _coupled_runs(rank: int, world: int, root: str, universal: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if universal:
        for label, stage in UNIVERSAL.items():
            cfg = H.ds_config(stage, world=world) | {"checkpoint": {"load_universal": True}}
            engine, _ = _engine(cfg)
            out[label] = _load_and_continue(engine, rank, os.path.join(root, label), "k_universal")
            engine.destroy()
        return out if rank == 0 else {}
    for label, stage in SAME_GROUPS.items():
        engine, _ = _engine(H.ds_config(stage, world=world))
        out[label] = _load_and_continue(engine, rank, os.path.join(root, label), "k")
        engine.destroy()
    folder = os.path.join(root, "zero2-one-group")
    engine, _ = _engine(H.ds_config(2, world=world))
    try:
        engine.load_checkpoint(folder, tag="k")
        out["refused"] = ("no error", "")
    except Exception as err:  # noqa: BLE001 - the test inspects the type
        out["refused"] = (type(err).__name__, str(err))
    engine.destroy()
    engine, _ = _engine(H.ds_config(2, world=world))
    out["fresh"] = _load_and_continue(engine, rank, folder, "k", load_optimizer_states=False)
    engine.destroy()
    engine, _ = _engine(_adamw_config(2, world), lambda m: _adamw_groups(m, False))
    out["reverse"] = _load_and_continue(engine, rank, os.path.join(root, "coupled-zero2"), "k")
    return out if rank == 0 else {}


def reference(one_group: bool, worlds: list[int], take_over: bool, reverse: bool = False
              ) -> dict[str, torch.Tensor]:
    """Single process: torch AdamW for K steps, then CoupledAdam (with AdamW's moments and step
    if ``take_over``, else fresh) for N - K (``reverse``: CoupledAdam first, then AdamW); the
    mean loss over every rank's micro-batch."""
    model = H.make_model()
    adamw = torch.optim.AdamW(_adamw_groups(model, one_group), lr=H.HP["lr"],
                              betas=H.HP["betas"], eps=H.HP["eps"],
                              weight_decay=H.HP["weight_decay"])
    coupled = CoupledAdam(coupled_param_groups(model, weight_decay=H.HP["weight_decay"]),
                          lr=H.HP["lr"], betas=H.HP["betas"], eps=H.HP["eps"])
    first, second = (coupled, adamw) if reverse else (adamw, coupled)
    for step in range(N):
        opt = first if step < K else second
        if step == K and take_over:
            for p, state in first.state.items():
                second.state[p] = {k: v.clone() for k, v in state.items()}
        opt.zero_grad(set_to_none=True)
        parts = [H.micro_batch(step, 0, r) for r in range(worlds[step])]
        (sum(model(ids, tg) for ids, tg in parts) / len(parts)).backward()
        opt.step()
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _assert_restored(label: str, loaded: dict[str, torch.Tensor],
                     saved: dict[str, torch.Tensor]) -> None:
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), f"{label}: {name} not restored bit for bit"


@pytest.mark.slow
def test_adamw_checkpoint_into_coupled_adam(tmp_path):
    root = str(tmp_path)
    saved = run_on_ranks(2, _adamw_runs, root, env=H.DS_ENV, timeout=300)[0]
    got = run_on_ranks(2, _coupled_runs, root, False, env=H.DS_ENV, timeout=300)[0]

    take_over = reference(False, [2] * N, take_over=True)
    fresh = reference(False, [2] * N, take_over=False)
    assert H.max_rel_diff(take_over, fresh) > 1e-3, "taking the moments over changed nothing"
    for label in SAME_GROUPS:
        loaded, final = got[label]
        _assert_restored(label, loaded, saved[label])
        diff = H.max_rel_diff(final, take_over)
        print(f"AdamW {label} -> CoupledAdam, moments taken over: max relative difference "
              f"{diff:.2e} (vs fresh moments {H.max_rel_diff(final, fresh):.2e})")
        assert diff <= 1e-6, f"{label}: continued run differs by {diff:.2e}"

    kind, message = got["refused"]
    assert kind == "CheckpointMismatchError", (kind, message)
    for word in ("plain Adam/AdamW", "1 param group", "3 param group",
                 "load_optimizer_states=False",
                 "ds_to_universal", "load_universal"):
        assert word in message, f"{word!r} missing from: {message}"
    loaded, final = got["fresh"]
    _assert_restored("one group, load_optimizer_states=False", loaded, saved["zero2-one-group"])
    diff = H.max_rel_diff(final, reference(True, [2] * N, take_over=False))
    print(f"AdamW one group -> CoupledAdam, fresh moments: max relative difference {diff:.2e}")
    assert diff <= 1e-6, f"fresh-moment continuation differs by {diff:.2e}"

    loaded, final = got["reverse"]
    _assert_restored("CoupledAdam -> AdamW", loaded, saved["coupled-zero2"])
    diff = H.max_rel_diff(final, reference(False, [2] * N, take_over=True, reverse=True))
    print(f"CoupledAdam zero2 -> AdamW, moments taken over: max relative difference {diff:.2e}")
    assert diff <= 1e-6, f"reverse switch differs by {diff:.2e}"

    for label in UNIVERSAL:
        _to_universal(tmp_path, label)
    got = run_on_ranks(3, _coupled_runs, root, True, env=H.DS_ENV, timeout=300)[0]
    want = reference(True, [2] * K + [3] * (N - K), take_over=True)
    for label in UNIVERSAL:
        loaded, final = got[label]
        _assert_restored(f"{label} universal 2 -> 3 ranks", loaded, saved[label])
        diff = H.max_rel_diff(final, want)
        print(f"AdamW {label}, universal 2 -> 3 ranks -> CoupledAdam: max relative difference "
              f"{diff:.2e}")
        assert diff <= 1e-6, f"{label}: universal switch differs by {diff:.2e}"


def _adamw_after_steps(one_group: bool) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    model = H.make_model()
    adamw = torch.optim.AdamW(_adamw_groups(model, one_group), lr=SCHEDULED_LR, betas=(0.8, 0.9))
    for step in range(2):
        adamw.zero_grad()
        model(*H.micro_batch(step, 0, 0)).backward()
        adamw.step()
    return model, adamw


def _coupled(model: torch.nn.Module, **groups: Any) -> CoupledAdam:
    return CoupledAdam(coupled_param_groups(model, weight_decay=H.HP["weight_decay"], **groups),
                       lr=H.HP["lr"], betas=H.HP["betas"])


def test_base_load_takes_over_same_groups_and_keeps_our_options():
    """What ZeRO 0 and 3 call: CoupledAdam.load_state_dict with an AdamW state dict. The
    scheduled lr continues; every other option is this run's."""
    from coupled_ds.ds_checkpoint import _base_load

    model, adamw = _adamw_after_steps(one_group=False)
    opt = _coupled(model, vocab_size=H.REAL_VOCAB)
    options = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
    _base_load(opt, opt.load_state_dict, adamw.state_dict())
    assert [{k: v for k, v in g.items() if k not in ("params", "lr")}
            for g in opt.param_groups] == options
    assert [g["lr"] for g in opt.param_groups] == [SCHEDULED_LR] * 3
    for p, state in adamw.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], state[key]), key
        assert opt.state[p]["step"] is not state["step"]
    model(*H.micro_batch(2, 0, 0)).backward()
    opt.step()  # no KeyError: 'coupled'


def test_base_load_refuses_other_groups_and_changed_settings():
    from coupled_ds.ds_checkpoint import CheckpointMismatchError, _base_load

    model, adamw = _adamw_after_steps(one_group=True)
    opt = _coupled(model)
    with pytest.raises(CheckpointMismatchError) as info:
        _base_load(opt, opt.load_state_dict, adamw.state_dict())
    for word in ("plain Adam/AdamW", "1 param group(s)", "3 param group(s)",
                 "coupled ['tok.weight']",
                 "load_optimizer_states=False", "load_universal"):
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
    saved = _coupled(model, vocab_size=H.REAL_VOCAB).state_dict()
    for changed, words in ((dict(vocab_size=H.V), ["optimizer.params.vocab_size=37",
                                                   "vocab_size=33"]),
                           (dict(embedding_weight_decay=0.05),
                            ["optimizer.params.embedding_weight_decay=0.05", "weight_decay=0.0"])):
        opt = _coupled(model, **{"vocab_size": H.REAL_VOCAB, **changed})
        with pytest.raises(CheckpointMismatchError) as info:
            _base_load(opt, opt.load_state_dict, saved)
        for word in words:
            assert word in str(info.value), f"{word!r} missing from: {info.value}"
