"""Orbax checkpoints under WORKDIR/checkpoints/<step>/: train state, data position and config.

Two items per step: `state` (params, optimizer state, step; sharded arrays, restored straight onto
the current mesh, whatever mesh saved them) and `meta` (JSON, a `Record`: the config, the model
config, the run's kind, tokens per step, the loop's log position and a fingerprint of `state`). The
data position is the step itself, since batches are addressed by step.

Safety, in the order things can go wrong:
- Saves are asynchronous and atomic: Orbax writes `<step>.orbax-checkpoint-tmp` and renames it
  when complete, so only committed checkpoints are ever listed or restored. Old checkpoints are
  deleted only after the newer one has committed, so one committed checkpoint always exists.
- A failed save (full disk, unwritable directory) raises CheckpointError naming the step and the
  reason; the checkpoints already on disk are untouched.
- A restored state must match the fingerprint saved with it (a wrapping uint32 sum of every
  leaf's bits, exact under any sharding), so truncated or bit-flipped files are never trained on:
  such a checkpoint is reported with a warning, set aside under checkpoints_corrupt/, and the run
  resumes from the previous good one.
- SIGTERM and SIGINT, once `handle_signals()` is installed, make `should_stop` true at the next
  step: the loop saves and exits. With several processes, JAX's preemption sync point makes all
  of them stop at the same step.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from llmjax.errors import UserError, one_line
from llmjax.model import GPT, GPTConfig
from llmjax.tokenizer import Tokenizer, get_tokenizer


class CheckpointError(UserError):
    """A checkpoint that cannot be used or written; the message names it."""


def manager(
    workdir: str, keep: int = 3, keep_every: int = 0, *, read_only: bool = False
) -> ocp.CheckpointManager:
    """`keep` most recent checkpoints, plus every step that is a multiple of `keep_every` (> 0).

    `read_only`: creates, deletes and cleans up nothing (Orbax's own read_only mode says so in
    three warnings, which would bury the one line a user needs to read).
    """
    # Orbax rejects relative paths, but only later, from its asynchronous save thread.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        keep_period=keep_every or None,
        create=not read_only,
        enable_async_checkpointing=True,
        # Half-written `<step>.orbax-checkpoint-tmp` folders of a killed run are never restored;
        # removing them at start-up only frees their space.
        cleanup_tmp_directories=not read_only,
    )
    mngr = ocp.CheckpointManager(directory(workdir), options=options, item_names=("state", "meta"))
    if not read_only:
        _writing.add(mngr)
    return mngr


# The managers of this process that write: a run that fails settles their saves (`settle`).
_writing: weakref.WeakSet = weakref.WeakSet()


def settle(timeout_s: float) -> tuple[str, int | None] | None:
    """After a failure: gives the save in flight of every writing manager up to `timeout_s` to
    commit, then removes what did not (process 0). Returns (checkpoints folder, its latest
    committed step) of the run, or None if this process never opened a checkpoint for writing
    (it failed before training started)."""
    found = None
    for mngr in list(_writing):
        # Orbax's wait has no timeout: it runs in a thread that may be left behind.
        waiter = threading.Thread(target=_wait_quietly, args=(mngr,), daemon=True)
        waiter.start()
        waiter.join(timeout_s)
        path = str(mngr.directory)
        if jax.process_index() == 0 and os.path.isdir(path):
            for name in os.listdir(path):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        steps = steps_on_disk(path)
        found = (path, steps[-1] if steps else None)
    return found


def writing() -> bool:
    """Whether this process has opened a checkpoint for writing: its training has started."""
    return len(_writing) > 0


def _wait_quietly(mngr: ocp.CheckpointManager) -> None:
    try:
        mngr.wait_until_finished()
    except Exception:  # the failed save: reported by whoever saw it first, cleaned up by settle
        pass


def directory(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _reason(e: BaseException) -> str:
    """The useful part of an Orbax/TensorStore error, on one line."""
    text = str(e)
    for needle, short in (
        ("No space left", "no space left on device"),
        ("Read-only file system", "read-only file system"),
        ("Permission denied", "permission denied"),
    ):
        if needle in text:
            return short
    return one_line(e, named=True, limit=200)


def steps_on_disk(path: str) -> list[int]:
    return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if os.path.isdir(path) else []


def wait(mngr: ocp.CheckpointManager) -> None:
    """Blocks until the save in flight has committed; its failure becomes a CheckpointError."""
    step = mngr.latest_step()
    try:
        mngr.wait_until_finished()
    except Exception as e:  # raised in Orbax's save thread, surfaced here
        raise CheckpointError(
            f"cannot save checkpoint {mngr.directory}/{step}: {_reason(e)}; the checkpoints "
            f"already on disk ({steps_on_disk(str(mngr.directory))}) are intact"
        ) from e


@jax.jit
def _fingerprint(state) -> list[jax.Array]:
    # Integer sums are exact and associative, so any sharding gives the same answer; one flipped
    # bit changes a leaf's sum by a power of two.
    def one(x):
        bits = jax.lax.bitcast_convert_type(
            x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        )
        return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(state)]


def fingerprint(state) -> list[int]:
    # 0-d outputs are replicated: every process holds the whole value, also across hosts.
    return [int(np.asarray(x.addressable_data(0))) for x in _fingerprint(state)]


def leaf_specs(abstract_state) -> dict[str, list]:
    """Leaf path -> [shape, dtype]: what a checkpoint must match to be restored into this run."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return {jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in leaves}


def save(mngr: ocp.CheckpointManager, step: int, state, record: Record) -> None:
    """Starts an asynchronous save; training continues while it is written.

    Waits first for the previous save, so its failure is reported (CheckpointError) before a new
    one starts.
    """
    wait(mngr)
    record = dataclasses.replace(record, fingerprint=fingerprint(state), leaves=leaf_specs(state))
    try:
        mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_stored(state)),
                meta=ocp.args.JsonSave(record.to_json()),
            ),
            force=True,
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot save checkpoint {mngr.directory}/{step}: {_reason(e)}; the checkpoints "
            f"already on disk ({steps_on_disk(str(mngr.directory))}) are intact"
        ) from e


def _stored(tree):
    # Orbax refuses zero-size arrays, and the Muon optimizer's state holds some (optim._split's
    # stand-ins); they carry no data, so they are stored as empty nodes and rebuilt on restore.
    return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _rebuilt(restored, abstract_state):
    leaves, treedef = jax.tree.flatten(abstract_state)
    got = jax.tree.leaves(restored, is_leaf=lambda x: x is None)
    # Placed straight from the host, with no compiled program per leaf (a Muon state has ~150).
    empty = lambda a: jax.make_array_from_callback(
        a.shape, a.sharding, lambda index: np.zeros(a.shape, a.dtype)[index]
    )
    return treedef.unflatten(empty(a) if r is None else r for a, r in zip(leaves, got, strict=True))


@dataclasses.dataclass(frozen=True)
class Record:
    """What a checkpoint says about itself, stored beside its state as the `meta` JSON item: the
    one place that knows its layout. Train and convert build it, `save` writes it, every reader
    (resume, load_model, init_from, evaluate, report) reads its fields."""

    step: int
    config: dict  # the run's whole config (ConfigDict.to_dict())
    model: dict  # the GPTConfig the state was built from (dataclasses.asdict)
    kind: str  # pretrain | instruct | preference (config.DATA_KINDS, resolved): its objective
    tokens_per_step: int  # as the trainer counts them (a DPO pair is two sequences)
    loop: dict | None = None  # metrics.RunLog.replay_state(): logs a resumed run exactly
    # The evaluations after `step` a stop request cut short ("eval", "hellaswag", "harness",
    # "sample"): the resumed run does them first, so its log reads as the uninterrupted run's.
    redo: list[str] | None = None
    converted_from: str | None = None  # weights only, written by llmjax.convert from this source
    fingerprint: list[int] | None = None  # of the state, set by `save`
    leaves: dict[str, list] | None = None  # `leaf_specs(state)`, set by `save`

    @property
    def tokenizer(self) -> str:
        return self.config["data"]["tokenizer"]

    @property
    def seq_len(self) -> int:
        """The context the run trained on (data.seq_len)."""
        return int(self.config["data"]["seq_len"])

    @property
    def init_from(self) -> str:
        return self.config["model"]["init_from"]

    @property
    def dpo_beta(self) -> float:
        # Checkpoints written before DPO existed have no dpo_beta; 0.1 was its first default.
        return float(self.config["optim"].get("dpo_beta", 0.1))

    def model_config(self) -> GPTConfig:
        return GPTConfig(**self.model)

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, meta: dict) -> Record:
        if "kind" not in meta:  # written before the record had a kind: counted as sequences
            data = meta["config"]["data"]
            meta = {
                **meta,
                "kind": "pretrain",
                "tokens_per_step": data["batch_size"] * data["seq_len"],
            }
        return cls(
            step=meta["step"],
            config=meta["config"],
            model=meta["model"],
            kind=meta["kind"],
            tokens_per_step=meta["tokens_per_step"],
            loop=meta.get("loop"),
            redo=meta.get("redo"),
            converted_from=meta.get("converted_from"),
            fingerprint=meta.get("fingerprint"),
            leaves=meta.get("leaves"),
        )


def read_record(mngr: ocp.CheckpointManager, step: int) -> Record:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return Record.from_json(meta)


def latest_record(workdir: str) -> tuple[int, Record]:
    """The step and record of a workdir's newest checkpoint (CheckpointError if it has none)."""
    if not os.path.isdir(directory(workdir)):
        raise CheckpointError(f"--workdir={workdir}: no checkpoints folder (not a training run)")
    mngr = manager(workdir, read_only=True)
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{mngr.directory}: no checkpoint")
    return step, read_record(mngr, step)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Restores `state` with the shardings and dtypes of `abstract_state` (ShapeDtypeStructs)."""
    target = jax.tree.map(
        lambda x: ocp.utils.to_shape_dtype_struct(x) if hasattr(x, "shape") else x, abstract_state
    )
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_stored(target)))
    )
    return _rebuilt(restored["state"], target)


def restore_params(mngr: ocp.CheckpointManager, step: int, target):
    """Only the parameters (no optimizer state): what sampling and evaluation need."""
    item = {"params": target}
    args = ocp.args.PyTreeRestore(
        item=item,
        partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
    )
    return mngr.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]


def check_compatible(record: Record, model_config: dict, path: str, abstract_state=None) -> None:
    """A workdir's checkpoint must come from the same model and train-state shapes, or resuming
    is meaningless (or would silently cast)."""
    saved = record.model
    diff = [
        f"{k}: checkpoint {saved.get(k)!r} != config {v!r}"
        for k, v in model_config.items()
        if k
        in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "param_dtype", "scan_layers")
        and saved.get(k, False) != v
    ]
    if not diff and abstract_state is not None and record.leaves is not None:
        want, have = leaf_specs(abstract_state), record.leaves
        diff = [
            f"{k}: checkpoint {have.get(k)} != config {want.get(k)}"
            for k in sorted(set(want) | set(have))
            if want.get(k) != have.get(k)
        ][:2]
    if diff:
        raise CheckpointError(
            f"{path} holds an incompatible train state ({'; '.join(diff)}); "
            "use another --workdir or the config it was trained with"
        )


def _all_agree(ok: bool) -> bool:
    """Every process must pick the same checkpoint, or the collective restore would hang."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def restore_latest(workdir: str, abstract_state, model_config: dict):
    """(step, state, record, corrupt) of the newest checkpoint that restores intact, or None if
    there is none.

    Reads only. Raises CheckpointError if the newest readable checkpoint belongs to another
    model, or if checkpoints exist but none restores. Unusable newer ones are reported with a
    warning and listed in `corrupt` (see `set_aside`).
    """
    path = directory(workdir)
    # Agreed: a process that looks after process 0 has created the folder (its save manager)
    # would otherwise open a reader that process 0 never opens, and their barriers would part.
    if not _all_agree(os.path.isdir(path)):
        return None
    _drop_abandoned_reads()
    mngr = manager(workdir, read_only=True)
    steps = sorted(mngr.all_steps(), reverse=True)
    corrupt, reasons = [], []
    for step in steps:
        where = f"{path}/{step}"
        meta, why = None, "unreadable on another process"
        try:
            meta = read_record(mngr, step)
        except Exception as e:
            why = _reason(e)
        if _all_agree(meta is not None):
            if meta.converted_from is not None:  # weights only, written by llmjax.convert
                raise CheckpointError(
                    f"{workdir} holds weights converted from {meta.converted_from}, not a "
                    f"training run; train from them with --config.model.init_from={workdir} "
                    "and a new --workdir"
                )
            check_compatible(meta, model_config, where, abstract_state)
            try:
                state = restore(mngr, step, abstract_state)
                saved = meta.fingerprint
                why = (
                    None
                    if saved is None or fingerprint(state) == saved
                    else "its contents do not match the fingerprint saved with it"
                )
            except Exception as e:
                why = _reason(e)
            if _all_agree(why is None):
                mngr.close()
                return step, state, meta, corrupt
        why = why or "not restorable on another process"
        logging.warning(
            "checkpoint %s is corrupt or truncated (%s); trying the one before", where, why
        )
        corrupt.append(step)
        reasons.append(f"{step}: {why}")
    mngr.close()
    if steps:
        raise CheckpointError(
            f"{path}: no checkpoint restores ({'; '.join(reasons)}); move the "
            "folder away to start over"
        )
    return None


def _drop_abandoned_reads() -> None:
    """Orbax abandons the pending reads of a restore that fails on damaged files, and the
    garbage collector reports each, when it meets it, through one of Python's three channels:
    `sys.unraisablehook` (a coroutine ending with the read error, a callback finding the event
    loop closed), asyncio's logger (a task or future freed still pending, or with the read error
    unretrieved) or `warnings` (a read coroutine never started). Printed, each is a traceback
    around the one warning that matters; those, and only those, are dropped. Installed before
    the first restore: the reads can fail while it is still under way."""
    std_logging.getLogger("asyncio").addFilter(_not_a_freed_read)  # all three idempotent
    warnings.filterwarnings(
        "ignore", rf"coroutine '{_READS.pattern}' was never awaited", RuntimeWarning
    )
    global _previous_hook
    if sys.unraisablehook is not _unraisable:
        _previous_hook, sys.unraisablehook = sys.unraisablehook, _unraisable


def _unraisable(unraisable) -> None:
    e, where = unraisable.exc_value, getattr(unraisable.object, "__qualname__", "")
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    if not (closed_loop or _READS.fullmatch(where) or _read_error(e)):
        _previous_hook(unraisable)


_previous_hook = sys.unraisablehook

# Orbax's coroutines that read one array.
_READS = re.compile(r"(_read_array_index_and_device_put|async_deserialize)")


def _read_error(e: BaseException | None) -> bool:
    """Orbax's wrapper of a failed read, or TensorStore's own ('OUT_OF_RANGE: Error reading
    "opt_state..." in OCDBT database ...')."""
    text = str(e)
    return text.startswith("Encountered error while reading array index") or bool(
        re.match(r"[A-Z_]+: Error reading ", text)
    )


def _not_a_freed_read(record: std_logging.LogRecord) -> bool:
    message = str(record.msg)
    unretrieved = re.match(r"\S+ exception was never retrieved", message)
    pending = message.startswith("Task was destroyed but it is pending!") and re.search(
        rf"coro=<{_READS.pattern}\(\)", message
    )
    return not ((unretrieved and record.exc_info and _read_error(record.exc_info[1])) or pending)


def set_aside(workdir: str, steps: list[int]) -> None:
    """Moves unrestorable checkpoints to checkpoints_corrupt/ (kept for inspection), so the
    resumed run can save those steps again."""
    if steps and jax.process_index() == 0:
        dest = os.path.join(os.path.abspath(workdir), "checkpoints_corrupt")
        os.makedirs(dest, exist_ok=True)
        for step in steps:
            target = os.path.join(dest, f"{step}-{int(time.time())}")
            shutil.move(os.path.join(directory(workdir), str(step)), target)
            logging.warning(
                "moved corrupt checkpoint %s/%d to %s", directory(workdir), step, target
            )
    if steps and jax.process_count() > 1:
        multihost_utils.sync_global_devices("llmjax:set_aside")


def check_writable(workdir: str) -> None:
    """Creates the workdir and proves a file can be written there, before any compiling."""
    probe = os.path.join(os.path.abspath(workdir), f".write_test.{jax.process_index()}")
    try:
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"--workdir={os.path.abspath(workdir)!r} is not writable ({e.strerror or e})"
        ) from e


# Stop requests: SIGTERM (preemption notice) and SIGINT (Ctrl-C) set this flag; the loop reads it
# after every step, saves and returns. A second signal acts at once.
_stop_reason: list[str] = []


def handle_signals() -> None:
    """Installs the SIGTERM/SIGINT handlers (main thread only; called by the CLI).

    With several processes JAX's preemption notifier owns SIGTERM and agrees on a step across
    processes; SIGINT is forwarded to it, so Ctrl-C on one process stops them all together.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    multi = jax.process_count() > 1
    for sig in (signal.SIGINT,) if multi else (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            signal.signal(signum, previous)  # a second signal acts at once
            if multi:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                request_stop(signal.Signals(signum).name)

        signal.signal(sig, handler)


def request_stop(reason: str) -> None:
    _stop_reason.append(reason)


def stop_requested() -> bool:
    """Whether a stop is pending (one process; not consumed): long evaluations check it between
    batches and give up, so a preemption's grace period is not spent on them."""
    return bool(_stop_reason)


def should_stop(step: int) -> str | None:
    """Why the loop should save and stop after `step` (None: carry on). Called every step on every
    process; the request is consumed."""
    if jax.process_count() > 1:
        return "preemption notice" if multihost_utils.reached_preemption_sync_point(step) else None
    reason = _stop_reason[0] if _stop_reason else None
    _stop_reason.clear()
    return reason


def load_model(workdir: str, step: int | None = None) -> tuple[GPT, Tokenizer, int]:
    """The model of a workdir's latest (or given) checkpoint, its tokenizer and its step: the one
    read path of `sample`, `evaluate`, `convert`, `chat` and `model.init_from`."""
    latest, record = latest_record(workdir)
    mngr = manager(workdir, read_only=True)
    if step is None:
        step = latest
    else:
        record = read_record(mngr, step)
    model_cfg = record.model_config()
    if jax.default_backend() != "gpu":
        model_cfg = dataclasses.replace(model_cfg, attention="xla")  # e.g. trained on GPU
    abstract = nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    target = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    params = restore_params(mngr, step, target)
    tok = get_tokenizer(record.tokenizer)
    return nnx.merge(graphdef, params), tok, step
