"""A run is never lost, never silently wrong, and bad input gets one clear line.

The CLI tests share one uninterrupted reference run (tiny config, a log row every step) and a
persistent compilation cache, so each further run of the same config only pays for start-up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import checkpoint, metrics, train
from llmjax.checkpoint import CheckpointError
from llmjax.data import DataError
from tests.conftest import ROOT, free_port, pretrain_run, snapshot, tiny_config

STEPS = 16
ARGS = [
    f"--config={ROOT}/configs/tiny.py",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=4",
    "--config.train.eval_every=8",
    "--config.train.eval_batches=1",
]
OVERRIDES = {
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.ckpt_every": 4,
    "train.eval_every": 8,
    "train.eval_batches": 1,
}


def _cmd(workdir, data_path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmjax.main",
        *ARGS,
        f"--workdir={workdir}",
        f"--config.data.path={data_path}",
        *extra,
    ]


def _run(env, workdir, data_path, *extra, timeout=300, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(workdir, data_path, *extra),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _record(step: int) -> checkpoint.Record:
    """The record of a bare state (no config, no model): what the checkpoint tests save."""
    return checkpoint.Record(step=step, config={}, model={}, kind="pretrain", tokens_per_step=0)


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _logged(workdir) -> list[tuple]:
    """Every logged number that a resumed run must reproduce, in file order (no timings)."""
    return [
        tuple(sorted((k, v) for k, v in r.items() if not k.startswith("perf/")))
        for r in _rows(workdir)
    ]


def _start_and_signal(env, workdir, data_path, sig, cwd=ROOT) -> tuple[subprocess.Popen, int, str]:
    """Starts a run, sends `sig` once a random step has been logged; returns (proc, step, out)."""
    at = random.randint(2, STEPS - 6)
    proc = subprocess.Popen(
        _cmd(workdir, data_path),
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out = ""
    for line in proc.stdout:
        out += line
        if line.startswith(f"step {at:>6}/"):
            proc.send_signal(sig)
            break
    return proc, at, out


@pytest.fixture(scope="module")
def reference(byte_data, env, tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("reference"))
    proc = _run(env, workdir, byte_data)
    assert proc.returncode == 0, proc.stderr
    return workdir


def test_reference_run_logs_every_step_once(reference):
    rows = _rows(reference)
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "eval/loss" in r] == [8, 16]
    assert checkpoint.steps_on_disk(checkpoint.directory(reference)) == [8, 12, 16]


def test_sigkill_at_a_random_step_resumes_bit_for_bit(byte_data, env, reference, tmp_path):
    workdir = str(tmp_path / "killed")
    proc, at, _ = _start_and_signal(env, workdir, byte_data, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_rows = len(_rows(workdir))
    resumed = _run(env, workdir, byte_data)
    assert resumed.returncode == 0, resumed.stderr
    # The log reads as one uninterrupted run: rows the killed run wrote after its last checkpoint
    # are replaced by the resumed run's, and every number matches the reference exactly.
    assert _logged(workdir) == _logged(reference), f"killed after step {at} ({killed_rows} rows)"
    saved = [s for s in checkpoint.steps_on_disk(checkpoint.directory(workdir))]
    assert saved == [8, 12, 16]


def test_sigterm_saves_the_current_step_and_exits_0(byte_data, env, reference, tmp_path):
    # A relative --workdir: made absolute at start-up (Orbax's save thread rejects relative ones).
    proc, at, out = _start_and_signal(env, "preempted", byte_data, signal.SIGTERM, cwd=tmp_path)
    workdir = str(tmp_path / "preempted")
    t0 = time.time()
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.time() - t0 < 30  # finish one step, save, flush: bounded
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", out + rest)
    assert stopped, out + rest
    step = int(stopped.group(1))
    assert at <= step < STEPS
    assert checkpoint.steps_on_disk(checkpoint.directory(workdir))[-1] == step
    assert [r["step"] for r in _rows(workdir) if "train/loss" in r] == list(range(1, step + 1))
    resumed = _run(env, "preempted", byte_data, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint.directory(workdir)}/{step}" in resumed.stdout
    assert _logged(workdir) == _logged(reference)


def test_sigint_and_sigterm_request_a_stop():
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        checkpoint.handle_signals()
        assert checkpoint.should_stop(1) is None
        os.kill(os.getpid(), signal.SIGINT)
        assert checkpoint.should_stop(2) == "SIGINT"
        assert checkpoint.should_stop(3) is None  # consumed
        assert signal.getsignal(signal.SIGINT) is old[signal.SIGINT]  # a second Ctrl-C acts
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoint.should_stop(4) == "SIGTERM"
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _copy_reference(reference, tmp_path) -> str:
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference, workdir)
    return workdir


def _largest_file(folder: str) -> str:
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


# Orbax abandons the read coroutines of a restore that fails on damaged data; expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(
    byte_data, reference, tmp_path, caplog, damage
):
    workdir = _copy_reference(reference, tmp_path)
    run = pretrain_run(tiny_config(byte_data, **OVERRIDES))
    model_cfg = dataclasses.asdict(run.model_cfg)
    good_step, good, _, _ = checkpoint.restore_latest(workdir, run.abstract_state, model_cfg)
    assert good_step == 16
    target = _largest_file(os.path.join(checkpoint.directory(workdir), "16", "state"))
    if damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    else:  # a single flipped bit in the parameters: Orbax alone restores it without complaint
        with open(target, "r+b") as f:
            f.seek(os.path.getsize(target) // 2)
            byte = f.read(1)[0]
            f.seek(-1, 1)
            f.write(bytes([byte ^ 0x10]))
    # A save that was killed half way is never a candidate.
    shutil.copytree(
        os.path.join(checkpoint.directory(workdir), "12"),
        os.path.join(checkpoint.directory(workdir), "20.orbax-checkpoint-tmp"),
    )
    with caplog.at_level(logging.WARNING):
        step, state, _, corrupt = checkpoint.restore_latest(workdir, run.abstract_state, model_cfg)
    assert step == 12 and corrupt == [16]
    assert f"checkpoint {checkpoint.directory(workdir)}/16 is corrupt" in caplog.text
    expected = checkpoint.restore(
        checkpoint.manager(reference, read_only=True), 12, run.abstract_state
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(expected))
    checkpoint.set_aside(workdir, corrupt)
    assert checkpoint.steps_on_disk(checkpoint.directory(workdir)) == [8, 12]
    assert os.listdir(os.path.join(workdir, "checkpoints_corrupt"))[0].startswith("16-")


def test_run_resumes_past_a_truncated_latest_checkpoint(byte_data, env, reference, tmp_path):
    workdir = _copy_reference(reference, tmp_path)
    target = _largest_file(os.path.join(checkpoint.directory(workdir), "16", "state"))
    os.truncate(target, os.path.getsize(target) // 2)
    proc = _run(env, workdir, byte_data)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint {checkpoint.directory(workdir)}/16 is corrupt" in proc.stderr
    # The warning and where the checkpoint went; not the tracebacks of the reads Orbax abandons
    # on the damaged files.
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "moved corrupt checkpoint" in lines[1], proc.stderr
    assert f"resumed from {checkpoint.directory(workdir)}/12" in proc.stdout
    assert _logged(workdir) == _logged(reference)  # steps 13..16 again, exactly
    assert checkpoint.steps_on_disk(checkpoint.directory(workdir)) == [8, 12, 16]


def _free_unfinished(what) -> None:
    """Frees, unretrieved, a future holding the exception `what`, or a pending task of the
    coroutine function `what`: asyncio reports either when the garbage collector meets it."""
    loop = asyncio.new_event_loop()
    if isinstance(what, Exception):
        future = loop.create_future()
        future.set_exception(what)
    else:
        future = loop.create_task(what())
    del future
    loop.close()
    gc.collect()


async def _read_array_index_and_device_put():  # named as Orbax's read coroutine
    pass


async def something_else():
    pass


def test_only_abandoned_read_errors_are_silenced(tmp_path, caplog):
    """Once a restore has been tried, the reads Orbax abandons stay quiet when freed unfinished;
    anything else freed that way still shows."""
    os.makedirs(checkpoint.directory(str(tmp_path)))
    assert checkpoint.restore_latest(str(tmp_path), None, {}) is None
    tensorstore = 'OUT_OF_RANGE: Error reading "params.wte" in OCDBT database at local file "x"'
    orbax = "Encountered error while reading array index: (slice(0, 64, 1),). See full ..."
    with (
        caplog.at_level(logging.ERROR, logger="asyncio"),
        warnings.catch_warnings(record=True) as w,
    ):
        for read in (ValueError(tensorstore), Exception(orbax), _read_array_index_and_device_put):
            _free_unfinished(read)
        assert caplog.records == [] and w == [], [str(x.message) for x in w]
        _free_unfinished(ValueError("something else went wrong"))
        _free_unfinished(something_else)
    assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
        "Future exception was never retrieved",
        "Task was destroyed but it is pending!",
    ]
    assert "ValueError('something else went wrong')" in caplog.records[0].getMessage()
    assert [str(x.message) for x in w] == ["coroutine 'something_else' was never awaited"]


def test_restored_buffers_are_donatable(byte_data, reference):
    run = pretrain_run(tiny_config(byte_data, **OVERRIDES))
    _, state, _, _ = checkpoint.restore_latest(
        reference, run.abstract_state, dataclasses.asdict(run.model_cfg)
    )
    leaves = jax.tree.leaves(state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    jax.block_until_ready(bump(state))
    assert all(x.is_deleted() for x in leaves)  # updated in place: no second copy of the state


def test_retention_keeps_recent_and_every_nth(tmp_path):
    mngr = checkpoint.manager(str(tmp_path), keep=2, keep_every=4)
    state = {"w": jnp.arange(4.0)}
    for step in range(1, 11):
        checkpoint.save(mngr, step, state, _record(step))
    checkpoint.wait(mngr)
    mngr.close()
    assert checkpoint.steps_on_disk(checkpoint.directory(str(tmp_path))) == [4, 8, 9, 10]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MB tmpfs (needs root and mount): a disk that really fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_gives_a_clear_error_and_keeps_the_last_checkpoint(tiny_disk):
    mngr = checkpoint.manager(tiny_disk, keep=1)  # the old one must survive a failed save
    state = {"w": jnp.arange(64 * 1024, dtype=jnp.float32)}  # 256 KB
    checkpoint.save(mngr, 1, state, _record(1))
    checkpoint.wait(mngr)
    stat = os.statvfs(tiny_disk)
    with open(os.path.join(tiny_disk, "filler"), "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))
    with pytest.raises(
        CheckpointError,
        match=r"cannot save checkpoint .*/checkpoints/2: no space "
        r"left on device; .* \(\[1\]\) are intact",
    ):
        checkpoint.save(mngr, 2, state, _record(2))
        checkpoint.wait(mngr)
    abstract = jax.eval_shape(lambda: state)
    step, restored, _, _ = checkpoint.restore_latest(tiny_disk, abstract, {})
    assert step == 1
    np.testing.assert_array_equal(restored["w"], state["w"])


def test_nan_run_stops_with_a_message_and_a_good_checkpoint(byte_data, env, tmp_path):
    workdir = str(tmp_path / "nan")
    # An absurd learning rate: step 2 applies a 5e5 update, step 3's loss is 4e12 (a spike) and
    # every later loss is NaN.
    proc = _run(env, workdir, byte_data, "--config.optim.lr=1e6", "--config.train.max_bad_steps=3")
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"llmjax: training diverged: 3 consecutive non-finite steps up to step 6 \(loss nan, "
        r"grad norm nan, lr [0-9.]+e\+05; 3 steps skipped in all\); last good checkpoint: "
        + re.escape(checkpoint.directory(workdir))
        + "/4",
        last,
    ), last
    rows = _rows(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["train/skipped_steps"] for r in train_rows] == [0, 0, 0, 1, 2, 3]
    assert [r["train/loss"] for r in train_rows][3:] == [None] * 3  # NaN is written as null
    spikes = [r for r in rows if "event/loss_spike" in r]
    assert [r["step"] for r in spikes] == [3] and spikes[0]["event/loss_spike"] > 1e9
    assert "step      3/16 | loss spike" in proc.stdout
    run = pretrain_run(tiny_config(byte_data, **OVERRIDES, **{"optim.lr": 1e6}))
    step, state, _, _ = checkpoint.restore_latest(
        workdir, run.abstract_state, dataclasses.asdict(run.model_cfg)
    )
    assert step == 4 and int(state.skipped) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def test_loss_spikes_are_found_against_the_running_mean():
    d = metrics.SPIKE_DECAY
    losses = [4.0, 4.0, float("nan"), 9.0, 4.0]
    spikes, mean, count = metrics.loss_spikes(losses, 0.0, 0, 2.0)
    assert spikes == [(3, 9.0, 4.0)]  # the NaN step is neither a spike nor averaged in
    after9 = d * 4.0 + (1 - d) * 9.0
    assert count == 4 and mean == pytest.approx(d * after9 + (1 - d) * 4.0, rel=1e-15)
    assert metrics.loss_spikes(losses, 0.0, 0, 0.0)[0] == []  # 0 turns events off


def _bad_tokens(folder) -> str:
    """Shards with no meta.json whose token ids reach 300: beyond the byte vocabulary (257)."""
    os.makedirs(folder)
    for split in ("train", "val"):
        tokens = np.arange(4000) % 257
        tokens[::20] = 300
        header = np.zeros(256, np.int32)
        header[:3] = (20240520, 1, len(tokens))
        with open(os.path.join(folder, f"{split}_000000.bin"), "wb") as f:
            f.write(header.tobytes() + tokens.astype(np.uint16).tobytes())
    return folder


@pytest.mark.parametrize("case", ["incompatible_model", "devices", "token_ids", "flipped_byte"])
def test_cli_bad_input_is_one_line_exit_2_and_changes_nothing(
    byte_data, env, reference, tmp_path, case
):
    workdir, data_path, extra, run_env = _copy_reference(reference, tmp_path), byte_data, [], env
    if case == "incompatible_model":
        extra, needle = ["--config.model.n_embd=128"], "n_embd: checkpoint 64 != config 128"
    elif case == "devices":
        run_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
        extra = ["--config.data.batch_size=9"]
        needle = "data.batch_size=9 is not divisible by data-parallel size 2"
    elif case == "token_ids":
        workdir, data_path = str(tmp_path / "fresh"), _bad_tokens(str(tmp_path / "bad"))
        needle = "train_000000.bin: token id 300 >= vocabulary size 257"
    else:  # one byte of the text changed ('a' -> 'b'): every id stays valid
        data_path = str(tmp_path / "data")
        shutil.copytree(byte_data, data_path)
        with open(os.path.join(data_path, "train_000000.bin"), "r+b") as f:
            f.seek(-2000, os.SEEK_END)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 1]))
        needle = "train_000000.bin: contents do not match the sha256 in meta.json"
    before = snapshot(tmp_path)
    t0 = time.time()
    proc = _run(run_env, workdir, data_path, *extra, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "compiled" not in proc.stdout and time.time() - t0 < 60  # before anything compiles
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["incompatible_dtype", "unwritable", "no_shards", "tokenizer"])
def test_bad_input_is_refused_before_compiling(byte_data, reference, tmp_path, case):
    """The same checks as the CLI's, in process (main.py maps each error type to exit 2)."""
    workdir, data_path, over = _copy_reference(reference, tmp_path), byte_data, {}
    if case == "incompatible_dtype":
        over = {"model.param_dtype": "bfloat16"}
        needle = "param_dtype: checkpoint 'float32' != config 'bfloat16'"
    elif case == "unwritable":
        workdir = os.path.join(workdir, "metrics.jsonl", "run")
        needle = "metrics.jsonl/run' is not writable (Not a directory)"
    elif case == "no_shards":
        data_path = str(tmp_path / "empty")
        os.makedirs(data_path)
        needle = f"data.path={data_path!r}: no train_*.bin shards"
    else:
        over, needle = {"data.tokenizer": "gpt2"}, "tokenized with 'bytes'"
    cfg = tiny_config(data_path, **OVERRIDES, **over)
    before = snapshot(tmp_path)
    with pytest.raises((CheckpointError, DataError), match=re.escape(needle)):
        train.train_and_evaluate(cfg, workdir)
    assert snapshot(tmp_path) == before


TWO_PROCESS_DRIVER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, data_path, workdir = sys.argv[1:5]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
from llmjax import checkpoint, train
from tests.conftest import tiny_config
checkpoint.handle_signals()
cfg = tiny_config(data_path, **{"train.steps": 24, "train.log_every": 1, "train.ckpt_every": 8,
                                "train.eval_every": 0})
print(f"returned at step {int(train.train_and_evaluate(cfg, workdir).step)}", flush=True)
"""


def _two_processes(env, data_path, workdir) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_DRIVER, str(port), str(i), data_path, workdir],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(byte_data, env, tmp_path):
    reference = str(tmp_path / "reference")
    assert all(p.wait(timeout=600) == 0 for p in _two_processes(env, byte_data, reference))
    workdir = str(tmp_path / "preempted")
    procs = _two_processes(env, byte_data, workdir)
    at = random.randint(2, 14)
    for line in procs[0].stdout:  # process 0 logs; process 1 gets the signal
        if line.startswith(f"step {at:>6}/"):
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    steps = {int(re.search(r"returned at step (\d+)", o).group(1)) for o in outs}
    assert len(steps) == 1 and at <= min(steps) < 24  # both saved the same step
    assert checkpoint.steps_on_disk(checkpoint.directory(workdir))[-1] == steps.pop()
    assert all(p.wait(timeout=600) == 0 for p in _two_processes(env, byte_data, workdir))
    assert _logged(workdir) == _logged(reference)


def _lines(stderr: str) -> list[str]:
    return stderr.strip().splitlines()


def test_a_second_trainer_on_one_workdir_is_refused(byte_data, env, reference, tmp_path):
    """A double submit: the second trainer exits 2 in one line naming the first, which runs on
    to the end untouched."""
    workdir = str(tmp_path / "w")
    first = subprocess.Popen(
        _cmd(workdir, byte_data), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE
    )
    for line in first.stdout:
        if line.startswith("step      2/"):
            break
    first.send_signal(signal.SIGSTOP)  # frozen mid-run, still holding the workdir
    t0 = time.time()
    try:
        second = _run(env, workdir, byte_data, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    lines = _lines(second.stderr)
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"--workdir={workdir} is in use by another trainer" in lines[0]
    assert f"pid {first.pid} since " in lines[0]
    assert time.time() - t0 < 60 and "compiled" not in second.stdout
    first.stdout.read()
    assert first.wait(timeout=120) == 0
    assert _logged(workdir) == _logged(reference)
    assert checkpoint.steps_on_disk(checkpoint.directory(workdir)) == [8, 12, 16]
    assert not os.path.exists(os.path.join(workdir, ".lock"))  # released at the end


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    from llmjax import workdir_lock

    path = tmp_path / workdir_lock.LOCK_FILE
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    now = time.time()
    record = {"host": os.uname().nodename, "pid": gone.pid, "since": now - 60, "beat": now - 5}
    path.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING):
        lock = workdir_lock.acquire(str(tmp_path))
    assert [r.getMessage() for r in caplog.records] == [
        f"took over the lock of {tmp_path}: host {record['host']} pid {gone.pid} since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(now - 60))} (no longer running)"
    ]
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirLockError, match=f"pid {os.getpid()} since"):
        workdir_lock.acquire(str(tmp_path))  # held: flock refuses even this process
    lock.release()
    # Another host's record with a fresh heartbeat: the lock may not reach that host (a shared
    # filesystem whose locks are local), so the run is refused; an old one is taken over.
    record = {"host": "elsewhere", "pid": 12, "since": now - 60, "beat": now - 5}
    path.write_text(json.dumps(record))
    with pytest.raises(workdir_lock.WorkdirLockError, match="heartbeat 5 s ago"):
        workdir_lock.acquire(str(tmp_path))
    path.write_text(json.dumps({**record, "beat": now - workdir_lock.STALE_S - 1}))
    workdir_lock.acquire(str(tmp_path)).release()
    assert not path.exists()


def _upto(workdir, step: int) -> list[tuple]:
    return [r for r in _logged(workdir) if dict(r)["step"] <= step]


def _intact_upto(workdir, reference, steps: list[int], line: str) -> None:
    """The run's checkpoints are `steps` and nothing half-written; the line names the last one;
    metrics.jsonl holds the reference's rows up to it."""
    folder = checkpoint.directory(workdir)
    assert sorted(os.listdir(folder)) == [str(s) for s in steps]
    assert line.endswith(f"latest intact checkpoint: {folder}/{steps[-1]}") or (
        f"latest intact checkpoint: {folder}/{steps[-1]} (details in " in line
    ), line
    assert _upto(workdir, steps[-1]) == _upto(reference, steps[-1])


def test_a_bad_id_mid_run_keeps_the_save_in_flight(byte_data, env, reference, tmp_path):
    """An id beyond the vocabulary met at run time (data.verify=off) by the eval one step after a
    save started: the save commits, the run ends in one line naming it, exit 2; the same command
    on good data resumes and logs exactly the uninterrupted run."""
    data_path, workdir = str(tmp_path / "data"), str(tmp_path / "w")
    shutil.copytree(byte_data, data_path)
    val = os.path.join(data_path, "val_000000.bin")
    tokens = np.memmap(val, np.uint16, "r+", offset=1024)
    # In the second eval batch (windows of 33 tokens every 32, 8 per batch): the first one also
    # compiles the eval step at start-up.
    tokens[300] = 300
    tokens.flush()
    del tokens
    t0 = time.time()
    proc = _run(
        env,
        workdir,
        data_path,
        "--config.data.verify=off",
        "--config.train.eval_every=5",
        "--config.train.eval_batches=2",
    )
    seconds = time.time() - t0
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"llmjax: {val}: token id 300 >= vocabulary size 257"), lines[0]
    assert seconds < 120
    _intact_upto(workdir, reference, [4], lines[0])
    resumed = _run(env, workdir, byte_data)
    assert resumed.returncode == 0, resumed.stderr
    assert _logged(workdir) == _logged(reference)


def test_a_full_disk_mid_run_is_one_line_and_resumes(byte_data, env, reference, tiny_disk):
    """A 2 MB disk holds checkpoint 4 (1.5 MB) but not 8: one line, exit 2, checkpoint 4 intact,
    the half-written 8 removed; Orbax's tracebacks are in errors.log."""
    workdir = os.path.join(tiny_disk, "w")
    t0 = time.time()
    proc = _run(env, workdir, byte_data)
    seconds = time.time() - t0
    lines = _lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.match(
        rf"llmjax: cannot save checkpoint {re.escape(checkpoint.directory(workdir))}/8: no space "
        r"left on device; the checkpoints already on disk \(\[4\]\) are intact",
        lines[0],
    ), lines[0]
    assert seconds < 120
    _intact_upto(workdir, reference, [4], lines[0])
    assert "Traceback" in open(os.path.join(workdir, "errors.log")).read()
    moved = shutil.copytree(workdir, os.path.join(os.path.dirname(tiny_disk), "moved"))
    resumed = _run(env, moved, byte_data)
    assert resumed.returncode == 0, resumed.stderr
    assert _logged(moved) == _logged(reference)


def _cli_processes(env, data_path, workdir, port: int, *extra) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            _cmd(workdir, data_path, *extra)
            + [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def reference2(byte_data, env, tmp_path_factory) -> str:
    """An uninterrupted two-process run (one CPU device each)."""
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    workdir = str(tmp_path_factory.mktemp("reference2") / "w")
    procs = _cli_processes(env, byte_data, workdir, free_port())
    assert [p.wait(timeout=600) for p in procs] == [0, 0], procs[0].stderr.read()
    return workdir


def _kill_one_of_two(byte_data, env, workdir, victim: int) -> tuple[int, str, float]:
    """Two processes; `victim` SIGKILLed after step 6 (checkpoint 4 committed). Returns the
    survivor's exit code, its stderr and the seconds from the kill to its end (its stderr
    closed: the line may come from its watchdog)."""
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = _cli_processes(env, byte_data, workdir, free_port())
    for line in procs[0].stdout:
        if line.startswith("step      6/"):
            break
    deadline = time.time() + 60
    while not os.path.isdir(os.path.join(checkpoint.directory(workdir), "4")):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].stderr.read()
        time.sleep(0.05)
    procs[victim].kill()
    t0 = time.time()
    err = procs[1 - victim].communicate(timeout=60)[1]
    seconds = time.time() - t0
    procs[victim].wait()
    return procs[1 - victim].returncode, err, seconds


@pytest.mark.slow
def test_a_dead_peer_ends_the_job_in_one_line(byte_data, env, reference2, tmp_path):
    """Process 1 of 2 is SIGKILLed mid-run (no launcher to stop the survivor): process 0 exits
    within 15 s, in one line naming process 1 and the checkpoint to resume from; the checkpoints
    and metrics.jsonl up to it are an uninterrupted two-process run's."""
    workdir = str(tmp_path / "w")
    code, err, seconds = _kill_one_of_two(byte_data, env, workdir, victim=1)
    lines = _lines(err)
    assert code == 1 and len(lines) <= 3, err
    assert seconds < 15, seconds
    assert re.match(r"llmjax: process 1 of 2 was lost \(no heartbeat for 1\d s\)", lines[-1])
    _intact_upto(workdir, reference2, [4], lines[-1])


@pytest.mark.slow
def test_a_dead_process_0_ends_the_job_in_one_line(byte_data, env, reference2, tmp_path):
    """Process 0 (the coordinator, and jax.distributed's service with it) SIGKILLed: JAX aborts
    process 1 in C++ at once; its watchdog prints the one line naming process 0 and the
    checkpoint to resume from; the same command then resumes to the uninterrupted run's log."""
    workdir = str(tmp_path / "w")
    code, err, seconds = _kill_one_of_two(byte_data, env, workdir, victim=0)
    lines = _lines(err)
    assert code != 0 and len(lines) <= 3, err
    assert seconds < 15, seconds
    assert re.match(r"llmjax: process 0 of 2 was lost \(the coordinator", lines[-1]), lines
    _intact_upto(workdir, reference2, [4], lines[-1])
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = _cli_processes(env, byte_data, workdir, free_port())
    assert [p.wait(timeout=600) for p in procs] == [0, 0], procs[0].stderr.read()
    assert _logged(workdir) == _logged(reference2)


_ABORT = """
import os, sys
from llmjax import guard
w = sys.argv[1]
last = guard.LastWord(w + "/errors.log", w + "/checkpoints", 1, 2)
with open(w + "/errors.log", "a") as f:  # what JAX's client logs when the coordinator is gone
    f.write("F1207 client.h:80] Terminating process because the JAX distributed service detected "
            "fatal errors. UNAVAILABLE: Failed to send RPC to coordination service.\\n")
if sys.argv[2] == "spoke":
    last.done()
os.abort()
"""


@pytest.mark.parametrize("case", ["aborted", "spoke", "killed"])
def test_an_aborted_process_gets_its_line_from_the_watchdog(env, tmp_path, case):
    """A process JAX aborts in C++ (no Python runs after): its watchdog prints the one line,
    naming the lost coordinator and the latest committed checkpoint, and appends the fatal-signal
    dump to errors.log. Silent for a process that spoke for itself, and for one killed outright
    (its surviving peer speaks)."""
    from llmjax import watchdog

    os.makedirs(tmp_path / "checkpoints" / "4")
    os.makedirs(tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1")
    log = str(tmp_path / "errors.log")
    if case == "killed":  # the pipe closes with nothing in it
        script = os.path.join(os.path.dirname(watchdog.__file__), "watchdog.py")
        args = [sys.executable, "-I", "-S", script, log, "0", f"{tmp_path}/checkpoints", "1", "2"]
        proc = subprocess.run(args, input=b"", capture_output=True, timeout=60)
        assert (proc.returncode, proc.stderr) == (0, b"")
        return
    proc = subprocess.run(
        [sys.executable, "-c", _ABORT, str(tmp_path), case],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGABRT
    if case == "spoke":
        assert proc.stderr == ""
        return
    assert proc.stderr == (
        "llmjax: process 0 of 2 was lost (the coordinator; JAX ended process 1 at once); "
        f"latest intact checkpoint: {tmp_path}/checkpoints/4 (details in {log})\n"
    )
    assert "Fatal Python error: Aborted" in open(log).read()


def test_sigterm_during_a_long_eval_stops_within_5_s(byte_data, env, reference, tmp_path):
    """SIGTERM once the eval after step 8 has started (2000 batches, far longer than the grace):
    the eval stops after its current batch, step 8 is saved, exit 0; the resumed run redoes that
    eval first (here with the reference's one batch) and logs exactly the uninterrupted run."""
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen(
        _cmd(workdir, byte_data, "--config.train.eval_batches=2000"),
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for line in proc.stdout:
        if line.startswith("step      8/16 | loss"):  # the train line; the eval comes next
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    out, err = proc.communicate(timeout=120)
    seconds = time.time() - t0
    assert proc.returncode == 0 and len(_lines(err)) <= 3, err
    assert seconds < 5, seconds
    assert "stopped by SIGTERM after step 8" in out and "eval loss" not in out
    assert checkpoint.steps_on_disk(checkpoint.directory(workdir)) == [4, 8]
    mngr = checkpoint.manager(workdir, read_only=True)
    assert checkpoint.read_record(mngr, 8).redo == ["eval"]
    assert _upto(workdir, 8) == [r for r in _upto(reference, 8) if "eval/loss" not in dict(r)]
    resumed = _run(env, workdir, byte_data)
    assert resumed.returncode == 0, resumed.stderr
    assert "step      8/16 | eval loss" in resumed.stdout
    assert _logged(workdir) == _logged(reference)


def test_evaluations_stop_between_batches():
    """A stop requested while an evaluation's batch computes (the signal handler's flag) ends it
    after that batch: no further batch is read; unrequested, the mean is the plain one."""
    from llmjax import evaluate

    read = []
    batches = (read.append(i) or np.full((2, 3), i, np.int32) for i in range(100))

    def step(params, batch):
        if int(batch[0, 0]) == 2:
            checkpoint.request_stop("SIGTERM")
        return jnp.sum(batch), (jnp.float32(batch.size), {})

    try:
        with pytest.raises(evaluate.Stopped):
            evaluate.mean_metrics(step, None, batches)
        assert checkpoint.stop_requested()  # not consumed: the loop saves and names the reason
    finally:
        assert checkpoint.should_stop(0) == "SIGTERM"  # consumed
    assert read == [0, 1, 2]  # the current batch finished, no further one read
    ones = [np.ones((2, 3), np.int32), np.full((2, 3), 3, np.int32)]
    assert evaluate.mean_metrics(step, None, ones) == {"loss": 2.0}


def test_a_step_over_the_memory_limit_is_refused_before_it_runs(byte_data, monkeypatch):
    from llmjax import memory
    from llmjax.config import ConfigError

    cfg = tiny_config(byte_data, **OVERRIDES)
    run = pretrain_run(cfg)
    compiled = run.train_step.lower(run.abstract_state, run.batch_spec).compile()
    m = compiled.memory_analysis()
    need = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    need += m.temp_size_in_bytes
    assert memory.step_bytes(compiled) == need
    monkeypatch.setattr(memory, "device_available", lambda d: (need // 2, "test limit"))
    with pytest.raises(ConfigError) as e:
        memory.check_fits(compiled, cfg)
    assert str(e.value) == (
        f"the train step needs {need / 2**30:,.2f} GiB per device (XLA's estimate) but "
        f"{need // 2 / 2**30:,.2f} GiB are free (test limit); lower data.batch_size (now 8), "
        "raise optim.grad_accum (now 1) or set model.remat=full (now none)"
    )
    monkeypatch.setattr(memory, "device_available", lambda d: (need, "test limit"))
    memory.check_fits(compiled, cfg)  # fits exactly


def test_out_of_memory_at_run_time_is_the_memory_line(byte_data):
    from llmjax import guard

    cfg = tiny_config(byte_data, **{"data.batch_size": 1024, "model.remat": "dots_saveable"})
    oom = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9876543210 bytes.\nmore"
    )
    assert guard.summary(oom, cfg) == (
        "out of memory (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9876543210 "
        "bytes.); lower data.batch_size (now 1024), raise optim.grad_accum (now 1) or set "
        "model.remat=full (now dots_saveable)",
        2,
    )
    assert guard.summary(MemoryError(), cfg)[1] == 2
    assert guard.summary(ValueError("a bug"), cfg) == ("ValueError: a bug", 1)


def test_a_save_cut_by_a_dead_peer_is_a_failed_collective():
    """A save's barrier runs on Gloo: a peer's death surfaces there as a save error (seen with
    process 0 SIGKILLed during checkpoint 8), which must wait for the peer watch to name the lost
    process rather than be reported as a failed save."""
    from llmjax import guard

    gloo = ValueError("UNKNOWN: Gloo AllGather failed: pair.cc:547] Connection closed by peer")
    try:
        try:
            raise gloo
        except ValueError as e:
            raise checkpoint.CheckpointError("cannot save checkpoint w/8: ...") from e
    except checkpoint.CheckpointError as e:
        assert guard.collective_failed(e)
    assert guard.collective_failed(jax.errors.JaxRuntimeError("INTERNAL: all-reduce failed"))
    assert not guard.collective_failed(checkpoint.CheckpointError("no space left on device"))
    assert not guard.collective_failed(ValueError("a bug"))
