"""The no-edit path: a DeepSpeed script that never imports coupled_ds trains with CoupledAdam under
``deepspeed --module coupled_ds.run`` (DeepSpeed's own launcher, 2 CPU ranks), says so visibly on
rank 0, and matches single-process CoupledAdam; the same script without the wrapper is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed",
                    reason="DeepSpeed is not installed (pip install coupled-ds[deepspeed])")

from tests import plain_ds_script as S  # noqa: E402
from tests.test_launch import _free_port  # noqa: E402
from tests.test_zero_init import setup_message  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "plain_ds_script.py"


def _env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _reference() -> dict[str, torch.Tensor]:
    from coupled_ds import CoupledAdam, coupled_param_groups

    model = S.Model()
    hp = S.CONFIG["optimizer"]["params"]
    opt = CoupledAdam(coupled_param_groups(model, weight_decay=hp["weight_decay"]), lr=hp["lr"],
                      betas=tuple(hp["betas"]), eps=hp["eps"])
    for step in range(S.STEPS):
        opt.zero_grad()
        ((model(S.batch(step, 0)) + model(S.batch(step, 1))) / 2).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_unmodified_script(tmp_path):
    assert "coupled_ds" not in SCRIPT.read_text().split('"""', 2)[2], "the fixture imports coupled_ds"
    out = tmp_path / "params.pt"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(_free_port()), "--module", "coupled_ds.run", str(SCRIPT), "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"launch failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = torch.load(out)
    assert result["optimizer"] == "CoupledAdam"
    want = _reference()
    diff = max(((result["params"][n] - w).abs().max() / w.abs().max()).item()
               for n, w in want.items())
    print(f"no-edit run vs single-process CoupledAdam: {diff:.2e}")
    assert diff <= 1e-6, f"no-edit run differs from single-process CoupledAdam by {diff:.2e}"
    # what the user sees in the launcher's output, without any logging set-up of their own
    message = setup_message(done.stdout + done.stderr)
    print("\n".join(message))
    assert "ZeRO stage 2" in message[0] and "tok.weight [37, 8]" in message[1], message
    assert '{"local_rank": 0}' in done.stdout, "the launcher's --local_rank did not reach the script"

    # the same script, without the wrapper: DeepSpeed does not know the name
    single = {**_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.pt")],
                          cwd=tmp_path, env=single, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "CoupledAdam" in done.stderr, done.stderr[-3000:]
    print(done.stderr.strip().splitlines()[-1])


def test_wrapper_usage_and_arguments(tmp_path):
    """Arguments reach the script as with ``python script.py``; bad use says how to call it."""
    script = tmp_path / "show.py"
    script.write_text("import sys, json\nprint(json.dumps([sys.argv, __name__, sys.path[0], "
                      "'coupled_ds.deepspeed' in sys.modules]))\n")
    run = [sys.executable, "-m", "coupled_ds.run"]
    done = subprocess.run([*run, "--local_rank=1", str(script), "--x", "1"], env=_env(),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    argv, name, path0, registered = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert argv == [str(script), "--local_rank=1", "--x", "1"] and name == "__main__"
    assert path0 == str(tmp_path) and registered
    for args, words in (([], "usage: python -m coupled_ds.run"),
                        ([str(tmp_path / "missing.py")], "no such script")):
        done = subprocess.run([*run, *args], env=_env(), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode != 0, done
        assert words in done.stderr, done.stderr
