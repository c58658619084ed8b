"""XLA and NCCL settings for NVIDIA GPUs and libtpu settings for TPUs, in one place; `apply()` runs
before jax starts a backend.

XLA reads XLA_FLAGS (libtpu: LIBTPU_INIT_ARGS) once, when the first backend is created, so
`main.py` and the benchmarks call `apply()` first, before anything touches a device. Nothing
changes on CPU. A flag the user
already set in XLA_FLAGS (or an NCCL variable already in the environment) wins over ours.
The flags below exist in jaxlib >= 0.10.2 (tests/test_speed_cpu.py checks that XLA accepts them:
an unknown flag aborts the process).
"""

from __future__ import annotations

import importlib.util
import os

# flag -> value; each with the reason it is here.
GPU_XLA_FLAGS = {
    # Lets XLA move collectives (and other async work) earlier/later to overlap them with compute.
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    # With scan_layers and fsdp: fetch the next layer's weights while this layer computes...
    "--xla_gpu_enable_pipelined_all_gather": "true",
    # ...and send this layer's gradients while the previous layer's backward runs.
    "--xla_gpu_enable_pipelined_reduce_scatter": "true",
    # Same for data-parallel gradient all-reduces inside the layer scan.
    "--xla_gpu_enable_pipelined_all_reduce": "true",
    # Per-parameter gradients are small; combining them into 128 MiB messages saves NCCL launches.
    "--xla_gpu_all_reduce_combine_threshold_bytes": "134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes": "134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes": "134217728",
}

# Left out until measured: --xla_gpu_enable_while_loop_double_buffering (unrolls every while loop
# by two, the grad-accumulation scan included, which may raise peak memory on one GPU).

# NCCL's own defaults are kept on purpose: its topology detection picks protocols and NVLink SHARP
# correctly on H100 nodes, and a wrong manual choice costs more than it saves. Add entries here
# (name -> value, with a reason) only with a measurement in benchmarks/NOTES.md behind them.
GPU_NCCL_ENV: dict[str, str] = {}

# libtpu flag -> value (LIBTPU_INIT_ARGS), each with its reason; MaxText sets the same ones for
# data-parallel and fsdp training. Accepted by libtpu 0.0.42.1 (jax[tpu]==0.10.2; an unknown
# flag makes libtpu refuse to start, which `plan --tpu` would show).
TPU_LIBTPU_FLAGS = {
    # Data-parallel gradient all-reduces (ICI and DCN) start as soon as each layer's gradient is
    # ready and overlap the rest of the backward pass, instead of waiting for its end...
    "--xla_tpu_enable_data_parallel_all_reduce_opt": "true",
    # ...also when the gradients being reduced have different sizes (GPT-2's layers do).
    "--xla_tpu_data_parallel_opt_different_sized_ops": "true",
    # fsdp: run collectives asynchronously, fused with the compute around them, so a layer's
    # weight all-gather hides under the previous layer's matmuls...
    "--xla_tpu_enable_async_collective_fusion": "true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather": "true",
    # ...and may span several steps of the layer scan (prefetch further ahead).
    "--xla_tpu_enable_async_collective_fusion_multiple_steps": "true",
    # Let the TensorCore compute while its collectives are in flight.
    "--xla_tpu_overlap_compute_collective_tc": "true",
}

# Modules of jax's CUDA plugins; one of them importable means jax will try a GPU backend.
_CUDA_PLUGINS = (
    "jax_cuda12_plugin",
    "jax_cuda13_plugin",
    "jax_plugins.xla_cuda12",
    "jax_plugins.xla_cuda13",
)


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA plugin (jax[cuda12] or [cuda13]) is installed, without importing it."""

    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # parent package (jax_plugins) missing
            return False

    return any(found(m) for m in _CUDA_PLUGINS)


def gpu_expected(environ: dict[str, str] | None = None) -> bool:
    """Whether jax will pick a GPU backend, decided without starting one."""
    environ = os.environ if environ is None else environ
    platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return cuda_plugin_installed()


def merged_xla_flags(user_flags: str) -> str:
    """The user's XLA_FLAGS plus ours for every flag the user did not set."""
    user_names = {f.split("=", 1)[0] for f in user_flags.split()}
    ours = [f"{k}={v}" for k, v in GPU_XLA_FLAGS.items() if k not in user_names]
    return " ".join([*user_flags.split(), *ours])


def merged_libtpu_args(user_args: str) -> str:
    """The user's LIBTPU_INIT_ARGS plus ours for every flag the user did not set."""
    user_names = {f.split("=", 1)[0] for f in user_args.split()}
    ours = [f"{k}={v}" for k, v in TPU_LIBTPU_FLAGS.items() if k not in user_names]
    return " ".join([*user_args.split(), *ours])


def tpu_expected(environ: dict[str, str] | None = None) -> bool:
    """Whether jax will pick a TPU backend, decided without starting one: libtpu installed and
    JAX_PLATFORMS allowing it (a TPU VM sets nothing else)."""
    environ = os.environ if environ is None else environ
    platforms = (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").lower()
    if platforms and "tpu" not in platforms:
        return False
    return importlib.util.find_spec("libtpu") is not None


def apply(environ: dict[str, str] | None = None, *, gpu: bool | None = None) -> bool:
    """Sets the GPU flags in `environ` (default os.environ) when a GPU backend is expected, the
    TPU ones when a TPU backend is.

    Must run before jax creates a backend; returns whether anything was applied.
    """
    environ = os.environ if environ is None else environ
    if gpu is None and tpu_expected(environ):
        environ["LIBTPU_INIT_ARGS"] = merged_libtpu_args(environ.get("LIBTPU_INIT_ARGS", ""))
        return True
    if not (gpu_expected(environ) if gpu is None else gpu):
        return False
    environ["XLA_FLAGS"] = merged_xla_flags(environ.get("XLA_FLAGS", ""))
    for name, value in GPU_NCCL_ENV.items():
        environ.setdefault(name, value)
    return True
