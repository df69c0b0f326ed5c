"""Hugging Face Trainer and Accelerate with ``"type": "CoupledAdam"`` in the DeepSpeed config, on
2 gloo CPU ranks, against single-process CoupledAdam on the same tiny GPT-2 (built and saved by
the test; nothing is downloaded):

* Trainer, ZeRO-2 and ZeRO-3, ``"auto"`` values filled from ``TrainingArguments``; under ZeRO-3
  the model comes from ``from_pretrained`` after ``TrainingArguments``, so ``deepspeed.zero.Init``
  partitions it before the engine sees it; checkpoint + ``resume_from_checkpoint``;
* an Accelerate ZeRO-2 loop with ``DummyOptim`` (Accelerate fills only lr and weight_decay);
* a negative control without the cross-rank reduction.

One spawn of the two ranks runs every job in sequence (importing transformers costs seconds).
The dataset is one global batch (2 ranks x 2 samples), so every step sees all of it whatever the
sampler's shuffling, and the reference is one full batch per step.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")
pytest.importorskip("transformers", reason="transformers is not installed (pip install coupled-ds[test])")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install coupled-ds[test])")

from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402
from tests.test_zero_init import setup_message  # noqa: E402

V, D, SEQ, WORLD, MICRO = 37, 8, 8, 2, 2   # vocabulary, hidden, tokens per sample, ranks, batch
REAL_VOCAB = 33                             # token ids in the data
STEPS, SAVE_AT = 10, 5
LR, BETAS, EPS, WD = 5e-3, (0.9, 0.95), 1e-8, 0.1
pytestmark = pytest.mark.slow


def save_tiny_gpt2(path: str, *, tie: bool = True) -> str:
    """A 1-layer GPT-2 with a [37, 8] vocabulary matrix (ZeRO cuts it mid-row on 2 ranks)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=D, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=tie)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def batch_ids() -> torch.Tensor:
    """The whole dataset: WORLD * MICRO samples of SEQ token ids."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, REAL_VOCAB, (WORLD * MICRO, SEQ), generator=gen)


class _Samples(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = batch_ids()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_config(stage: int) -> dict[str, Any]:
    """What a Trainer user writes: everything Trainer knows is "auto"."""
    return {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "CoupledAdam",
                      "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                 "weight_decay": "auto", "embedding_weight_decay": 0.0}},
    }


def _embedding(engine: Any) -> torch.Tensor:
    import deepspeed

    weight = engine.module.transformer.wte.weight
    with deepspeed.zero.GatheredParameters([weight], enabled=hasattr(weight, "ds_id")):
        return weight.detach().float().clone()


def _trainer_run(model_dir: str, out_dir: str, stage: int, *, resume: str | None = None,
                 no_reduce: bool = False) -> tuple[torch.Tensor, list[str], int]:
    """One Trainer run; returns the final embedding, rank 0's coupled_ds setup message and the
    number of optimizer steps this run took."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    import coupled_ds.deepspeed  # noqa: F401

    args = TrainingArguments(
        output_dir=out_dir, deepspeed=trainer_config(stage), per_device_train_batch_size=MICRO,
        max_steps=STEPS, learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1],
        adam_epsilon=EPS, weight_decay=WD, lr_scheduler_type="constant", max_grad_norm=0.0,
        save_strategy="steps", save_steps=SAVE_AT, save_only_model=False, report_to=[],
        logging_steps=1000, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        accelerator_config={"use_configured_state": True})  # the gloo state of _run
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # after the args: zero.Init under 3
    assert is_deepspeed_zero3_enabled() == (stage == 3)
    assert all(hasattr(p, "ds_id") for p in model.parameters()) == (stage == 3)

    steps = []

    class _Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if no_reduce:
                H.drop_reduction(trainer.model_wrapped)

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer = Trainer(model=model, args=args, train_dataset=_Samples(), callbacks=[_Probe()])
    with contextlib.redirect_stderr(io.StringIO()) as err:
        trainer.train(resume_from_checkpoint=resume)
    embedding = _embedding(trainer.model_wrapped)
    _release(trainer)
    return embedding, setup_message(err.getvalue()), len(steps)


def _accelerate_run(model_dir: str, betas: Any = BETAS) -> torch.Tensor:
    """The loop of Accelerate's DeepSpeed examples, with DummyOptim standing for the config's
    optimizer. Accelerate fills only lr and weight_decay; betas and eps are written out."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DummyOptim, InitProcessGroupKwargs
    from transformers import AutoModelForCausalLM

    import coupled_ds.deepspeed  # noqa: F401

    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "CoupledAdam",
                         "params": {"lr": "auto", "weight_decay": "auto", "betas": betas,
                                    "eps": EPS, "embedding_weight_decay": 0.0}}}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = DummyOptim(model.parameters(), lr=LR, weight_decay=WD)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    ids = batch_ids()[rank * MICRO:(rank + 1) * MICRO]
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    embedding = _embedding(model)
    _release(accelerator)
    return embedding


def _release(owner: Any) -> None:
    """Forget Trainer's / Accelerate's process-wide state before the next job in this process."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    engine = getattr(owner, "model_wrapped", None) or owner.deepspeed_engine_wrapped.engine
    engine.destroy()
    unset_hf_deepspeed_config()
    AcceleratorState._reset_state(reset_partial_state=False)


def _run(rank: int, world: int, root: str, model_dir: str) -> dict[str, Any]:
    import deepspeed

    from accelerate import PartialState

    # CPU only: without a backend, Accelerate's state (which TrainingArguments builds) counts one
    # process and Trainer neither shards the data nor sizes the batch for the world. A state
    # built for DeepSpeed with gloo, reused through use_configured_state, fixes both.
    deepspeed.init_distributed("gloo")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    assert PartialState(backend="gloo").num_processes == world
    out: dict[str, Any] = {}
    for stage in (2, 3):
        out[f"trainer-zero{stage}"], out[f"setup-zero{stage}"], _ = _trainer_run(
            model_dir, os.path.join(root, f"zero{stage}"), stage)
        checkpoint = os.path.join(root, f"zero{stage}", f"checkpoint-{SAVE_AT}")
        label = f"trainer-zero{stage}-resumed"
        out[label], _, out["steps", label] = _trainer_run(
            model_dir, os.path.join(root, f"zero{stage}-resumed"), stage, resume=checkpoint)
    out["trainer-zero2-no-reduce"], _, _ = _trainer_run(model_dir, os.path.join(root, "nr"), 2,
                                                        no_reduce=True)
    try:  # Accelerate does not fill betas
        _accelerate_run(model_dir, betas="auto")
        out["accelerate-betas-auto"] = "no error"
    except ValueError as err:
        out["accelerate-betas-auto"] = str(err)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    out["accelerate-zero2"] = _accelerate_run(model_dir)
    return out


def _reference(model_dir: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from coupled_ds import CoupledAdam, coupled_param_groups

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    opt = CoupledAdam(coupled_param_groups(model, weight_decay=WD, embedding_weight_decay=0.0),
                      lr=LR, betas=BETAS, eps=EPS)
    ids = batch_ids()
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model.transformer.wte.weight.detach().clone()


def test_trainer_and_accelerate_match_single_process(tmp_path: Path):
    model_dir = save_tiny_gpt2(str(tmp_path / "tiny-gpt2"))
    env = {**H.DS_ENV, "MASTER_PORT": str(_free_port())}
    got = run_on_ranks(WORLD, _run, str(tmp_path), model_dir, env=env, timeout=600)[0]
    want = _reference(model_dir)
    labels = ("trainer-zero2", "trainer-zero3", "trainer-zero2-resumed", "trainer-zero3-resumed",
              "trainer-zero2-no-reduce", "accelerate-zero2")
    diffs = {label: H.max_rel_diff({"E": got[label]}, {"E": want}) for label in labels}
    for label, diff in diffs.items():
        print(f"{label}: final embedding vs single-process CoupledAdam {diff:.2e}")
    for label, diff in diffs.items():
        if "no-reduce" in label:
            assert diff > 1e-3, f"{label}: the negative control matched ({diff:.2e})"
        else:
            assert diff <= 1e-5, f"{label}: max relative difference {diff:.2e}"
    # Accelerate refuses it itself (before CoupledAdam is built), naming the key
    assert "optimizer.params.betas" in got["accelerate-betas-auto"], got["accelerate-betas-auto"]
    for stage in (2, 3):  # resumed from the step-5 checkpoint: the same trajectory
        steps = got["steps", f"trainer-zero{stage}-resumed"]
        assert steps == STEPS - SAVE_AT, f"ZeRO-{stage}: the resumed run took {steps} steps"
        diff = H.max_rel_diff({"E": got[f"trainer-zero{stage}-resumed"]},
                              {"E": got[f"trainer-zero{stage}"]})
        print(f"zero{stage} resumed vs straight: {diff:.2e}")
        assert diff <= 1e-6, f"ZeRO-{stage} resume left the trajectory by {diff:.2e}"
    for stage in (2, 3):
        setup = got[f"setup-zero{stage}"]
        print("\n".join(setup))
        assert setup and f"ZeRO stage {stage}" in setup[0], setup
        assert any("transformer.wte.weight [37, 8], column mean over 37 of 37 rows" in line
                   for line in setup[1:]), setup


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
