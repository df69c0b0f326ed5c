"""A tiny GPT (nanoGPT layout) for the demo and the launch tests.

Token embedding ``wte`` [V, H] is tied to the output projection ``lm_head``, as in the paper, so
Coupled Adam couples one matrix. The positional embedding ``wpe`` is not a vocabulary matrix and
is left to plain AdamW. No dropout: runs are bit-reproducible on CPU, which the resume test needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab_size: int = 4096
    """Rows of the tied embedding / output matrix."""
    seq_len: int = 128
    """Context length (rows of ``wpe``)."""
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    """Hidden size H."""


class _Block(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc_out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x_BTH: torch.Tensor) -> torch.Tensor:
        B, T, H = x_BTH.shape
        q, k, v = self.qkv(self.ln_1(x_BTH)).split(H, dim=2)
        q, k, v = (t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_BTH = x_BTH + self.proj(att.transpose(1, 2).reshape(B, T, H))
        return x_BTH + self.fc_out(F.gelu(self.fc(self.ln_2(x_BTH))))


class GPT(nn.Module):
    """Decoder-only transformer with tied input / output embedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}.")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("proj.weight", "fc_out.weight")):
                # GPT-2: residual projections scaled by depth.
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V], or the mean cross-entropy when ``targets_BT`` is given."""
        T = idx_BT.shape[1]
        x = self.wte(idx_BT) + self.wpe(torch.arange(T, device=idx_BT.device))
        for block in self.blocks:
            x = block(x)
        logits_BTV = self.lm_head(self.ln_f(x))
        if targets_BT is None:
            return logits_BTV
        return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten())
