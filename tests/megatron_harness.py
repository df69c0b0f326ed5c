"""Rank-side harness for tests/test_megatron.py (no tests here): a tiny vocabulary-parallel LM
trained through megatron-core's own DDP and optimizer wrappers on gloo CPU ranks
(tests/megatron_shim.py).

Every run returns, per step, the gradients the optimizer was given and, at the end, the fp32
values it holds, each as (tp_rank, name, flat start, values) pieces in the model parameter's
frame, taken from Megatron's own range maps (not from megatron_patch), so the parent process can
assemble the full matrices and replay single-process references on them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

V_REAL, H, F_HIDDEN, BATCH, SEQ = 37, 12, 8, 3, 5
HP = dict(lr=1e-2, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, weight_decay=0.1)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    tp: int
    distopt: bool
    precision: str = "fp32"          # fp32 | bf16 | fp16
    tied: bool = False
    v_pad: int = 40
    steps: int = 20
    count_padded: bool = False
    reduce: tuple[str, ...] = ("tp", "dp")   # negative controls drop one
    checkpoint_at: int | None = None         # save/reload through sharded_state_dict here
    bucket_size: int | None = None           # small: every parameter is its own DP-sharded bucket
    ckpt_format: str = "dp_reshardable"      # Megatron-LM's default; or "fully_reshardable"
    pp: int = 1                              # >1: tied copies on first and last stage
    te_step_path: bool = False               # DistributedOptimizer's TE/apex branches for `step`
    optimizer: str = "coupled_adam"          # "adam": Megatron's own path, for comparisons;
                                             # "muon": 0.19's Muon, muon_scalar for the rest
    muon_scalar: str = "coupled_adam"
    synthetic: bool = False                  # gradients keyed by global (row, col), not a model
    model: str = "tiny"                      # "gpt_mtp": megatron-core's GPTModel + 1 MTP layer
    v016_markers: bool = False               # mark the MTP copy as megatron-core 0.16 does
                                             # (shared_embedding only; 0.19 marks it both ways)
    legacy_rule: bool = False                # negative control: couple by is_embedding_or_output
                                             # _parameter only (with v016_markers the MTP copy
                                             # then gets AdamW)
    unmarked: bool = False                   # TinyLM without markers (get_megatron_optimizer
                                             # must raise on every rank)


VOCAB_NAMES = ("word_embeddings.weight", "output_layer.weight")


def is_vocab(key: str) -> bool:
    """A copy of a vocabulary matrix, by parameter name (independent of megatron_patch's rule)."""
    return key.endswith(VOCAB_NAMES)


def _model_class():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.transformer.module import MegatronModule

    class Embedding(MegatronModule):
        """Container, so sharded_state_dict reaches VocabParallelEmbedding's own (TP-aware)."""

        def __init__(self, config, v_pad: int):
            super().__init__(config)
            self.word_embeddings = VocabParallelEmbedding(
                v_pad, H, init_method=torch.nn.init.normal_, config=config)

    class TinyLM(MegatronModule):
        """Embedding -> one residual MLP -> vocabulary-parallel output layer (tied or not)."""

        def __init__(self, config, v_pad: int, tied: bool, marked: bool = True):
            super().__init__(config)
            init = torch.nn.init.normal_
            self.tied = tied
            self.embedding = Embedding(config, v_pad)
            self.fc1 = ColumnParallelLinear(H, F_HIDDEN, config=config, init_method=init,
                                            bias=True, gather_output=False)
            self.fc2 = RowParallelLinear(F_HIDDEN, H, config=config, init_method=init, bias=True,
                                         input_is_parallel=True, skip_bias_add=False)
            self.output_layer = ColumnParallelLinear(
                H, v_pad, config=config, init_method=init, bias=False, gather_output=False,
                skip_weight_param_allocation=tied)
            # What LanguageModule.setup_embeddings_and_output_layer marks.
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = marked
            if not tied:
                self.output_layer.weight.is_embedding_or_output_parameter = marked

        def forward(self, tokens, labels):
            h = self.embedding.word_embeddings(tokens)                       # [B, S, H]
            h = h + self.fc2(torch.nn.functional.gelu(self.fc1(h)[0]))[0]
            weight = self.embedding.word_embeddings.weight if self.tied else None
            logits, _ = self.output_layer(h, weight=weight)                  # [B, S, V/tp]
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()

    class TinyStage(MegatronModule):
        """One pipeline stage of a tied model (parameters only; stepped with synthetic grads):
        stage 0 holds the embedding, the last stage its copy as the output layer, marked as
        LanguageModule marks it (``shared_embedding``, ``is_embedding_or_output_parameter``);
        middle stages hold no vocabulary matrix."""

        def __init__(self, config, v_pad: int, first: bool, last: bool):
            super().__init__(config)
            init = torch.nn.init.normal_
            torch.manual_seed(1234)  # both copies start equal (Megatron copies stage 0's)
            if first:
                self.embedding = Embedding(config, v_pad)
                self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
                self.fc1 = ColumnParallelLinear(H, F_HIDDEN, config=config, init_method=init,
                                                bias=True, gather_output=False)
            elif not last:
                self.fc1 = ColumnParallelLinear(H, F_HIDDEN, config=config, init_method=init,
                                                bias=True, gather_output=False)
            else:
                self.output_layer = ColumnParallelLinear(
                    H, v_pad, config=config, init_method=init, bias=False, gather_output=False)
                self.output_layer.weight.is_embedding_or_output_parameter = True
                self.output_layer.weight.shared_embedding = True
                self.fc2 = RowParallelLinear(F_HIDDEN, H, config=config, init_method=init,
                                             bias=True, input_is_parallel=True,
                                             skip_bias_add=False)

    return TinyLM, TinyStage


def _gpt_mtp(config, v_pad: int, tied: bool):
    """megatron-core's GPTModel (local layers) with one multi-token-prediction layer, which lives
    on the last pipeline stage with its own copy of the word embedding."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )

    spec = get_gpt_layer_local_spec()
    last = parallel_state.is_pipeline_last_stage()
    mtp = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False) if last else None
    return GPTModel(config, spec, vocab_size=v_pad, max_sequence_length=SEQ,
                    pre_process=parallel_state.is_pipeline_first_stage(), post_process=last,
                    share_embeddings_and_output_weights=tied, mtp_block_spec=mtp)


def _build(spec: RunSpec):
    import megatron_patch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.precision]
    config = TransformerConfig(
        num_layers=spec.pp, hidden_size=H, num_attention_heads=spec.tp,
        mtp_num_layers=1 if spec.model == "gpt_mtp" else None,
        use_cpu_initialization=True, tensor_model_parallel_size=spec.tp,
        pipeline_model_parallel_size=spec.pp, params_dtype=dtype, bf16=spec.precision == "bf16",
        fp16=spec.precision == "fp16", pipeline_dtype=dtype)
    torch.manual_seed(1234)  # CPU init draws the full master weights: same for every TP degree
    lm, stage = _model_class()
    if spec.model == "gpt_mtp":
        model = _gpt_mtp(config, spec.v_pad, spec.tied).to(dtype)
        if spec.v016_markers and not parallel_state.is_pipeline_first_stage():
            model.embedding.word_embeddings.weight.is_embedding_or_output_parameter = False
    elif spec.pp > 1:
        model = stage(config, spec.v_pad, parallel_state.is_pipeline_first_stage(),
                      parallel_state.is_pipeline_last_stage()).to(dtype)
    else:
        model = lm(config, spec.v_pad, spec.tied, marked=not spec.unmarked).to(dtype)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=spec.distopt,
        overlap_grad_reduce=spec.bucket_size is not None, bucket_size=spec.bucket_size)
    model = DistributedDataParallel(config, ddp_config, model)
    opt_config = megatron_patch.coupled_adam_config(
        vocab_size=V_REAL, count_padded_rows=spec.count_padded, **HP, clip_grad=0.0,
        optimizer=spec.optimizer,
        **({"muon_scalar_optimizer": spec.muon_scalar} if spec.optimizer == "muon" else {}),
        bf16=spec.precision == "bf16", fp16=spec.precision == "fp16",
        loss_scale=1.0 if spec.precision == "fp16" else None, params_dtype=dtype,
        use_distributed_optimizer=spec.distopt)
    if spec.legacy_rule:  # the rule before MTP copies were coupled
        from megatron_patch import core

        rule = core.is_coupled_parameter
        core.is_coupled_parameter = lambda p: bool(getattr(p, "is_embedding_or_output_parameter",
                                                           False))
    try:
        optimizer = get_megatron_optimizer(opt_config, [model])
    finally:
        if spec.legacy_rule:
            core.is_coupled_parameter = rule
    if spec.reduce != ("tp", "dp"):
        _drop_reductions(optimizer, spec.reduce, parallel_state.get_tensor_model_parallel_group())
    return model, optimizer


def _drop_reductions(chained, keep, tp_group):
    """Negative control: rebuild the geometries without the TP or DP all-reduce."""
    for opt in chained.chained_optimizers:
        inner = opt.optimizer
        pieces = [(t, inner.geometry_of(t)) for t in list(inner._coupled.keys())]
        empties = list(inner._empty_pieces)
        inner.clear_geometry()

        def filtered(geometry):
            groups = tuple(g for g in geometry.groups
                           if ("tp" if g is tp_group else "dp") in keep)
            return dataclasses.replace(geometry, groups=groups)

        for tensor, geometry in pieces:
            inner.couple(tensor, filtered(geometry))
        for geometry, device in empties:
            inner.add_empty_piece(filtered(geometry), device)


def _batch(step: int, dp_rank: int):
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    tokens = torch.randint(0, V_REAL, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, V_REAL, (BATCH, SEQ), generator=gen)
    return tokens, labels


def _synthetic_grads(model, step, tp_rank):
    """Reduced gradients that depend only on the global element, whatever TP degree and padding:
    row i of a vocabulary matrix gets the same values for V_pad = 40 and 48."""
    for index, (name, p) in enumerate(_named(model)):
        coupled = is_vocab(name)
        # Vocabulary matrices share one seed: tied copies on two pipeline stages get the same
        # gradient, as Megatron's embedding-group all-reduce gives them.
        gen = torch.Generator().manual_seed(100 * step + (99 if coupled else index))
        if coupled:
            rows = p.shape[0]
            full = torch.randn(64, H, generator=gen) * (1 + torch.arange(H)) / H   # [V_max, H]
            full[V_REAL:] *= 4  # padded output rows get gradient too; make them count
            grad = full[tp_rank * rows:(tp_rank + 1) * rows]
        else:
            grad = torch.randn(p.shape, generator=gen)
        p.main_grad.copy_(grad)


def _megatron_range(optimizer, param):
    """Megatron's own (start, end) of ``param.view(-1)`` that this DP rank's optimizer holds."""
    from megatron.core.optimizer import DistributedOptimizer

    if isinstance(optimizer, DistributedOptimizer):
        try:
            r = optimizer._get_model_param_range_map(param)["param"]
        except KeyError:
            return None
        return r.start, r.end
    return 0, param.numel()


def _named(model):
    """(key, parameter): the name, prefixed with the pipeline stage when there are several
    (stages reuse local names such as ``decoder.layers.0``)."""
    from megatron.core import parallel_state

    prefix = ""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        prefix = f"s{parallel_state.get_pipeline_model_parallel_rank()}/"
    return [(prefix + n.removeprefix("module."), p) for n, p in model.named_parameters()]


def _grad_pieces(model, optimizer, tp_rank):
    out = []
    for name, p in _named(model):
        bounds = _megatron_range(optimizer, p)
        if bounds is not None and bounds[1] > bounds[0]:
            out.append((tp_rank, name, bounds[0],
                        p.main_grad.detach().view(-1)[bounds[0]:bounds[1]].float().clone()))
    return out


def _main_pieces(model, optimizer, tp_rank):
    """fp32 values the optimizer steps: the param itself (fp32) or its main_param."""
    out = []
    for name, p in _named(model):
        bounds = _megatron_range(optimizer, p)
        if bounds is None or bounds[1] == bounds[0]:
            continue
        main = getattr(p, "main_param", None)
        if main is None:
            values = p.detach().view(-1)[bounds[0]:bounds[1]]
        elif getattr(p, "main_param_sharded", False):
            values = main.detach().view(-1)
        else:
            values = main.detach().view(-1)[bounds[0]:bounds[1]]
        out.append((tp_rank, name, bounds[0], values.float().clone()))
    return out


def _initial_pieces(model, tp_rank):
    return [(tp_rank, n, 0, p.detach().float().view(-1).clone()) for n, p in _named(model)]


def _save_load(model, optimizer, spec):
    """Round trip through sharded_state_dict + dist_checkpointing into a fresh model/optimizer."""
    import os
    import tempfile

    from megatron.core import dist_checkpointing

    with tempfile.TemporaryDirectory() as tmp:
        # Every rank must use the same directory: rank 0 picks it.
        path = [tmp if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(path, src=0)
        ckpt = os.path.join(path[0], "ckpt")
        if dist.get_rank() == 0:
            os.makedirs(ckpt)
        dist.barrier()
        metadata = {"distrib_optim_sharding_type": spec.ckpt_format}
        state = {"model": model.module.sharded_state_dict(),
                 "optimizer": optimizer.sharded_state_dict(model.module.sharded_state_dict(),
                                                           metadata=metadata)}
        dist_checkpointing.save(state, ckpt)
        dist.barrier()
        new_model, new_optimizer = _build(spec)
        for opt in new_optimizer.chained_optimizers:
            # Megatron's torch-fallback DistributedOptimizer.state_dict() asserts one common
            # per-parameter step, so a fresh one needs state first (as with its own AdamW).
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                opt._init_optimizer_states_with_dummy_values()
        template = {"model": new_model.module.sharded_state_dict()}
        template["optimizer"] = new_optimizer.sharded_state_dict(
            new_model.module.sharded_state_dict(), is_loading=True, metadata=metadata)
        loaded = dist_checkpointing.load(template, ckpt)
        new_model.module.load_state_dict(loaded["model"])
        new_optimizer.load_state_dict(loaded["optimizer"])
        dist.barrier()
    return new_model, new_optimizer


def train(spec: RunSpec) -> dict:
    """Train ``spec.steps`` steps; return pieces for the parent's references."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import distrib_optimizer

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=spec.tp,
                                             pipeline_model_parallel_size=spec.pp)
    flags = (distrib_optimizer.HAVE_APEX_OR_TE, distrib_optimizer.USING_TE_OPTIMIZER)
    if spec.te_step_path:  # what a machine with TransformerEngine runs (step in param groups)
        distrib_optimizer.HAVE_APEX_OR_TE = distrib_optimizer.USING_TE_OPTIMIZER = True
    try:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        model, optimizer = _build(spec)
        result = {"initial": _initial_pieces(model, tp_rank), "grads": [], "groups": [],
                  "shapes": {n: tuple(p.shape) for n, p in _named(model)}}
        inner_opt = optimizer.chained_optimizers[0]
        for step in range(spec.steps):
            if spec.checkpoint_at is not None and step == spec.checkpoint_at:
                model, optimizer = _save_load(model, optimizer, spec)
                inner_opt = optimizer.chained_optimizers[0]
            model.zero_grad_buffer()
            optimizer.zero_grad()
            if spec.synthetic:
                _synthetic_grads(model, step, tp_rank)
            else:
                tokens, labels = _batch(step, dp_rank)
                model(tokens, labels).backward()
                model.finish_grad_sync()
            result["grads"].append(_grad_pieces(model, inner_opt, tp_rank))
            ok, _, _ = optimizer.step()
            assert ok, "optimizer step was skipped"
        result["final"] = _main_pieces(model, inner_opt, tp_rank)
        result["ranges"] = {n: _megatron_range(inner_opt, p) for n, p in _named(model)}
        result["reduce_bytes"] = getattr(inner_opt.optimizer, "last_reduce_bytes", 0)
        result["lr_wd"] = [(g["lr"], g["weight_decay"]) for g in inner_opt.optimizer.param_groups]
        return result
    finally:
        distrib_optimizer.HAVE_APEX_OR_TE, distrib_optimizer.USING_TE_OPTIMIZER = flags
        parallel_state.destroy_model_parallel()


def refusals() -> dict[str, str]:
    """The error each unsupported combination raises (type name and message)."""
    import megatron_patch
    from megatron.core import parallel_state
    from megatron.core.optimizer import get_megatron_optimizer

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    out = {}
    try:
        for flag, value in [("use_precision_aware_optimizer", True),
                            ("optimizer_cpu_offload", True), ("decoupled_weight_decay", False),
                            ("use_megatron_fsdp", True)]:
            model, _ = _build(RunSpec(tp=1, distopt=True, steps=0))
            config = megatron_patch.coupled_adam_config(vocab_size=V_REAL, **HP,
                                                        use_distributed_optimizer=True)
            target = model.ddp_config if flag == "use_megatron_fsdp" else config
            setattr(target, flag, value)  # after __post_init__, which asserts on some of them
            try:
                get_megatron_optimizer(config, [model])
                out[flag] = "accepted"
            except ValueError as error:
                out[flag] = f"{type(error).__name__}: {error}"
    finally:
        parallel_state.destroy_model_parallel()
    return out


def unmarked() -> str:
    """What get_megatron_optimizer says, on this rank, for a model with no marked matrix."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    try:
        _build(RunSpec(tp=dist.get_world_size(), distopt=False, steps=0, unmarked=True))
        return "accepted"
    except ValueError as error:
        return f"{type(error).__name__}: {error}"
    finally:
        parallel_state.destroy_model_parallel()


def run_specs(rank: int, world: int, specs: list) -> list:
    """run_on_ranks entry point: one spawn, many configurations (RunSpec, "refusals" or
    "unmarked")."""
    from tests import megatron_shim

    megatron_shim.install()
    import megatron_patch

    megatron_patch.apply(training=False)
    extras = {"refusals": refusals, "unmarked": unmarked}
    return [extras[spec]() if isinstance(spec, str) else train(spec) for spec in specs]


def assemble(results_by_rank: list[dict], key: str, step: int | None = None
             ) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from (tp_rank, name, start, values) pieces of every rank.

    Vocabulary matrices ([V/tp, H] blocks) are stacked by TP rank; other TP-split weights are
    only compared per TP rank block, so they are keyed by ``name@tp_rank``.
    """
    shapes = {n: torch.Size(shape) for r in results_by_rank for n, shape in r["shapes"].items()}
    blocks: dict[tuple[int, str], torch.Tensor] = {}
    for result in results_by_rank:
        pieces = result[key] if step is None else result[key][step]
        for tp_rank, name, start, values in pieces:
            flat = blocks.setdefault((tp_rank, name), torch.full((shapes[name].numel(),),
                                                                  float("nan")))
            flat[start:start + values.numel()] = values
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        parts = [blocks[(r, n)].view(shape) for (r, n) in sorted(blocks) if n == name]
        if not parts:
            continue
        if is_vocab(name):
            out[name] = torch.cat(parts, 0)
        else:
            for r, part in enumerate(parts):
                out[f"{name}@{r}"] = part
    for name, tensor in out.items():
        assert not torch.isnan(tensor).any(), f"{key}: elements of {name} missing"
    return out
