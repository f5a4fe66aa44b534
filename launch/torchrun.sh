#!/usr/bin/env bash
# Single-node launcher: gdn2-pretrain under torchrun, one process per GPU.
#
#   bash launch/torchrun.sh --model swa_gdn2_1.3B --tokenizer tok.model \
#       --train-data /data/fineweb_text_document --save /ckpt/run1 --tensor-model-parallel-size 2
#   NPROC_PER_NODE=2 bash launch/torchrun.sh --model swa_gdn2_tiny --tp 2 ...   # no GPU: 2 CPU ranks, gloo
#
# Every argument goes to gdn2-pretrain. Environment:
#   NPROC_PER_NODE  processes (default: the number of GPUs nvidia-smi lists, else 1)
#   LOG_DIR         default runs/logs/<date>-<pid>: torchrun writes one log per rank under it
#                   (<run id>/attempt_0/<rank>/stdout.log, stderr.log), this script the combined
#                   LOG_DIR/job.log (also shown on the terminal)
#   PYTHON          interpreter with the package installed (default python3)
# NCCL and Triton settings, and how to override them: launch/env.sh. For several nodes use
# slurm/pretrain.sbatch.
set -uo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/env.sh
source "$REPO_DIR/launch/env.sh"
PYTHON=${PYTHON:-python3}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  [ "$NPROC_PER_NODE" -ge 1 ] || NPROC_PER_NODE=1
fi
LOG_DIR=${LOG_DIR:-$REPO_DIR/runs/logs/$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$LOG_DIR" || { echo "ERROR: cannot create LOG_DIR=$LOG_DIR" >&2; exit 2; }
echo "[$(date '+%F %T')] $NPROC_PER_NODE processes on $(hostname); logs in $LOG_DIR" | tee -a "$LOG_DIR/job.log"
gdn2_print_env | tee -a "$LOG_DIR/job.log"

# tee -i: Ctrl-C must reach torchrun (which stops the ranks), not kill the log copy first.
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node="$NPROC_PER_NODE" \
  --log-dir "$LOG_DIR" --tee 3 -m megatron_gdn2.training.pretrain "$@" 2>&1 | tee -i -a "$LOG_DIR/job.log"
exit "${PIPESTATUS[0]}"
