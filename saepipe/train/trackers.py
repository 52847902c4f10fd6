"""Experiment trackers (``train.log_to``): every train_log.jsonl row also goes to W&B and/or MLflow.

Opt-in and off by default (``log_to: []``); train_log.jsonl stays the record either way. Each
SAE gets its own tracker run (in a pack of K, K runs), named after the SAE id, grouped by its
sweep group (the id up to its first "-": ``topk-k16-s0`` -> ``topk``), with the SAE's config
fields and train settings as the run's config. Each row is logged at ``step`` = training step,
with list-valued entries flattened to one metric each (``expert_counts/0``, ``omega/1``, ...).

Where runs go is the tools' own business, through their own environment variables:

* ``wandb``: ``WANDB_PROJECT`` (default "saepipe"), ``WANDB_ENTITY``, ``WANDB_RUN_GROUP`` (else
  the sweep group), ``WANDB_MODE=offline`` (no account, no network: ``wandb sync`` uploads
  later), ``WANDB_DIR`` (default: the working directory; files in ``$WANDB_DIR/wandb/``).
* ``mlflow``: ``MLFLOW_TRACKING_URI`` (required: a server ``http://host:5000``, or a local
  file store ``file:./mlruns``, which MLflow 3.18 accepts only with ``MLFLOW_ALLOW_FILE_STORE=true``;
  MLflow's own default, a new ``sqlite:///mlflow.db``, breaks when parallel train jobs create
  it at once), ``MLFLOW_EXPERIMENT_NAME`` (default "saepipe").

Preemption and resume: the run ids of an SAE are kept next to its checkpoint
(``checkpoint.trackers.json``); a job resuming from that checkpoint resumes the same runs
(W&B ``resume="allow"``, MLflow: the same run id set back to RUNNING) and logs from the
resumed step on. A preempted run is closed as preempted (W&B: ``mark_preempting`` and exit
code 143; MLflow: KILLED), a run that raised as failed (exit code 1; FAILED). A job that
starts afresh (no checkpoint, or a stale one) starts new runs; one that resumes a
checkpoint with no run id for a tracker (log_to turned on mid-run) starts a new run and
first logs the rows restored from the checkpoint. A tracker that fails while logging is
warned about once and dropped for the rest of the job: training goes on.

The libraries are imported only when a tracker starts (neither is needed otherwise).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from saepipe.io import atomic_path
from saepipe.train.signals import TrainingPreempted

DEFAULT_PROJECT = "saepipe"
"""W&B project and MLflow experiment when WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME are unset."""
IDS_SUFFIX = ".trackers.json"
"""The run ids of an SAE's trackers: ``<checkpoint stem>.trackers.json`` beside its checkpoint."""
STATUSES = ("finished", "preempted", "failed")
"""How a run ends (:meth:`Tracker.finish`)."""


class Tracker(Protocol):
    """One experiment tracker's run for one SAE."""

    def start(self, run_name: str, config: dict[str, Any], group: str, resume_id: str | None) -> str:
        """Start (or, with `resume_id`, resume) the run; returns its id."""
        ...

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log the scalar `metrics` of one row at training step `step`."""
        ...

    def finish(self, status: str) -> None:
        """End the run as `status`, one of :data:`STATUSES`."""
        ...


def _require(module: str, tracker: str, package: str) -> ModuleType:
    """Import `module`, or an ImportError that says which package `tracker` needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"train.log_to lists {tracker} but the {package} package is not installed: "
            f"pip install {package} (or pip install 'saepipe[{tracker}]')"
        ) from err


class WandbTracker:
    """Weights & Biases (``wandb``): one run per SAE, ``reinit="create_new"`` (a pack's K runs
    live side by side in one process)."""

    EXIT_CODES = {"finished": 0, "preempted": 143, "failed": 1}  # 143 = 128 + SIGTERM

    def __init__(self) -> None:
        self.run: Any = None

    def start(self, run_name: str, config: dict[str, Any], group: str, resume_id: str | None) -> str:
        wandb = _require("wandb", "wandb", "wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            name=run_name,
            group=os.environ.get("WANDB_RUN_GROUP") or group,
            job_type="train",
            config=config,
            id=resume_id or uuid.uuid4().hex[:16],
            resume="allow",
            reinit="create_new",
        )
        return str(self.run.id)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str) -> None:
        if status == "preempted":
            self.run.mark_preempting()
        self.run.finish(exit_code=self.EXIT_CODES[status])


class MLflowTracker:
    """MLflow (``mlflow-skinny`` suffices): one run per SAE in the experiment
    ``MLFLOW_EXPERIMENT_NAME`` (default "saepipe") of ``MLFLOW_TRACKING_URI``; the config
    becomes the run's params (``sae.width``, ``train.lr``, ...), the group a tag."""

    STATUS = {"finished": "FINISHED", "preempted": "KILLED", "failed": "FAILED"}
    BATCH = 100  # MLflow's limit on params (and tags) per log_batch call

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""

    def start(self, run_name: str, config: dict[str, Any], group: str, resume_id: str | None) -> str:
        mlflow = _require("mlflow", "mlflow", "mlflow-skinny")
        if not mlflow.is_tracking_uri_set():
            raise ValueError(
                "train.log_to lists mlflow but MLFLOW_TRACKING_URI is not set: set it to a tracking "
                "server (http://host:5000) or a local file store (MLFLOW_TRACKING_URI=file:./mlruns "
                "with MLFLOW_ALLOW_FILE_STORE=true); MLflow's default, a new sqlite:///mlflow.db, "
                "breaks when parallel train jobs create it"
            )
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.client = mlflow.MlflowClient(mlflow.get_tracking_uri())
        if resume_id is not None:
            try:
                self.client.update_run(resume_id, status="RUNNING")
                self.run_id = resume_id
                return resume_id
            except MlflowException:  # not in this store (the URI changed): a new run below
                pass
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # a parallel job created it first
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        tags = {"saepipe.group": group, "saepipe.sae_id": run_name}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        params = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in _flat(config).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + self.BATCH])
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit on metrics per call
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS[status])


TRACKERS: dict[str, type[Tracker]] = {"wandb": WandbTracker, "mlflow": MLflowTracker}
"""``train.log_to`` name -> tracker class."""


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to ``outer.inner`` keys (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def metrics_of(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of a train_log row, ``step`` aside (it is the x axis): numbers as they are,
    each entry of a list (``expert_counts``, Scale's ``omega``) as ``<name>/<index>``."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        if isinstance(v, (list, tuple)):
            out.update({f"{k}/{i}": float(x) for i, x in enumerate(v) if isinstance(x, (int, float))})
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def sweep_group(sae_id: str) -> str:
    """The sweep group of an SAE id (``topk-k16-s0`` -> ``topk``: group names have no "-")."""
    return sae_id.split("-", 1)[0]


def ids_path(checkpoint: Path) -> Path:
    """Where the run ids of the SAE checkpointed at `checkpoint` are kept."""
    return checkpoint.with_name(checkpoint.stem + IDS_SUFFIX)


def _warn(sae_id: str, message: str) -> None:
    print(f"train {sae_id}: {message}", file=sys.stderr)


class Trackers:
    """The tracker runs of one SAE (``train.log_to``); empty and inert for ``log_to: []``.

    Started with :func:`start_trackers`; :meth:`log` each row, :meth:`finish` once (again is
    a no-op; runs still open at interpreter exit are finished as failed)."""

    def __init__(self, sae_id: str, trackers: dict[str, Tracker], ids_file: Path | None) -> None:
        self.sae_id, self.trackers, self.ids_file = sae_id, trackers, ids_file
        if trackers:
            atexit.register(self._at_exit)

    def log(self, row: dict[str, Any]) -> None:
        """Send one train_log row to every tracker (one that raises is dropped, with a warning)."""
        if not self.trackers:
            return
        metrics = metrics_of(row)
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.log(metrics, int(row["step"]))
            except Exception as err:  # a tracker must never stop training
                _warn(self.sae_id, f"{name} failed to log step {row['step']} ({err!r}); not logging to it any more")
                del self.trackers[name]

    def finish(self, status: str = "finished") -> None:
        """End every run as `status` (:data:`STATUSES`); the run ids are forgotten once finished."""
        if not self.trackers:
            return
        for name, tracker in self.trackers.items():
            try:
                tracker.finish(status)
            except Exception as err:  # the SAE is saved already: warn, do not fail the job
                _warn(self.sae_id, f"{name} failed to finish its run ({err!r})")
        self.trackers = {}
        atexit.unregister(self._at_exit)
        if status == "finished" and self.ids_file is not None:
            self.ids_file.unlink(missing_ok=True)

    def _at_exit(self) -> None:
        self.finish("failed")


def start_trackers(
    names: list[str], sae_id: str, config: dict[str, Any], checkpoint: Path, resuming: bool, history: list[dict]
) -> Trackers:
    """Start the runs of `names` (``train.log_to``) for SAE `sae_id` with run config `config`.

    `resuming`: the job resumes from `checkpoint`; each tracker then resumes the run whose id
    was saved beside it, or starts a new one and first logs `history` (the restored rows)."""
    if not names:
        return Trackers(sae_id, {}, None)
    ids_file = ids_path(checkpoint)
    saved: dict[str, str] = {}
    if resuming and ids_file.is_file():
        with contextlib.suppress(ValueError, OSError):
            saved = json.loads(ids_file.read_text())
    trackers: dict[str, Tracker] = {}
    ids: dict[str, str] = {}
    backfill: list[str] = []
    for name in names:
        tracker = TRACKERS[name]()
        ids[name] = tracker.start(sae_id, config, sweep_group(sae_id), saved.get(name))
        trackers[name] = tracker
        if ids[name] != saved.get(name):
            backfill.append(name)
    with atomic_path(ids_file) as tmp:
        tmp.write_text(json.dumps(ids) + "\n")
    group = Trackers(sae_id, trackers, ids_file)
    for name in backfill:  # a new run of a resumed job: the rows so far first
        for row in history:
            group.trackers[name].log(metrics_of(row), int(row["step"]))
    return group


@contextlib.contextmanager
def finish_on_error(groups: list[Trackers]) -> Iterator[None]:
    """Inside, an exception finishes every run of `groups` (preempted for
    :class:`TrainingPreempted`, else failed) before it propagates."""
    try:
        yield
    except BaseException as err:
        status = "preempted" if isinstance(err, TrainingPreempted) else "failed"
        for group in groups:
            group.finish(status)
        raise
