set -euo pipefail
# Rendered by `c2seg slurm submit` for stage {{stage}} of the chain in {{run_dir}}.
cd {{workdir}}
{{setup}}
{{exports}}
C2SEG="{{python}} -m c2seg.cli"
RUN_DIR={{run_dir}}
STAGE={{stage}}
STATUS_FILE="$RUN_DIR/status/$STAGE${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}.exit"
mkdir -p "$RUN_DIR/status"
# The exit status of this job (task) for `c2seg slurm status`; 'requeued' while a requeue is under way.
trap 'rc=$?; echo "$rc" > "$STATUS_FILE"; echo "[c2seg-slurm] $(date +%T) stage $STAGE ended with exit $rc"' EXIT
echo "[c2seg-slurm] $(date +%T) stage $STAGE: job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID} on ${SLURMD_NODENAME:-$(hostname)} (nodes ${SLURM_JOB_NODELIST:-none}), requeue count ${SLURM_RESTART_COUNT:-0}"
echo running > "$STATUS_FILE"
# The nodes it runs on (the last start's, after a requeue), for the chain's MLflow runs (slurm/tracking.py).
echo "${SLURM_JOB_NODELIST:-}" > "${STATUS_FILE%.exit}.nodes"
