"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, fed the rows of metrics.jsonl.

`metrics.Writer` makes every row once and writes it to WORKDIR/metrics.jsonl, the record; each
tracker here only forwards those rows (so no two of them can disagree), and only process 0 has
any. MLflow and W&B keep their run id in WORKDIR/trackers.json, so a resumed run continues the
same tracker run; the steps after its checkpoint are logged again, with the same losses.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import secrets
import sys
import time
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.text.summary_v2 import text_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from llmjax.config import parse_trackers
from llmjax.errors import UserError, one_line
from llmjax.shards import META_FILE

RUN_FILE = "trackers.json"  # in the workdir: the MLflow / W&B run ids a resumed run continues


class TrackerError(UserError):
    """A tracker asked for but not usable: unknown name, package missing, server unreachable."""


class Tracker:
    """What a tracker does with the rows metrics.Writer makes. Any exception is reported by the
    writer (once), which keeps the rows and offers them again at the next log interval."""

    name = ""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def text(self, step: int, tag: str, text: str) -> None:
        raise NotImplementedError

    def rewind(self, step: int) -> None:
        """The run resumes from its checkpoint at `step`: what it logged later comes again."""

    def close(self, finished: bool) -> None:
        """`finished`: the run reached train.steps (else it stopped to be resumed)."""


class TensorBoard(Tracker):
    """Event files under WORKDIR/tb, written with TensorBoard's own writer (no TensorFlow)."""

    name = "tensorboard"

    def __init__(self, workdir: str):
        self.tb = EventFileWriter(os.path.join(workdir, "tb"))

    def _add(self, step: int, **event: Any) -> None:
        self.tb.add_event(Event(wall_time=time.time(), step=step, **event))
        self.tb.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        tags = [Summary.Value(tag=k, simple_value=v) for k, v in values.items()]
        self._add(step, summary=Summary(value=tags))

    def text(self, step: int, tag: str, text: str) -> None:
        self._add(step, summary=text_pb(tag, text))

    def rewind(self, step: int) -> None:
        # TensorBoard drops events at or after a START event's step when it meets one.
        self._add(step + 1, session_log=SessionLog(status=SessionLog.START))

    def close(self, finished: bool) -> None:
        self.tb.close()


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def text(self, step: int, tag: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"{tag}/step_{step:08d}.txt")

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class WandB(Tracker):
    name = "wandb"

    def __init__(self, run):
        self.run = run
        # Rows go against our own step, not W&B's counter: loss-spike events arrive after their
        # interval's row, and a resumed run logs steps again, which W&B's `step=` would drop.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"step": step, **values})

    def text(self, step: int, tag: str, text: str) -> None:
        import wandb

        self.run.log({"step": step, tag: wandb.Table(columns=["step", tag], data=[[step, text]])})

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


@dataclasses.dataclass
class Setup:
    """What the trackers are told about a run when it starts."""

    workdir: str
    config: dict  # the resolved config: MLflow parameters (flattened) and config.json
    files: list[str]  # kept beside the run: the dataset card (meta.json)
    experiment: str  # MLflow experiment; W&B project when wandb_project is empty
    run_name: str
    mlflow_uri: str
    wandb_project: str


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layer": 12}} -> {"model.n_layer": 12}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def start(names: list[str], setup: Setup, optional: bool) -> list[Tracker]:
    """Opens (or, with the run id in WORKDIR/trackers.json, resumes) each tracker. One that
    cannot start is a TrackerError, or with `optional` a warning and the run goes on without it."""
    stored = read_ids(setup.workdir)
    opened: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                opened.append(TensorBoard(setup.workdir))
            elif name == "mlflow":
                opened.append(_start_mlflow(setup, stored))
                _write_ids(setup.workdir, stored)
            elif name == "wandb":
                opened.append(_start_wandb(setup, stored))
                _write_ids(setup.workdir, stored)
        except TrackerError as e:
            if not optional:
                for t in opened:
                    t.close(finished=False)
                raise
            warn(f"{e}; training goes on without it (train.tracker_optional=True)")
    return opened


def read_ids(workdir: str) -> dict:
    """WORKDIR/trackers.json: {"mlflow": {"run_id", "uri"}, "wandb": {"id", "project"}}."""
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _write_ids(workdir: str, ids: dict) -> None:
    path = os.path.join(workdir, RUN_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(ids, f, indent=1)
    os.replace(path + ".tmp", path)  # a kill mid-write never leaves half a file


def warn(msg: str) -> None:
    print(f"llmjax: warning: {msg}", file=sys.stderr, flush=True)


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise TrackerError(
            f"train.trackers has {name} but {name} is not installed "
            f'(pip install -e ".[{name}]"): {one_line(e)}'
        ) from e


def _start_mlflow(setup: Setup, stored: dict) -> MLflow:
    _import("mlflow")
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = setup.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise TrackerError(
            "train.trackers has mlflow but neither train.mlflow_uri nor MLFLOW_TRACKING_URI is "
            "set (e.g. http://127.0.0.1:5000 for `mlflow server`, or sqlite:///mlflow.db)"
        )
    # MLflow retries a request 7 times with growing pauses (minutes): an unreachable server
    # would hold the start, and later every log interval. A user's own settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # Each retry would print a warning; a failure is reported once, by us.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = stored.get("mlflow", {}).get("run_id")
        run = _find_run(client, run_id) if run_id else None
        if run is None:
            exp = client.get_experiment_by_name(setup.experiment)
            exp_id = exp.experiment_id if exp else client.create_experiment(setup.experiment)
            run = client.create_run(exp_id, run_name=setup.run_name)
            if run_id:
                warn(f"mlflow run {run_id} is not at {uri}; logging to a new run")
        else:
            client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
        # A parameter cannot change in MLflow; one a resumed run's config changed stays as is.
        params = [
            Param(k, str(v)[:6000])
            for k, v in flatten(setup.config).items()
            if k not in run.data.params
        ]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 per request
            client.log_batch(run_id, params=params[i : i + 100])
        client.log_dict(run_id, setup.config, "config.json")
        for path in setup.files:
            client.log_artifact(run_id, path, artifact_path="data")
    except Exception as e:  # whatever stops the client at start is the user's to fix
        raise TrackerError(f"mlflow at {uri}: {one_line(e)}") from e
    stored["mlflow"] = {"run_id": run_id, "uri": uri}
    return MLflow(client, run_id)


def _find_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _start_wandb(setup: Setup, stored: dict) -> WandB:
    wandb = _import("wandb")
    project = setup.wandb_project or setup.experiment
    run_id = stored.get("wandb", {}).get("id") or secrets.token_hex(4)  # W&B's own id shape
    try:
        run = wandb.init(
            project=project,
            name=setup.run_name,
            id=run_id,
            resume="allow",
            dir=setup.workdir,  # offline runs (WANDB_MODE=offline) stay in WORKDIR/wandb
            config=setup.config,
            settings=wandb.Settings(console="off", init_timeout=60, silent=True),
        )
        for path in setup.files:
            run.save(path, base_path=os.path.dirname(path), policy="now")
    except Exception as e:  # not logged in, unreachable server, ...: the user's to fix
        raise TrackerError(f"wandb project {project!r}: {one_line(e)}") from e
    stored["wandb"] = {"id": run_id, "project": project}
    return WandB(run)


def start_run(cfg, workdir: str, config_name: str = "llmjax") -> list[Tracker]:
    """The trackers `train.trackers` names for a training run in `workdir` (an
    ml_collections config), started or resumed; `config_name` (the --config file's name without
    .py) is the experiment unless train.experiment names one."""
    t = cfg.train
    card = os.path.join(cfg.data.path, META_FILE)
    setup = Setup(
        workdir=workdir,
        config=cfg.to_dict(),
        files=[card] if os.path.isfile(card) else [],
        experiment=t.experiment or config_name,
        run_name=os.path.basename(os.path.normpath(workdir)),
        mlflow_uri=t.mlflow_uri,
        wandb_project=t.wandb_project,
    )
    return start(parse_trackers(t.trackers), setup, t.tracker_optional)
