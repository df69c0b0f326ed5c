"""Telemetry under a real DeepSpeed engine on 2 CPU ranks (gloo): ZeRO 2 logs through the
engine's csv_monitor and a JSONL file and saves the checkpoint that tests/test_report.py reads;
ZeRO 3 computes the metrics from each rank's mid-row ds_tensor slice and must match the gathered
whole matrix.

    python -m tests.test_telemetry      # measures the overhead at every=100 (not a test)
"""

from __future__ import annotations

import atexit
import csv
import json
import os
import shutil
import socket
import tempfile
import time

import pytest
import torch
from torch import nn

from coupled_ds.metrics import embedding_metrics, log_frequencies, save_token_counts
from coupled_ds.telemetry import EmbeddingSource, EmbeddingTelemetry
from tests.dist import run_on_ranks

V, H, T, BATCH, STEPS, EVERY = 53, 8, 8, 4, 6, 2
METRICS = ["iso", "mu_norm", "mu_norm_rel", "kappa", "rho", "mean_cosine"]
TAG = "embedding/wte.weight/{}"


class TinyGPT(nn.Module):
    """Embedding (tied to the output), learned positions, one MLP block, final norm."""

    def __init__(self, vocab: int = V, hidden: int = H, ctx: int = T, layers: int = 1) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(ctx, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                          nn.Linear(4 * hidden, hidden)) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = x + block(x)
        logits = self.lm_head(self.ln_f(x))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           tokens[:, 1:].reshape(-1))


def zipf_tokens(n: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    """Token ids with a Zipf-like frequency profile (so rho has something to correlate)."""
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    probs[-3:] = 0.0  # a few tokens never seen
    return torch.multinomial(probs, n, replacement=True,
                             generator=torch.Generator().manual_seed(seed))


def _config(stage: int, root: str) -> dict:
    return {
        "train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // 2,
        "gradient_clipping": 0.0, "steps_per_print": 10**9,
        # torch_adam: torch's AdamW; without it DeepSpeed JIT-compiles its FusedAdam C++ op.
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "betas": [0.9, 0.95],
                                                  "weight_decay": 0.0, "torch_adam": True}},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "csv_monitor": {"enabled": True, "output_path": os.path.join(root, "csv"),
                        "job_name": f"zero{stage}"},
    }


def _train(rank, world, root):
    """ZeRO 2 run with telemetry + checkpoint, then a ZeRO 3 run: sharded vs gathered."""
    import deepspeed

    tokens = zipf_tokens(STEPS * BATCH * T).view(STEPS, BATCH, T)
    counts = torch.bincount(tokens.flatten(), minlength=V)
    if rank == 0:
        save_token_counts(os.path.join(root, "counts.npy"), counts)
    log_f = log_frequencies(counts)
    out = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        engine, *_ = deepspeed.initialize(model=TinyGPT(), config=_config(stage, root))
        telemetry = EmbeddingTelemetry.for_deepspeed(
            engine, every=EVERY, jsonl_path=os.path.join(root, f"zero{stage}.jsonl"),
            log_freq_V=log_f)
        logged = {}
        for step in range(STEPS):
            micro = tokens[step, rank * BATCH // 2 : (rank + 1) * BATCH // 2]
            engine.backward(engine(micro))
            engine.step()
            results = telemetry.after_step(engine.global_steps)
            if results is not None:
                with deepspeed.zero.GatheredParameters([engine.module.wte.weight],
                                                       enabled=stage == 3):
                    whole = embedding_metrics(engine.module.wte.weight.detach().clone(),
                                              log_freq_V=log_f)
                logged[engine.global_steps] = ({k: m.as_dict() for k, m in results.items()},
                                               whole.as_dict())
        out[stage] = {"logged": logged, "sources": [s.name for s in telemetry.sources],
                      "geometry": [(s.geometry.start_global_flat, s.geometry.numel)
                                   if s.geometry else None for s in telemetry.sources]}
        if stage == 2:
            engine.save_checkpoint(os.path.join(root, "ckpt_zero2"))
        del engine
    return out


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_RUN: dict = {}


def deepspeed_run() -> tuple[str, list]:
    """Run :func:`_train` once per test session; (root dir, results by rank)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    if "run" not in _RUN:
        root = tempfile.mkdtemp(prefix="coupled_ds_telemetry_")
        atexit.register(shutil.rmtree, root, True)
        env = {"DS_ACCELERATOR": "cpu", "MASTER_PORT": _free_port()}
        _RUN["run"] = (root, run_on_ranks(2, _train, root, env=env, timeout=240))
    return _RUN["run"]


def _assert_close(got: dict, want: dict, rel: float) -> None:
    for k in METRICS:
        if want[k] is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(want[k], rel=rel, abs=1e-9), k


@pytest.mark.slow
def test_zero2_logs_through_monitor_and_jsonl():
    root, results = deepspeed_run()
    r0 = results[0][2]
    steps = list(range(EVERY, STEPS + 1, EVERY))
    assert r0["sources"] == ["wte.weight"] and r0["geometry"] == [None]
    assert sorted(r0["logged"]) == steps
    assert results[1][2]["logged"] == {}, "ZeRO 2: only rank 0 computes (full weights)"
    records = [json.loads(line) for line in open(os.path.join(root, "zero2.jsonl"))]
    assert [r["step"] for r in records] == steps
    for record in records:
        computed, whole = r0["logged"][record["step"]]
        _assert_close(record, whole, 1e-12)
        _assert_close(computed["wte.weight"], whole, 1e-12)
    for metric in METRICS:
        path = os.path.join(root, "csv", "zero2", TAG.format(metric).replace("/", "_") + ".csv")
        rows = list(csv.reader(open(path)))
        assert rows[0] == ["step", metric]
        assert [int(s) for s, _ in rows[1:]] == steps
        for (_, value), record in zip(rows[1:], records):
            assert float(value) == pytest.approx(record[metric], rel=1e-12)
    first, last = records[0], records[-1]
    assert first["mu_norm"] != last["mu_norm"], "the series must follow training"
    assert -1.0 <= last["rho"] <= 1.0


@pytest.mark.slow
def test_zero3_sharded_slices_match_gathered_matrix():
    _, results = deepspeed_run()
    geoms = [results[r][3]["geometry"][0] for r in range(2)]
    assert geoms[0][0] == 0 and geoms[1][0] == geoms[0][1] and sum(g[1] for g in geoms) == V * H
    assert geoms[1][0] % H != 0, "the ZeRO 3 partition must cut a row mid-way"
    for rank in range(2):
        logged = results[rank][3]["logged"]
        assert sorted(logged) == list(range(EVERY, STEPS + 1, EVERY))
        for computed, whole in logged.values():
            _assert_close(computed["wte.weight"], whole, 1e-9)


def test_every_and_sources_validation(tmp_path):
    E = torch.randn(20, 4)
    seen = []
    telemetry = EmbeddingTelemetry([EmbeddingSource("E", lambda: E)], every=3,
                                   jsonl_path=tmp_path / "sub" / "m.jsonl", writers=[seen.extend])
    assert [telemetry.after_step(s) is None for s in range(1, 7)] == [True, True, False] * 2
    assert [e[2] for e in seen if e[0] == "embedding/E/iso"] == [3, 6]
    assert "embedding/E/rho" not in {e[0] for e in seen}, "no frequencies: rho is not logged"
    assert len((tmp_path / "sub" / "m.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="every=0"):
        EmbeddingTelemetry([EmbeddingSource("E", lambda: E)], every=0)
    with pytest.raises(ValueError, match="sources is empty"):
        EmbeddingTelemetry([])


def _megatron_tp2(rank, world, root):
    """A VocabParallelEmbedding on TP=2 (rows split 19/19, 3 padding rows): telemetry reduces
    over the tensor-parallel group and matches the gathered matrix."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    torch.manual_seed(0)
    model = nn.Module()
    model.word_embeddings = VocabParallelEmbedding(38, 6, init_method=nn.init.normal_,
                                                   config=config)
    model.word_embeddings.weight.is_embedding_or_output_parameter = True  # as GPTModel sets it
    telemetry = EmbeddingTelemetry.for_megatron(model, every=1, vocab_size=35,
                                                jsonl_path=os.path.join(root, "megatron.jsonl"))
    results = telemetry.after_step(1)
    parts = [torch.empty_like(model.word_embeddings.weight) for _ in range(world)]
    dist.all_gather(parts, model.word_embeddings.weight.detach().contiguous())
    whole = embedding_metrics(torch.cat(parts), vocab_size=35)
    ps.destroy_model_parallel()
    return (results["word_embeddings.weight"].as_dict(), whole.as_dict(), telemetry.is_writer,
            telemetry.sources[0].geometry.start_global_flat)


@pytest.mark.slow
def test_megatron_vocab_parallel_embedding(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    results = run_on_ranks(2, _megatron_tp2, str(tmp_path), timeout=240)
    assert [r[2] for r in results] == [True, False], "tensor-parallel rank 0 writes"
    assert [r[3] for r in results] == [0, 19 * 6]
    for got, whole, _, _ in results:
        _assert_close(got, whole, 1e-9)
    records = [json.loads(line) for line in open(tmp_path / "megatron.jsonl")]
    assert len(records) == 1 and records[0]["name"] == "word_embeddings.weight"


# ----------------------------------------------------------------------------- overhead


def measure_overhead(vocab: int = 4096, hidden: int = 128, layers: int = 2, ctx: int = 128,
                     batch: int = 16, steps: int = 30, every: int = 100) -> dict:
    """Step time of a small GPT-like model vs one telemetry computation, single process.

    Defaults: the shape of the demo run (examples/train_ds.py: V 4096, d 128, 2 layers, 128
    tokens, micro-batch 16). TinyGPT has no attention, so its step is cheaper than the demo's
    and the overhead printed is an upper bound.

    The overhead at ``every`` is (telemetry time / every) / step time.
    """
    torch.manual_seed(0)
    model = TinyGPT(vocab, hidden, ctx, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = zipf_tokens(batch * ctx * (steps + 3), vocab).view(-1, batch, ctx)
    log_f = log_frequencies(torch.bincount(tokens.flatten(), minlength=vocab))
    watch = EmbeddingTelemetry([EmbeddingSource("wte.weight", lambda: model.wte.weight.detach())],
                               every=every, log_freq_V=log_f, is_writer=True)

    def step(i):
        opt.zero_grad(set_to_none=True)
        model(tokens[i]).backward()
        opt.step()

    for i in range(3):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    step_s = (time.perf_counter() - t0) / steps
    watch.compute()
    t0 = time.perf_counter()
    for _ in range(3):
        watch.compute()
    metric_s = (time.perf_counter() - t0) / 3
    return {"step_s": step_s, "metrics_s": metric_s,
            "overhead_pct": 100.0 * metric_s / every / step_s, "every": every,
            "model": f"V={vocab} H={hidden} layers={layers} ctx={ctx} batch={batch}",
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    print(json.dumps(measure_overhead(), indent=1))
