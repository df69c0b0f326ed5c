#!/usr/bin/env bash
# Launch examples/train_ds.py (DeepSpeed inside) with torchrun: run this once on every node.
#
# Usage: launch/torchrun_ds.sh [options] [-- training-script args...]
#
#   Static: node 0 and node 1 of two, 8 GPUs each (same command, different --node-rank):
#     launch/torchrun_ds.sh --nnodes 2 --node-rank 0 --master-addr node0 --nproc-per-node 8 \
#         --save-dir /shared/runs/r1
#   Rendezvous (nodes may start in any order; no node rank):
#     launch/torchrun_ds.sh --nnodes 2 --rdzv-endpoint node0:29400 --rdzv-id job42 ...
#   One process per GPU started by someone else (srun), ranks from SLURM's variables:
#     srun --ntasks-per-node 8 launch/torchrun_ds.sh --from-slurm-env --master-addr node0 ...
#
# Options (defaults come from the variables of the same name, upper case, e.g. NNODES=2):
#   --config FILE          DeepSpeed JSON config      [launch/configs/zero2_bf16_coupled.json]
#   --save-dir DIR         checkpoints and outputs; a relaunch resumes from DIR/checkpoints/latest
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
#   --script FILE          training script                        [examples/train_ds.py]
#   --python EXE           Python for the checks and --from-slurm-env [.venv/bin/python or python3]
#   --dry-run              print the exact command and exit
#   -h, --help             this text
# Arguments after "--" go to the training script unchanged.
# Input checks (JSON config, data paths) run before any process starts.
set -euo pipefail

SCRIPT_NAME=torchrun_ds.sh
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${CONFIG:-$REPO_DIR/launch/configs/zero2_bf16_coupled.json}
SAVE_DIR=${SAVE_DIR:-}
SCRIPT=${SCRIPT:-$REPO_DIR/examples/train_ds.py}
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
        --config) need_value "$1" "$#"; CONFIG=$2; shift 2 ;;
        --save-dir) need_value "$1" "$#"; SAVE_DIR=$2; shift 2 ;;
        --data) need_value "$1" "$#"; DATA+=("$2"); shift 2 ;;
        --script) need_value "$1" "$#"; SCRIPT=$2; shift 2 ;;
        -h | --help) usage_from_header "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (see --help; training-script arguments go after --)" ;;
    esac
done

check_ds_run_inputs "$SAVE_DIR" "$CONFIG" "$SCRIPT" "${DATA[@]}"
check_torchrun_options

tag=$(ds_latest_tag "$SAVE_DIR/checkpoints")
if [[ -n "$tag" ]]; then
    info "resuming from checkpoint $SAVE_DIR/checkpoints/$tag"
fi

args=("$SCRIPT" --config "$CONFIG" --save-dir "$SAVE_DIR")
[[ ${#DATA[@]} -eq 0 ]] || args+=(--data "${DATA[@]}")
run_ranks "${args[@]}" "$@"
