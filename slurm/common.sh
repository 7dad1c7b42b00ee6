# shellcheck shell=bash
# Shared body of the slurm/*.sh batch scripts; sourced, not run. Launches
#
#   srun torchrun --nnodes $SLURM_NNODES --nproc_per_node $NPROC_PER_NODE \
#        --rdzv_backend c10d --rdzv_endpoint $head:$port \
#        recipes/train.py --config $CONFIG --output_dir=$OUTPUT_DIR [--device=$DEVICE] $OVERRIDES
#
# and handles preemption. Settings (environment, or `sbatch --export=ALL,NAME=value`):
#   CONFIG          YAML config (relative paths: from the submit directory, else from the repository)
#   OUTPUT_DIR      run directory; an existing one resumes from its latest checkpoint. Defaults chain the
#                   stages: pretrain.sh runs/base, collect_background.sh runs/background, the finetunes
#                   runs/$SLURM_JOB_NAME-$SLURM_JOB_ID
#   INIT_FROM       the run to start from, passed as --init_from unless OVERRIDES names one (defaults:
#                   background runs/base, finetunes runs/background; empty: none)
#   NPROC_PER_NODE  processes per node (default: the node's allocated GPUs; 1 with DEVICE=cpu)
#   OVERRIDES       extra `--key=value` words for train.py, split on whitespace
#   DEVICE          empty (the config decides), `cuda`, or `cpu` (gloo; pair with `sbatch --gres=none`)
#   MASTER_PORT     rendezvous port on the head node (default 29500 + SLURM_JOB_ID % 1000)
#   PYTHON          run `$PYTHON -m torch.distributed.run` instead of `torchrun` from PATH
#   TRAIN_SCRIPT    the entry point (default recipes/train.py in the repository)
#   RESIGNAL_S      after a SIGUSR1, re-send it every RESIGNAL_S seconds until the trainer stops (30)
#
# Preemption. `#SBATCH --signal=B:USR1@N` makes Slurm send SIGUSR1 to this batch shell only, N seconds
# before the time limit (up to 30 s earlier: slurmctld checks every 30 s). The shell traps it and
# forwards it to srun, which relays it to every process of the step on every node; it re-sends it every
# RESIGNAL_S seconds until the trainer has stopped, since one that arrives before the trainer installed
# its handler is lost. torchrun runs with SIGUSR1 ignored (its default action would kill it; an ignored
# disposition survives exec and is inherited by the workers), and the trainer installs its own SIGUSR1
# handler: at the next step boundary it checkpoints, writes OUTPUT_DIR/PREEMPTED and exits 0. Seeing
# exit 0 and PREEMPTED, this script runs `scontrol requeue`; the requeued job (same job id, same
# OUTPUT_DIR) resumes from the checkpoint. A SIGUSR1 sent to the steps directly
# (`scancel --signal=USR1 JOBID`, `--full`, or `--signal=USR1@N` without `B:`) works the same way.
set -euo pipefail

smf_die() { echo "slurm/common.sh: error: $*" >&2; exit 2; }

# ---- preemption signal: forward SIGUSR1 to the training step ------------------------------------
# A SIGUSR1 that reaches the workers before the trainer installed its handler is ignored (torchrun and
# its workers start with it ignored), so after a signal the shell re-sends it every RESIGNAL_S seconds
# until the trainer answers with PREEMPTED or exits. Extra signals are harmless: the trainer only sets
# a flag it reads at the next step boundary.
SMF_SRUN_PID=""
SMF_SIGNALLED=0
SMF_LAST_FORWARD=-1000000
SMF_SRUN_START=0
smf_forward() {
  # not in srun's first seconds: a task killed by SIGUSR1 before its `trap "" USR1` ran would fail the job
  [[ -n $SMF_SRUN_PID ]] && ((SECONDS - SMF_SRUN_START >= 5)) || return 1
  SMF_LAST_FORWARD=$SECONDS
  echo "$(date -Is) sending SIGUSR1 to the training step"
  # srun relays the signal to every process of the step on every node
  kill -USR1 "$SMF_SRUN_PID" 2>/dev/null || scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || true
}
smf_on_usr1() {
  echo "$(date -Is) batch shell got SIGUSR1: asking the trainer to checkpoint and stop"
  SMF_SIGNALLED=1
  smf_forward || true
}
trap smf_on_usr1 USR1

[[ -n ${SLURM_JOB_ID:-} ]] || smf_die "not inside a Slurm job: submit with sbatch (or run inside salloc)"
REPO_DIR=$(cd "${REPO_DIR:?}" && pwd)

# ---- settings -------------------------------------------------------------------------------------
: "${CONFIG:?set CONFIG to a YAML config}"
[[ $CONFIG == /* || -e $CONFIG ]] || CONFIG=$REPO_DIR/$CONFIG
[[ -f $CONFIG ]] || smf_die "config not found: $CONFIG"
CONFIG=$(realpath "$CONFIG")
OUTPUT_DIR=$(realpath -m "${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID}")
DEVICE=${DEVICE:-}
OVERRIDES=${OVERRIDES:-}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO_DIR/recipes/train.py}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  if [[ $DEVICE == cpu ]]; then
    NPROC_PER_NODE=1
  else
    NPROC_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    ((NPROC_PER_NODE > 0)) || smf_die "no GPUs allocated on this node: request them (--gres=gpu:N) or set DEVICE=cpu NPROC_PER_NODE=N"
  fi
fi
NNODES=${SLURM_NNODES:-1}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
RESIGNAL_S=${RESIGNAL_S:-30}
if [[ -z ${OMP_NUM_THREADS:-} ]]; then
  OMP_NUM_THREADS=$((${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE))
  ((OMP_NUM_THREADS > 0)) || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}

if [[ -n ${PYTHON:-} ]]; then
  LAUNCHER=("$PYTHON" -m torch.distributed.run)
elif command -v torchrun >/dev/null; then
  LAUNCHER=(torchrun)
elif [[ -x $REPO_DIR/.venv/bin/torchrun ]]; then
  LAUNCHER=("$REPO_DIR/.venv/bin/torchrun")
else
  smf_die "torchrun not found: activate the environment before sbatch, or set PYTHON"
fi

read -r -a OVERRIDE_WORDS <<<"$OVERRIDES"
TRAIN_ARGS=(--config "$CONFIG" "--output_dir=$OUTPUT_DIR")
[[ -z $DEVICE ]] || TRAIN_ARGS+=("--device=$DEVICE")
# the stages chain: runs/base -> runs/background -> a finetune (each script's INIT_FROM default)
if [[ -n ${INIT_FROM:-} && " $OVERRIDES" != *" --init_from="* ]]; then
  TRAIN_ARGS+=("--init_from=$(realpath -m "$INIT_FROM")")
fi
TRAIN_ARGS+=("${OVERRIDE_WORDS[@]}")

# ---- log into the run directory as well as Slurm's --output file --------------------------------
mkdir -p "$OUTPUT_DIR"
exec 3>&1 4>&2
exec > >(tee -a "$OUTPUT_DIR/slurm-$SLURM_JOB_ID.log") 2>&1
SMF_TEE_PID=$!
smf_flush_log() { exec 1>&3 2>&4; wait "$SMF_TEE_PID" 2>/dev/null || true; }
trap smf_flush_log EXIT

echo "==== $(date -Is) job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"
echo "config:     $CONFIG"
echo "output_dir: $OUTPUT_DIR"
echo "nodes: $NNODES x $NPROC_PER_NODE processes, device ${DEVICE:-from config}, rendezvous $HEAD_NODE:$MASTER_PORT"

# ---- launch ---------------------------------------------------------------------------------------
SRUN_ARGS=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun in Slurm 22.05 does not inherit --cpus-per-task from sbatch; pass it on
[[ -z ${SLURM_CPUS_PER_TASK:-} ]] || SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
CMD=("${LAUNCHER[@]}" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$MASTER_PORT"
  "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}")
rm -f "$OUTPUT_DIR/PREEMPTED"   # the marker of an earlier run of this job (the trainer removes it too)
echo "+ srun ${SRUN_ARGS[*]} ${CMD[*]}"
# torchrun must survive SIGUSR1: start it with the signal ignored (the trainer re-installs a handler)
SMF_SRUN_START=$SECONDS
srun "${SRUN_ARGS[@]}" bash -c 'trap "" USR1; exec "$@"' smf-launch "${CMD[@]}" &
SMF_SRUN_PID=$!
# bash runs a trap only between commands: wait in short sleeps, not in one long `wait`
while kill -0 "$SMF_SRUN_PID" 2>/dev/null; do
  if ((SMF_SIGNALLED && SECONDS - SMF_LAST_FORWARD >= RESIGNAL_S)) && [[ ! -e $OUTPUT_DIR/PREEMPTED ]]; then
    smf_forward || true   # the trainer has not stopped yet (or the first one was deferred)
  fi
  sleep 1 &
  wait $! 2>/dev/null || true
done
set +e
wait "$SMF_SRUN_PID"
SMF_RC=$?
set -e

if ((SMF_RC != 0)); then
  echo "$(date -Is) training failed (exit $SMF_RC)"
  exit "$SMF_RC"
fi
if [[ -e $OUTPUT_DIR/PREEMPTED ]]; then
  echo "$(date -Is) trainer checkpointed and stopped ($(head -c 200 "$OUTPUT_DIR/PREEMPTED")); requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    # Slurm now ends this run of the job; the requeued run resumes from the checkpoint
    sleep 60 || true
    exit 0
  fi
  echo "requeue failed: resume with OUTPUT_DIR=$OUTPUT_DIR CONFIG=$CONFIG sbatch <script>"
  exit 75
fi
((SMF_SIGNALLED == 0)) || echo "$(date -Is) SIGUSR1 arrived but the trainer finished without PREEMPTED"
[[ -e $OUTPUT_DIR/summary.json ]] || echo "warning: no summary.json in $OUTPUT_DIR"
echo "$(date -Is) done"
