#!/usr/bin/env bash
# N processes of llmjax.main on this machine, joined by jax.distributed: multi-host on one box.
#
#   launch/multiprocess_local.sh N --config=configs/tiny.py --workdir=runs/mp [--config.K=V ...]
#
# Environment:
#   PORT=12355               coordinator port on 127.0.0.1
#   CPU_DEVICES_PER_PROCESS  fake CPU devices per process (sets JAX_PLATFORMS=cpu and
#                            --xla_force_host_platform_device_count); unset = the real devices
#   GPUS_PER_PROCESS         on a GPU box: process i sees GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES)
#   PYTHON=python
# Process 0 prints the console log; every process shares stdout/stderr, so errors are never lost.
# If one process fails the others are stopped and its exit code is returned.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [llmjax.main flags...]" >&2
  exit 2
fi
N=$1
shift
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}

pids=()
# (stderr: bash's own report of a process killed by a signal, its whole command, would bury the
# processes' lines)
cleanup() {
  # Each process's children too: its watchdog prints the line for a process that JAX aborted.
  local all=("${pids[@]}") pid
  for pid in "${pids[@]}"; do all+=($(pgrep -P "$pid" 2>/dev/null || true)); done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # Wait for them: a survivor of a lost peer ends itself within ~10 s (llmjax's peer watch, one
  # line saying so); one still there after 20 s is killed, so a requeued job never overlaps it.
  for ((t = 0; t < 400; t++)); do
    alive=0
    for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.05
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
} 2>/dev/null
trap cleanup EXIT INT TERM

for ((i = 0; i < N; i++)); do
  (
    if [[ -n "${CPU_DEVICES_PER_PROCESS:-}" ]]; then
      export JAX_PLATFORMS=cpu
      export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES_PER_PROCESS"
    fi
    if [[ -n "${GPUS_PER_PROCESS:-}" ]]; then
      export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * GPUS_PER_PROCESS)) $((i * GPUS_PER_PROCESS + GPUS_PER_PROCESS - 1)))
    fi
    exec "$PYTHON" -m llmjax.main "$@" --coordinator_address="127.0.0.1:$PORT" \
      --num_processes="$N" --process_id="$i"
  ) &
  pids+=($!)
done

# A failing process stops the others at once (the rest would wait on it until a timeout).
status=0
for ((k = 0; k < N; k++)); do
  wait -n 2>/dev/null || { status=$?; break; }
done
[[ $status -eq 0 ]] && pids=()
exit $status
