"""DeepSpeed integration: ``"type": "CoupledAdam"`` trains exactly like single-process CoupledAdam
under ZeRO 0/1/2/3, offload, bf16, clipping and gradient accumulation, on 2 and 3 gloo CPU ranks.

Each test spawns its ranks once and runs many engine configurations in sequence (spawning and
importing deepspeed costs seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from tests import ds_helpers as H  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402

STEPS = 20
CLIP = 0.3
pytestmark = pytest.mark.slow


def _job(label: str, cfg: dict[str, Any], *, how: str = "config", vocab_size: int | None = None,
         no_reduce: bool = False, dtype: str = "float32") -> dict[str, Any]:
    return dict(label=label, cfg=cfg, how=how, vocab_size=vocab_size, no_reduce=no_reduce,
                dtype=dtype)


def _initialize(job: dict[str, Any], model: torch.nn.Module) -> Any:
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401  (the documented one line)
    from coupled_ds import CoupledAdam, coupled_param_groups

    cfg = H.clone_config(job["cfg"])
    if job["how"] in ("config", "file"):
        if job["how"] == "file":
            path = Path(tempfile.mkdtemp()) / "ds_config.json"
            path.write_text(json.dumps(cfg))
            cfg = str(path)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=cfg)
        return engine
    if job["how"] == "groups":  # the user's own decay / no-decay groups; the embedding moves out
        named = list(model.named_parameters())
        groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
        return engine
    params = cfg.pop("optimizer")["params"]
    kwargs = dict(lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"])

    def build(_params):
        return CoupledAdam(coupled_param_groups(model, weight_decay=params["weight_decay"],
                                                vocab_size=job["vocab_size"]), **kwargs)

    optimizer = build(None) if job["how"] == "instance" else build
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine


def _run_jobs(rank: int, world: int, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Train each job for STEPS steps on this rank; rank 0 returns the final parameters."""
    out = {}
    for job in jobs:
        model = H.make_model(getattr(torch, job["dtype"]))
        engine = _initialize(job, model)
        if job["no_reduce"]:
            H.drop_reduction(engine)
        H.train(engine, rank, 0, STEPS)
        params = H.full_params(engine)
        offload = "+offload" if engine.zero_use_cpu_optimizer() else ""
        kind = type(engine.optimizer).__name__ + offload
        out[job["label"]] = (params, kind) if rank == 0 else None
        out["pieces", job["label"]] = [(g.start_global_flat, g.numel, t.numel())
                                       for t, g in engine.basic_optimizer._geometry.items()]
        engine.destroy()
    return out


def _fp32_jobs(world: int) -> list[dict[str, Any]]:
    c = H.ds_config
    stages, offloaded = ((0, 1, 2, 3), (1, 2, 3)) if world == 2 else ((1, 2, 3), (2, 3))
    jobs = [_job(f"zero{s}", c(s, world=world)) for s in stages]
    jobs += [_job(f"zero{s}-offload", c(s, world=world, offload=True)) for s in offloaded]
    jobs.append(_job("zero2-vocab-rr", c(2, world=world, vocab_size=H.REAL_VOCAB,
                                         ) | {"zero_optimization": {
                                             "stage": 2, "round_robin_gradients": True}},
                     vocab_size=H.REAL_VOCAB))
    return jobs


@pytest.mark.parametrize("world", [2, 3])
def test_zero_stages_match_single_process(world):
    """Also: clipping with gradient accumulation, a CoupledAdam instance or callable as
    ``optimizer=``, a JSON file on disk, and negative controls without the reduction."""
    c = H.ds_config
    jobs = _fp32_jobs(world)
    if world == 2:
        jobs += [_job(f"zero{s}-clip-gas", c(s, world=world, gas=2, clip=CLIP)) for s in (2, 3)]
        jobs += [_job("zero2-instance", c(2, world=world), how="instance"),
                 _job("zero3-callable", c(3, world=world), how="callable"),
                 _job("zero2-json-file", c(2, world=world), how="file"),
                 _job("zero1-user-groups", c(1, world=world), how="groups"),
                 _job("zero2-no-reduce", c(2, world=world), no_reduce=True),
                 _job("zero3-no-reduce", c(3, world=world), no_reduce=True)]
    by_rank = run_on_ranks(world, _run_jobs, jobs, env=H.DS_ENV, timeout=420)
    got = by_rank[0]
    for label in ("zero2", "zero3"):  # slices cut rows mid-way; the last one holds padding
        pieces = sorted(p for out in by_rank for p in out["pieces", label])
        assert [p[0] + p[1] for p in pieces[:-1]] == [p[0] for p in pieces[1:]]
        assert pieces[0][0] == 0 and sum(p[1] for p in pieces) == H.V * H.H, pieces
        assert any(start % H.H for start, _, _ in pieces[1:]), f"{label}: no mid-row cut"
        assert world == 2 or pieces[-1][2] > pieces[-1][1], f"{label}: no padding in {pieces}"
    want = H.reference(STEPS, world)
    want_vocab = H.reference(STEPS, world, vocab_size=H.REAL_VOCAB)
    want_clip = H.reference(STEPS, world, gas=2, clip=CLIP)
    assert H.max_rel_diff(want_clip, H.reference(STEPS, world, gas=2)) > 1e-3, "clip never bit"
    kinds = {"zero0": "CoupledAdam", "zero1": "DeepSpeedZeroOptimizer",
             "zero2": "DeepSpeedZeroOptimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3"}
    for label, kind in kinds.items():
        for suffix, extra in (("", ""), ("-offload", "+offload")):
            if label + suffix in got:
                assert got[label + suffix][1] == kind + extra, (label, got[label + suffix][1])
    for job in jobs:
        label = job["label"]
        ref = want_vocab if job["vocab_size"] else want_clip if "clip" in label else want
        diff = H.max_rel_diff(got[label][0], ref)
        print(f"{world} ranks {label}: max relative difference {diff:.2e}")
        if job["no_reduce"]:
            assert diff > 1e-3, f"{label}: the negative control matched ({diff:.2e})"
        else:
            assert diff <= 1e-5, f"{label}: max relative difference {diff:.2e}"


def test_bf16_matches_stage0_bf16():
    """bf16 under ZeRO 1 (both DeepSpeed wrappers), 2 and 3 against the same run without ZeRO.

    The tolerance is bf16's; the negative control (no cross-rank reduction) exceeds it.
    """
    c, world = H.ds_config, 2
    jobs = [_job(f"bf16-zero{s}", c(s, world=world, bf16=True), dtype="bfloat16")
            for s in (0, 1, 2, 3)]
    fp32_accum = c(1, world=world, bf16=True) | {"data_types": {"grad_accum_dtype": "fp32"}}
    jobs.append(_job("bf16-zero1-fp32-accum", fp32_accum, dtype="bfloat16"))
    jobs.append(_job("bf16-zero2-offload", c(2, world=world, bf16=True, offload=True),
                     dtype="bfloat16"))
    jobs.append(_job("bf16-zero2-no-reduce", c(2, world=world, bf16=True), dtype="bfloat16",
                     no_reduce=True))
    got = run_on_ranks(world, _run_jobs, jobs, env=H.DS_ENV, timeout=420)[0]
    assert got["bf16-zero1-fp32-accum"][1] == "BF16_Optimizer"
    assert got["bf16-zero0"][1] == "FP16_UnfusedOptimizer"
    base = got["bf16-zero0"][0]["tok.weight"]
    for job in jobs[1:]:
        diff = H.max_rel_diff({"E": got[job["label"]][0]["tok.weight"]}, {"E": base})
        print(f"{job['label']} ({got[job['label']][1]}): embedding vs bf16 stage 0 {diff:.2e}")
        if job["no_reduce"]:
            assert diff > 6e-2, f"{job['label']}: the negative control matched ({diff:.2e})"
        else:
            assert diff <= 3e-2, f"{job['label']}: max relative difference {diff:.2e}"


class _NoEmbedding(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)


def _error_cases(rank: int, world: int) -> dict[str, tuple[str, str]]:
    """Each bad input through deepspeed.initialize; returns (exception type, message)."""
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401
    from coupled_ds import CoupledAdam

    def attempt(cfg, model=None, optimizer=None):
        model = model or H.make_model()
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                 optimizer=optimizer)
        except Exception as err:  # noqa: BLE001 - the test inspects the type
            return type(err).__name__, str(err)
        return "no error", ""

    c = H.ds_config
    forced = c(2, world=1, offload=True) | {"zero_force_ds_cpu_optimizer": True}
    model = H.make_model()
    two_in_one = CoupledAdam([{"params": [model.tok.weight, model.mix.weight], "coupled": True},
                              {"params": [p for n, p in model.named_parameters()
                                          if n not in ("tok.weight", "mix.weight")]}])
    return {
        "unknown_key": attempt(c(2, world=1, max_grad_norm=1.0, lrr=1e-3)),
        "no_embedding": attempt(c(2, world=1), model=_NoEmbedding()),
        "not_2d": attempt(c(2, world=1, coupled_params=["norm.bias"])),
        "coupled_params_str": attempt(c(2, world=1, coupled_params="tok")),
        "forced_cpu_adam": attempt(forced),
        "two_matrices_one_group": attempt(c(2, world=1, optimizer=False), model=model,
                                          optimizer=two_in_one),
    }


def test_bad_input_raises_clear_errors():
    got = run_on_ranks(1, _error_cases, env=H.DS_ENV, timeout=300)[0]
    expect = {
        "unknown_key": ("ValueError", ["'lrr'", "'max_grad_norm'", "Accepted keys",
                                       "coupled_params"]),
        "no_embedding": ("NoEmbeddingFoundError", ["coupled_params"]),
        "not_2d": ("ValueError", ["norm.bias", "2-D"]),
        "coupled_params_str": ("ValueError", ["coupled_params='tok'", "list"]),
        "forced_cpu_adam": ("ValueError", ["zero_force_ds_cpu_optimizer", "DeepSpeedCPUAdam"]),
        "two_matrices_one_group": ("ValueError", ["param group of its own",
                                                  "coupled_param_groups"]),
    }
    for case, (kind, words) in expect.items():
        name, message = got[case]
        assert name == kind, f"{case}: raised {name}: {message}"
        for word in words:
            assert word in message, f"{case}: {word!r} missing from: {message}"


def test_deepspeed_launcher(tmp_path):
    """`deepspeed --num_gpus 2 script.py` (DeepSpeed's own launcher, CPU accelerator)."""
    out = tmp_path / "params.pt"
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
           "--master_port", "29533", str(root / "tests" / "ds_helpers.py"), "--out", str(out),
           "--steps", "3"]
    env = {**os.environ, **H.DS_ENV, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"launcher failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = torch.load(out)
    assert result["world"] == 2 and result["optimizer"] == "CoupledAdam"
    diff = H.max_rel_diff(result["params"], H.reference(3, 2))
    assert diff <= 1e-5, f"launched run differs from single-process CoupledAdam by {diff:.2e}"


class _ToyMPU:
    """The parts of Megatron's mpu interface DeepSpeed calls: tensor parallel over all ranks,
    data parallel of size 1 (each rank alone)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp = dist.new_group(list(range(world)))
        self.dp = None
        for r in range(world):  # every rank creates every group, in the same order
            group = dist.new_group([r])
            if r == rank:
                self.dp = group

    def _size(self, group):
        import torch.distributed as dist
        return dist.get_world_size(group)

    def _rank(self, group):
        import torch.distributed as dist
        return dist.get_rank(group)

    def get_model_parallel_group(self): return self.tp
    def get_tensor_model_parallel_group(self): return self.tp
    def get_model_parallel_rank(self): return self._rank(self.tp)
    def get_tensor_model_parallel_rank(self): return self._rank(self.tp)
    def get_model_parallel_world_size(self): return self._size(self.tp)
    def get_tensor_model_parallel_world_size(self): return self._size(self.tp)
    def get_tensor_model_parallel_src_rank(self): return 0
    def get_data_parallel_group(self): return self.dp
    def get_data_parallel_rank(self): return 0
    def get_data_parallel_world_size(self): return 1


TP_ROWS, TP_STEPS = 19, 10  # rows per tensor-parallel rank of a [2 * 19, 8] matrix


def _tp_grad_scale(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7 + step)
    return torch.randn(2 * TP_ROWS, H.H, generator=gen) * (1 + torch.arange(H.H))


class _VocabParallel(torch.nn.Module):
    """Rows [r * 19, (r + 1) * 19) of a [38, 8] matrix, marked as Megatron marks them; the loss
    is separable over rows, so each shard's gradient is the full loss's gradient on its rows."""

    def __init__(self, rank: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        full = torch.randn(2 * TP_ROWS, H.H)
        rows = slice(None) if rank is None else slice(rank * TP_ROWS, (rank + 1) * TP_ROWS)
        self.rows = rows
        self.weight = torch.nn.Parameter(full[rows].clone())
        self.weight.tensor_model_parallel, self.weight.partition_dim = True, 0

    def forward(self, step: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.weight) * _tp_grad_scale(int(step))[self.rows]).sum()


def _tp_run(rank: int, world: int, jobs: list[tuple[int, bool, int | None]]
            ) -> dict[tuple, torch.Tensor]:
    import deepspeed

    import coupled_ds.deepspeed  # noqa: F401

    out = {}
    for stage, no_reduce, vocab_size in jobs:
        model = _VocabParallel(rank)
        extra = {} if vocab_size is None else {"vocab_size": vocab_size}
        cfg = H.ds_config(stage, world=1, coupled_params=["weight"], **extra)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=cfg, mpu=_ToyMPU())
        if no_reduce:
            H.drop_reduction(engine)
        for step in range(TP_STEPS):
            engine.backward(engine(torch.tensor(step)))
            engine.step()
        out[stage, no_reduce, vocab_size] = model.weight.detach().clone()
        engine.destroy()
    return out


def test_vocab_parallel_mpu_reduces_over_tensor_parallel_group():
    """With an mpu, a vocabulary-parallel matrix's column sums also cross the TP group."""
    from coupled_ds import CoupledAdam

    def reference(vocab_size):
        model = _VocabParallel(None)
        opt = CoupledAdam([{"params": [model.weight], "coupled": True, "weight_decay": 0.0,
                            "vocab_size": vocab_size}], **H.HP)
        for step in range(TP_STEPS):
            opt.zero_grad()
            model(torch.tensor(step)).backward()
            opt.step()
        return model.weight.detach()

    jobs = [(0, False, None), (2, False, None), (2, False, 2 * TP_ROWS - 1), (2, True, None)]
    got = run_on_ranks(2, _tp_run, jobs, env=H.DS_ENV, timeout=300)
    for job in jobs:
        full = torch.cat([got[0][job], got[1][job]])  # rows of TP rank 0, then rank 1
        diff = H.max_rel_diff({"E": full}, {"E": reference(job[2])})
        if job[1]:
            assert diff > 1e-3, f"negative control (no reduction) matched ({diff:.2e})"
        else:
            assert diff <= 1e-5, f"stage {job[0]} with TP=2: max relative difference {diff:.2e}"
