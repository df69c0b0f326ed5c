"""End-to-end demo: AdamW vs Coupled Adam on a small GPT under DeepSpeed ZeRO-2 (what `make demo` runs).

    python examples/demo.py                       # 2 CPU ranks, stdlib corpus, 300 steps
    python examples/demo.py --steps 2000 --d-model 256 --n-layer 4 --micro-batch 16 --ranks 4 \
        --data ~/books --max-tokens 20000000 --vocab-size 16384

Both runs go through the repository's own launcher (launch/deepspeed.sh), with the same seed,
data, batches and steps, and the DeepSpeed config launch/configs/zero2_cpu_coupled.json; the
baseline differs only by ``--optimizer AdamW``. The corpus is the Python standard library's own
source (or --data), tokenized by a word-level tokenizer trained on it (examples/data.py).

Prints a paper-style table (validation loss, Iso, ||mu||, ||mu||^r, kappa, rho) and writes
OUT/compare.png. Exits 1 when Coupled Adam's ||mu||^r is not --min-ratio times below AdamW's.
Re-running with the same settings resumes (or reuses) the runs in OUT; changed settings start over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO))

import data as corpus_data  # noqa: E402  (examples/data.py)

OPTIMIZERS = ("AdamW", "CoupledAdam")
# Table columns: (metrics.json key, header, format).
COLUMNS = (("val_loss", "val loss", "{:.3f}"), ("iso", "Iso", "{:.3f}"),
           ("mu_norm", "||mu||", "{:.4f}"), ("mu_norm_rel", "||mu||^r", "{:.4f}"),
           ("kappa", "kappa", "{:.3f}"), ("rho", "rho", "{:+.3f}"))
# Launcher output worth showing live: progress bars, our own summary lines, errors. Everything
# (DeepSpeed's INFO lines, the launcher's full command) goes to OUT/<optimizer>/launch.log.
_SHOW = re.compile(r"\d+%\||\[train_ds\]|\[deepspeed\.sh\]|Traceback|Error|error:")
# A tqdm bar ("CoupledAdam:  37%|███▋      | 11/30 [00:03<00:05, ..., loss=6.091]"): other
# ranks write to the same pipe, so a bar segment can carry their text after it.
_BAR = re.compile(r"^ *\w+: +\d+%\|[^\]]*\]")
# Said already: deepspeed.sh's line naming what it starts (the demo's header line says it), and
# train_ds's metrics (the table shows them).
_HIDE = re.compile(r"^\[deepspeed\.sh\] starting |^\[train_ds\] done: ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=str(REPO / "runs" / "demo"), help="output directory")
    p.add_argument("--data", nargs="+", default=None,
                   help="text files or directories (default: the Python standard library)")
    p.add_argument("--ranks", type=int, default=2, help="local DeepSpeed ranks (CPU processes)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    p.add_argument("--vocab-size", type=int, default=4096, help="word vocabulary (with <unk>)")
    p.add_argument("--max-tokens", type=int, default=1_000_000, help="corpus size (5%% validation)")
    p.add_argument("--seq-len", type=int, default=128, help="context length")
    p.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--d-model", type=int, default=128, help="hidden size H")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warmup + cosine)")
    p.add_argument("--seed", type=int, default=1234, help="model init and batch order")
    p.add_argument("--eval-interval", type=int, default=50,
                   help="validation loss on the progress bar every N steps (0: only at the end)")
    p.add_argument("--config", default=str(REPO / "launch" / "configs" / "zero2_cpu_coupled.json"),
                   help="DeepSpeed config (the baseline overrides only the optimizer type)")
    p.add_argument("--min-ratio", type=float, default=10.0,
                   help="exit 1 unless ||mu||^r(AdamW) / ||mu||^r(CoupledAdam) reaches this")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs in --out first")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(args: argparse.Namespace, data_dir: Path) -> list[str]:
    """Training-script arguments shared by both runs (everything but the optimizer)."""
    return ["--data-dir", str(data_dir), "--steps", str(args.steps), "--seed", str(args.seed),
            "--seq-len", str(args.seq_len), "--n-layer", str(args.n_layer),
            "--n-head", str(args.n_head), "--d-model", str(args.d_model),
            "--micro-batch", str(args.micro_batch), "--lr", str(args.lr),
            "--vocab-size", str(args.vocab_size), "--max-tokens", str(args.max_tokens),
            "--eval-interval", str(args.eval_interval)]


def _visible(text: str) -> str | None:
    """What the terminal shows of one output line (or bar refresh): None for nothing."""
    if bar := _BAR.match(text):
        rest = text[bar.end():]  # another rank's output that landed behind the bar
        return bar.group() + ("\n" + rest if _SHOW.search(rest) else "")
    if _SHOW.search(text) and not _HIDE.match(text):
        return text
    return None


def _stream(proc: subprocess.Popen, log) -> None:
    """Copy the launcher's output to ``log``; echo progress bars, summaries and errors."""
    assert proc.stdout is not None
    pending = b""
    while chunk := os.read(proc.stdout.fileno(), 4096):
        log.write(chunk)
        pending += chunk
        *pieces, pending = re.split(rb"(\r|\n)", pending)
        for i in range(0, len(pieces) - 1, 2):
            shown = _visible(pieces[i].decode(errors="replace"))
            if shown is not None:
                sys.stderr.write(shown + pieces[i + 1].decode())
                sys.stderr.flush()
    log.flush()


def _short(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to read)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run_one(args: argparse.Namespace, optimizer: str, data_dir: Path, out: Path) -> dict:
    """Train with one optimizer through launch/deepspeed.sh; return its metrics.json."""
    run_dir = out / optimizer
    settings = {"optimizer": optimizer, "config": Path(args.config).read_text(),
                "train_args": _train_args(args, data_dir), "ranks": args.ranks}
    stamp = run_dir / "demo_settings.json"
    if run_dir.exists() and (args.fresh or not stamp.exists()
                             or json.loads(stamp.read_text()) != settings):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings))
    cmd = ["bash", str(REPO / "launch" / "deepspeed.sh"), "--num-gpus", str(args.ranks),
           "--master-port", str(_free_port()), "--config", args.config, "--save-dir", str(run_dir),
           "--python", sys.executable, "--", "--optimizer", optimizer, *_train_args(args, data_dir)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks))}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    log_path = run_dir / "launch.log"
    print(f"\n== {optimizer}: launch/deepspeed.sh, {args.ranks} CPU ranks, {args.steps} steps "
          f"(command and output: {_short(log_path)})", flush=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} examples/demo.py runs:\n"
                  f"{shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        _stream(proc, log)
        rc = proc.wait()
    metrics_path = run_dir / "metrics.json"
    if rc != 0 or not metrics_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        sys.exit(f"{optimizer} run failed (exit code {rc}); last lines of {log_path}:\n"
                 + "\n".join(tail))
    return json.loads(metrics_path.read_text())


def format_table(results: dict[str, dict]) -> str:
    """The paper-style comparison table, one row per optimizer."""
    header = f"{'':<12}" + "".join(f"{h:>11}" for _, h, _ in COLUMNS)
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        cells = [fmt.format(m[k]) if m.get(k) is not None else "n/a" for k, _, fmt in COLUMNS]
        lines.append(f"{name:<12}" + "".join(f"{c:>11}" for c in cells))
    return "\n".join(lines)


def plot(out: Path, data_dir: Path) -> Path | None:
    """OUT/compare.png (and OUT/report.txt) from the two DeepSpeed checkpoints, through
    ``python -m coupled_ds.report`` (which consolidates the ZeRO shards itself)."""
    png = out / "compare.png"
    cmd = [sys.executable, "-m", "coupled_ds.report",
           *(str(out / name / "checkpoints") for name in OPTIMIZERS),
           "--freq", str(data_dir / "token_counts.npy"), "--plot", str(png)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out / "report.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not png.exists():
        print(f"(no plot: coupled_ds.report exited {proc.returncode}; see {out / 'report.txt'})")
        return None
    return png


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    out = Path(args.out).resolve()
    data_dir = out / "data"
    try:
        corpus_data.prepare(data_dir, paths=args.data, vocab_size=args.vocab_size,
                            max_tokens=args.max_tokens)
    except corpus_data.NoTextError as err:
        sys.exit(f"error: {err}")
    meta = json.loads((data_dir / "meta.json").read_text())
    print(f"corpus: {meta['n_tokens']:,} tokens from {meta['n_files']} files "
          f"({meta['n_train']:,} train), word vocabulary {meta['vocab_size']}, "
          f"<unk> {meta['unk_fraction']:.1%}")
    print(f"model: GPT {args.n_layer} layers, d={args.d_model}, {args.steps} steps x "
          f"{args.ranks} ranks x {args.micro_batch} x {args.seq_len} tokens, DeepSpeed ZeRO-2 on CPU")
    results = {name: run_one(args, name, data_dir, out) for name in OPTIMIZERS}
    table = format_table(results)
    ratio = results["AdamW"]["mu_norm_rel"] / max(results["CoupledAdam"]["mu_norm_rel"], 1e-30)
    png = plot(out, data_dir)
    wall = time.time() - t0
    summary = (f"\n{table}\n\n||mu||^r AdamW / CoupledAdam = {ratio:.1f}x "
               f"(needed >= {args.min_ratio:g}x); wall time {wall:.0f} s")
    print(summary)
    if png is not None:
        print(f"plot: {png}")
    (out / "results.json").write_text(json.dumps(
        {"results": results, "ratio_mu_norm_rel": ratio, "wall_seconds": wall,
         "args": vars(args)}, indent=1))
    (out / "table.txt").write_text(summary.lstrip("\n") + "\n")
    return 0 if ratio >= args.min_ratio and not math.isnan(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
