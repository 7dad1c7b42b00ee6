#!/bin/bash
# Background statistics: run the background batches through a base model and store the slot document frequencies.
#   sbatch slurm/collect_background.sh   # defaults below: from runs/base, run dir runs/background
#   CONFIG=... OUTPUT_DIR=... OVERRIDES="--key=value ..." sbatch --nodes=2 slurm/collect_background.sh
# Settings and the preemption protocol: slurm/common.sh. CPU mode (no GPUs):
#   DEVICE=cpu NPROC_PER_NODE=2 sbatch --gres=none --cpus-per-task=2 slurm/collect_background.sh
#SBATCH --job-name=collect_background
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
: "${CONFIG:=recipes/configs/paper_1.3b_background.yaml}"
: "${OUTPUT_DIR:=runs/background}"
: "${INIT_FROM=runs/base}"     # --init_from unless OVERRIDES names one (INIT_FROM= to start from nothing)
# sbatch runs a copy of this file: ask Slurm where the original (and so the repository) is
if [[ -z ${REPO_DIR:-} ]]; then
  REPO_DIR=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/]*$|\1|p')
  [[ -f $REPO_DIR/slurm/common.sh ]] || REPO_DIR=${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}
fi
source "$REPO_DIR/slurm/common.sh"
