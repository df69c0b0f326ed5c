"""DeepSpeed pipeline parallelism (``deepspeed.pipe.PipelineModule``) with CoupledAdam.

Stages hold different parameters: the first the token embedding, the middle ones none, the last
the tied head (a copy of the embedding whose gradient DeepSpeed all-reduces with the first
stage's) or an untied output projection. Each pipeline trains 8 steps of 2 micro-batches under
ZeRO 1 (and 0) and must equal single-process CoupledAdam on the same whole model. A hang (stages
entering different collectives) becomes a failure through ``run_on_ranks``' timeout.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from coupled_ds import CoupledAdam, coupled_param_groups  # noqa: E402
from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

STEPS, GAS = 8, 2
pytestmark = pytest.mark.slow


def _init_(tensor: torch.Tensor, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)


class Embed(nn.Embedding):
    """The token embedding [V, H]; on the last stage, its tied copy is the output layer."""

    def __init__(self, seed: int) -> None:
        super().__init__(H.V, H.H)
        _init_(self.weight, seed, 0.5)


def tied_head(embed: Embed, x: torch.Tensor) -> torch.Tensor:
    return x @ embed.weight.t()


class Block(nn.Module):
    """One decayed matrix and undecayed bias / norm parameters."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.lin = nn.Linear(H.H, H.H)
        self.norm = nn.LayerNorm(H.H)
        for index, p in enumerate((self.lin.weight, self.lin.bias, self.norm.bias)):
            _init_(p, seed * 10 + index, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.tanh(self.lin(x)))


class Head(nn.Module):
    """An untied output projection [V, H]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.out = nn.Linear(H.H, H.V, bias=False)
        _init_(self.out.weight, seed, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, H.V), targets.reshape(-1))


def _layers(blocks: int, tied: bool) -> list[nn.Module]:
    """The whole model as a list of (seeded) layers, for the single-process reference."""
    embed = Embed(1)
    layers = [embed, *[Block(10 + i) for i in range(blocks)]]
    if tied:
        layers.append(lambda x: tied_head(embed, x))
    else:
        layers.append(Head(2))
    return layers


def _specs(blocks: int, tied: bool) -> list[Any]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    specs = [TiedLayerSpec("embed", Embed, 1, tied_weight_attr="weight") if tied
             else LayerSpec(Embed, 1)]
    specs += [LayerSpec(Block, 10 + i) for i in range(blocks)]
    specs.append(TiedLayerSpec("embed", Embed, 1, forward_fn=tied_head, tied_weight_attr="weight")
                 if tied else LayerSpec(Head, 2))
    return specs


def _key(index: int, blocks: int, name: str) -> str:
    """Reference name of a pipeline parameter (``index``: layer in the spec list, -1 tied)."""
    if index in (-1, 0):  # the tied module, or the untied embedding
        return "embed.weight"
    if index == blocks + 1:
        return "head.out.weight"
    return f"block{index - 1}.{name}"


def reference(blocks: int, tied: bool, dp: int, vocab_size: int | None = None,
              clip: float = 0.0) -> dict[str, torch.Tensor]:
    """Single-process CoupledAdam on the whole model, the mean loss over every micro-batch."""
    layers = _layers(blocks, tied)
    model = nn.Module()
    model.embed = layers[0]
    for i in range(blocks):
        setattr(model, f"block{i}", layers[1 + i])
    if not tied:
        model.head = layers[-1]
    opt = CoupledAdam(coupled_param_groups(model, weight_decay=H.HP["weight_decay"],
                                           embedding_weight_decay=0.0, vocab_size=vocab_size),
                      lr=H.HP["lr"], betas=H.HP["betas"], eps=H.HP["eps"])
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        losses = []
        for micro in range(GAS):
            for rank in range(dp):
                ids, targets = H.micro_batch(step, micro, rank)
                x = ids
                for layer in layers:
                    x = layer(x)
                losses.append(loss_fn(x, targets))
        (sum(losses) / len(losses)).backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _pipeline_job(rank: int, job: dict[str, Any]) -> dict[str, Any]:
    import deepspeed
    from deepspeed.pipe import PipelineModule

    import coupled_ds.deepspeed  # noqa: F401

    blocks, stages, dp = job["blocks"], job["stages"], job["dp"]
    module = PipelineModule(layers=_specs(blocks, job["tied"]), num_stages=stages,
                            loss_fn=loss_fn, partition_method=job.get("partition", "type:Block"))
    cfg = H.ds_config(job["zero"], world=dp, gas=GAS, clip=job.get("clip", 0.0),
                      **job.get("params", {}))
    if job.get("callable"):  # the user's own groups per stage, as the README says
        hp = cfg.pop("optimizer")["params"]

        def build(params):
            groups = coupled_param_groups(module, weight_decay=hp["weight_decay"],
                                          allow_no_embedding=True)
            return CoupledAdam(groups, lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"])

        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                          optimizer=build, config=cfg)
    else:
        engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                          config=cfg)
    if job.get("no_reduce"):
        H.drop_reduction(engine)
    dp_rank = engine.grid.data_parallel_id
    for step in range(STEPS):
        batches = iter([H.micro_batch(step, micro, dp_rank) for micro in range(GAS)])
        engine.train_batch(data_iter=batches)
    out: dict[str, torch.Tensor] = {}
    if dp_rank == 0:
        for name, p in module.named_parameters():
            layer, rest = name.split(".", 1)
            out[_key(-1 if layer == "tied_modules" else int(layer), blocks, rest)] = \
                p.detach().clone()
    norm = engine.get_global_grad_norm()
    groups = len(engine.basic_optimizer.param_groups)
    coupled = sum(bool(g["coupled"]) for g in engine.basic_optimizer.param_groups)
    engine.destroy()
    return {"params": out, "groups": groups, "coupled": coupled, "stage": engine.stage_id,
            "norm": None if norm is None else float(norm)}


def _run(rank: int, world: int, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    import deepspeed

    deepspeed.init_distributed("gloo")  # PipelineModule asks deepspeed.comm for the rank
    out = {}
    for job in jobs:
        if job.get("expect_error"):
            try:
                _pipeline_job(rank, job)
                out[job["label"]] = ("no error", "")
            except Exception as err:  # noqa: BLE001 - the test inspects the type
                out[job["label"]] = (type(err).__name__, str(err))
        else:
            out[job["label"]] = _pipeline_job(rank, job)
    return out


def _job(label: str, *, stages: int, dp: int = 1, blocks: int | None = None, tied: bool = True,
         zero: int = 1, **extra: Any) -> dict[str, Any]:
    return dict(label=label, stages=stages, dp=dp, blocks=blocks or stages, tied=tied, zero=zero,
                **extra)


def _check(by_rank: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        label = job["label"]
        if job.get("expect_error"):  # every stage raises the same error, none hangs
            for out in by_rank:
                kind, message = out[label]
                assert kind == "NoEmbeddingFoundError", (label, kind, message)
                assert "no stage holds" in message and "coupled_params" in message, message
            continue
        got: dict[str, torch.Tensor] = {}
        for out in by_rank:
            for name, tensor in out[label]["params"].items():
                if name in got:  # the tied copy on the last stage must equal the first's
                    assert torch.equal(got[name], tensor), f"{label}: copies of {name} differ"
                got[name] = tensor
        vocab = job.get("params", {}).get("vocab_size")
        want = reference(job["blocks"], job["tied"], job["dp"], vocab, job.get("clip", 0.0))
        if job.get("clip"):
            unclipped = reference(job["blocks"], job["tied"], job["dp"], vocab)
            assert H.max_rel_diff(want, unclipped) > 1e-3, f"{label}: clipping never bit"
        norms = {out[label]["norm"] for out in by_rank}
        assert len(norms) == 1, f"{label}: stages computed different gradient norms {norms}"
        assert sorted(got) == sorted(want), (label, sorted(got), sorted(want))
        diff = H.max_rel_diff(got, want)
        layout = [(o[label]["stage"], o[label]["groups"], o[label]["coupled"]) for o in by_rank]
        print(f"{label}: (stage, param groups, coupled) {layout}; gradient norm {norms}; max "
              f"relative difference {diff:.2e}")
        if job.get("no_reduce"):
            assert diff > 1e-3, f"{label}: the negative control matched ({diff:.2e})"
        else:
            assert diff <= 1e-6, f"{label}: max relative difference {diff:.2e}"


def test_three_stage_pipelines():
    """3 stages, 1 rank each: embedding / no embedding / tied head, ZeRO 1 and 0, a padded
    vocabulary, and stages that hold only the embedding or only the head."""
    jobs = [_job("pp3-zero1-tied", stages=3),
            # [embedding] / [block] / [tied head]: 1, 2 and 1 param groups
            _job("pp3-zero1-embedding-alone", stages=3, blocks=1, partition="uniform"),
            _job("pp3-zero1-embedding-alone-callable", stages=3, blocks=1, partition="uniform",
                 callable=True),
            # the clipping norm sums every stage's groups (and counts the tied copy once)
            _job("pp3-zero1-embedding-alone-clip", stages=3, blocks=1, partition="uniform",
                 clip=0.05),
            _job("pp3-zero0-tied", stages=3, zero=0),
            _job("pp3-zero1-tied-vocab", stages=3, params={"vocab_size": H.REAL_VOCAB}),
            _job("pp3-nothing-coupled", stages=3, params={"coupled_params": ["no_such_name"]},
                 expect_error=True)]
    _check(run_on_ranks(3, _run, jobs, env=H.DS_ENV, timeout=240), jobs)


def test_four_rank_pipelines():
    """4 stages with an untied head found on the last stage without coupled_params, and 2 stages
    x 2 data-parallel ranks (the embedding's ZeRO slices cut mid-row), with its negative control
    (the column sums not reduced across data-parallel ranks)."""
    jobs = [_job("pp4-zero1-untied", stages=4, tied=False),
            _job("pp4-zero1-tied", stages=4),
            _job("pp2xdp2-zero1-tied", stages=2, dp=2),
            _job("pp2xdp2-zero1-no-reduce", stages=2, dp=2, no_reduce=True)]
    _check(run_on_ranks(4, _run, jobs, env=H.DS_ENV, timeout=300), jobs)
