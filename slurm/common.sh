# shellcheck shell=bash
# Shared by slurm/*.sbatch (sourced after REPO_DIR is known). Functions only, no side effects.
# shellcheck disable=SC2034  # CONTAINER_ARGS, STEP_RC, GOT_USR1, GOT_TERM are set for the caller

gdn2_log() { echo "[$(date '+%F %T')] $*"; }

# A configuration mistake: say what to fix and stop the job now, before srun starts anything.
gdn2_die() {
  echo "ERROR: $*" >&2
  echo "[$(date '+%F %T')] job ${SLURM_JOB_ID:-?} stopped before starting any task (exit 2)" >&2
  exit 2
}

gdn2_require_set() { # VAR description
  [ -n "${!1:-}" ] || gdn2_die "$1 is not set: $2"
}

gdn2_require_path() { # VAR: the file or directory named by $VAR must exist
  [ -e "${!1}" ] || gdn2_die "$1=${!1}: no such file or directory"
}

gdn2_require_dir() { # VAR: the directory named by $VAR must exist
  [ -d "${!1}" ] || gdn2_die "$1=${!1}: no such directory"
}

# A directory the job writes: created if missing, but its parent must exist (a typo in a shared
# file-system path must not silently create a new tree) and it must be writable.
gdn2_require_writable_dir() { # VAR
  local dir=${!1} parent
  parent=$(dirname "$dir")
  [ -d "$parent" ] || gdn2_die "$1=$dir: its parent directory $parent does not exist"
  mkdir -p "$dir" 2>/dev/null || gdn2_die "$1=$dir: cannot create it"
  [ -w "$dir" ] || gdn2_die "$1=$dir: not writable"
}

# Megatron data prefixes, optionally weighted ("0.7 /d/a 0.3 /d/b"): each PREFIX.bin/.idx must exist.
gdn2_require_data_prefixes() { # VAR
  local item found=0
  for item in ${!1}; do
    if [[ $item =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then continue; fi
    found=1
    if [ ! -r "$item.bin" ] || [ ! -r "$item.idx" ]; then
      gdn2_die "$1: dataset $item.bin / $item.idx not found (preprocess it with slurm/preprocess.sbatch)"
    fi
  done
  [ "$found" = 1 ] || gdn2_die "$1='${!1}' names no dataset prefix"
}

# srun flags for a pyxis/enroot container when CONTAINER_IMAGE is set (the repository is always
# mounted at its own path; add data and checkpoint directories with CONTAINER_MOUNTS=src:dst,...).
gdn2_container_args() {
  CONTAINER_ARGS=()
  [ -n "${CONTAINER_IMAGE:-}" ] || return 0
  local mounts="$REPO_DIR:$REPO_DIR"
  [ -n "${CONTAINER_MOUNTS:-}" ] && mounts="$mounts,$CONTAINER_MOUNTS"
  CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
                  --container-workdir="$REPO_DIR")
}

# Run `srun ARGS...` in the background and wait for it, so that signals reach this shell while the
# step runs. USR1 (#SBATCH --signal=B:USR1@T) is passed on to the step; TERM (scancel, time limit,
# pre-emption by the scheduler) is only noted: Slurm sends it to the step's tasks itself.
# Sets STEP_RC (srun's exit status), GOT_USR1 and GOT_TERM (0/1).
gdn2_run_step() {
  GOT_USR1=0 GOT_TERM=0
  local pid
  srun "$@" &
  pid=$!
  trap 'GOT_USR1=1; gdn2_log "USR1: asking the step to save a checkpoint and stop"; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'GOT_TERM=1; gdn2_log "TERM: the job is ending; waiting for the step"' TERM
  # wait returns early (status > 128) whenever a trapped signal arrives: wait again until srun is
  # gone; bash keeps an exited child's status for the final wait.
  while :; do
    wait "$pid"
    kill -0 "$pid" 2>/dev/null || break
  done
  wait "$pid"
  STEP_RC=$?
  trap - USR1 TERM
}
