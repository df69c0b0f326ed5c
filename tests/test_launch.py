"""The launch/ scripts: exact --dry-run commands, input checks, two "nodes" on one machine, resume.

Real launchers and real DeepSpeed (CPU, gloo) with a tiny GPT and a few steps:
* torchrun: two launcher processes (node rank 0 and 1) over localhost;
* DeepSpeed ``--no_ssh``: two launcher processes with a two-host hostfile;
* SLURM one-task-per-GPU: two processes whose ranks come from SLURM_PROCID / SLURM_LOCALID;
* fault: a rank is SIGKILLed after a checkpoint, the same command is run again, and the final
  parameters equal the uninterrupted two-node run's bit for bit.
The pdsh / openmpi / SLURM paths need a cluster; their --dry-run output is checked exactly.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
ENTRY_POINTS = [p for p in SCRIPTS if not p.name.startswith("_")]
CONFIG = LAUNCH / "configs" / "zero2_cpu_coupled.json"
TRAIN = REPO / "examples" / "train_ds.py"
VENV_BIN = str(Path(sys.executable).parent)
STEPS = 8
# Tiny model, few steps: seconds of compute; the launchers' start-up dominates.
TINY = ["--steps", str(STEPS), "--save-interval", "3", "--seq-len", "16", "--n-layer", "1",
        "--n-head", "2", "--d-model", "16", "--micro-batch", "2", "--eval-seqs", "4",
        "--lr", "1e-2", "--no-progress"]

pytest.importorskip("deepspeed", reason="deepspeed is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "")}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_PROCID", "SLURM_LOCALID",
                "SLURM_NTASKS"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(script: str, *args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _start(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    """Wait for all; on a timeout kill the rest (by pid) and fail."""
    out = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _final_params(save_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(save_dir / "final_model.pt", weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small tokenized corpus (stdlib text) shared by every run of this module."""
    sys.path.insert(0, str(REPO / "examples"))
    import data

    return data.prepare(tmp_path_factory.mktemp("data"), vocab_size=128, max_tokens=20_000)


@pytest.fixture(scope="module")
def hostfile(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hosts") / "hostfile"
    path.write_text("# two 'nodes', one rank each\nnodeA slots=1\n\nnodeB slots=1\n")
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_dir, hostfile) -> Path:
    """DeepSpeed --no_ssh: two launchers (node rank 0 and 1) over localhost, run to the end."""
    save = tmp_path_factory.mktemp("no_ssh")
    port = str(_free_port())
    procs = [_start("deepspeed.sh", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(r),
                    "--master-addr", "127.0.0.1", "--master-port", port, "--config", str(CONFIG),
                    "--save-dir", str(save), "--", "--data-dir", str(data_dir), *TINY)
             for r in (0, 1)]
    for rc, text in _finish(procs):
        assert rc == 0, text[-4000:]
    return save


# ---------------------------------------------------------------- static checks


def test_shellcheck() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=LAUNCH,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [p.name for p in ENTRY_POINTS])
def test_help_and_strict_mode(script: str) -> None:
    text = (LAUNCH / script).read_text()
    assert "set -euo pipefail" in text
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--dry-run" in proc.stdout and ("Usage" in proc.stdout or "sbatch" in proc.stdout)


@pytest.mark.parametrize("name", ["zero2_cpu_coupled.json", "zero2_bf16_coupled.json",
                                  "zero3_offload_coupled.json"])
def test_example_configs(name: str) -> None:
    cfg = json.loads((LAUNCH / "configs" / name).read_text())
    assert cfg["optimizer"]["type"] == "CoupledAdam"
    from coupled_ds.deepspeed import ACCEPTED_PARAMS

    assert set(cfg["optimizer"]["params"]) <= set(ACCEPTED_PARAMS)
    if "offload" in name:
        assert cfg["zero_optimization"]["stage"] == 3
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_force_ds_cpu_optimizer"] is False


# ---------------------------------------------------------------- --dry-run: exact commands


def _dry(script: str, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    proc = _run(script, "--dry-run", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi"])
def test_dry_run_deepspeed_hostfile(launcher: str, hostfile: Path, tmp_path: Path) -> None:
    [cmd] = _dry("deepspeed.sh", "--hostfile", str(hostfile), "--launcher", launcher,
                 "--master-addr", "nodeA", "--master-port", "29511", "--save-dir", str(tmp_path),
                 "--", "--steps", "7")
    assert cmd == [f"{VENV_BIN}/deepspeed", "--hostfile", str(hostfile), "--launcher", launcher,
                   "--master_addr", "nodeA", "--master_port", "29511", str(TRAIN),
                   "--config", str(LAUNCH / "configs" / "zero2_bf16_coupled.json"),
                   "--save-dir", str(tmp_path), "--steps", "7"]


def test_dry_run_deepspeed_no_ssh(hostfile: Path, tmp_path: Path) -> None:
    [cmd] = _dry("deepspeed.sh", "--hostfile", str(hostfile), "--no-ssh", "--node-rank", "1",
                 "--master-addr", "10.1.2.3", "--config", str(CONFIG), "--save-dir", str(tmp_path))
    assert cmd == [f"{VENV_BIN}/deepspeed", "--hostfile", str(hostfile), "--master_addr",
                   "10.1.2.3", "--master_port", "29500", "--no_ssh", "--node_rank", "1",
                   str(TRAIN), "--config", str(CONFIG), "--save-dir", str(tmp_path)]


def test_dry_run_torchrun(tmp_path: Path) -> None:
    [static] = _dry("torchrun_ds.sh", "--nnodes", "2", "--node-rank", "1", "--master-addr", "n0",
                    "--nproc-per-node", "8", "--config", str(CONFIG), "--save-dir", str(tmp_path))
    assert static[:11] == [f"{VENV_BIN}/torchrun", "--nnodes", "2", "--nproc_per_node", "8",
                           "--node_rank", "1", "--master_addr", "n0", "--master_port", "29500"]
    [rdzv] = _dry("torchrun_ds.sh", "--nnodes", "2", "--rdzv-endpoint", "n0:29400",
                  "--config", str(CONFIG), "--save-dir", str(tmp_path))
    assert rdzv[5:11] == ["--rdzv_backend", "c10d", "--rdzv_endpoint", "n0:29400", "--rdzv_id",
                          "coupled-ds"]
    assert rdzv[11:] == [str(TRAIN), "--config", str(CONFIG), "--save-dir", str(tmp_path)]


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    """SLURM's variables for a 2-node job, and an ``scontrol`` that expands its node list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-a[01-02]" ] && '
                        'printf "gpu-a01\\ngpu-a02\\n"\n')
    scontrol.chmod(0o755)
    return _env(PATH=f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
                SLURM_JOB_ID="77", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_NNODES="2")


def test_dry_run_slurm_deepspeed(tmp_path: Path) -> None:
    env = _fake_slurm(tmp_path)
    [per_node] = _dry("slurm_deepspeed.sbatch", "--save-dir", str(tmp_path), "--", "--steps", "9",
                      env=env)
    assert per_node == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                        "bash", str(LAUNCH / "torchrun_ds.sh"), "--nnodes", "2",
                        "--nproc-per-node", "8", "--rdzv-endpoint", "gpu-a01:29500",
                        "--rdzv-id", "77", "--config",
                        str(LAUNCH / "configs" / "zero2_bf16_coupled.json"),
                        "--save-dir", str(tmp_path), "--", "--steps", "9"]
    [per_gpu] = _dry("slurm_deepspeed.sbatch", "--mode", "per-gpu", "--gpus-per-node", "4",
                     "--save-dir", str(tmp_path), env=env)
    assert per_gpu[:9] == ["srun", "--nodes", "2", "--ntasks-per-node", "4",
                           "--kill-on-bad-exit=1", "bash", str(LAUNCH / "torchrun_ds.sh"),
                           "--from-slurm-env"]
    assert per_gpu[9:13] == ["--master-addr", "gpu-a01", "--master-port", "29500"]
    # What each of those tasks then runs: one rank, numbered by SLURM.
    task_env = {**env, "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    [task] = _dry("torchrun_ds.sh", *per_gpu[8:per_gpu.index("--")], env=task_env)
    assert task[:7] == ["env", "RANK=5", "LOCAL_RANK=1", "WORLD_SIZE=8", "MASTER_ADDR=gpu-a01",
                        "MASTER_PORT=29500", sys.executable]


def _fake_megatron(tmp_path: Path) -> dict[str, str]:
    """A directory shaped like a Megatron-LM checkout and a one-token indexed dataset."""
    (tmp_path / "Megatron-LM" / "megatron" / "training").mkdir(parents=True)
    (tmp_path / "Megatron-LM" / "pretrain_gpt.py").write_text("")
    for suffix in (".bin", ".idx"):
        (tmp_path / f"corpus_text_document{suffix}").write_bytes(b"\1")
    entry = LAUNCH / "pretrain_gpt_coupled.py"
    if not entry.exists():  # owned by the Megatron work; the launcher only needs a file here
        entry = tmp_path / "pretrain_gpt_coupled.py"
        entry.write_text("")
    return {"MEGATRON_LM": str(tmp_path / "Megatron-LM"), "ENTRY": str(entry),
            "DATA_PATH": str(tmp_path / "corpus_text_document")}


def test_dry_run_megatron_and_resume(tmp_path: Path) -> None:
    env = _env(**_fake_megatron(tmp_path))
    save = tmp_path / "ckpt"
    exports, cmd = _dry("torchrun_megatron.sh", "--nnodes", "2", "--node-rank", "0",
                        "--master-addr", "n0", "--save-dir", str(save), "--",
                        "--tensor-model-parallel-size", "2", env=env)
    assert exports[:3] == ["export", f"MEGATRON_LM_PATH={env['MEGATRON_LM']}",
                           f"PYTHONPATH={env['MEGATRON_LM']}:{REPO}"]
    assert cmd[cmd.index(env["ENTRY"]) - 1] == "29500"
    assert cmd[cmd.index("--optimizer") + 1] == "coupled_adam"
    assert cmd[cmd.index("--save") + 1] == str(save)
    assert "--load" not in cmd and cmd[-2:] == ["--tensor-model-parallel-size", "2"]
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("1200\n")
    proc = _run("torchrun_megatron.sh", "--save-dir", str(save), "--dry-run", env=env)
    assert proc.returncode == 0 and "iteration 1200" in proc.stderr
    cmd = shlex.split(proc.stdout.splitlines()[-1])
    assert cmd[cmd.index("--load") + 1] == str(save)
    slurm_env = {**_fake_slurm(tmp_path), **_fake_megatron(tmp_path / "m2")}
    [srun] = _dry("slurm_megatron.sbatch", "--save-dir", str(save), env=slurm_env)
    assert srun[:8] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
                        "bash", str(LAUNCH / "torchrun_megatron.sh")]
    assert srun[srun.index("--rdzv-endpoint") + 1] == "gpu-a01:29500"


# ---------------------------------------------------------------- bad input: stop before starting


def _bad_inputs(tmp: Path, hostfile: Path) -> dict[str, tuple[list[str], str]]:
    bad_hosts = tmp / "bad_hostfile"
    bad_hosts.write_text("nodeA slots=2\nnodeB gpus=2\n")
    bad_json = tmp / "bad.json"
    bad_json.write_text('{"optimizer": {"type": "CoupledAdam",}}')
    empty = tmp / "empty_dir"
    empty.mkdir()
    binary = tmp / "binary_dir"
    binary.mkdir()
    (binary / "blob.txt").write_bytes(b"\0\1\2" * 100)
    save = ["--save-dir", str(tmp / "save")]
    return {
        "missing hostfile": (["--hostfile", str(tmp / "nope"), *save], "hostfile '"),
        "bad hostfile line": (["--hostfile", str(bad_hosts), *save],
                              "line 2 does not parse: 'nodeB gpus=2'"),
        "invalid json": (["--config", str(bad_json), *save], "is not valid JSON"),
        "empty data dir": (["--data", str(empty), *save], "holds no text"),
        "binary data": (["--data", str(binary), *save], "holds no text"),
        "missing data": (["--data", str(tmp / "nothing_here"), *save], "does not exist"),
        "no-ssh without node rank": (["--hostfile", str(hostfile), "--no-ssh",
                                      "--master-addr", "h", *save], "--no-ssh needs --node-rank"),
    }


def test_bad_input_stops_before_any_process(tmp_path: Path, hostfile: Path) -> None:
    """Each mistake: exit code 2, a message naming it, and the launcher never ran."""
    sentinel = tmp_path / "launcher_ran"
    fake = tmp_path / "fake_launcher"
    fake.write_text(f"#!/bin/sh\ntouch {sentinel}\n")
    fake.chmod(0o755)
    env = _env(DEEPSPEED=str(fake), TORCHRUN=str(fake))
    for case, (args, message) in _bad_inputs(tmp_path, hostfile).items():
        script = "deepspeed.sh"
        proc = _run(script, *args, env=env)
        assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
        assert message in proc.stderr and proc.stderr.startswith("error: "), (case, proc.stderr)
        if "hostfile" not in case and "ssh" not in case:  # torchrun takes the same checks
            proc = _run("torchrun_ds.sh", *args, env=env)
            assert proc.returncode == 2 and message in proc.stderr, (case, proc.stderr)
        assert not sentinel.exists() and not (tmp_path / "save").exists(), case
    proc = _run("deepspeed.sh", "--save-dir", str(tmp_path / "save"), env=env)  # control
    assert proc.returncode == 0 and sentinel.exists(), proc.stderr
    mega = _fake_megatron(tmp_path)
    proc = _run("torchrun_megatron.sh", "--save-dir", str(tmp_path / "s"),
                env=_env(**{**mega, "DATA_PATH": str(tmp_path / "missing_text_document"),
                            "TORCHRUN": str(fake)}))
    assert proc.returncode == 2 and "has no text" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- real runs


@pytest.mark.slow
def test_two_nodes_deepspeed_no_ssh(reference_run: Path) -> None:
    metrics = json.loads((reference_run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == STEPS
    assert metrics["optimizer"] == "CoupledAdam" and metrics["zero_stage"] == 2
    assert (reference_run / "checkpoints" / "latest").read_text().strip() == f"step{STEPS}"


@pytest.mark.slow
def test_two_nodes_torchrun_and_slurm_tasks(tmp_path: Path, data_dir: Path,
                                           reference_run: Path) -> None:
    """torchrun (node rank 0 and 1) and SLURM-numbered tasks train the same model as DeepSpeed's
    launcher: same world size, seed and batches give the same parameters."""
    reference = _final_params(reference_run)
    port = str(_free_port())
    torchrun = [_start("torchrun_ds.sh", "--nnodes", "2", "--node-rank", str(r),
                       "--master-addr", "127.0.0.1", "--master-port", port,
                       "--config", str(CONFIG), "--save-dir", str(tmp_path / "torchrun"), "--",
                       "--data-dir", str(data_dir), *TINY) for r in (0, 1)]
    for rc, text in _finish(torchrun):
        assert rc == 0, text[-4000:]
    port = str(_free_port())
    tasks = [_start("torchrun_ds.sh", "--from-slurm-env", "--master-port", port,
                    "--config", str(CONFIG), "--save-dir", str(tmp_path / "slurm"), "--",
                    "--data-dir", str(data_dir), *TINY,
                    env=_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                             MASTER_ADDR="127.0.0.1")) for r in (0, 1)]
    for rc, text in _finish(tasks):
        assert rc == 0, text[-4000:]
    for run in ("torchrun", "slurm"):
        got = _final_params(tmp_path / run)
        assert json.loads((tmp_path / run / "metrics.json").read_text())["world_size"] == 2
        for name, value in reference.items():
            assert torch.equal(got[name], value), (run, name)


@pytest.mark.slow
def test_killed_rank_resumes_to_identical_parameters(tmp_path: Path, data_dir: Path,
                                                     reference_run: Path) -> None:
    """Rank 1 dies (SIGKILL) at step 4, after the step-3 checkpoint; the same command, run
    again, resumes from step 3 and ends with the uninterrupted run's parameters, bit for bit."""
    save = tmp_path / "faulty"
    command = ["--num-gpus", "2", "--master-port", str(_free_port()), "--config", str(CONFIG),
               "--save-dir", str(save), "--", "--data-dir", str(data_dir), *TINY,
               "--fail-at-step", "4", "--fail-rank", "1"]
    [(rc, text)] = _finish([_start("deepspeed.sh", *command)])
    assert rc != 0, text[-4000:]
    assert (save / "fail_at_step.done").exists() and not (save / "final_model.pt").exists()
    assert (save / "checkpoints" / "latest").read_text().strip() == "step3"
    [(rc, text)] = _finish([_start("deepspeed.sh", *command)])
    assert rc == 0, text[-4000:]
    assert "resuming from checkpoint" in text and "at step 3" in text
    assert json.loads((save / "metrics.json").read_text())["resumed_from"] == 3
    reference, resumed = _final_params(reference_run), _final_params(save)
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.slow
def test_megatron_arguments_parse_with_megatron_lm(tmp_path: Path) -> None:
    """The Megatron-LM arguments the script builds pass Megatron-LM's own parse_args and
    validate_args with --optimizer coupled_adam (launch/pretrain_gpt_coupled.py's dry run)."""
    checkout = os.environ.get("MEGATRON_LM_PATH", "")
    if not (Path(checkout) / "pretrain_gpt.py").is_file():
        pytest.skip("MEGATRON_LM_PATH is not set to a Megatron-LM checkout")
    if not (LAUNCH / "pretrain_gpt_coupled.py").is_file():
        pytest.skip("launch/pretrain_gpt_coupled.py is not there yet")
    fake = _fake_megatron(tmp_path)
    env = _env(MEGATRON_LM=checkout, DATA_PATH=fake["DATA_PATH"], COUPLED_DS_DRY_RUN="1")
    proc = _run("torchrun_megatron.sh", "--save-dir", str(tmp_path / "ckpt"), "--master-port",
                str(_free_port()), "--", "--vocab-size", "50257", env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "optimizer=coupled_adam use_distributed_optimizer=True" in proc.stdout
