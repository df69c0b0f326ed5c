#!/usr/bin/env bash
# Pretrain a GPT with Megatron-LM and Coupled Adam (launch/pretrain_gpt_coupled.py) via torchrun.
# Run it once on every node; edit the model / data variables below or set them in the environment.
#
# Usage: launch/torchrun_megatron.sh [options] [-- extra Megatron-LM args...]
#
#   MEGATRON_LM=~/Megatron-LM DATA_PATH=/data/owt_text_document \
#   VOCAB_FILE=gpt2-vocab.json MERGE_FILE=gpt2-merges.txt \
#   launch/torchrun_megatron.sh --nnodes 4 --node-rank 0 --master-addr node0 --nproc-per-node 8 \
#       --save-dir /shared/ckpt/gpt-coupled -- --tensor-model-parallel-size 2
#   Rendezvous instead of node ranks:   --nnodes 4 --rdzv-endpoint node0:29400 --rdzv-id job42
#   One process per GPU under srun:     --from-slurm-env (RANK etc. from SLURM's variables)
#
# Options:
#   --save-dir DIR         Megatron --save; a relaunch resumes (--load) from its latest iteration
#   --data-path PREFIX     Megatron indexed dataset prefix (PREFIX.bin / PREFIX.idx)  [$DATA_PATH]
#   --megatron-lm DIR      Megatron-LM checkout (tag = your megatron-core) on PYTHONPATH [$MEGATRON_LM]
#   --optimizer NAME       coupled_adam | adam (the baseline)                  [coupled_adam]
#   --nnodes N, --node-rank R, --nproc-per-node G, --master-addr HOST, --master-port PORT,
#   --rdzv-endpoint H:P, --rdzv-id ID, --from-slurm-env      as in launch/torchrun_ds.sh
#   --python EXE           Python for the checks and --from-slurm-env
#   --dry-run              print the exact command and exit
#   -h, --help             this text
# Arguments after "--" are appended to the Megatron-LM arguments (later flags win).
# Input checks (Megatron-LM checkout, dataset files, tokenizer files) run before any process starts.
set -euo pipefail

SCRIPT_NAME=torchrun_megatron.sh
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

# ---- model, data and schedule: edit here or override from the environment
MEGATRON_LM=${MEGATRON_LM:-}
DATA_PATH=${DATA_PATH:-}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-GPT2BPETokenizer}
VOCAB_FILE=${VOCAB_FILE:-}
MERGE_FILE=${MERGE_FILE:-}
SAVE_DIR=${SAVE_DIR:-}
OPTIMIZER=${OPTIMIZER:-coupled_adam}
TP=${TP:-1}
PP=${PP:-1}
NUM_LAYERS=${NUM_LAYERS:-12}
HIDDEN_SIZE=${HIDDEN_SIZE:-768}
NUM_HEADS=${NUM_HEADS:-12}
SEQ_LENGTH=${SEQ_LENGTH:-1024}
MICRO_BATCH=${MICRO_BATCH:-8}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
LR=${LR:-6e-4}
MIN_LR=${MIN_LR:-6e-5}
TRAIN_ITERS=${TRAIN_ITERS:-100000}
WARMUP_ITERS=${WARMUP_ITERS:-2000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
EVAL_INTERVAL=${EVAL_INTERVAL:-1000}
PRECISION=${PRECISION:---bf16}
ENTRY=${ENTRY:-$REPO_DIR/launch/pretrain_gpt_coupled.py}

# shellcheck source-path=SCRIPTDIR
# shellcheck source=_common.sh
source "$REPO_DIR/launch/_common.sh"
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_torchrun.sh
source "$REPO_DIR/launch/_torchrun.sh"

while [[ $# -gt 0 ]]; do
    if parse_torchrun_option "$@"; then
        shift "$SHIFT_BY"
        continue
    fi
    case $1 in
        --save-dir) need_value "$1" "$#"; SAVE_DIR=$2; shift 2 ;;
        --data-path) need_value "$1" "$#"; DATA_PATH=$2; shift 2 ;;
        --megatron-lm) need_value "$1" "$#"; MEGATRON_LM=$2; shift 2 ;;
        --optimizer) need_value "$1" "$#"; OPTIMIZER=$2; shift 2 ;;
        -h | --help) usage_from_header "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (see --help; Megatron-LM arguments go after --)" ;;
    esac
done

# ---- checks
[[ -n "$SAVE_DIR" ]] || die "--save-dir is required (Megatron --save; a relaunch resumes from it)"
[[ -n "$MEGATRON_LM" ]] || die "set MEGATRON_LM (or --megatron-lm) to a Megatron-LM checkout; the megatron-core wheel does not ship megatron/training"
[[ -d "$MEGATRON_LM/megatron/training" && -f "$MEGATRON_LM/pretrain_gpt.py" ]] ||
    die "MEGATRON_LM='$MEGATRON_LM' is not a Megatron-LM checkout (needs pretrain_gpt.py and megatron/training)"
check_file "entry script" "$ENTRY"
[[ -n "$DATA_PATH" ]] || die "set DATA_PATH (or --data-path) to a Megatron dataset prefix (PREFIX.bin and PREFIX.idx, made by tools/preprocess_data.py)"
for word in $DATA_PATH; do  # a blend is "weight prefix weight prefix ..."
    [[ "$word" =~ ^[0-9.]+$ ]] && continue
    [[ -s "$word.bin" && -s "$word.idx" ]] || die "data path '$word' has no text: $word.bin and $word.idx must exist and be non-empty (build them with Megatron-LM's tools/preprocess_data.py)"
done
[[ -z "$VOCAB_FILE" ]] || check_file "VOCAB_FILE" "$VOCAB_FILE"
[[ -z "$MERGE_FILE" ]] || check_file "MERGE_FILE" "$MERGE_FILE"
case $OPTIMIZER in
    coupled_adam | adam) ;;
    *) die "--optimizer must be coupled_adam or adam, got '$OPTIMIZER'" ;;
esac
check_torchrun_options

# ---- resume: Megatron loads --load's latest_checkpointed_iteration.txt
resume=()
iteration=$(megatron_latest_iteration "$SAVE_DIR")
if [[ -n "$iteration" ]]; then
    info "resuming from $SAVE_DIR (iteration $iteration)"
    resume=(--load "$SAVE_DIR")
fi

# shellcheck disable=SC2206  # PRECISION and DATA_PATH are word lists on purpose
megatron_args=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN_SIZE" --num-attention-heads "$NUM_HEADS"
    --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --optimizer "$OPTIMIZER" --use-distributed-optimizer
    --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS"
    --train-iters "$TRAIN_ITERS" --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95
    --adam-eps 1e-8 --clip-grad 1.0 $PRECISION
    --data-path $DATA_PATH --split "949,50,1" --tokenizer-type "$TOKENIZER_TYPE"
    --save "$SAVE_DIR" --save-interval "$SAVE_INTERVAL"
    --eval-interval "$EVAL_INTERVAL" --eval-iters 10 --log-interval 10
)
[[ -z "$VOCAB_FILE" ]] || megatron_args+=(--vocab-file "$VOCAB_FILE")
[[ -z "$MERGE_FILE" ]] || megatron_args+=(--merge-file "$MERGE_FILE")

export MEGATRON_LM_PATH=$MEGATRON_LM  # read by launch/pretrain_gpt_coupled.py
export PYTHONPATH="$MEGATRON_LM:$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # Megatron's TP overlap needs it
[[ "$DRY_RUN" == 0 ]] || show_cmd export "MEGATRON_LM_PATH=$MEGATRON_LM_PATH" "PYTHONPATH=$PYTHONPATH" \
    "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS"
run_ranks "$ENTRY" "${megatron_args[@]}" "${resume[@]}" "$@"
