#!/usr/bin/env bash
# Training on a Cloud TPU VM slice (or several: multislice), from your workstation:
#
#   TPU_NAME=gpt2 ZONE=us-west4-a ACCELERATOR=v5litepod-16 RUNTIME=v2-alpha-tpuv5-lite \
#     DATA_BUCKET=my-shards RUNS_BUCKET=my-runs \
#     launch/tpu_vm.sh [--dry_run] --config=configs/gpt2_124m.py --workdir=/home/$USER/runs/124m \
#     --config.data.path=/home/$USER/data/fineweb_edu_10b
#
# Steps, each a gcloud command (--dry_run prints them all and runs none):
#   1. a queued resource asks for the slice(s) and waits in the queue until Cloud TPU has them
#      (NUM_SLICES > 1: one queued resource of that many slices, joined by the data-center
#      network, which JAX sees as devices with slice_index 0..NUM_SLICES-1);
#   2. waits until the queued resource is ACTIVE;
#   3. copies this checkout's committed tree to every worker (git archive | scp; REPO=URL clones
#      that repository instead), creates a venv there and installs llmjax with jax[tpu] at this
#      checkout's jax version;
#   4. DATA_BUCKET=BUCKET: mounts gs://BUCKET at ~/data on every worker with gcsfuse (read-only),
#      so data.path can point at prepared shards on GCS; RUNS_BUCKET=BUCKET: read-write at ~/runs,
#      the workdir all workers share (checkpoints, metrics.jsonl);
#   5. runs the same `python -m llmjax.main ARGS` on every worker of every slice at once
#      (`gcloud compute tpus tpu-vm ssh --worker=all`); jax.distributed finds the other workers
#      itself (sharding.init_distributed), and the config's mesh (mesh.dcn_data = slices) spans
#      all chips. DELETE=1 deletes the queued resource (and its TPU VMs) when the run ends.
#
# Environment: TPU_NAME (required), ZONE (required), ACCELERATOR (v5litepod-N, v5p-N, v6e-N,
# v4-N), RUNTIME (the TPU software version: v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p,
# v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4), PROJECT (default: gcloud's), NUM_SLICES=1,
# SPOT=1 (spot capacity), REPO, REF (branch or commit with REPO), DATA_BUCKET, RUNS_BUCKET, DELETE.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry_run" ]]; then
  DRY=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME (the queued resource and TPU VM name)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
NUM_SLICES=${NUM_SLICES:-1}
if [[ ! "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_SLICES=$NUM_SLICES: expected a positive integer" >&2
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
JAX_VERSION=${JAX_VERSION:-$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)}
GCLOUD=(gcloud)
[[ -n "${PROJECT:-}" ]] && GCLOUD+=(--project="$PROJECT")
TPU=(compute tpus)
# The TPU VMs of the queued resource: one, or TPU_NAME-0 .. TPU_NAME-(K-1) for K slices.
if [[ "$NUM_SLICES" == 1 ]]; then
  NODES=("$TPU_NAME")
  SHAPE=(--node-id="$TPU_NAME")
else
  NODES=()
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$TPU_NAME-$i"); done
  SHAPE=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
fi

run() {  # prints the command (shell-quoted), then runs it unless --dry_run
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $DRY == 0 ]]; then "$@"; fi
}

on_workers() {  # on_workers NODE COMMAND: COMMAND on every worker of one TPU VM slice
  run "${GCLOUD[@]}" "${TPU[@]}" tpu-vm ssh "$1" --zone="$ZONE" --worker=all --command="$2"
}

# 1-2. The slice(s).
run "${GCLOUD[@]}" "${TPU[@]}" queued-resources create "$TPU_NAME" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${SHAPE[@]}" \
  ${SPOT:+--spot}
state() {
  "${GCLOUD[@]}" "${TPU[@]}" queued-resources describe "$TPU_NAME" --zone="$ZONE" \
    --format='value(state.state)'
}
echo "+ waiting until queued resource $TPU_NAME is ACTIVE"
if [[ $DRY == 0 ]]; then
  until [[ "$(state)" == ACTIVE ]]; do
    s=$(state)
    if [[ "$s" == FAILED || "$s" == SUSPENDED ]]; then
      echo "queued resource $TPU_NAME is $s" >&2
      exit 1
    fi
    sleep 30
  done
fi

# 3. The code, on every worker.
INSTALL="python3 -m venv ~/llmjax/.venv && ~/llmjax/.venv/bin/pip install -q --upgrade pip"
INSTALL+=" && ~/llmjax/.venv/bin/pip install -q -e ~/llmjax 'jax[tpu]==$JAX_VERSION'"
if [[ -n "${REPO:-}" ]]; then
  FETCH="rm -rf ~/llmjax && git clone -q $(printf '%q' "$REPO") ~/llmjax"
  [[ -n "${REF:-}" ]] && FETCH+=" && git -C ~/llmjax checkout -q $(printf '%q' "$REF")"
else
  TARBALL=/tmp/llmjax.tar.gz  # --dry_run: a name only
  [[ $DRY == 0 ]] && TARBALL=$(mktemp -t llmjax.XXXXXX.tar.gz)
  run git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
  for node in "${NODES[@]}"; do
    run "${GCLOUD[@]}" "${TPU[@]}" tpu-vm scp "$TARBALL" "$node:llmjax.tar.gz" --zone="$ZONE" \
      --worker=all
  done
  FETCH="rm -rf ~/llmjax && mkdir -p ~/llmjax && tar -xzf ~/llmjax.tar.gz -C ~/llmjax"
fi
for node in "${NODES[@]}"; do
  on_workers "$node" "$FETCH && $INSTALL"
done

# 4. Shards on GCS through gcsfuse (preinstalled on TPU VM images; else apt-get install gcsfuse).
mount_bucket() {  # mount_bucket BUCKET DIR [OPTIONS]
  for node in "${NODES[@]}"; do
    on_workers "$node" "mkdir -p ~/$2 && gcsfuse ${3:-}--implicit-dirs $(printf '%q' "$1") ~/$2"
  done
}
[[ -n "${DATA_BUCKET:-}" ]] && mount_bucket "$DATA_BUCKET" data "-o ro "
[[ -n "${RUNS_BUCKET:-}" ]] && mount_bucket "$RUNS_BUCKET" runs

# 5. The same program on every worker of every slice, at once.
ARGS=$(printf ' %q' "$@")
TRAIN="cd ~/llmjax && .venv/bin/python -m llmjax.main$ARGS"
pids=()
for node in "${NODES[@]}"; do
  if [[ $DRY == 0 ]]; then
    on_workers "$node" "$TRAIN" &
    pids+=($!)
  else
    on_workers "$node" "$TRAIN"
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done

if [[ -n "${DELETE:-}" ]]; then
  run "${GCLOUD[@]}" "${TPU[@]}" queued-resources delete "$TPU_NAME" --zone="$ZONE" --force \
    --quiet
fi
exit $status
