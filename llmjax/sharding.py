"""The device mesh, the one table mapping logical axis names to mesh axes, and batch placement.

The model names its weight axes logically (vocab, embed, heads, mlp); this file alone decides where
they live. With fsdp > 1 weights and optimizer state are split over `fsdp` (ZeRO-3) and XLA gathers
each layer's weights when it needs them; tensor > 1 splits heads and the MLP hidden dimension.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). The single place where parallelism is decided.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),  # examples are split over every data-parallel replica
    "vocab": "tensor",  # embedding rows
    "embed": "fsdp",  # model width: the ZeRO-3 axis of every weight
    "heads": "tensor",  # attention heads (q, k, v outputs and c_proj inputs)
    "mlp": "tensor",  # MLP hidden units
    "layers": None,  # the stacked-block axis of scan_layers: every device holds all layers
}


def mesh_shape(cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Resolves the one -1 axis and checks the product against the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"mesh {sizes}: {n_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
                         f"{math.prod(sizes)} devices, but {n_devices} are available")
    return tuple(sizes)


def make_mesh(cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_mesh(spec: P) -> P:
    return P(*(RULES.get(name) if name is not None else None for name in spec))


def param_shardings(abstract_params, mesh: Mesh):
    """NamedShardings for a pure-dict params tree built from the model's logical axis names."""
    specs = nnx.get_partition_spec(abstract_params)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, logical_to_mesh(s)), nnx.to_pure_dict(specs),
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows -> one global array split over (data, fsdp)."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_batch)
