"""megatron_patch: ``optimizer="coupled_adam"`` through megatron-core's own DDP,
DistributedOptimizer, Float16 and FP32 wrappers on gloo CPU ranks, against single-process references on the gathered
full matrices (tests/megatron_harness.py runs the ranks, tests/megatron_shim.py maps
Megatron's CUDA allocations to the CPU).

Layouts covered (V_real=37 padded to 40 or 48, H=12): TP=1/DP=2, TP=2/DP=1, TP=2/DP=2; the
distributed optimizer with one bucket (each DP rank owns only one of the two matrices: empty
pieces), with one bucket per parameter (DP shards cut rows mid-way at 256 = 21 rows + 4 and
128 = 10 rows + 8 elements) and tied (cut at 64 = 5 rows + 4); fp32, bf16, fp16.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install "
                                            "'coupled-ds[megatron]')")

from coupled_ds import CoupledAdam  # noqa: E402
from tests.dist import run_on_ranks  # noqa: E402
from tests.reference import coupled_adam_reference  # noqa: E402
from tests.megatron_harness import (  # noqa: E402
    HP,
    V_REAL,
    RunSpec,
    assemble,
    is_vocab,
    run_specs,
)

COUPLED = ("embedding.word_embeddings.weight", "output_layer.weight")
TOL = 1e-6          # relative, acceptance bound (vs single-process CoupledAdam / AdamW)
TOL64 = 1e-5        # relative, vs the float64 reference (fp32 rounding over 20 steps)
ROOT = Path(__file__).resolve().parents[1]

# name -> spec; one spawn per world size runs all of them.
TWO_RANKS = {
    "tp1_dp2_distopt_one_bucket": RunSpec(tp=1, distopt=True),
    "tp1_dp2_distopt_midrow": RunSpec(tp=1, distopt=True, bucket_size=1),
    "tp1_dp2_distopt_tied": RunSpec(tp=1, distopt=True, tied=True),
    "tp1_dp2_fp32": RunSpec(tp=1, distopt=False),
    "tp1_dp2_distopt_midrow_bf16": RunSpec(tp=1, distopt=True, bucket_size=1, precision="bf16"),
    "tp1_dp2_fp16": RunSpec(tp=1, distopt=False, precision="fp16"),
    "tp2_dp1_fp32": RunSpec(tp=2, distopt=False),
    "tp2_dp1_distopt": RunSpec(tp=2, distopt=True),
    "tp2_dp1_tied_bf16": RunSpec(tp=2, distopt=False, tied=True, precision="bf16"),
    "neg_tp1_dp2_no_dp_reduce": RunSpec(tp=1, distopt=True, bucket_size=1, reduce=("tp",)),
    "neg_tp2_dp1_no_tp_reduce": RunSpec(tp=2, distopt=False, reduce=("dp",)),
    "synthetic_tp1_v40": RunSpec(tp=1, distopt=True, bucket_size=1, synthetic=True, v_pad=40),
    "synthetic_tp2_v48": RunSpec(tp=2, distopt=False, synthetic=True, v_pad=48),
    "synthetic_tp1_v40_count_padded": RunSpec(tp=1, distopt=True, synthetic=True, v_pad=40,
                                              count_padded=True),
    "synthetic_tp2_v48_count_padded": RunSpec(tp=2, distopt=False, synthetic=True, v_pad=48,
                                              count_padded=True),
    "ckpt_tp1_dp2_distopt_one_bucket": RunSpec(tp=1, distopt=True, checkpoint_at=10),
    "ckpt_tp1_dp2_distopt_tied": RunSpec(tp=1, distopt=True, tied=True, checkpoint_at=10,
                                         ckpt_format="fully_reshardable"),
    "ckpt_tp2_dp1_fp32": RunSpec(tp=2, distopt=False, checkpoint_at=10),
    "ckpt_tp2_dp1_tied_bf16": RunSpec(tp=2, distopt=False, tied=True, precision="bf16",
                                      checkpoint_at=10),
    "ckpt_tp1_dp2_distopt_one_bucket_te_step_path": RunSpec(tp=1, distopt=True, checkpoint_at=10,
                                                 te_step_path=True),
    "pp2_dp1_tied_distopt": RunSpec(tp=1, pp=2, distopt=True, synthetic=True),
    # megatron-core's GPTModel with one MTP layer: the last stage holds a copy of the word
    # embedding (marked shared_embedding only) besides the output layer.
    "mtp_pp2_untied_distopt": RunSpec(tp=1, pp=2, distopt=True, model="gpt_mtp", synthetic=True,
                                      steps=10),
    "mtp_pp2_tied_fp32_v016_markers": RunSpec(tp=1, pp=2, distopt=False, model="gpt_mtp",
                                              tied=True, synthetic=True, steps=10,
                                              v016_markers=True),
    "neg_mtp_pp2_untied_v016_markers_legacy_rule": RunSpec(
        tp=1, pp=2, distopt=True, model="gpt_mtp", synthetic=True, steps=10, v016_markers=True,
        legacy_rule=True),
}
FOUR_RANKS = {
    "tp2_dp2_distopt_one_bucket": RunSpec(tp=2, distopt=True),
    "tp2_dp2_distopt_midrow": RunSpec(tp=2, distopt=True, bucket_size=1),
    "tp2_dp2_fp32": RunSpec(tp=2, distopt=False),
    "tp2_dp2_distopt_midrow_bf16": RunSpec(tp=2, distopt=True, bucket_size=1, precision="bf16"),
    "tp2_dp2_distopt_tied": RunSpec(tp=2, distopt=True, tied=True),
    "tp2_dp2_distopt_one_bucket_bf16": RunSpec(tp=2, distopt=True, precision="bf16"),
    "neg_tp2_dp2_no_dp_reduce": RunSpec(tp=2, distopt=True, bucket_size=1, reduce=("tp",)),
    "neg_tp2_dp2_no_tp_reduce": RunSpec(tp=2, distopt=True, bucket_size=1, reduce=("dp",)),
    "ckpt_tp2_dp2_distopt_tied": RunSpec(tp=2, distopt=True, tied=True, checkpoint_at=10),
    "ckpt_tp2_dp2_distopt_one_bucket_bf16": RunSpec(tp=2, distopt=True, precision="bf16",
                                                    checkpoint_at=10,
                                                    ckpt_format="fully_reshardable"),
    "pp2_dp2_tied_distopt": RunSpec(tp=1, pp=2, distopt=True, synthetic=True),
    "pp2_dp2_tied_distopt_midrow": RunSpec(tp=1, pp=2, distopt=True, bucket_size=1,
                                           synthetic=True),
    "pp2_tp2_tied_bf16": RunSpec(tp=2, pp=2, distopt=False, precision="bf16", synthetic=True),
    "pp4_tied_fp32": RunSpec(tp=1, pp=4, distopt=False, synthetic=True, steps=5),
    "mtp_pp2_dp2_tied_distopt_midrow": RunSpec(tp=1, pp=2, distopt=True, bucket_size=1,
                                               model="gpt_mtp", tied=True, synthetic=True,
                                               steps=10),
}
EQUIVALENCE = [n for n in [*TWO_RANKS, *FOUR_RANKS] if not n.startswith("neg_")]


def _run(world: int, specs: dict[str, RunSpec], extra=()) -> dict:
    names = list(specs)
    by_rank = run_on_ranks(world, run_specs, [specs[n] for n in names] + list(extra),
                           timeout=600)
    out = {name: [by_rank[r][i] for r in range(world)] for i, name in enumerate(names)}
    for j, label in enumerate(extra):
        out[label] = [by_rank[r][len(names) + j] for r in range(world)]
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    out = _run(2, TWO_RANKS, extra=("refusals", "unmarked"))
    out.update(_run(4, FOUR_RANKS))
    return out


def _spec(name: str) -> RunSpec:
    return {**TWO_RANKS, **FOUR_RANKS}[name]


def _reference(per_rank: list[dict], spec: RunSpec, *, float64: bool = False
               ) -> dict[str, torch.Tensor]:
    """Single-process replay on the gathered full matrices with the gradients the run saw:
    CoupledAdam (or the float64 ten-line reference) on each whole [V_pad, H] vocabulary
    matrix, torch.optim.AdamW on every other parameter."""
    init = assemble(per_rank, "initial")
    grads = [assemble(per_rank, "grads", step=s) for s in range(spec.steps)]
    hyper = dict(lr=HP["lr"], betas=(HP["adam_beta1"], HP["adam_beta2"]), eps=HP["adam_eps"],
                 weight_decay=HP["weight_decay"])
    vocab_size = None if spec.count_padded else V_REAL
    out = {}
    for name, p0 in init.items():
        steps = [g[name] for g in grads]
        if is_vocab(name) and float64:
            out[name] = coupled_adam_reference(p0, steps, **hyper, vocab_size=vocab_size).float()
            continue
        p = torch.nn.Parameter(p0.clone())
        if is_vocab(name):
            opt = CoupledAdam([{"params": [p], "coupled": True, "vocab_size": vocab_size}],
                              **hyper)
        else:
            opt = torch.optim.AdamW([p], **hyper)
        for g in steps:
            p.grad = g.clone()
            opt.step()
        out[name] = p.detach()
    return out


def _rel_errors(per_rank: list[dict], spec: RunSpec, *, float64: bool = False
                ) -> dict[str, float]:
    got = assemble(per_rank, "final")
    ref = _reference(per_rank, spec, float64=float64)
    assert got.keys() == ref.keys()
    return {k: ((got[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in got}


@pytest.mark.slow
@pytest.mark.parametrize("name", EQUIVALENCE)
def test_matches_single_process(results, name):
    errors = _rel_errors(results[name], _spec(name))
    errors64 = _rel_errors(results[name], _spec(name), float64=True)
    print("EQUIV", name, max(errors[k] for k in errors if is_vocab(k)),
          max([errors[k] for k in errors if not is_vocab(k)]), max(errors64.values()))
    assert max(errors.values()) <= TOL, errors
    assert max(errors64.values()) <= TOL64, errors64


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in [*TWO_RANKS, *FOUR_RANKS] if n.startswith("neg_")])
def test_without_a_reduction_the_result_differs(results, name):
    """Negative controls: dropping the TP or the DP all-reduce, or coupling by
    is_embedding_or_output_parameter alone (the MTP copy then steps with AdamW), must break the
    equivalence."""
    errors = _rel_errors(results[name], _spec(name))
    print("NEG", name, max(v for k, v in errors.items() if is_vocab(k)))
    assert max(v for k, v in errors.items() if is_vocab(k)) > 1e-3, errors
    assert max(v for k, v in errors.items() if not is_vocab(k)) <= TOL, errors


@pytest.mark.slow
def test_layouts_cover_mid_row_cuts_and_empty_pieces(results):
    """The runs above are only meaningful if shards really cut rows and leave ranks empty."""
    H = 12
    one_bucket = results["tp1_dp2_distopt_one_bucket"]
    assert any(r["ranges"]["embedding.word_embeddings.weight"] is None for r in one_bucket)
    midrow = results["tp2_dp2_distopt_midrow"]
    starts = [r["ranges"]["embedding.word_embeddings.weight"][0] for r in midrow]
    assert any(s % H for s in starts), starts
    # The checkpointed layouts: TP1/DP2 tied cuts a row, TP2/DP2 tied leaves a rank empty.
    tied = [r["ranges"][COUPLED[0]] for r in results["tp1_dp2_distopt_tied"]]
    assert any(r[0] % H for r in tied), tied
    tied = [r["ranges"][COUPLED[0]] for r in results["tp2_dp2_distopt_tied"]]
    assert None in tied, tied


@pytest.mark.slow
def test_padded_rows_left_out_make_tp_degree_irrelevant(results):
    """Same gradients per global element: TP=1 with V_pad=40 and TP=2 with V_pad=48 agree on
    the real rows; counting the padded rows (a flag) makes them differ."""
    def real_rows(name):
        return assemble(results[name], "final")[COUPLED[0]][:V_REAL]

    tp1, tp2 = real_rows("synthetic_tp1_v40"), real_rows("synthetic_tp2_v48")
    same = ((tp1 - tp2).abs().max() / tp1.abs().max()).item()
    tp1c = real_rows("synthetic_tp1_v40_count_padded")
    tp2c = real_rows("synthetic_tp2_v48_count_padded")
    differ = ((tp1c - tp2c).abs().max() / tp1c.abs().max()).item()
    print("PADDING", same, differ)
    assert same <= TOL
    assert differ > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in [*TWO_RANKS, *FOUR_RANKS]
                                  if n.startswith(("pp", "mtp_"))])
def test_copies_on_first_and_last_stage_step_identically(results, name):
    """PP>1: stage 0's embedding and the last stage's copy of it (the tied output layer, or
    the MTP layer's word embedding) get the same gradients (as after Megatron's embedding-group
    all-reduce), sit in different DP shard layouts, each reduces over its own groups, and still
    end equal. Middle stages (PP=4) hold no vocabulary matrix and do not raise."""
    spec = _spec(name)
    final = assemble(results[name], "final")
    copy = "embedding.word_embeddings.weight" if spec.model == "gpt_mtp" else COUPLED[1]
    first, last = final[f"s0/{COUPLED[0]}"], final[f"s{spec.pp - 1}/{copy}"]
    err = ((first - last).abs().max() / first.abs().max()).item()
    print("PP", name, err)
    assert err <= 1e-6, err


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in [*TWO_RANKS, *FOUR_RANKS] if n.startswith("ckpt_")])
def test_checkpoint_round_trip_continues_the_trajectory(results, name):
    """Save at step 10 (sharded_state_dict + dist_checkpointing, Megatron-LM's dp_reshardable or
    fully_reshardable format), load into a fresh model and optimizer, train 10 more: the same
    parameters as the uninterrupted run. (One-bucket layouts only: in megatron-core 0.16.1 both
    formats break with several small buckets, for every parameter and optimizer alike -
    dp_reshardable asserts 'empty bucket encountered', fully_reshardable pads state with zeros,
    its issue #504.)"""
    spec = _spec(name)
    plain = name.removeprefix("ckpt_").removesuffix("_te_step_path")
    got = assemble(results[name], "final")
    want = assemble(results[plain], "final")
    for key in want:
        err = ((got[key] - want[key]).abs().max() / want[key].abs().max()).item()
        print("CKPT", name, key, err)
        assert err <= 1e-6, (key, err)


@pytest.mark.slow
def test_unsupported_combinations_raise_naming_the_flag(results):
    for flag, message in results["refusals"][0].items():
        assert message.startswith("UnsupportedMegatronError") and flag.split("=")[0] in message, \
            (flag, message)


@pytest.mark.slow
def test_a_model_with_no_marked_matrix_raises_on_every_rank(results):
    """A custom model without markers would train as AdamW: every rank raises at
    get_megatron_optimizer, naming the attributes to set."""
    from megatron_patch.geometry import MARKERS

    messages = results["unmarked"]
    assert len(messages) == 2
    for message in messages:
        assert message.startswith("ValueError") and all(m in message for m in MARKERS), message


# ----------------------------------------------------------------- single process, no ranks
def test_apply_is_idempotent_and_undo_restores():
    import megatron.core.optimizer as mco

    import megatron_patch

    original = mco._get_megatron_optimizer_based_on_param_groups
    megatron_patch.apply(training=False)
    patched = mco._get_megatron_optimizer_based_on_param_groups
    megatron_patch.apply(training=False)
    assert mco._get_megatron_optimizer_based_on_param_groups is patched is not original
    megatron_patch.undo()
    assert mco._get_megatron_optimizer_based_on_param_groups is original
    assert not megatron_patch.is_applied()


def test_config_needs_the_vocabulary_size_or_the_padded_rows_flag():
    import megatron_patch

    with pytest.raises(ValueError, match="coupled_adam_vocab_size"):
        megatron_patch.coupled_adam_config(lr=1e-3)
    config = megatron_patch.coupled_adam_config(count_padded_rows=True, lr=1e-3)
    assert config.optimizer == "coupled_adam"


def test_unsupported_megatron_core_version_is_refused(monkeypatch):
    from megatron_patch import _compat

    monkeypatch.setattr(_compat, "megatron_core_version", lambda: (0, 20, 0))
    with pytest.raises(_compat.UnsupportedMegatronError, match=r">=0.16.0,<0.20"):
        _compat.check_version()


ARGS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [p for p in ({lm!r}, {root!r}) if p]
    import megatron_patch
    megatron_patch.apply(training=True)
    from megatron.training import arguments, global_vars, training
    base = ["x", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--lr", "1e-3", "--train-iters", "10", "--vocab-size", "37",
            "--tokenizer-type", "NullTokenizer", "--bf16"]
    sys.argv = base + ["--optimizer", "coupled_adam", "--use-distributed-optimizer",
                       "--coupled-adam-avg-scale", "0.5"]
    args = arguments.parse_args()
    arguments.validate_args(args)
    config, _ = training.get_megatron_optimizer_config(args)  # no tokenizer yet: built here
    print("RESULT", args.optimizer, args.coupled_adam, args.use_distributed_optimizer,
          config.optimizer, config.use_distributed_optimizer, config.coupled_adam_avg_scale,
          config.coupled_adam_count_padded_rows)
    # Megatron-LM's own initialisation builds the tokenizer pretrain() uses; the vocabulary
    # reported before it must be the same.
    dry_vocab, dry_padded = config.coupled_adam_vocab_size, args.padded_vocab_size
    args.padded_vocab_size = None
    global_vars.set_global_variables(args)
    config, _ = training.get_megatron_optimizer_config(args)
    print("VOCAB", dry_vocab, config.coupled_adam_vocab_size,
          global_vars.get_tokenizer().vocab_size, dry_padded, args.padded_vocab_size)
    import megatron.core.optimizer as mco
    from megatron_patch import _compat
    # setup_model_and_optimizer calls training.get_megatron_optimizer: the patched factory must
    # be reached from it (0.17+: through the router that passes the emerging-optimizer dispatch).
    routed = (training.get_megatron_optimizer is mco.get_megatron_optimizer
              if _compat.megatron_core_version() < (0, 17)
              else getattr(training.get_megatron_optimizer, "_coupled_ds_patch", False))
    print("FACTORY", routed,
          getattr(mco._get_megatron_optimizer_based_on_param_groups, "_coupled_ds_patch", False))
    sys.argv = base + ["--optimizer", "coupled_adam", "--use-precision-aware-optimizer"]
    args = arguments.parse_args()
    try:
        training.get_megatron_optimizer_config(args)
    except ValueError as error:
        print("REFUSED", error)
""")


def _megatron_lm_path(entry: str) -> str:
    """Where ``megatron.training`` (and ``entry`` in it) come from: $MEGATRON_LM_PATH, or
    (megatron-core 0.17+) the wheel itself ("" then). Skips, saying why, when neither has it."""
    lm = os.environ.get("MEGATRON_LM_PATH")
    if lm and (Path(lm) / entry).exists():
        return lm
    if importlib.util.find_spec("megatron.training") is not None and entry == "megatron/training":
        return ""
    pytest.skip(f"{entry} is neither in the installed megatron-core (the wheel ships "
                "megatron/training from 0.17) nor in MEGATRON_LM_PATH (a Megatron-LM checkout)")


@pytest.mark.slow
def test_megatron_lm_arguments_reach_the_optimizer_factory():
    """Megatron-LM's own parse_args/validate_args/get_megatron_optimizer_config: in the
    megatron-core wheel from 0.17, from a checkout (MEGATRON_LM_PATH) before."""
    lm = _megatron_lm_path("megatron/training")
    script = ARGS_SCRIPT.format(lm=lm, root=str(ROOT))
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line for line in proc.stdout.splitlines()
             if line.startswith(("RESULT", "REFUSED", "FACTORY", "VOCAB"))}
    # validate_args sees "adam" (0.17+ would turn any other name's distributed optimizer into
    # the layer-wise one); the config says coupled_adam.
    assert lines["RESULT"].split()[1:] == ["adam", "True", "True", "coupled_adam", "True", "0.5",
                                           "False"], lines
    dry, configured, tokenizer, dry_padded, padded = map(int, lines["VOCAB"].split()[1:])
    assert dry == configured == tokenizer and dry_padded == padded == 128, lines
    assert lines["FACTORY"].split()[1:] == ["True", "True"], lines
    assert "--use-precision-aware-optimizer" in lines["REFUSED"], lines


@pytest.mark.slow
def test_launch_script_dry_run_reports_the_vocabulary_of_the_run():
    """launch/pretrain_gpt_coupled.py with a pretrain_gpt.py command line (dry run: parse,
    validate, build the tokenizer as Megatron-LM does, build the optimizer config; no model)."""
    lm = _megatron_lm_path("megatron/training")
    argv = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
            "--lr", "1e-3", "--train-iters", "10", "--vocab-size", "37", "--tokenizer-type",
            "NullTokenizer", "--optimizer", "coupled_adam", "--use-distributed-optimizer",
            "--tensor-model-parallel-size", "1", "--make-vocab-size-divisible-by", "16"]
    env = {**os.environ, "COUPLED_DS_DRY_RUN": "1", "RANK": "0", "WORLD_SIZE": "1"}
    if lm:
        env["MEGATRON_LM_PATH"] = lm
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_gpt_coupled.py"),
                           *argv], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r"optimizer=coupled_adam use_distributed_optimizer=True "
                      r"coupled_adam_vocab_size=(\d+) coupled_adam_avg_scale=1.0 "
                      r"coupled_adam_count_padded_rows=False", proc.stdout)
    assert match, proc.stdout[-2000:]
    vocab = int(match.group(1))
    assert vocab in (37, 38), vocab  # NullTokenizer: 37, plus its end-of-document token before 0.17
    padded = -(-vocab // 16) * 16
    assert (f"vocabulary: {padded} rows per vocabulary matrix after Megatron's padding "
            f"(--make-vocab-size-divisible-by 16 x TP 1); Coupled Adam's column means count the "
            f"first {vocab}") in proc.stdout, proc.stdout[-2000:]
    # A tokenizer that cannot be built: said plainly, not guessed from --vocab-size.
    argv[argv.index("NullTokenizer")] = "GPT2BPETokenizer"
    argv += ["--vocab-file", "/nonexistent/vocab.json", "--merge-file", "/nonexistent/merges.txt"]
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_gpt_coupled.py"),
                           *argv], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "coupled_adam_vocab_size=unknown" in proc.stdout, proc.stdout[-2000:]
    assert ("vocabulary: unknown - building the tokenizer (--tokenizer-type GPT2BPETokenizer) "
            "the way Megatron-LM does failed") in proc.stdout, proc.stdout[-2000:]


# --------------------------------------------------------- Muon (megatron-core 0.17+ registry)
MUON = {
    # Muon steps the 2-D hidden weights; the vocabulary matrices and 1-D parameters go to its
    # scalar optimizer: coupled_adam, or (control) Megatron's adam.
    "muon_tp2_dp1_coupled": RunSpec(tp=2, distopt=False, synthetic=True, optimizer="muon",
                                    steps=10),
    "muon_tp2_dp1_adam": RunSpec(tp=2, distopt=False, synthetic=True, optimizer="muon",
                                 muon_scalar="adam", steps=10),
}


@pytest.fixture(scope="module")
def muon_results() -> dict:
    from megatron_patch import _compat

    if _compat.megatron_core_version() < (0, 17, 0):
        pytest.skip("muon_scalar_optimizer (Muon's optimizer for non-matrix parameters) exists "
                    "from megatron-core 0.17")
    if importlib.util.find_spec("emerging_optimizers") is None:
        pytest.skip("megatron-core's Muon needs the emerging-optimizers package (pip install "
                    "emerging-optimizers)")
    return _run(2, MUON)


@pytest.mark.slow
def test_muon_scalar_optimizer_coupled_adam(muon_results):
    """--optimizer muon --muon-scalar-optimizer coupled_adam: the vocabulary matrices equal
    single-process Coupled Adam, 1-D parameters AdamW, and the Muon-stepped matrices are exactly
    those of the run whose scalar optimizer is Megatron's adam (which does not couple)."""
    spec = MUON["muon_tp2_dp1_coupled"]
    errors = _rel_errors(muon_results["muon_tp2_dp1_coupled"], spec)
    shapes = muon_results["muon_tp2_dp1_coupled"][0]["shapes"]
    scalar = {k: v for k, v in errors.items()
              if is_vocab(k) or len(shapes[k.split("@")[0]]) == 1}
    print("MUON", scalar)
    assert scalar and max(scalar.values()) <= TOL, scalar
    got = assemble(muon_results["muon_tp2_dp1_coupled"], "final")
    control = assemble(muon_results["muon_tp2_dp1_adam"], "final")
    for key in got:
        if not is_vocab(key) and len(shapes[key.split("@")[0]]) == 2:
            assert torch.equal(got[key], control[key]), key
    adam_errors = _rel_errors(muon_results["muon_tp2_dp1_adam"], MUON["muon_tp2_dp1_adam"])
    assert max(v for k, v in adam_errors.items() if is_vocab(k)) > 1e-3, adam_errors


def test_a_vocabulary_copy_stepped_by_another_optimizer_raises():
    """Muon hands 2-D weights without is_embedding_or_output_parameter to its matrix optimizer:
    a copy marked only shared_embedding (as megatron-core 0.16 marks the MTP copy) would be
    stepped by Muon; the check names it."""
    from megatron_patch import core

    model = torch.nn.Linear(4, 6, bias=True)
    model.weight.shared_embedding = True
    why = core._copy_elsewhere([model], here={id(model.bias)})
    with pytest.raises(ValueError, match=r"0:weight .*shared_embedding.*another optimizer"):
        core.check_coupled_somewhere(1, why)
    assert core._copy_elsewhere([model], here={id(model.weight), id(model.bias)}) is None
