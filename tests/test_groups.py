"""Finding embedding matrices and building CoupledAdam's param groups."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from coupled_ds import CoupledAdam, NoEmbeddingFoundError, coupled_param_groups, find_coupled_parameters


class TinyGPT(nn.Module):
    def __init__(self, vocab=50, block=16, d=8, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.ln = nn.LayerNorm(d)
        self.mlp = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


def _names(model, **kw):
    return [n for n, _ in find_coupled_parameters(model, **kw)]


def test_tied_embedding_is_found_once_and_positional_is_not_coupled():
    assert _names(TinyGPT(tied=True)) == ["wte.weight"]


def test_untied_output_projection_is_coupled_too():
    assert _names(TinyGPT(tied=False)) == ["wte.weight", "lm_head.weight"]


def test_positional_table_longer_than_vocab_is_still_not_coupled():
    model = TinyGPT(vocab=10, block=64)
    assert _names(model) == ["wte.weight"]


def test_megatron_attribute_is_honoured():
    model = nn.Module()
    model.word = nn.Parameter(torch.randn(12, 4))
    model.other = nn.Parameter(torch.randn(4, 4))
    model.word.is_embedding_or_output_parameter = True
    assert _names(model) == ["word"]


def test_names_override_detection():
    assert _names(TinyGPT(tied=False), names=[r"^lm_head\."]) == ["lm_head.weight"]


def test_groups_split_coupled_decay_and_no_decay(caplog):
    model = TinyGPT(tied=False)
    with caplog.at_level(logging.INFO, logger="coupled_ds.groups"):
        groups = coupled_param_groups(model, weight_decay=0.1, vocab_size=45)
    coupled = [g for g in groups if g.get("coupled")]
    assert [g["coupled_names"] for g in coupled] == [["wte.weight"], ["lm_head.weight"]]
    assert all(g["weight_decay"] == 0.0 and g["vocab_size"] == 45 for g in coupled)
    decay = [g for g in groups if not g.get("coupled") and g["weight_decay"] == 0.1]
    no_decay = [g for g in groups if not g.get("coupled") and g["weight_decay"] == 0.0]
    assert {p.shape for p in decay[0]["params"]} == {(16, 8), (8, 8)}  # wpe and mlp.weight
    assert all(p.dim() == 1 for p in no_decay[0]["params"])
    seen = [p for g in groups for p in g["params"]]
    assert len(seen) == len(list(model.parameters()))
    assert "wte.weight (50, 8)" in caplog.text and "lm_head.weight (50, 8)" in caplog.text
    CoupledAdam(groups)  # the optimizer accepts them as they are


def test_no_embedding_is_an_error_unless_allowed():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(NoEmbeddingFoundError, match="names=\\[regex"):
        coupled_param_groups(model)
    with pytest.raises(NoEmbeddingFoundError, match=r"names=\['nope'\] matched no parameter"):
        coupled_param_groups(model, names=["nope"])
    groups = coupled_param_groups(model, allow_no_embedding=True)
    assert not any(g.get("coupled") for g in groups)


def test_selected_parameter_must_be_2d():
    with pytest.raises(ValueError, match="'ln.weight' has shape \\(8,\\)"):
        coupled_param_groups(TinyGPT(), names=[r"^ln\.weight"])


def test_vocab_size_beyond_rows_is_an_error():
    with pytest.raises(ValueError, match="vocab_size=60 is larger than its 50 rows"):
        coupled_param_groups(TinyGPT(), vocab_size=60)
