# shellcheck shell=bash
# Shared helpers of the launch/ scripts: input checks that run before any process starts,
# checkpoint discovery for resume, and --dry-run printing. Sourced, never executed.

# die MESSAGE...: print "error: MESSAGE" to stderr and exit 2 (usage / input error).
die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# info MESSAGE...: a progress line on stderr, prefixed by the script's name.
info() {
    printf '[%s] %s\n' "${SCRIPT_NAME:-launch}" "$*" >&2
}

# need_value OPTION "$#": an option that takes a value got none.
need_value() {
    [[ "$2" -ge 2 ]] || die "$1 needs a value (see --help)"
}

# default_tool VAR NAME FALLBACK: unless VAR is set, VAR = the repo's .venv/bin/NAME if it is
# there, else FALLBACK (found on PATH).
default_tool() {
    if [[ -z "${!1:-}" ]]; then
        if [[ -x "$REPO_DIR/.venv/bin/$2" ]]; then printf -v "$1" %s "$REPO_DIR/.venv/bin/$2"; else printf -v "$1" %s "$3"; fi
    fi
}

# check_int NAME VALUE: VALUE is a non-negative integer.
check_int() {
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}

# check_hostfile FILE: exists, and every non-blank, non-comment line reads "host slots=N".
check_hostfile() {
    local file=$1 line n=0 hosts=0
    [[ -f "$file" ]] || die "hostfile '$file' not found. Write one line per node: 'hostname slots=GPUS_PER_NODE'."
    while IFS= read -r line || [[ -n "$line" ]]; do
        n=$((n + 1))
        line=${line%%#*}
        [[ "$line" =~ ^[[:space:]]*$ ]] && continue
        if [[ ! "$line" =~ ^[[:space:]]*[A-Za-z0-9._-]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]]; then
            die "hostfile '$file' line $n does not parse: '$line'. Expected 'hostname slots=N' (N >= 1)."
        fi
        hosts=$((hosts + 1))
    done <"$file"
    [[ $hosts -gt 0 ]] || die "hostfile '$file' lists no hosts. Write one line per node: 'hostname slots=GPUS_PER_NODE'."
}

# hostfile_first_host FILE: the first host named in FILE.
hostfile_first_host() {
    awk '{sub(/#.*/, "")} NF {print $1; exit}' "$1"
}

# hostfile_count FILE: number of hosts in FILE.
hostfile_count() {
    awk '{sub(/#.*/, "")} NF {n++} END {print n + 0}' "$1"
}

# check_json FILE: exists and parses as JSON (python's json module gives the line and column).
check_json() {
    local file=$1 err
    [[ -f "$file" ]] || die "config '$file' not found."
    if ! err=$("$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' "$file" 2>&1); then
        die "config '$file' is not valid JSON: ${err##*$'\n'}"
    fi
}

# check_data PATH...: each path exists and holds text (same rules as examples/data.py --check).
check_data() {
    local err
    [[ $# -gt 0 ]] || return 0
    if ! err=$("$PYTHON" "$REPO_DIR/examples/data.py" --check "$@" 2>&1); then
        die "${err#error: }"
    fi
}

# check_file WHAT PATH: PATH is an existing file.
check_file() {
    [[ -f "$2" ]] || die "$1 '$2' not found."
}

# The inputs of a DeepSpeed training run, checked before any process starts.
# Usage: check_ds_run_inputs SAVE_DIR CONFIG SCRIPT [DATA...]
check_ds_run_inputs() {
    [[ -n "$1" ]] || die "--save-dir is required (checkpoints go there; a relaunch resumes from it)"
    check_json "$2"
    check_file "training script" "$3"
    shift 3
    check_data "$@"
}

# ds_latest_tag DIR: tag in DIR/latest (a DeepSpeed checkpoint directory), or nothing.
ds_latest_tag() {
    [[ -f "$1/latest" ]] && tr -d '[:space:]' <"$1/latest"
    return 0
}

# megatron_latest_iteration DIR: the iteration in Megatron's tracker file, or nothing.
megatron_latest_iteration() {
    [[ -f "$1/latest_checkpointed_iteration.txt" ]] && tr -d '[:space:]' <"$1/latest_checkpointed_iteration.txt"
    return 0
}

# show_cmd ARGS...: print a command so that copying the line runs it.
show_cmd() {
    local out="" arg
    for arg in "$@"; do
        out+="$(printf '%q' "$arg") "
    done
    printf '%s\n' "${out% }"
}

# run_cmd ARGS...: under DRY_RUN=1 print the command; otherwise run it, after saying so on
# stderr: with RUN_LOG set, the command goes to that file (appended, with the time) and stderr
# gets one short line, "starting RUN_WHAT"; without it, stderr gets the whole command.
run_cmd() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        show_cmd "$@"
        return 0
    fi
    if [[ -n "${RUN_LOG:-}" ]]; then
        mkdir -p "$(dirname "$RUN_LOG")"
        printf '# %s %s runs:\n%s\n' "$(date '+%F %T')" "${SCRIPT_NAME:-launch}" "$(show_cmd "$@")" >>"$RUN_LOG"
        info "starting ${RUN_WHAT:-${1##*/}} (command in $RUN_LOG)"
    else
        info "running: $(show_cmd "$@")"
    fi
    "$@"
}

# usage_from_header FILE: print the leading comment block of FILE (after the shebang) as help.
usage_from_header() {
    awk 'NR == 1 && /^#!/ {next} /^#SBATCH/ {next} /^#/ {sub(/^# ?/, ""); print; next} {exit}' "$1"
}

# slurm_master_addr: first host of the allocation (MASTER_ADDR wins when set).
slurm_master_addr() {
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        printf '%s\n' "$MASTER_ADDR"
        return 0
    fi
    command -v scontrol >/dev/null || die "scontrol not found: run inside a SLURM allocation or set MASTER_ADDR."
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

# require_slurm: the variables a SLURM allocation sets are present.
require_slurm() {
    local var
    for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES; do
        [[ -n "${!var:-}" ]] || die "$var is not set: submit this script with sbatch (or, to preview, set SLURM_JOB_ID, SLURM_JOB_NODELIST and SLURM_NNODES and pass --dry-run)."
    done
}

# Every script runs its input checks with this Python (--python overrides it while parsing).
default_tool PYTHON python python3
