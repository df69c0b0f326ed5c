"""Every bad DeepSpeed config value raises before any step, naming the key, the value and the fix.

Most cases call :func:`coupled_ds.deepspeed.build_optimizer` directly (what the engine calls for
``"type": "CoupledAdam"``; no process group needed); the ones that need the engine run
``deepspeed.initialize`` on one gloo rank.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from coupled_ds import NoEmbeddingFoundError, coupled_param_groups  # noqa: E402
from coupled_ds.deepspeed import build_optimizer  # noqa: E402
from tests import ds_helpers as H  # noqa: E402


def _build(model: torch.nn.Module | None = None, **params):
    model = model or H.make_model()
    hp = dict(H.HP, betas=list(H.HP["betas"]))
    hp.update(params)
    return build_optimizer(model, model.parameters(), hp)


def _raises(words: list[str], kind: type[Exception] = ValueError, **params) -> str:
    with pytest.raises(kind) as info:
        _build(**params)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    return message


@pytest.mark.parametrize("key", ["lr", "eps", "weight_decay", "embedding_weight_decay",
                                 "avg_scale"])
def test_string_number_names_key_value_and_fix(key):
    _raises([f"optimizer.params.{key}='0.1'", "(str)", "a number", "not a string"],
            **{key: "0.1"})


def test_auto_outside_hugging_face_is_explained():
    _raises(["optimizer.params.lr='auto'", "Hugging Face"], lr="auto")


@pytest.mark.parametrize("value", ["50", True, 0, 3.5])
def test_vocab_size_must_be_a_positive_int_not_a_bool(value):
    # True is an int in Python: accepted, the mean would cover row 0 only.
    _raises([f"optimizer.params.vocab_size={value!r}", "positive int", "real vocabulary"],
            vocab_size=value)


@pytest.mark.parametrize("value", [0.9, [0.9], "0.9,0.95", [0.9, 1.5]])
def test_betas_must_be_two_numbers(value):
    _raises([f"optimizer.params.betas={value!r}", "two numbers", "[0.9, 0.95]"], betas=value)


def test_adamw_only_keys_left_from_a_switch_are_explained():
    _raises(["'torch_adam'", "'adam_w_mode'", "Accepted keys", "switching from AdamW"],
            torch_adam=True, adam_w_mode=True)


def test_negative_avg_scale_names_the_key():
    _raises(["optimizer.params.avg_scale=-1.0", "> 0.0"], avg_scale=-1.0)


def test_bad_regex_in_coupled_params_names_the_key_and_escape():
    _raises(["optimizer.params.coupled_params=['lm_head[']", "'lm_head['",
                       "not a valid regular expression", "lm_head\\\\["],
                      coupled_params=["lm_head["])


def test_frozen_tied_embedding_is_reported_as_frozen():
    model = H.make_model()
    model.tok.weight.requires_grad_(False)
    for build in (lambda: coupled_param_groups(model),
                  lambda: _build(model),
                  lambda: coupled_param_groups(model, names=["tok"])):
        with pytest.raises(NoEmbeddingFoundError) as info:
            build()
        message = str(info.value)
        for word in ("tok.weight (37, 8)", "frozen", "requires_grad", "allow_no_embedding"):
            assert word in message, f"{word!r} missing from: {message}"


def test_valid_params_still_build():
    opt = _build(vocab_size=H.REAL_VOCAB, avg_scale=0.5, betas=(0.9, 0.95), lr=1)
    coupled = [g for g in opt.param_groups if g["coupled"]]
    assert [g["vocab_size"] for g in coupled] == [H.REAL_VOCAB]
    assert [g["avg_scale"] for g in coupled] == [0.5]


def _engine_cases(rank: int, world: int, root: str) -> dict[str, tuple[str, str]]:
    """Through deepspeed.initialize on one rank: Megatron's spelling of the name, and a config
    that disagrees with the checkpoint it resumes from."""
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    def engine(**params):
        cfg = H.ds_config(1, world=1)
        cfg["optimizer"]["type"] = params.pop("type", "CoupledAdam")
        cfg["optimizer"]["params"].update(params)
        model = H.make_model()
        return deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                    config=cfg)[0]

    out = {}
    megatron_spelling = engine(type="coupled_adam", vocab_size=H.REAL_VOCAB)
    H.train(megatron_spelling, rank, 0, 2)
    out["coupled_adam"] = (type(megatron_spelling.basic_optimizer).__name__,
                           str(megatron_spelling.basic_optimizer.param_groups[0]["coupled"]))
    megatron_spelling.save_checkpoint(root, tag="t")
    for label, params in {"vocab_size": dict(vocab_size=H.V),
                          "embedding_weight_decay": dict(vocab_size=H.REAL_VOCAB,
                                                         embedding_weight_decay=0.1),
                          "same": dict(vocab_size=H.REAL_VOCAB)}.items():
        resumed = engine(**params)
        try:
            resumed.load_checkpoint(root, tag="t")
            out[label] = ("no error", "")
        except Exception as err:  # noqa: BLE001 - the test inspects the type
            out[label] = (type(err).__name__, str(err))
    return out


@pytest.mark.slow
def test_megatron_spelling_and_checkpoint_disagreement(tmp_path):
    from tests.dist import run_on_ranks

    got = run_on_ranks(1, _engine_cases, str(tmp_path), env=H.DS_ENV, timeout=300)[0]
    assert got["coupled_adam"] == ("CoupledAdam", "True"), got["coupled_adam"]
    assert got["same"] == ("no error", ""), got["same"]
    for key, config, saved in (("vocab_size", H.V, H.REAL_VOCAB),
                               ("embedding_weight_decay", 0.1, 0.0)):
        kind, message = got[key]
        assert kind == "CheckpointMismatchError", (key, kind, message)
        for word in (f"optimizer.params.{key}={config!r}", f"={saved!r}",
                     "load_optimizer_states=False"):
            assert word in message, f"{word!r} missing from: {message}"
