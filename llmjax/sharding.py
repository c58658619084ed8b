"""The device mesh, the one table mapping logical axis names to mesh axes, and batch placement.

The model names the axes of its weights (vocab, embed, heads, mlp) and of the activations that
decide the layout (activation_batch, activation_heads, ...); this file alone decides where they
live. With fsdp > 1 weights and optimizer state are split over `fsdp` (ZeRO-3) while every
activation keeps its batch axis split over (data, fsdp): each device computes its own rows with
each layer's weights all-gathered, and gradients are reduce-scattered. Without the activation
names XLA is free to keep the weights' `embed` split and move activations of the whole global batch
instead. tensor > 1 splits heads, the MLP hidden units and the vocabulary (Megatron's layout) and,
between the projections, the rows of the residual stream (sequence parallelism).

The activation names take effect only inside `activation_rules` (the jitted train and eval steps
enter it through `under_rules`); elsewhere the model's constraints are no-ops.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import math
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from llmjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). The single place where parallelism is decided.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # Weights.
    "vocab": "tensor",  # embedding rows
    "embed": "fsdp",  # model width: the ZeRO-3 axis of every weight
    "heads": "tensor",  # attention heads (q, k, v outputs and c_proj inputs)
    "mlp": "tensor",  # MLP hidden units
    "layers": None,  # the stacked-block axis of scan_layers: every device holds all layers
    # Activations (and the input batch).
    "activation_batch": ("data", "fsdp"),  # examples are split over every data-parallel replica
    "activation_length": None,  # whole sequences per device
    # The residual stream (model.RESIDUAL), where norms, residual adds and dropout work one token
    # at a time: its rows are split over the tensor ranks as well. Megatron's sequence
    # parallelism, along the batch because our layout is [B, T, D] where Megatron's is [T, B, D]:
    # either way the split dimension is the outermost, so gathering it needs no transpose. Each
    # all-reduce of plain tensor parallelism becomes a reduce-scatter and an all-gather (the
    # same bytes), and no tensor rank holds its replica's whole residual stream. Fewer rows than
    # tensor ranks still works: XLA pads the uneven split.
    "activation_residual_batch": ("data", "fsdp", "tensor"),
    "activation_embed": None,  # the residual stream's width is whole: fsdp moves weights
    "activation_heads": "tensor",  # Megatron: each tensor rank attends with its own heads
    "activation_mlp": "tensor",  # ... and holds its slice of the MLP hidden units
    "activation_vocab": "tensor",  # vocabulary-parallel logits and loss
}


def mesh_shape(
    cfg: ml_collections.ConfigDict, n_devices: int, slices: int = 1
) -> tuple[int, int, int]:
    """Resolves the one -1 axis and checks the product against the device count; with several
    TPU slices (mesh.dcn_data) the axes tile one slice and `data` is multiplied by dcn_data."""
    dcn = dcn_data(cfg, slices)
    if dcn > 1:
        inner = mesh_shape(cfg, n_devices // dcn)
        return (dcn * inner[0], inner[1], inner[2])
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    named = " x ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"{named}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"{named} = {math.prod(sizes)} devices, but {n_devices} are available")
    return tuple(sizes)


def slice_count(devices) -> int:
    """TPU slices the devices span (devices of other platforms: 1)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def dcn_data(cfg: ml_collections.ConfigDict, slices: int) -> int:
    """mesh.dcn_data resolved (-1: one data replica group per slice), checked against the slices
    the devices span: the data-center network carries only the data axis's gradient all-reduce."""
    dcn = slices if cfg.get("dcn_data", 1) == -1 else cfg.get("dcn_data", 1)
    if dcn != slices:
        raise ConfigError(
            f"mesh.dcn_data={cfg.dcn_data}, but the devices span {slices} TPU slice(s); "
            f"use mesh.dcn_data={slices} (or -1)"
        )
    return dcn


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """data x fsdp x tensor over `devices`. On TPU the axes follow the ICI torus (mesh_utils), and
    over several slices (multislice) `data` is the hybrid mesh's dcn_data x data: slice-major, so
    only the data-parallel gradient all-reduce crosses the data-center network; fsdp and tensor
    stay inside a slice. The one RULES table serves both."""
    devices = jax.devices() if devices is None else devices
    slices = slice_count(devices)
    shape = mesh_shape(cfg, len(devices), slices)
    if devices[0].platform != "tpu":
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
    from jax.experimental import mesh_utils

    if slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        inner = (shape[0] // slices, shape[1], shape[2])
        grid = mesh_utils.create_hybrid_device_mesh(
            inner, (slices, 1, 1), devices, allow_split_physical_axes=True
        )
    return Mesh(grid, MESH_AXES)


def logical_to_mesh(spec: P) -> P:
    return P(*(RULES.get(name) if name is not None else None for name in spec))


def param_shardings(abstract_params, mesh: Mesh):
    """NamedShardings for a pure-dict params tree built from the model's logical axis names."""
    specs = nnx.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, logical_to_mesh(s)),
        nnx.to_pure_dict(specs),
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["activation_batch"]))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Micro-batches stacked [A, B/A, ...]: every micro-batch split like the batch."""
    return NamedSharding(mesh, P(None, RULES["activation_batch"]))


@contextlib.contextmanager
def activation_rules(mesh: Mesh) -> Iterator[None]:
    """Inside: the model's activation axis names (model.constrain) map onto `mesh` by RULES.
    Usable inside a traced function: it sets JAX's abstract mesh, not a concrete one."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        with nnx.logical_axis_rules(tuple(RULES.items())):
            yield


def under_rules(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` traced inside `activation_rules(mesh)`: wrap a step with it before jitting, so the
    constraints apply wherever the jitted step is traced (the loop, plan, tests)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_rules(mesh):
            return fn(*args, **kwargs)

    return wrapped


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows -> one global array split over (data, fsdp)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)


def gather(tree):
    """Whole arrays on every process (numpy), even where shards live on other hosts; every
    process must call it. One process: the tree itself."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.process_allgather(tree, tiled=True)


def check_run(cfg: ml_collections.ConfigDict, mesh: Mesh, param_sh, abstract_params) -> None:
    """Refuses, before anything compiles, a mesh that cannot hold this batch or these weights."""
    dp, accum, B = data_parallel_size(mesh), cfg.optim.grad_accum, cfg.data.batch_size
    if B % (dp * accum):
        raise ConfigError(
            f"data.batch_size={B} is not divisible by data-parallel size {dp} (mesh data="
            f"{mesh.shape['data']} x fsdp={mesh.shape['fsdp']}) x optim.grad_accum={accum}; "
            f"use a multiple of {dp * accum}"
        )
    if cfg.model.n_head % mesh.shape["tensor"]:
        raise ConfigError(
            f"model.n_head={cfg.model.n_head} is not divisible by mesh.tensor="
            f"{mesh.shape['tensor']}: tensor parallelism splits whole heads"
        )

    def check_param(path, sh: NamedSharding, x) -> None:
        for dim, axes in zip(x.shape, sh.spec, strict=False):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            ways = math.prod(mesh.shape[a] for a in axes)
            if dim % ways:
                name = ".".join(str(getattr(k, "key", k)) for k in path)
                raise ConfigError(
                    f"parameter {name} {tuple(x.shape)}: a dimension of {dim} cannot be split "
                    f"{ways} ways over mesh.{'+'.join(axes)}; change the mesh or the model width"
                )

    jax.tree_util.tree_map_with_path(check_param, param_sh, abstract_params)
    _check_process_rows(mesh, B)


def _check_process_rows(mesh: Mesh, rows: int) -> None:
    # Each process loads the contiguous 1/process_count of the batch (data.process_rows); its
    # devices must hold exactly those rows, which holds when model axes stay within a host.
    i, n = jax.process_index(), jax.process_count()
    if n == 1:
        return
    if rows % n:
        raise ConfigError(f"data.batch_size={rows} is not divisible by {n} processes")
    index = batch_sharding(mesh).addressable_devices_indices_map((rows,))
    held = sorted({r for (s,) in index.values() for r in range(*s.indices(rows))})
    if held != list(range(i * rows // n, (i + 1) * rows // n)):
        raise ConfigError(
            f"mesh {dict(mesh.shape)} over {n} processes: process {i}'s devices hold batch rows "
            f"{held[0]}..{held[-1]}, not the 1/{n} it loads; keep mesh.tensor within one host"
        )


def bytes_per_device(tree) -> int:
    """Bytes of one device's share of a tree of sharded arrays or ShapeDtypeStructs."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


def mesh_line(mesh: Mesh) -> str:
    axes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    return (
        f"mesh {axes} over {mesh.size} {mesh.devices.flat[0].platform} devices in "
        f"{jax.process_count()} process(es); batch over {RULES['activation_batch']}"
    )


def peak_bytes(m) -> int:
    """A compiled step's peak device memory from its memory_analysis() `m`: buffer assignment's
    total, with donated arguments counted once (they are reused for the outputs)."""
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def memory_report(params, opt_state, compiled) -> str:
    """Per-device memory: the state's share, and XLA's estimate for the compiled step."""
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    line = (
        f"memory per device: parameters {mib(bytes_per_device(params))} + optimizer "
        f"{mib(bytes_per_device(opt_state))}"
    )
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        m = None
    if m is None:
        return line + "; no compiled-step estimate on this backend"
    peak = peak_bytes(m)
    return (
        line + f"; compiled step (XLA estimate): arguments {mib(m.argument_size_in_bytes)}, "
        f"temporaries {mib(m.temp_size_in_bytes)}, peak {mib(peak)}"
    )


# jax.distributed's timeouts. The heartbeat timeout is JAX's own detection of a dead process; it
# aborts the survivors without a word, so it must come after llmjax's (guard.LOST_S, 10 s, which
# ends them with a line) and only matters where that cannot run (a process hung with the GIL
# held). Its default, 100 s, left survivors running 55-93 s; 30 s bounds that case. The shutdown
# timeout is how long a finished process waits at the shutdown barrier for the others (default
# 300 s); healthy processes arrive within seconds of each other, failed ones exit without it.
# A dead coordinator (process 0) is the exception: JAX's client aborts every survivor within a
# second (its message lands in errors.log); its error callback cannot be set from Python.
HEARTBEAT_TIMEOUT_S, SHUTDOWN_TIMEOUT_S = 30, 60
TIMEOUTS = {
    "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
    "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S,
}


# Launchers that start several processes and tell jax.distributed who is who.
def launched_processes() -> str | None:
    env = os.environ
    if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if on_cloud_tpu_vm():
        return "Cloud TPU VM"
    return None


def on_cloud_tpu_vm() -> bool:
    """A Cloud TPU VM: TPU chips attached (/dev/accel* on v4, VFIO groups on v5e/v5p/v6e) and
    libtpu installed. There jax.distributed finds the slice's workers (and a multislice run's
    other slices) from the VM's metadata, so every worker runs the same command."""
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def init_distributed(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Starts jax.distributed: from the flags when all three are given (every local device is
    used), else from the launcher's environment (SLURM srun, Open MPI: one device per process
    there; a Cloud TPU VM: one process per worker, all its chips); a lone process on its own
    machine starts nothing. Call before any JAX computation."""
    given = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    if None not in given.values():
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
            )
        # Explicit flags mean every visible device: without this, jax under SLURM would still
        # restrict each process to device SLURM_LOCALID.
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            cluster_detection_method="deactivate",
            **TIMEOUTS,
        )
    elif launcher := launched_processes():
        try:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, **TIMEOUTS)
        except ValueError as e:  # e.g. JAX_COORDINATOR_ADDRESS set but no process count
            raise ConfigError(f"jax.distributed under {launcher}: {e}") from e
    elif any(v is not None for v in given.values()):
        missing = ", ".join(k for k, v in given.items() if v is None)
        raise ConfigError(
            f"{missing} missing: pass all of --coordinator_address, "
            "--num_processes and --process_id (or run under SLURM / Open MPI)"
        )
