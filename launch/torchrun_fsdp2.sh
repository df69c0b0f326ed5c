#!/usr/bin/env bash
# Launch examples/train_fsdp2.py (PyTorch FSDP2 + DTensor tensor parallelism) with torchrun:
# run this once on every node.
#
# Usage: launch/torchrun_fsdp2.sh [options] [-- training-script args...]
#
#   Static: node 0 and node 1 of two, 8 GPUs each, TP 2 inside each node (mesh [8, 2]):
#     launch/torchrun_fsdp2.sh --nnodes 2 --node-rank 0 --master-addr node0 --nproc-per-node 8 \
#         --tp 2 --save-dir /shared/runs/r1
#   Rendezvous (nodes may start in any order; no node rank):
#     launch/torchrun_fsdp2.sh --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id job42 ...
#   One process per GPU started by someone else (srun), ranks from SLURM's variables:
#     srun --ntasks-per-node 8 launch/torchrun_fsdp2.sh --from-slurm-env --master-addr node0 ...
#   4 CPU ranks on this machine (2 x 2 mesh):
#     launch/torchrun_fsdp2.sh --nproc-per-node 4 --tp 2 --save-dir runs/fsdp2 -- --steps 100
#
# Options (defaults come from the variables of the same name, upper case, e.g. NNODES=2):
#   --save-dir DIR         checkpoints and outputs; a relaunch resumes from DIR/checkpoints/latest
#                          (torch.distributed.checkpoint: also at another world size)
#   --tp N                 tensor-parallel degree; must divide the world size; keep it inside a
#                          node (ranks are numbered node by node)                    [1]
#   --optimizer NAME       CoupledAdam or AdamW                              [CoupledAdam]
#   --data PATH            text file or directory (repeatable; default: the Python stdlib)
#   --nnodes N             number of nodes                                          [1]
#   --node-rank R          this node's rank (static rendezvous)                     [0]
#   --nproc-per-node G     processes (GPUs) per node                                [1]
#   --master-addr HOST     host of node rank 0 (static rendezvous)          [127.0.0.1]
#   --master-port PORT                                                           [29500]
#   --rdzv-endpoint H:P    use torchrun's c10d rendezvous at H:P instead of a node rank
#   --rdzv-id ID           rendezvous job id                                   [coupled-ds]
#   --from-slurm-env       no torchrun: this process is one rank; RANK=SLURM_PROCID,
#                          LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE=SLURM_NTASKS
#   --script FILE          training script                     [examples/train_fsdp2.py]
#   --python EXE           Python for the checks and --from-slurm-env [.venv/bin/python or python3]
#   --dry-run              print the exact command and exit
#   -h, --help             this text
# Arguments after "--" go to the training script unchanged.
# Input checks (TP degree, data paths) run before any process starts.
set -euo pipefail

SCRIPT_NAME=torchrun_fsdp2.sh
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
SAVE_DIR=${SAVE_DIR:-}
TP=${TP:-1}
OPTIMIZER=${OPTIMIZER:-CoupledAdam}
SCRIPT=${SCRIPT:-$REPO_DIR/examples/train_fsdp2.py}
DATA=()
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
        --tp) need_value "$1" "$#"; TP=$2; shift 2 ;;
        --optimizer) need_value "$1" "$#"; OPTIMIZER=$2; shift 2 ;;
        --data) need_value "$1" "$#"; DATA+=("$2"); shift 2 ;;
        --script) need_value "$1" "$#"; SCRIPT=$2; shift 2 ;;
        -h | --help) usage_from_header "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (see --help; training-script arguments go after --)" ;;
    esac
done

[[ -n "$SAVE_DIR" ]] || die "--save-dir is required (checkpoints go there; a relaunch resumes from it)"
check_file "training script" "$SCRIPT"
check_data "${DATA[@]}"
check_torchrun_options
check_int --tp "$TP"
[[ "$TP" -ge 1 ]] || die "--tp must be >= 1"
[[ "$OPTIMIZER" == CoupledAdam || "$OPTIMIZER" == AdamW ]] || die "--optimizer must be CoupledAdam or AdamW, got '$OPTIMIZER'"
if [[ "$FROM_SLURM_ENV" == 1 ]]; then
    world=$SLURM_NTASKS
    (( SLURM_NTASKS % TP == 0 )) || die "--tp $TP does not divide SLURM_NTASKS=$SLURM_NTASKS"
else
    world=$((NNODES * NPROC_PER_NODE))
    (( NPROC_PER_NODE % TP == 0 )) || die "--tp $TP must divide --nproc-per-node $NPROC_PER_NODE (tensor-parallel groups stay inside a node)"
fi
info "mesh [dp=$((world / TP)), tp=$TP] on $world ranks, $OPTIMIZER"

tag=$(ds_latest_tag "$SAVE_DIR/checkpoints")
if [[ -n "$tag" ]]; then
    info "resuming from checkpoint $SAVE_DIR/checkpoints/$tag"
fi

args=("$SCRIPT" --save-dir "$SAVE_DIR" --tp "$TP" --optimizer "$OPTIMIZER")
[[ ${#DATA[@]} -eq 0 ]] || args+=(--data "${DATA[@]}")
run_ranks "${args[@]}" "$@"
