# shellcheck shell=bash
# shellcheck disable=SC2034  # SHIFT_BY and the settings are read by the sourcing script
# torchrun options shared by launch/torchrun_ds.sh and launch/torchrun_megatron.sh: static
# (--nnodes --node-rank --master-addr --master-port), c10d rendezvous (--rdzv-endpoint), or one
# rank per process from SLURM's variables (--from-slurm-env). Sourced after _common.sh.

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-coupled-ds}
FROM_SLURM_ENV=${FROM_SLURM_ENV:-0}
DRY_RUN=${DRY_RUN:-0}
default_tool TORCHRUN torchrun torchrun
SHIFT_BY=0

# parse_torchrun_option "$@": consume one launcher option; sets SHIFT_BY; false if not ours.
parse_torchrun_option() {
    case $1 in
        --nnodes) need_value "$1" "$#"; NNODES=$2; SHIFT_BY=2 ;;
        --node-rank) need_value "$1" "$#"; NODE_RANK=$2; SHIFT_BY=2 ;;
        --nproc-per-node) need_value "$1" "$#"; NPROC_PER_NODE=$2; SHIFT_BY=2 ;;
        --master-addr) need_value "$1" "$#"; MASTER_ADDR=$2; SHIFT_BY=2 ;;
        --master-port) need_value "$1" "$#"; MASTER_PORT=$2; SHIFT_BY=2 ;;
        --rdzv-endpoint) need_value "$1" "$#"; RDZV_ENDPOINT=$2; SHIFT_BY=2 ;;
        --rdzv-id) need_value "$1" "$#"; RDZV_ID=$2; SHIFT_BY=2 ;;
        --from-slurm-env) FROM_SLURM_ENV=1; SHIFT_BY=1 ;;
        --python) need_value "$1" "$#"; PYTHON=$2; SHIFT_BY=2 ;;
        --dry-run) DRY_RUN=1; SHIFT_BY=1 ;;
        *) return 1 ;;
    esac
    return 0
}

# check_torchrun_options: numbers are numbers, the node rank is in range, SLURM vars are there.
check_torchrun_options() {
    local var
    check_int --nnodes "$NNODES"
    check_int --node-rank "$NODE_RANK"
    check_int --nproc-per-node "$NPROC_PER_NODE"
    check_int --master-port "$MASTER_PORT"
    [[ "$NNODES" -ge 1 && "$NPROC_PER_NODE" -ge 1 ]] || die "--nnodes and --nproc-per-node must be >= 1"
    [[ "$NODE_RANK" -lt "$NNODES" ]] || die "--node-rank $NODE_RANK is out of range for --nnodes $NNODES"
    if [[ -n "$RDZV_ENDPOINT" && ! "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]]; then
        die "--rdzv-endpoint must be HOST:PORT, got '$RDZV_ENDPOINT'"
    fi
    if [[ "$FROM_SLURM_ENV" == 1 ]]; then
        for var in SLURM_PROCID SLURM_LOCALID SLURM_NTASKS; do
            [[ -n "${!var:-}" ]] || die "--from-slurm-env: $var is not set (run under srun, one task per GPU)"
        done
        [[ -n "$MASTER_ADDR" ]] || MASTER_ADDR=$(slurm_master_addr)
    elif [[ "$NNODES" -gt 1 && -z "$RDZV_ENDPOINT" && -z "$MASTER_ADDR" ]]; then
        die "--nnodes $NNODES needs --master-addr (host of node rank 0) or --rdzv-endpoint HOST:PORT"
    fi
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
}

# run_ranks SCRIPT ARGS...: start this node's ranks (torchrun), or be one rank (--from-slurm-env).
run_ranks() {
    local cmd
    if [[ "$FROM_SLURM_ENV" == 1 ]]; then
        cmd=(env "RANK=$SLURM_PROCID" "LOCAL_RANK=$SLURM_LOCALID" "WORLD_SIZE=$SLURM_NTASKS"
             "MASTER_ADDR=$MASTER_ADDR" "MASTER_PORT=$MASTER_PORT" "$PYTHON" "$@")
    else
        cmd=("$TORCHRUN" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE")
        if [[ -n "$RDZV_ENDPOINT" ]]; then
            cmd+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID")
        else
            cmd+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
        fi
        cmd+=("$@")
    fi
    run_cmd "${cmd[@]}"
}
