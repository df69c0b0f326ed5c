"""DeepSpeed MoE (``deepspeed.moe.layer.MoE``): DeepSpeed hands the optimizer dense and expert
param groups; CoupledAdam keeps them apart (expert groups stay ``moe`` groups for ZeRO) and gives
them the same decay / no-decay split as without MoE: matrices ``weight_decay``, biases, norms and
expert biases 0, the embedding its own coupled group."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from coupled_ds import CoupledAdam, coupled_param_groups  # noqa: E402
from coupled_ds.deepspeed import build_optimizer  # noqa: E402
from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

STEPS = 4


class MoELM(nn.Module):
    """Tied embedding, one MoE layer of two experts (Linear + LayerNorm), a final norm."""

    def __init__(self) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(H.V, H.H)
        expert = nn.Sequential(nn.Linear(H.H, H.H), nn.LayerNorm(H.H))
        self.moe = MoE(hidden_size=H.H, expert=expert, num_experts=2, ep_size=1, k=1,
                       min_capacity=H.B * H.T)  # no token dropped
        self.norm = nn.LayerNorm(H.H)
        self.head = nn.Linear(H.H, H.V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        y, aux, _ = self.moe(x)
        logits = self.head(self.norm(x + y))
        return F.cross_entropy(logits.reshape(-1, H.V), targets.reshape(-1)) + 0.01 * aux


def _expected_decay(name: str, p: torch.Tensor) -> float:
    return 0.0 if name == "tok.weight" or p.dim() < 2 else H.HP["weight_decay"]


def test_moe_groups_split_decay_and_keep_experts_apart():
    from deepspeed.moe.utils import configure_moe_param_groups, is_moe_param

    model = MoELM()
    given = configure_moe_param_groups(list(model.parameters()))  # what the engine passes on
    opt = build_optimizer(model, given, dict(H.HP, betas=list(H.HP["betas"])))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            seen.append(name)
            assert group["weight_decay"] == _expected_decay(name, p), (name, group["weight_decay"])
            assert bool(group.get("moe")) == is_moe_param(p), f"{name}: moe {group.get('moe')}"
            assert group["coupled"] == (name == "tok.weight"), name
    assert sorted(seen) == sorted(names.values())
    assert any(".bias" in n and "experts" in n for n in seen)


def _train_moe(rank: int, world: int) -> dict[str, torch.Tensor]:
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    model = MoELM()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=H.ds_config(2, world=world))
    moe_groups = [g for g in engine.basic_optimizer.param_groups if g.get("moe")]
    assert moe_groups and all(g["weight_decay"] in (0.0, H.HP["weight_decay"]) for g in moe_groups)
    H.train(engine, rank, 0, STEPS)
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.slow
def test_moe_trains_like_single_process():
    got = run_on_ranks(1, _train_moe, env=H.DS_ENV, timeout=240)[0]
    model = MoELM()
    opt = CoupledAdam(coupled_param_groups(model, weight_decay=H.HP["weight_decay"]),
                      lr=H.HP["lr"], betas=H.HP["betas"], eps=H.HP["eps"])
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(*H.micro_batch(step, 0, 0)).backward()
        opt.step()
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    diff = H.max_rel_diff(got, want)
    print(f"MoE under ZeRO 2, 1 rank: max relative difference {diff:.2e}")
    assert diff <= 1e-6, f"MoE run differs from single-process CoupledAdam by {diff:.2e}"
