"""CoupledAdam on PyTorch FSDP2 (``fully_shard``) and DTensor tensor parallelism, with DCP.

Real torch FSDP2 / DTensor on gloo CPU ranks. A tiny LM (V=37 rows: uneven on 2, 3 and 4 ranks)
trains 12 steps sharded and must equal single-process CoupledAdam on the full matrices; the
uncoupled parameters must equal torch AdamW stepping the same DTensors; a run whose column sums
are not reduced must fail the comparison. One spawn per world size runs every case.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coupled_ds import CoupledAdam, coupled_param_groups
from tests.dist import run_on_ranks
from tests.reference import max_relative_error

pytestmark = pytest.mark.slow

V, H, T, B = 37, 6, 5, 12  # B: global batch, split evenly over 1, 2, 3 or 4 data ranks
STEPS, SAVE_AT = 12, 5
HP = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


class TinyLM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx_BT: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.mix(self.emb(idx_BT)))))


def _model(tied: bool, seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(tied)


def _loss(model: nn.Module, step: int, part: int = 0, parts: int = 1) -> torch.Tensor:
    """Cross entropy on data rank ``part``'s share of step ``step``'s global batch (skewed
    token frequencies, so rows get gradients of different sizes)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = (torch.rand(B, T + 1, generator=gen) ** 3 * V).long().chunk(parts)[part]
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))


def _groups(model: nn.Module, vocab_size: int | None) -> list[dict]:
    return coupled_param_groups(model, weight_decay=0.1, vocab_size=vocab_size)


def _reference(tied: bool, vocab_size: int | None, compact: bool = False
               ) -> dict[str, torch.Tensor]:
    """Single-process CoupledAdam on the whole model, global batch."""
    model = _model(tied)
    opt = CoupledAdam(_groups(model, vocab_size), **HP, compact_coupled_state=compact)
    for step in range(STEPS):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------ ranks
def _parallelize(model: nn.Module, layout: str, world: int) -> tuple[int, int]:
    """Shard ``model`` as torchtitan would; return (data rank, data ranks)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    def vocab_parallel(tp_mesh):
        tied = model.head.weight is model.emb.weight
        # Token ids come in whole on every rank (RowwiseParallel's default is Shard(-1)).
        parallelize_module(model, tp_mesh, {"emb": RowwiseParallel(input_layouts=Replicate()),
                                            "head": ColwiseParallel(output_layouts=Replicate())})
        if tied:  # each plan made its own Parameter of the shared weight: tie them again
            model.head.weight = model.emb.weight

    if layout == "fsdp":  # 1-D mesh, rows 19/18 (2 ranks), 13/13/11 (3 ranks)
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model, mesh=mesh)
        return mesh.get_local_rank(), world
    if layout == "tp":  # tensor parallel alone: every rank sees the same batch
        vocab_parallel(init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
        return 0, 1
    if layout == "fsdp_tp":  # rows split by TP (19/18), then each block by FSDP (10/9, 9/9)
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        vocab_parallel(mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
        return mesh.get_local_rank("dp"), 2
    if layout == "hsdp":  # (Replicate, Shard(0)): the replicate dim must not be reduced
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)
        return torch.distributed.get_rank(), world
    raise AssertionError(layout)


def _train(rank, world, *, layout, tied, vocab_size=None, reduce=True, compact=False,
           steps=range(STEPS), model=None, opt=None, shadow=True):
    """Sharded training; returns (full parameters on rank 0, uncoupled == torch AdamW, model, opt,
    number of groups each coupled matrix is reduced over)."""
    if model is None:
        model = _model(tied)
        data_rank, data_ranks = _parallelize(model, layout, world)
        opt = CoupledAdam(_groups(model, vocab_size), **HP, compact_coupled_state=compact)
    else:
        data_rank, data_ranks = model._data
    model._data = data_rank, data_ranks
    coupled = [p for g in opt.param_groups if g["coupled"] for p in g["params"]]
    groups_per_matrix = [len(opt.geometry_of(p).groups) for p in coupled]
    if not reduce:  # negative control: each rank averages only its own rows
        for p in coupled:
            opt.set_geometry(p, dataclasses.replace(opt.geometry_of(p), groups=()))
    # torch AdamW on copies of the uncoupled DTensors, fed the same gradients.
    plain = [g for g in opt.param_groups if not g["coupled"]]
    twins = [[nn.Parameter(p.detach().clone()) for p in g["params"]] for g in plain]
    adamw = torch.optim.AdamW([{"params": t, "weight_decay": g["weight_decay"]}
                               for t, g in zip(twins, plain)], **HP) if shadow else None
    for step in steps:
        _loss(model, step, data_rank, data_ranks).backward()
        for g, t in zip(plain, twins):
            for p, twin in zip(g["params"], t):
                twin.grad = p.grad.detach().clone()
        opt.step()
        opt.zero_grad()
        if adamw is not None:
            adamw.step()
    same = all(torch.equal(p.to_local() if hasattr(p, "to_local") else p,
                           twin.to_local() if hasattr(twin, "to_local") else twin)
               for g, t in zip(plain, twins) for p, twin in zip(g["params"], t)) if shadow else None
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}
    return (full if rank == 0 else None), same, model, opt, groups_per_matrix


def _run(rank, world, **case):
    full, same, _, _, groups = _train(rank, world, **case)
    return full, same, groups


def _dcp_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def _dcp_save(rank, world, path, **case):
    import torch.distributed.checkpoint as dcp
    _, _, model, opt, _ = _train(rank, world, steps=range(SAVE_AT), shadow=False, **case)
    dcp.save(_dcp_state(model, opt), checkpoint_id=path)


def _dcp_resume(rank, world, path, **case):
    """A fresh model (another seed) loads the checkpoint and trains the remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    model = _model(case["tied"], seed=123)
    model._data = _parallelize(model, case["layout"], world)
    opt = CoupledAdam(_groups(model, case.get("vocab_size")), **HP,
                      compact_coupled_state=case.get("compact", False))
    state = _dcp_state(model, opt)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    full, _, _, _, _ = _train(rank, world, steps=range(SAVE_AT, STEPS), model=model, opt=opt,
                              shadow=False, **case)
    return full


def _refusals(rank, world):
    """Placements that cannot be coupled raise before any native code, naming the parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    cols = nn.Parameter(distribute_tensor(torch.randn(V, H), mesh, [Shard(1)]))
    try:
        CoupledAdam([{"params": [cols], "coupled": True, "coupled_names": ["wte.weight"]}])
    except ValueError as e:
        out["shard1"] = str(e)
    rows = nn.Parameter(distribute_tensor(torch.randn(V, H), mesh, [Shard(0)]))
    opt = CoupledAdam([{"params": [rows], "coupled": True, "coupled_names": ["wte.weight"]}])
    rows.grad = DTensor.from_local(torch.ones(rows.to_local().shape), mesh, [Partial()],
                                   shape=rows.shape, stride=rows.stride())
    try:
        opt.step()
    except ValueError as e:
        out["partial"] = str(e)
    return out


def _kernels_refuse_dtensors(rank, world):
    """V=36 on 3 ranks: handing DTensors straight to the fast kernels segfaulted in the C code
    before the guard (it read a global [36, 6] matrix from a 12-row shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from coupled_ds import full_matrix_geometry, kernels
    mesh = init_device_mesh("cpu", (world,))
    m, v, g = (distribute_tensor(torch.rand(36, H), mesh, [Shard(0)]) for _ in range(3))
    geometry = full_matrix_geometry(m, key="E")
    out = []
    for call in (lambda: kernels.moments_and_column_sums_(
                     torch.zeros(H), m, v, g, geometry, beta1=0.9, beta2=0.95, maximize=False,
                     rows_limit=36),
                 lambda: kernels.apply_coupled_update_(m, v, torch.ones(H), geometry,
                                                       step_size=0.1, decay=1.0)):
        try:
            call()
            out.append(None)
        except TypeError as e:
            out.append(str(e))
    return out


def _tiny_vocab_data():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(4, H, generator=gen), [torch.randn(4, H, generator=gen) for _ in range(4)]


def _tiny_vocab(rank, world):
    """V=4 on 3 ranks: torch.chunk gives 2/2/0 rows; the empty rank still joins the reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    init, grads = _tiny_vocab_data()
    p = nn.Parameter(distribute_tensor(init, mesh, [Shard(0)]))
    opt = CoupledAdam([{"params": [p], "coupled": True, "coupled_names": ["E"]}], **HP)
    for g in grads:
        p.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    return tuple(p.to_local().shape), p.full_tensor()


def _log_freq() -> torch.Tensor:
    from coupled_ds.metrics import log_frequencies
    return log_frequencies(torch.arange(V, dtype=torch.float64) % 7)  # some tokens never seen


def _metrics(rank, world, layout, tied, vocab_size):
    """Metrics of a trained DTensor embedding, computed on the shards (never gathered), by
    ``embedding_metrics`` on the DTensor and by ``EmbeddingTelemetry.for_fsdp``."""
    from coupled_ds.metrics import embedding_metrics
    from coupled_ds.telemetry import EmbeddingTelemetry
    full, _, model, _, _ = _train(rank, world, layout=layout, tied=tied, vocab_size=vocab_size,
                                  steps=range(3), shadow=False)
    kwargs = dict(log_freq_V=_log_freq(), vocab_size=vocab_size)
    direct = embedding_metrics(model.emb.weight, **kwargs).as_dict()
    telemetry = EmbeddingTelemetry.for_fsdp(model, every=2, **kwargs)
    assert all(s.geometry.numel < V * H for s in telemetry.sources), "a rank held everything"
    logged = {n: m.as_dict() for n, m in telemetry.after_step(2).items()}
    return (full["emb.weight"] if rank == 0 else None), direct, logged


FSDP_CASES = {f"{layout}-{'tied' if tied else 'untied'}-{vocab}": dict(
    layout=layout, tied=tied, vocab_size=vocab) for layout in ("fsdp",)
    for tied, vocab in ((True, None), (False, 33))}


def _two_ranks(rank, world, path):
    out = {name: _run(rank, world, **case) for name, case in FSDP_CASES.items()}
    out["tp-untied"] = _run(rank, world, layout="tp", tied=False)
    out["tp-tied"] = _run(rank, world, layout="tp", tied=True)
    out["no-reduce"] = _run(rank, world, layout="fsdp", tied=True, reduce=False, shadow=False)
    out["tp-no-reduce"] = _run(rank, world, layout="tp", tied=False, reduce=False, shadow=False)
    out["refusals"] = _refusals(rank, world)
    _dcp_save(rank, world, os.path.join(path, "full"), layout="fsdp", tied=True)
    _dcp_save(rank, world, os.path.join(path, "compact"), layout="fsdp", tied=True, compact=True)
    return out


def _three_ranks(rank, world, path):
    out = {name: _run(rank, world, **case) for name, case in FSDP_CASES.items()}
    out["no-reduce"] = _run(rank, world, layout="fsdp", tied=True, reduce=False, shadow=False)
    out["kernels"] = _kernels_refuse_dtensors(rank, world)
    out["metrics"] = _metrics(rank, world, "fsdp", True, None)
    out["tiny-vocab"] = _tiny_vocab(rank, world)
    out["resume-full"] = _dcp_resume(rank, world, os.path.join(path, "full"),
                                     layout="fsdp", tied=True)
    out["resume-compact"] = _dcp_resume(rank, world, os.path.join(path, "compact"),
                                        layout="fsdp", tied=True, compact=True)
    # Exact resume at the same world size: save at 3, load at 3, continue == uninterrupted.
    _dcp_save(rank, world, os.path.join(path, "same"), layout="fsdp", tied=False)
    out["resume-same"] = _dcp_resume(rank, world, os.path.join(path, "same"),
                                     layout="fsdp", tied=False)
    out["uninterrupted"] = _run(rank, world, layout="fsdp", tied=False, shadow=False)
    return out


def _interleaved_rows_refused(rank, world):
    """_StridedShard(0) whose split factor is not what the later row splits hold: each shard
    would interleave rows of several blocks, which a ShardGeometry cannot describe."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard
    mesh = init_device_mesh("cpu", (2, 2))
    p = nn.Parameter(DTensor.from_local(torch.zeros(9, H), mesh,
                                        [_StridedShard(0, split_factor=3), Shard(0)]))
    try:
        CoupledAdam([{"params": [p], "coupled": True, "coupled_names": ["wte.weight"]}])
    except ValueError as e:
        return str(e)
    return None


def _four_ranks(rank, world):
    return {"interleaved": _interleaved_rows_refused(rank, world),
            "fsdp_tp-untied": _run(rank, world, layout="fsdp_tp", tied=False, vocab_size=33),
            "fsdp_tp-tied": _run(rank, world, layout="fsdp_tp", tied=True),
            "hsdp-tied": _run(rank, world, layout="hsdp", tied=True),
            "metrics": _metrics(rank, world, "fsdp_tp", False, 33),
            "fsdp_tp-no-reduce": _run(rank, world, layout="fsdp_tp", tied=False, reduce=False,
                                      shadow=False)}


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dcp"))
    return {2: run_on_ranks(2, _two_ranks, path), 3: run_on_ranks(3, _three_ranks, path),
            4: run_on_ranks(4, _four_ranks)}


def _check_equal_to_reference(result, *, tied, vocab_size=None, groups_expected, compact=False):
    full, same, groups = result
    want = _reference(tied, vocab_size, compact)
    assert groups == groups_expected
    for name, p in want.items():
        err = max_relative_error(full[name], p)
        assert err <= 1e-6, f"{name}: {err:.2e}"
    assert same is None or same, "uncoupled parameters differ from torch AdamW on the same DTensors"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", sorted(FSDP_CASES))
def test_fsdp2_matches_single_process(runs, world, name):
    case = FSDP_CASES[name]
    matrices = 1 if case["tied"] else 2
    _check_equal_to_reference(runs[world][0][name], tied=case["tied"],
                              vocab_size=case["vocab_size"], groups_expected=[1] * matrices)


def test_tensor_parallel_alone_matches_single_process(runs):
    _check_equal_to_reference(runs[2][0]["tp-untied"], tied=False, groups_expected=[1, 1])
    _check_equal_to_reference(runs[2][0]["tp-tied"], tied=True, groups_expected=[1])


def test_fsdp2_times_tensor_parallel_matches_single_process(runs):
    """2 x 2 mesh, vocabulary rows split on both dims: reduced over both groups."""
    _check_equal_to_reference(runs[4][0]["fsdp_tp-untied"], tied=False, vocab_size=33,
                              groups_expected=[2, 2])
    _check_equal_to_reference(runs[4][0]["fsdp_tp-tied"], tied=True, groups_expected=[2])


def test_hsdp_reduces_only_the_sharded_dim(runs):
    """(Replicate, Shard(0)): reducing the replicas too would double the column sums."""
    _check_equal_to_reference(runs[4][0]["hsdp-tied"], tied=True, groups_expected=[1])


@pytest.mark.parametrize("world,name,tied", [(2, "no-reduce", True), (3, "no-reduce", True),
                                             (2, "tp-no-reduce", False),
                                             (4, "fsdp_tp-no-reduce", False)])
def test_without_reduction_the_result_differs(runs, world, name, tied):
    full, _, _ = runs[world][0][name]
    vocab_size = 33 if name.startswith("fsdp_tp") else None
    assert max_relative_error(full["emb.weight"], _reference(tied, vocab_size)["emb.weight"]) > 1e-3


def test_embedding_detected_on_sharded_models(runs):
    """coupled_param_groups on FSDP2 / TP models: DTensor shapes are global, tied weights once."""
    assert sorted(runs[2][0]["fsdp-tied-None"][0]) == sorted(n for n, _ in
                                                           _model(True).named_parameters())
    assert runs[2][0]["fsdp-tied-None"][2] == [1]  # one coupled matrix (tied), one group
    assert runs[2][0]["tp-untied"][2] == [1, 1]  # emb and head


def test_uncouplable_placements_are_refused(runs):
    messages = runs[2][0]["refusals"]
    assert "wte.weight" in messages["shard1"] and "Shard(dim=1)" in messages["shard1"]
    assert "wte.weight" in messages["partial"] and "Partial" in messages["partial"]
    interleaved = runs[4][0]["interleaved"]
    assert interleaved is not None and "wte.weight" in interleaved and "contiguous" in interleaved


def test_kernels_refuse_dtensors_instead_of_reading_past_the_shard(runs):
    for rank_result in runs[3]:
        assert all(msg is not None and "DTensor" in msg for msg in rank_result["kernels"])


@pytest.mark.parametrize("mode", ["full", "compact"])
def test_dcp_save_at_2_load_at_3_continue_equals_uninterrupted(runs, mode):
    got = runs[3][0][f"resume-{mode}"]
    want = _reference(True, None, compact=mode == "compact")
    for name, p in want.items():
        assert max_relative_error(got[name], p) <= 1e-6, name


def test_dcp_resume_at_the_same_world_size_is_exact(runs):
    got, (want, _, _) = runs[3][0]["resume-same"], runs[3][0]["uninterrupted"]
    for name, p in want.items():
        assert torch.equal(got[name], p), name


@pytest.mark.parametrize("world,vocab_size", [(3, None), (4, 33)])
def test_metrics_and_telemetry_on_dtensor_shards_match_the_whole_matrix(runs, world, vocab_size):
    from coupled_ds.metrics import embedding_metrics
    full = runs[world][0]["metrics"][0]
    want = embedding_metrics(full, log_freq_V=_log_freq(), vocab_size=vocab_size).as_dict()
    for rank_result in runs[world]:  # every rank gets the numbers
        _, direct, logged = rank_result["metrics"]
        expected_names = ["emb.weight"] if world == 3 else ["emb.weight", "head.weight"]
        assert sorted(logged) == expected_names
        for got in (direct, logged["emb.weight"]):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


# ------------------------------------------------------------------ the example and its launcher
REPO = Path(__file__).resolve().parent.parent
_TINY = ["--steps", "4", "--max-tokens", "20000", "--vocab-size", "203", "--seq-len", "16",
         "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--micro-batch", "2",
         "--eval-seqs", "4", "--telemetry-every", "2", "--save-interval", "2"]


def _launch(*args: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PATH=str(Path(sys.executable).parent) + os.pathsep
               + env.get("PATH", ""))
    return subprocess.run(["bash", str(REPO / "launch" / "torchrun_fsdp2.sh"),
                           "--master-port", port, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)


def test_launcher_dry_run_and_input_checks(tmp_path):
    proc = _launch("--nnodes", "2", "--node-rank", "1", "--master-addr", "n0",
                   "--nproc-per-node", "4", "--tp", "2", "--save-dir", str(tmp_path), "--dry-run",
                   "--", "--steps", "9")
    assert proc.returncode == 0, proc.stderr
    [cmd] = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert cmd[1:9] == ["--nnodes", "2", "--nproc_per_node", "4", "--node_rank", "1",
                        "--master_addr", "n0"]
    assert cmd[11:] == [str(REPO / "examples" / "train_fsdp2.py"), "--save-dir", str(tmp_path),
                        "--tp", "2", "--optimizer", "CoupledAdam", "--steps", "9"]
    assert "mesh [dp=4, tp=2] on 8 ranks" in proc.stderr
    bad = _launch("--nproc-per-node", "3", "--tp", "2", "--save-dir", str(tmp_path), "--dry-run")
    assert bad.returncode == 2 and "--tp 2 must divide --nproc-per-node 3" in bad.stderr


def test_example_trains_on_a_2x2_mesh_and_resumes_on_2_ranks(tmp_path):
    """FSDP2 x TP on 4 CPU ranks through the launcher, then a relaunch on 2 ranks (FSDP2 alone)
    resumes from the DCP checkpoint, resharded, and finishes the longer run."""
    first = _launch("--nproc-per-node", "4", "--tp", "2", "--save-dir", str(tmp_path), "--",
                    *_TINY)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "coupling wte.weight (203, 16);" in first.stderr  # tied: one matrix
    second = _launch("--nproc-per-node", "2", "--tp", "1", "--save-dir", str(tmp_path), "--",
                     *_TINY[:1], "6", *_TINY[2:])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from checkpoint" in second.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from"] == 4 and metrics["steps"] == 6 and metrics["dp"] == 2
    assert all(metrics[k] is not None for k in ("val_loss", "iso", "mu_norm_rel"))
    logged = [json.loads(line) for line in (tmp_path / "embedding.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4, 6] and logged[0]["name"] == "wte.weight"
    assert (tmp_path / "final_model.pt").exists()


def test_a_rank_with_no_rows_still_takes_part(runs):
    init, grads = _tiny_vocab_data()
    p = nn.Parameter(init.clone())
    opt = CoupledAdam([{"params": [p], "coupled": True}], **HP)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    assert [r["tiny-vocab"][0] for r in runs[3]] == [(2, H), (2, H), (0, H)]
    assert max_relative_error(runs[3][0]["tiny-vocab"][1], p.detach()) <= 1e-6
