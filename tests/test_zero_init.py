"""ZeRO-3 with a model built under ``deepspeed.zero.Init`` (partitioned before
``deepspeed.initialize``, as Hugging Face ``from_pretrained`` / ``from_config`` do under ZeRO-3):
``"type": "CoupledAdam"`` finds the coupled matrices from DeepSpeed's metadata without gathering
and trains exactly like single-process CoupledAdam, tied and untied, with offload and sub-groups,
on 2 and 3 gloo ranks; a negative control without the cross-rank reduction fails.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

STEPS = 12


def make_untied(dtype: torch.dtype = torch.float32) -> H.TinyLM:
    """TinyLM with an output layer of its own (same initial values as a tied one's copy)."""
    torch.manual_seed(0)
    model = H.TinyLM()
    model.head = nn.Linear(H.H, H.V, bias=False)
    return model.to(dtype)


def setup_message(stderr: str) -> list[str]:
    """The lines of coupled_ds's setup message in a process's stderr (empty if none)."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("[coupled_ds] ")]
    if not starts:
        return []
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def _job(label: str, *, untied: bool = False, offload: bool = False, sub_group: bool = False,
         no_reduce: bool = False, **params: Any) -> dict[str, Any]:
    return dict(label=label, untied=untied, offload=offload, sub_group=sub_group,
                no_reduce=no_reduce, params=params)


def _run(rank: int, world: int, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    deepspeed.init_distributed("gloo")  # zero.Init reads the world size from deepspeed.comm
    out: dict[Any, Any] = {}
    for job in jobs:
        cfg = H.ds_config(3, world=world, offload=job["offload"], **job["params"])
        if job["sub_group"]:  # the other parameters split into several sub-groups
            cfg["zero_optimization"]["sub_group_size"] = 10
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = make_untied() if job["untied"] else H.make_model()
        assert all(hasattr(p, "ds_id") for p in model.parameters()), "zero.Init did not partition"
        assert model.tok.weight.numel() == 0, "zero.Init left the embedding whole"
        with contextlib.redirect_stderr(io.StringIO()) as err:
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=cfg)
        out["setup", job["label"]] = setup_message(err.getvalue())
        if job["no_reduce"]:
            H.drop_reduction(engine)
        H.train(engine, rank, 0, STEPS)
        out[job["label"]] = H.full_params(engine)
        geometries = engine.basic_optimizer._geometry.items()
        out["pieces", job["label"]] = sorted((g.key, g.start_global_flat, g.numel)
                                             for _, g in geometries)
        to_group = engine.optimizer.sub_group_to_group_id
        out["split", job["label"]] = len(to_group) > len(set(to_group.values()))
        engine.destroy()
    if world == 2:  # a partitioned model under ZeRO stage 2 is refused, naming the stage
        cfg = H.ds_config(2, world=world)
        with deepspeed.zero.Init(config_dict_or_path=H.ds_config(3, world=world)):
            model = H.make_model()
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
            out["stage2"] = "no error"
        except ValueError as err:
            out["stage2"] = str(err)
    return out


def _jobs(world: int) -> list[dict[str, Any]]:
    if world == 3:
        return [_job("tied"), _job("untied-offload", untied=True, offload=True)]
    return [_job("tied"), _job("tied-offload-subgroups", offload=True, sub_group=True),
            _job("untied", untied=True), _job("untied-subgroups", untied=True, sub_group=True),
            _job("tied-vocab", vocab_size=H.REAL_VOCAB),
            _job("untied-regex", untied=True, coupled_params=[r"^tok\.", r"^head\."]),
            _job("tied-no-reduce", no_reduce=True)]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_zero_init_matches_single_process(world):
    jobs = _jobs(world)
    by_rank = run_on_ranks(world, _run, jobs, env=H.DS_ENV, timeout=420)
    got = by_rank[0]
    for job in jobs:  # the partitions cut the [37, 8] matrices mid-row and cover them once
        pieces = sorted(p for out in by_rank for p in out["pieces", job["label"]])
        keys = sorted({key for key, _, _ in pieces})
        assert keys == (["head.weight", "tok.weight"] if job["untied"] else ["tok.weight"]), keys
        for key in keys:
            mine = [(start, n) for k, start, n in pieces if k == key and n]
            assert [s + n for s, n in mine[:-1]] == [s for s, _ in mine[1:]], mine
            assert mine[0][0] == 0 and sum(n for _, n in mine) == H.V * H.H, mine
            assert any(start % H.H for start, _ in mine[1:]), f"{key}: no mid-row cut"
        if job["sub_group"]:
            assert got["split", job["label"]], "sub_group_size did not split a param group"
    if world == 2:
        assert "zero_optimization.stage=2" in got["stage2"], got["stage2"]
    # rank 0 says what was coupled, without any logging set-up; the other ranks stay quiet
    setup = got["setup", "untied" if world == 2 else "untied-offload"]
    print("\n".join(setup))
    assert setup[0].startswith("[coupled_ds] CoupledAdam under DeepSpeed ZeRO stage 3"), setup
    for words in (["tok.weight [37, 8], column mean over 37 of 37 rows",
                   f"data-parallel size {world}"], ["head.weight [37, 8]"]):
        assert any(all(w in line for w in words) for line in setup[1:]), (words, setup)
    assert world == 2 or "offloaded to CPU" in setup[0], setup
    assert world == 3 or "over 33 of 37 rows" in "".join(got["setup", "tied-vocab"])
    assert all(not out["setup", job["label"]] for out in by_rank[1:] for job in jobs)
    for job in jobs:
        label = job["label"]
        make = make_untied if job["untied"] else H.make_model
        want = H.reference(STEPS, world, make=make, vocab_size=job["params"].get("vocab_size"))
        diff = H.max_rel_diff(got[label], want)
        print(f"zero.Init {world} ranks {label}: max relative difference {diff:.2e}")
        if job["no_reduce"]:
            assert diff > 1e-3, f"{label}: the negative control matched ({diff:.2e})"
        else:
            assert diff <= 1e-6, f"{label}: max relative difference {diff:.2e}"


def _as_partitioned(model: nn.Module) -> nn.Module:
    """What zero.Init leaves on a rank, without a process group: empty data, ``ds_shape``."""
    for p in model.parameters():
        p.ds_shape, p.ds_id = p.shape, id(p)
        p.data = torch.empty(0)
    return model


def test_partitioned_parameters_found_by_ds_shape():
    """Detection, decay groups and the vocab_size check read the full shape, not the empty data."""
    from coupled_ds.deepspeed import build_optimizer

    for make, coupled in ((H.make_model, ["tok.weight"]),
                          (make_untied, ["tok.weight", "head.weight"])):
        model = _as_partitioned(make())
        opt = build_optimizer(model, model.parameters(), {"weight_decay": 0.1})
        groups = {tuple(g["coupled_names"] or ()): g for g in opt.param_groups}
        assert [n for names in groups for n in names] == coupled
        decayed = [g for g in opt.param_groups if not g["coupled"] and g["weight_decay"] == 0.1]
        assert [p.ds_shape for g in decayed for p in g["params"]] == [(H.H, H.H)]
        for name in coupled:  # a numel=0 placeholder until the ZeRO-3 adapter attaches
            geometry = opt.geometry_of(groups[(name,)]["params"][0])
            assert (geometry.rows_global, geometry.cols, geometry.numel) == (H.V, H.H, 0)
    model = _as_partitioned(H.make_model())
    with pytest.raises(ValueError, match="vocab_size=40 is larger than its 37 rows"):
        build_optimizer(model, model.parameters(), {"vocab_size": 40})


@pytest.mark.parametrize("params, words", [
    ({"lr": 1e-3, "betas": "auto"}, ["optimizer.params.betas='auto'", "Accelerate only"]),
    ({"lr": "auto", "vocab_size": "auto"}, ["optimizer.params.lr='auto', optimizer.params."
                                            "vocab_size='auto'", "['vocab_size'] cannot be"]),
    ({"compact_coupled_state": "false"}, ["compact_coupled_state='false' (str)", "JSON boolean"]),
])
def test_unfilled_auto_and_non_boolean_compact_are_refused(params, words):
    from coupled_ds.deepspeed import build_optimizer

    model = H.make_model()
    with pytest.raises(ValueError) as err:
        build_optimizer(model, model.parameters(), params)
    for word in words:
        assert word in str(err.value), str(err.value)
