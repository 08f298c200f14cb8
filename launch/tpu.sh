#!/bin/bash
# Cloud TPU VM recipe: one blayers process per TPU host, started on every host at once.
# JAX finds the slice's hosts, its own process id and the coordinator from the TPU metadata,
# so the job only needs distributed.enabled=true.
#
#   export TPU_NAME=blayers ZONE=us-central2-b ACCELERATOR=v4-16   # v4-16: 2 hosts x 4 chips
#   launch/tpu.sh create                  # the TPU VM slice
#   launch/tpu.sh install                 # committed tree to every host, pip install .[tpu]
#   launch/tpu.sh mount 10.0.0.2:/runs    # one shared run directory (Filestore/NFS) on all hosts
#   launch/tpu.sh train run_dir=/mnt/runs/exp1 data.path=/mnt/runs/data/train.parquet
#   launch/tpu.sh logs                    # follow host 0's log (all hosts: WORKER=all)
#   launch/tpu.sh stop                    # SIGTERM everywhere: finish the step, checkpoint, exit
#   launch/tpu.sh train run_dir=...       # the same command again resumes
#   launch/tpu.sh delete
#
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-16}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REMOTE_DIR=${REMOTE_DIR:-blayers}
MOUNT=${MOUNT:-/mnt/runs}
PYTHON=${PYTHON:-python3.11}

run() {
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

on_hosts() {  # on_hosts WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

quoted() {
  local out="" arg
  for arg in "$@"; do out+=" $(printf '%q' "$arg")"; done
  echo "$out"
}

action=${1:?usage: launch/tpu.sh create|install|mount|train|score|logs|stop|delete [ARGS...]}
shift
case "$action" in
  create)
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
    ;;
  install)
    # the committed tree (git archive), not local build outputs; JAX needs Python >= 3.11,
    # newer than the TPU base images ship, hence deadsnakes
    archive=$(mktemp -d)/blayers.tar.gz
    run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:blayers.tar.gz" \
      --zone "$ZONE" --worker=all
    on_hosts all "set -e; if ! command -v $PYTHON >/dev/null; then \
sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get -qq update && \
sudo apt-get -qq install -y $PYTHON $PYTHON-venv; fi; mkdir -p $REMOTE_DIR && \
tar -xzf blayers.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR && $PYTHON -m venv .venv && \
.venv/bin/pip install -q -c constraints.txt '.[tpu]'"
    ;;
  mount)
    share=${1:?usage: launch/tpu.sh mount NFS_HOST:/EXPORT}
    on_hosts all "sudo apt-get -qq install -y nfs-common && sudo mkdir -p $MOUNT && \
sudo mount -t nfs -o rw,hard $share $MOUNT && sudo chmod a+rwx $MOUNT"
    ;;
  train | score)
    command=blayers-$action
    log="\$HOME/$command.log"
    on_hosts all "cd $REMOTE_DIR && nohup .venv/bin/$command distributed.enabled=true\
$(quoted "$@") >> $log 2>&1 < /dev/null &"
    ;;
  logs)
    on_hosts "${WORKER:-0}" "tail -n 100 -f \$HOME/blayers-*.log"
    ;;
  stop)
    on_hosts all "pkill -TERM -f 'bin/blayers-(train|score)' || true"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
    ;;
  *)
    echo "unknown action '$action': use create|install|mount|train|score|logs|stop|delete" >&2
    exit 2
    ;;
esac
