#!/usr/bin/env bash
# Launch examples/train_ds.py (or --script) with the DeepSpeed launcher, on one node or many.
#
# Usage: launch/deepspeed.sh [options] [-- training-script args...]
#
#   One node, all local GPUs (or CPU ranks with DS_ACCELERATOR=cpu and --num-gpus):
#     launch/deepspeed.sh --config launch/configs/zero2_bf16_coupled.json --save-dir runs/r1
#   Many nodes from a hostfile ("hostname slots=N" per line), ssh via pdsh or mpirun:
#     launch/deepspeed.sh --hostfile hosts.txt --launcher pdsh --save-dir /shared/runs/r1
#     launch/deepspeed.sh --hostfile hosts.txt --launcher openmpi --save-dir /shared/runs/r1
#   No ssh: run the same command on every node, each with its own --node-rank:
#     launch/deepspeed.sh --hostfile hosts.txt --no-ssh --node-rank 0 --master-addr node0 ...
#
# Options (defaults come from the variables of the same name, upper case, e.g. CONFIG=...):
#   --config FILE        DeepSpeed JSON config        [launch/configs/zero2_bf16_coupled.json]
#   --save-dir DIR       checkpoints and outputs; a relaunch resumes from DIR/checkpoints/latest
#   --data PATH          text file or directory (repeatable; default: the Python stdlib)
#   --hostfile FILE      "hostname slots=N" per line; without it, this node only
#   --launcher NAME      pdsh | openmpi | mpich | impi | mvapich | slurm        [pdsh]
#   --num-nodes N        use the first N hosts of the hostfile                   [all]
#   --num-gpus N         ranks per node                                          [all slots]
#   --master-addr HOST   rendezvous host (needed with --no-ssh)   [first hostfile host]
#   --master-port PORT                                                            [29500]
#   --no-ssh             start only this node's ranks (needs --node-rank, --master-addr)
#   --node-rank R        this node's index in the hostfile (with --no-ssh)
#   --script FILE        training script                          [examples/train_ds.py]
#   --python EXE         Python used for the checks                [.venv/bin/python or python3]
#   (variable DEEPSPEED: the launcher executable             [.venv/bin/deepspeed or deepspeed])
#   --dry-run            print the exact command and exit
#   (variable RUN_LOG: each launch's exact command is appended here  [SAVE_DIR/launch.log])
#   -h, --help           this text
# Arguments after "--" go to the training script unchanged (e.g. -- --steps 1000 --lr 3e-4).
# Input checks (hostfile lines, JSON config, data paths) run before any process starts. A run
# prints one line saying what starts; the exact command goes to RUN_LOG (--dry-run prints it).
set -euo pipefail

SCRIPT_NAME=deepspeed.sh
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
CONFIG=${CONFIG:-$REPO_DIR/launch/configs/zero2_bf16_coupled.json}
SAVE_DIR=${SAVE_DIR:-}
HOSTFILE=${HOSTFILE:-}
LAUNCHER=${LAUNCHER:-pdsh}
NUM_NODES=${NUM_NODES:-}
NUM_GPUS=${NUM_GPUS:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
NO_SSH=${NO_SSH:-0}
NODE_RANK=${NODE_RANK:-}
SCRIPT=${SCRIPT:-$REPO_DIR/examples/train_ds.py}
DRY_RUN=${DRY_RUN:-0}
DATA=()
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_common.sh
source "$REPO_DIR/launch/_common.sh"
default_tool DEEPSPEED deepspeed deepspeed

while [[ $# -gt 0 ]]; do
    case $1 in
        --config) need_value "$1" "$#"; CONFIG=$2; shift 2 ;;
        --save-dir) need_value "$1" "$#"; SAVE_DIR=$2; shift 2 ;;
        --data) need_value "$1" "$#"; DATA+=("$2"); shift 2 ;;
        --hostfile) need_value "$1" "$#"; HOSTFILE=$2; shift 2 ;;
        --launcher) need_value "$1" "$#"; LAUNCHER=$2; shift 2 ;;
        --num-nodes) need_value "$1" "$#"; NUM_NODES=$2; shift 2 ;;
        --num-gpus) need_value "$1" "$#"; NUM_GPUS=$2; shift 2 ;;
        --master-addr) need_value "$1" "$#"; MASTER_ADDR=$2; shift 2 ;;
        --master-port) need_value "$1" "$#"; MASTER_PORT=$2; shift 2 ;;
        --no-ssh) NO_SSH=1; shift ;;
        --node-rank) need_value "$1" "$#"; NODE_RANK=$2; shift 2 ;;
        --script) need_value "$1" "$#"; SCRIPT=$2; shift 2 ;;
        --python) need_value "$1" "$#"; PYTHON=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage_from_header "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (see --help; training-script arguments go after --)" ;;
    esac
done

# ---- checks: everything a user can get wrong, before any process starts
check_ds_run_inputs "$SAVE_DIR" "$CONFIG" "$SCRIPT" "${DATA[@]}"
case $LAUNCHER in
    pdsh | openmpi | mpich | impi | mvapich | slurm) ;;
    *) die "--launcher must be one of pdsh, openmpi, mpich, impi, mvapich, slurm; got '$LAUNCHER'" ;;
esac
check_int --master-port "$MASTER_PORT"
[[ -z "$NUM_NODES" ]] || check_int --num-nodes "$NUM_NODES"
[[ -z "$NUM_GPUS" ]] || check_int --num-gpus "$NUM_GPUS"
if [[ -n "$HOSTFILE" ]]; then
    check_hostfile "$HOSTFILE"
elif [[ "$NO_SSH" == 1 || -n "$NUM_NODES" && "$NUM_NODES" -gt 1 ]]; then
    die "--hostfile is required for several nodes (--no-ssh or --num-nodes > 1)"
fi
if [[ "$NO_SSH" == 1 ]]; then
    [[ -n "$NODE_RANK" ]] || die "--no-ssh needs --node-rank (this node's index in the hostfile)"
    check_int --node-rank "$NODE_RANK"
    [[ "$NODE_RANK" -lt "$(hostfile_count "$HOSTFILE")" ]] ||
        die "--node-rank $NODE_RANK is out of range: hostfile '$HOSTFILE' lists $(hostfile_count "$HOSTFILE") hosts"
    [[ -n "$MASTER_ADDR" ]] || die "--no-ssh needs --master-addr (the host of node rank 0)"
elif [[ -n "$NODE_RANK" ]]; then
    die "--node-rank only applies with --no-ssh"
fi

# ---- resume: the training script loads SAVE_DIR/checkpoints/latest by itself
tag=$(ds_latest_tag "$SAVE_DIR/checkpoints")
if [[ -n "$tag" ]]; then
    info "resuming from checkpoint $SAVE_DIR/checkpoints/$tag"
fi

cmd=("$DEEPSPEED")
if [[ -n "$HOSTFILE" ]]; then
    cmd+=(--hostfile "$HOSTFILE")
    [[ "$NO_SSH" == 1 ]] || cmd+=(--launcher "$LAUNCHER")
fi
[[ -z "$NUM_NODES" ]] || cmd+=(--num_nodes "$NUM_NODES")
[[ -z "$NUM_GPUS" ]] || cmd+=(--num_gpus "$NUM_GPUS")
[[ -z "$MASTER_ADDR" ]] || cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(--master_port "$MASTER_PORT")
[[ "$NO_SSH" == 0 ]] || cmd+=(--no_ssh --node_rank "$NODE_RANK")
cmd+=("$SCRIPT" --config "$CONFIG" --save-dir "$SAVE_DIR")
[[ ${#DATA[@]} -eq 0 ]] || cmd+=(--data "${DATA[@]}")
cmd+=("$@")

RUN_LOG=${RUN_LOG:-$SAVE_DIR/launch.log}
RUN_WHAT="${SCRIPT##*/} with the DeepSpeed launcher${NUM_GPUS:+, $NUM_GPUS ranks per node}"
RUN_WHAT+="${HOSTFILE:+, hosts from ${HOSTFILE##*/}}, config ${CONFIG##*/}"
run_cmd "${cmd[@]}"
