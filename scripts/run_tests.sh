#!/usr/bin/env bash
# Run the test suite. Starts the one-node SLURM cluster on localhost when slurm/local_cluster.sh is
# able to (installs slurm-wlm + munge with apt when missing and running as root), and stops it after.
set -euo pipefail
cd "$(dirname "$0")/.."
started=0
if [ -x slurm/local_cluster.sh ] && [ "${C2SEG_NO_SLURM:-0}" != 1 ]; then
  if slurm/local_cluster.sh up; then started=1; else echo "SLURM cluster not started: SLURM tests will be skipped"; fi
fi
trap '[ $started = 1 ] && slurm/local_cluster.sh down || true' EXIT
.venv/bin/python -m pytest "$@"
