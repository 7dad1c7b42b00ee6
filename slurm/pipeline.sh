#!/bin/bash
# Submit the whole chain, each stage after the previous one succeeded (sbatch --dependency=afterok):
#   pretrain -> background statistics -> fact learning (and, with SWEEP_PRESET, a sweep array after the
#   background). Run it on the login node from the repository (or anywhere, with REPO_DIR):
#     slurm/pipeline.sh
#     RUNS=runs/paper SWEEP_PRESET=paper_fact_learning slurm/pipeline.sh --gres=gpu:8
#     DEVICE=cpu NPROC_PER_NODE=2 slurm/pipeline.sh --gres=none --cpus-per-task=2
# Arguments are sbatch options for every job. Settings (environment):
#   RUNS                  folder of the chain's run directories (default runs): RUNS/base, RUNS/background,
#                         RUNS/fact_learning
#   CONFIG_PRETRAIN, CONFIG_BACKGROUND, CONFIG_FACT   the stages' configs (defaults: the paper_1.3b_* ones)
#   OVERRIDES_PRETRAIN, OVERRIDES_BACKGROUND, OVERRIDES_FACT, OVERRIDES   extra train.py words (OVERRIDES
#                         goes to every stage, after the stage's own)
#   SWEEP_PRESET          also submit recipes/sweep.py --preset NAME --slurm from RUNS/background into RUNS/sweep,
#                         one job array after the background job (afterok); OVERRIDES_SWEEP (then OVERRIDES)
#                         go to every point
#   DEVICE, NPROC_PER_NODE, PYTHON, ...   as for each script (slurm/common.sh)
# Prints one line per job on stderr (its stage, job id and run directory) and the job ids on stdout:
# "PRETRAIN BACKGROUND FACT_LEARNING [SWEEP]".
set -euo pipefail
REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
RUNS=$(realpath -m "${RUNS:-runs}")
command -v sbatch >/dev/null || { echo "error: sbatch not found: run this where Slurm's commands are" >&2; exit 2; }

submit() {   # submit STAGE SCRIPT CONFIG OUTPUT_DIR INIT_FROM STAGE_OVERRIDES DEPENDENCY
  local stage=$1 script=$2 config=$3 out=$4 init=$5 words=$6 dep=$7 id
  local args=(--parsable)
  [[ -z $dep ]] || args+=("--dependency=afterok:$dep")
  id=$(CONFIG=$config OUTPUT_DIR=$out INIT_FROM=$init OVERRIDES="$words ${OVERRIDES:-}" \
       sbatch "${args[@]}" "${SBATCH_OPTS[@]}" "$REPO_DIR/slurm/$script")
  id=${id%%;*}
  echo "$stage job $id -> $out" >&2
  echo "$id"
}

SBATCH_OPTS=("$@")
pre=$(submit pretrain pretrain.sh "${CONFIG_PRETRAIN:-recipes/configs/paper_1.3b_pretrain.yaml}" "$RUNS/base" "" \
      "${OVERRIDES_PRETRAIN:-}" "")
bg=$(submit background collect_background.sh "${CONFIG_BACKGROUND:-recipes/configs/paper_1.3b_background.yaml}" \
     "$RUNS/background" "$RUNS/base" "${OVERRIDES_BACKGROUND:-}" "$pre")
fact=$(submit fact_learning fact_learning.sh "${CONFIG_FACT:-recipes/configs/paper_1.3b_fact_learning.yaml}" \
       "$RUNS/fact_learning" "$RUNS/background" "${OVERRIDES_FACT:-}" "$bg")
sweep=""
if [[ -n ${SWEEP_PRESET:-} ]]; then
  PY=${PYTHON:-$( [[ -x $REPO_DIR/.venv/bin/python ]] && echo "$REPO_DIR/.venv/bin/python" || echo python3)}
  read -r -a SWEEP_WORDS <<<"${OVERRIDES_SWEEP:-} ${OVERRIDES:-}"
  # the array's tasks get DEVICE, NPROC_PER_NODE (and the rest of this environment) through sbatch's --export=ALL
  log=$("$PY" "$REPO_DIR/recipes/sweep.py" --preset "$SWEEP_PRESET" --init_from "$RUNS/background" \
        --out "$RUNS/sweep" --slurm --sbatch_args="--dependency=afterok:$bg ${SBATCH_OPTS[*]}" \
        "${SWEEP_WORDS[@]}") || { echo "$log" >&2; echo "error: the sweep was not submitted" >&2; exit 1; }
  echo "$log" >&2
  sweep=$(sed -n 's/^Submitted batch job \([0-9]*\).*/\1/p' <<<"$log")
  [[ -n $sweep ]] || { echo "error: no job id in the sweep's output" >&2; exit 1; }
  echo "sweep job $sweep (array, after background) -> $RUNS/sweep" >&2
fi
echo "pipeline: pretrain $pre, background $bg, fact_learning $fact${sweep:+, sweep $sweep}" >&2
echo "$pre $bg $fact${sweep:+ $sweep}"
