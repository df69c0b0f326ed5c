"""Plain PyTorch, one process: AdamW vs CoupledAdam on a tiny tied-embedding language model.

    python examples/compare_adam.py [--steps 300]

Tokens follow a Zipf law (like words), so rare tokens mostly receive the negative softmax
gradient; with AdamW their per-element second moments are small and the mean embedding drifts
(anisotropy). CoupledAdam shares one second moment per hidden column and keeps it in place.
Prints ||mu||^r = ||mean_i e_i|| / mean_i ||e_i|| for both.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from coupled_ds import CoupledAdam, coupled_param_groups


class TinyLM(nn.Module):
    """Embedding -> MLP -> tied output: predicts token t+1 from tokens t-1 and t."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Sequential(nn.Linear(2 * d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.LayerNorm(d))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in the paper
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2 initialisation

    def forward(self, prev2: torch.Tensor) -> torch.Tensor:  # prev2: [B, 2] -> logits [B, V]
        return self.lm_head(self.mix(self.wte(prev2).flatten(1)))


def zipf_stream(vocab: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """A token stream with Zipfian unigram frequencies and a little bigram structure."""
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    tokens = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    tokens[1::2] = (tokens[0::2][: len(tokens[1::2])] * 7 + 3) % vocab  # learnable pairs
    return tokens


def mu_rel(E: torch.Tensor) -> float:
    """||mean_i e_i|| / mean_i ||e_i||, the paper's anisotropy measure."""
    return (E.mean(0).norm() / E.norm(dim=1).mean()).item()


def train(optimizer_name: str, steps: int, vocab: int = 2048, d: int = 64) -> tuple[float, float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = zipf_stream(vocab, 200_000, gen)
    model = TinyLM(vocab, d)
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    groups = coupled_param_groups(model, weight_decay=0.1, embedding_weight_decay=0.0)
    if optimizer_name == "AdamW":
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("coupled", "coupled_names", "vocab_size")}
                                 for g in groups], **hp)
    else:
        opt = CoupledAdam(groups, **hp)
    for _ in range(steps):
        idx = torch.randint(2, len(data), (256,), generator=gen)
        x = torch.stack([data[idx - 2], data[idx - 1]], 1)
        loss = F.cross_entropy(model(x), data[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item(), mu_rel(model.wte.weight.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    print(f"{'optimizer':<12}{'loss':>8}{'||mu||^r':>12}")
    results = {}
    for name in ("AdamW", "CoupledAdam"):
        loss, rel = train(name, args.steps)
        results[name] = rel
        print(f"{name:<12}{loss:>8.3f}{rel:>12.4f}")
    print(f"CoupledAdam's ||mu||^r is {results['AdamW'] / results['CoupledAdam']:.0f}x smaller.")


if __name__ == "__main__":
    main()
