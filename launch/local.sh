#!/usr/bin/env bash
# One host, every local GPU, one process: JAX sees all devices and the config's mesh spans them.
#
#   launch/local.sh --config=configs/gpt2_124m.py --workdir=runs/124m [--config.K=V ...]
#
# No jax.distributed is needed in one process. The flags below are the usual GPU defaults
# (see launch/README.md); anything already in XLA_FLAGS / the environment wins.
set -euo pipefail
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
exec "${PYTHON:-python}" -m llmjax.main "$@"
