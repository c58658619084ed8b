"""Orbax checkpoints under WORKDIR/checkpoints/<step>/: train state, data position and config.

Two items per step: `state` (params, optimizer state, step; sharded arrays, restored straight onto
the current mesh, whatever mesh saved them) and `meta` (JSON: the config, the model config and the
data position). The data position is the step itself, since batches are addressed by step.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message names it."""


def manager(workdir: str, keep: int = 3, *, read_only: bool = False) -> ocp.CheckpointManager:
    # Orbax rejects relative paths, but only later, from its asynchronous save thread.
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Restores `state` with the shardings and dtypes of `abstract_state` (ShapeDtypeStructs)."""
    target = jax.tree.map(
        lambda x: ocp.utils.to_shape_dtype_struct(x) if hasattr(x, "shape") else x, abstract_state
    )
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]


def restore_params(mngr: ocp.CheckpointManager, step: int, target):
    """Only the parameters (no optimizer state): what sampling and evaluation need."""
    item = {"params": target}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    return mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


def check_compatible(meta: dict, model_config: dict, path: str) -> None:
    """A workdir's checkpoint must come from the same model shape, or resuming is meaningless."""
    saved = meta.get("model", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r} != config {v!r}" for k, v in model_config.items()
            if k in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size")
            and saved.get(k) != v]
    if diff:
        raise CheckpointError(f"{path} holds an incompatible model ({'; '.join(diff)})")
