"""MLflow (a real `mlflow server`) and W&B (offline) get exactly metrics.jsonl's rows; a killed
and resumed run continues the same tracker run; a tracker that fails never stops training."""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request

import pytest

from llmjax import checkpoint, metrics, trackers
from tests.conftest import ROOT, free_port

STEPS = 12
ARGS = [
    f"--config={ROOT}/configs/tiny.py",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=4",
    "--config.train.eval_every=6",
    "--config.train.eval_batches=1",
    f"--config.train.sample_every={STEPS}",
]
DETERMINISTIC = ("train/", "eval/", "event/")  # reproduced bit for bit by a resumed run


@pytest.fixture(scope="module")
def env(env) -> dict:
    """conftest's, with W&B offline and quiet."""
    return dict(env, WANDB_MODE="offline", WANDB_SILENT="true")


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real tracking server: sqlite backend and artifact store in a temporary directory."""
    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            mlflow,
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{tmp}/mlflow.db",
            f"--artifacts-destination={tmp}/artifacts",
        ],
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its workers stop with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, open(tmp / "server.log").read()[-2000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # uvicorn's graceful shutdown can take a while
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


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


def _run(env, workdir, data_path, *extra) -> subprocess.CompletedProcess:
    cmd = _cmd(workdir, data_path, *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _scalars(rows) -> dict[str, set[tuple[int, float]]]:
    """{key: {(step, value)}} of metrics.jsonl's numbers (null: not sent to trackers)."""
    out: dict[str, set] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, float | int) and v is not None:
                out.setdefault(k, set()).add((r["step"], float(v)))
    return out


def test_mlflow_run_survives_sigkill_and_reads_as_one_run(byte_data, env, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    workdir = str(tmp_path / "mlrun")
    extra = (
        "--config.train.trackers=tensorboard,mlflow",
        f"--config.train.mlflow_uri={mlflow_uri}",
    )
    proc = subprocess.Popen(
        _cmd(workdir, byte_data, *extra), cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE
    )
    for line in proc.stdout:  # killed after the checkpoint at step 4, before the next one
        if line.startswith(f"step {6:>6}/{STEPS} | loss"):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # The checkpoint at step 4 is written asynchronously: on a busy machine it may not be there.
    saved = checkpoint.steps_on_disk(checkpoint.directory(workdir))
    run_id = trackers.read_ids(workdir)["mlflow"]["run_id"]
    client = MlflowClient(mlflow_uri)
    killed = client.get_metric_history(run_id, "train/loss")
    assert {m.step for m in killed} >= set(range(1, 7))  # logged past the checkpoint

    resumed = _run(env, workdir, byte_data, *extra)
    assert resumed.returncode == 0, resumed.stderr
    assert ("resumed from" in resumed.stdout) == bool(saved)
    assert trackers.read_ids(workdir)["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mlrun"
    (exp,) = [e for e in client.search_experiments() if e.name == "tiny"]  # the config's name
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    params = run.data.params
    assert params["model.n_layer"] == "2" and params["train.steps"] == str(STEPS)
    assert params["train.mlflow_uri"] == mlflow_uri

    # Every number metrics.jsonl holds (the killed run's rows past step 4 were cut from it), at
    # its step. The steps after the checkpoint were logged twice; their losses are the same
    # both times, so each curve against step is one curve.
    rows = _scalars(_rows(workdir))
    assert {s for s, _ in rows["train/loss"]} == set(range(1, STEPS + 1))
    for key, expected in rows.items():
        history = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
        if key.startswith(DETERMINISTIC):
            assert history == expected, key
        else:  # throughput: both runs' values at the repeated steps
            assert history >= expected and {s for s, _ in history} == {s for s, _ in expected}

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "data", "sample"} <= artifacts
    assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/meta.json"]
    (sample,) = [a.path for a in client.list_artifacts(run_id, "sample")]
    assert sample == f"sample/step_{STEPS:08d}.txt"
    config = json.load(open(client.download_artifacts(run_id, "config.json", str(tmp_path))))
    assert config["train"]["steps"] == STEPS
    text = open(client.download_artifacts(run_id, sample, str(tmp_path))).read()
    assert text == [r["sample"] for r in _rows(workdir) if "sample" in r][0]


def _wandb_records(path: str):
    """The protobuf records of a `.wandb` file: W&B's 7-byte header, then LevelDB's log format
    (32 KiB blocks; chunks of crc32c, uint16 length, type 1 full | 2 first | 3 middle | 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_holds_config_and_rows(byte_data, env, tmp_path):
    workdir = str(tmp_path / "wbrun")
    steps = 6
    proc = _run(
        env,
        workdir,
        byte_data,
        "--config.train.trackers=wandb",
        f"--config.train.steps={steps}",
        "--config.train.sample_every=0",
        "--config.train.wandb_project=llmjax-test",
    )
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(os.path.join(workdir, "tb"))  # tensorboard not asked for
    ids = trackers.read_ids(workdir)["wandb"]
    assert ids["project"] == "llmjax-test"
    (path,) = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", f"run-{ids['id']}.wandb"))
    history, config = [], {}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            assert (r.run.run_id, r.run.project) == (ids["id"], "llmjax-test")
        elif kind == "history":
            # A key with "/" is stored as nested_key.
            row = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item
            }
            history.append({k: v for k, v in row.items() if not k.startswith("_")})
    assert config["model"]["n_layer"] == 2 and config["train"]["steps"] == steps
    expected = [{k: v for k, v in r.items() if v is not None} for r in _rows(workdir)]
    assert history == expected


def test_unreachable_tracker_is_one_line_before_compiling(byte_data, env, tmp_path):
    env = dict(env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")  # refused at once, not after retries
    dead = f"http://127.0.0.1:{free_port()}"
    extra = ("--config.train.trackers=mlflow", f"--config.train.mlflow_uri={dead}")
    proc = _run(env, str(tmp_path / "w"), byte_data, *extra)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"llmjax: mlflow at {dead}: "), line
    assert "compiled" not in proc.stdout

    # Optional: one warning, and the run goes on with metrics.jsonl alone.
    workdir = str(tmp_path / "optional")
    proc = _run(
        env,
        workdir,
        byte_data,
        *extra,
        "--config.train.tracker_optional=True",
        "--config.train.sample_every=0",
    )
    assert proc.returncode == 0, proc.stderr
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("llmjax: warning:")]
    assert len(warnings) == 1 and "tracker_optional" in warnings[0]
    assert [r["step"] for r in _rows(workdir) if "train/loss" in r] == list(range(1, STEPS + 1))


def test_unknown_tracker_is_one_line(env, tmp_path):
    proc = _run(env, str(tmp_path / "w"), "unused", "--config.train.trackers=tensorboard,comet")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "llmjax: train.trackers='tensorboard,comet': 'comet' is not one of "
        "tensorboard, mlflow, wandb, none"
    )


def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    setup = trackers.Setup(str(tmp_path), {}, [], "e", "r", "", "")
    with pytest.raises(trackers.TrackerError, match=r'pip install -e "\.\[wandb\]"'):
        trackers.start(["wandb"], setup, optional=False)
    assert trackers.start(["wandb"], setup, optional=True) == []


class Flaky(trackers.Tracker):
    """Fails while `down`; records what it was given."""

    name = "flaky"

    def __init__(self):
        self.down, self.got, self.closed = False, [], None

    def scalars(self, step, values):
        if self.down:
            raise ConnectionError("server gone")
        self.got.append((step, values))

    def close(self, finished):
        self.closed = finished


def test_a_failing_tracker_warns_once_and_gets_its_rows_later(tmp_path, capsys):
    flaky = Flaky()
    w = metrics.Writer(str(tmp_path), trackers=[flaky])
    w.scalars(1, {"train/loss": 3.0})
    flaky.down = True
    w.scalars(2, {"train/loss": 2.0})
    w.scalars(2, {"eval/loss": 2.5})  # same interval: not retried
    w.scalars(3, {"train/loss": 1.5, "perf/mfu": None})
    assert capsys.readouterr().err.count("llmjax: warning: tracker flaky failed at step 2") == 1
    flaky.down = False
    w.scalars(4, {"train/loss": 1.0})
    assert "tracker flaky works again at step 4" in capsys.readouterr().out
    w.close(finished=True)
    assert flaky.got == [
        (1, {"train/loss": 3.0}),
        (2, {"train/loss": 2.0}),
        (2, {"eval/loss": 2.5}),
        (3, {"train/loss": 1.5}),
        (4, {"train/loss": 1.0}),
    ]
    assert flaky.closed is True
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 2, 3, 4]
