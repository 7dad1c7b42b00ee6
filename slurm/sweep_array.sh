#!/bin/bash
# One task of a sweep's job array: task i trains point i of the points file that recipes/sweep.py wrote.
# Submitted by `python recipes/sweep.py ... --slurm` (not by hand), which sets
#   SWEEP_POINTS    OUT/sweep_points.tsv: one line per point, "NAME<TAB>RUN_DIR<TAB>--key=value ..."
#   CONFIG          the sweep's base config;  REPO_DIR  the repository
#   NPROC_PER_NODE  (with --nproc) processes per point; otherwise one per allocated GPU
# and passes `--array=0-(points-1)` plus any --sbatch_args (e.g. '--gres=gpu:8 --time=4:00:00'; CPU:
# `--nproc 2 --sbatch_args='--gres=none --cpus-per-task=2' --device=cpu`). The launch, the run-directory
# log and preemption (checkpoint, requeue this task, resume) are slurm/common.sh's.
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -euo pipefail
: "${SWEEP_POINTS:?set by recipes/sweep.py --slurm: the points file}"
: "${SLURM_ARRAY_TASK_ID:?not an array task: submit with recipes/sweep.py --slurm}"
SWEEP_LINE=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SWEEP_POINTS")
[[ -n $SWEEP_LINE ]] || { echo "slurm/sweep_array.sh: error: no point $SLURM_ARRAY_TASK_ID in $SWEEP_POINTS" >&2; exit 2; }
IFS=$'\t' read -r SWEEP_NAME OUTPUT_DIR OVERRIDES <<<"$SWEEP_LINE"
export OUTPUT_DIR OVERRIDES
echo "sweep point $SLURM_ARRAY_TASK_ID: $SWEEP_NAME"
if [[ -e $OUTPUT_DIR/summary.json ]]; then
  echo "$OUTPUT_DIR/summary.json exists: point $SWEEP_NAME is finished, nothing to do"
  exit 0
fi
# sbatch runs a copy of this file: ask Slurm where the original (and so the repository) is
if [[ -z ${REPO_DIR:-} ]]; then
  REPO_DIR=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*$|\1|p')
  [[ -f $REPO_DIR/slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}
fi
source "$REPO_DIR/slurm/common.sh"
