"""Experiment trackers (``train.log_to``): every train_log row also reaches W&B (offline) and
MLflow (a file store), one run per SAE of a pack, resumed with the checkpoint after a SIGTERM;
``log_to: []`` creates nothing, and ``log_to`` changes nothing that is trained.

Nothing here touches the network or the real home: W&B runs offline, MLflow writes to a
``file:`` store in tmp, HOME and the tools' config/cache directories are in tmp, and the test
process refuses any socket connection that is not local.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import struct
import sys
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
import yaml
from conftest import REPO, random_shards

import saepipe.train.loop as loop
import saepipe.train.trackers as trackers
from saepipe.data.loader import ShardStream
from saepipe.sweep import expand_sweep
from saepipe.train import Member, TrainConfig, TrainingPreempted, split_runtime, train_pack, train_sae
from saepipe.train.checkpoint import job_key
from saepipe.train.trackers import metrics_of

SAES = {
    "topk-k4": {"arch": "topk", "width": 64, "k": 4},
    "switch-k4": {"arch": "switch", "width": 64, "k": 4, "n_experts": 4},  # logs expert_counts
}
CFG = TrainConfig(tokens=20 * 64, batch_size=64, lr=1e-3, warmup_steps=5, log_every=5, device="cpu")
STEPS = [0, 5, 10, 15, 19]  # the train_log rows of CFG


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return random_shards(tmp_path_factory.mktemp("shards"), n_shards=1, rows=640)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """HOME and every W&B / MLflow directory in tmp, W&B offline, telemetry off, no remote sockets;
    W&B's service (started by the first run, with this environment) is stopped at the end."""
    home = tmp_path_factory.mktemp("home")
    env = {
        "HOME": str(home),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_DATA_DIR": str(home / "wandb-data"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB__DISABLE_STATS": "true",  # no system-metrics sampler per run
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    real_connect = socket.socket.connect

    def local_only(sock, address):
        if sock.family not in (socket.AF_UNIX,) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a tracker test tried to reach {address}")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_API_KEY", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(k, raising=False)
        mp.setattr(socket.socket, "connect", local_only)
        torch.set_num_threads(1)
        yield
        import wandb

        wandb.teardown()


@pytest.fixture
def stores(tmp_path, monkeypatch) -> tuple[Path, str]:
    """(this test's WANDB_DIR, its MLflow tracking URI)."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb", f"file:{tmp_path / 'mlruns'}"


def _records(path: str):
    """The records of a W&B run file (``run-<id>.wandb``): a LevelDB-style log (a 7-byte header,
    then 32 KiB blocks of chunks, each with a 7-byte header: CRC, length, type) of
    ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, block, record = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            r = pb.Record()
            r.ParseFromString(record)
            record = b""
            yield r


def wandb_runs(root: Path) -> dict[str, dict]:
    """Run id -> {name, group, config, history: step -> metrics, exit_codes, preempting}, over
    every offline run directory under `root` (a resumed run has one directory per attempt)."""
    import wandb

    wandb.teardown()  # W&B's service writes the run files after run.finish() returns: wait for it
    runs: dict[str, dict] = {}
    files = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    for path in sorted(files, key=os.path.getmtime):  # attempts in order
        run: dict = {}
        for r in _records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = runs.setdefault(r.run.run_id, {"history": {}, "exit_codes": [], "preempting": 0, "attempts": 0})
                run.update(name=r.run.display_name, group=r.run.run_group, project=r.run.project)
                run["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
                run["attempts"] += 1
            elif kind == "history":
                items = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                items = {k: v for k, v in items.items() if not k.startswith("_")}  # _step, _runtime, ...
                assert r.history.step.num not in run["history"], "a step logged twice"
                run["history"][r.history.step.num] = items
            elif kind == "exit":
                run["exit_codes"].append(r.exit.exit_code)
            elif kind == "preempting":
                run["preempting"] += 1
    return runs


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _assert_logged(history: dict[int, dict], rows: list[dict]) -> None:
    """`history` (step -> metrics) holds exactly the rows of train_log.jsonl."""
    assert sorted(history) == [r["step"] for r in rows]
    for row in rows:
        expected = metrics_of(row)
        assert set(history[row["step"]]) == set(expected)
        assert history[row["step"]] == pytest.approx(expected, rel=1e-12)


def _mlflow_runs(uri: str) -> dict[str, object]:
    """Run name -> MLflow Run, in the "saepipe" experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("saepipe")
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _mlflow_history(uri: str, run_id: str, keys) -> dict[int, dict]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    history: dict[int, dict] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            assert key not in history.setdefault(m.step, {}), f"{key} logged twice at step {m.step}"
            history[m.step][key] = m.value
    return history


def test_wandb_offline_run_holds_every_row(shards, stores, tmp_path):
    wandb_dir, _ = stores
    out = tmp_path / "topk-k4"
    train_sae(SAES["topk-k4"], replace(CFG, log_to=["wandb"]), shards, out)
    runs = wandb_runs(wandb_dir)
    assert len(runs) == 1
    (run,) = runs.values()
    assert (run["name"], run["group"], run["project"]) == ("topk-k4", "topk", "saepipe")
    assert run["config"]["sae"]["arch"] == "topk" and run["config"]["sae"]["width"] == 64
    assert run["config"]["train"]["batch_size"] == 64 and run["config"]["lr"] == 1e-3
    rows = _rows(out)
    assert [r["step"] for r in rows] == STEPS
    _assert_logged(run["history"], rows)
    assert {"loss", "l0", "dead_fraction", "tokens_per_s", "lr", "tokens"} <= set(run["history"][19])
    assert run["exit_codes"] == [0]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "sae.safetensors", "train_log.jsonl"]


def test_a_pack_of_two_gives_two_runs_in_each_tracker(shards, stores, tmp_path):
    wandb_dir, uri = stores
    members = [Member(fields, replace(CFG, log_to=["wandb", "mlflow"]), tmp_path / sid) for sid, fields in SAES.items()]
    train_pack(members, shards)
    runs = {r["name"]: r for r in wandb_runs(wandb_dir).values()}
    ml = _mlflow_runs(uri)
    assert sorted(runs) == sorted(ml) == sorted(SAES)
    for sid in SAES:
        rows = _rows(tmp_path / sid)
        _assert_logged(runs[sid]["history"], rows)
        assert runs[sid]["exit_codes"] == [0] and runs[sid]["group"] == sid.split("-")[0]
        run = ml[sid]
        assert run.info.status == "FINISHED"
        assert run.data.tags["saepipe.group"] == sid.split("-")[0]
        assert run.data.params["sae.arch"] == SAES[sid]["arch"] and run.data.params["train.batch_size"] == "64"
        _assert_logged(_mlflow_history(uri, run.info.run_id, metrics_of(rows[0])), rows)
    assert "expert_counts/3" in runs["switch-k4"]["history"][0]  # routed: one metric per expert
    assert not list(tmp_path.glob("*/checkpoint*"))  # ids forgotten with the checkpoint


@pytest.fixture
def sigterm_at(monkeypatch):
    """sigterm_at(n): the next training run gets a SIGTERM (its real handler) before step n."""

    def patch(n: int) -> None:
        class Preempted(ShardStream):
            def batches(self, start=0):
                for step, x in enumerate(super().batches(start), start):
                    if step == n:
                        os.kill(os.getpid(), signal.SIGTERM)
                    yield x

        monkeypatch.setattr(loop, "ShardStream", Preempted)

    return patch


def test_preempted_runs_resume_with_the_checkpoint(shards, stores, tmp_path, sigterm_at, monkeypatch):
    wandb_dir, uri = stores
    out, cfg = tmp_path / "topk-k4", replace(CFG, log_to=["wandb", "mlflow"])
    sigterm_at(12)
    with pytest.raises(TrainingPreempted):
        train_sae(SAES["topk-k4"], cfg, shards, out)
    ids = json.loads((out / "checkpoint.trackers.json").read_text())
    (run,) = wandb_runs(wandb_dir).values()
    assert run["exit_codes"] == [143] and run["preempting"] == 1 and sorted(run["history"]) == [0, 5, 10]
    assert _mlflow_runs(uri)["topk-k4"].info.status == "KILLED"

    monkeypatch.setattr(loop, "ShardStream", ShardStream)
    train_sae(SAES["topk-k4"], cfg, shards, out)  # the rerun resumes at step 13
    rows = _rows(out)
    assert json.loads((out / "config.json").read_text())["run"]["resumed_at_steps"] == [13]
    runs = wandb_runs(wandb_dir)
    assert list(runs) == [ids["wandb"]]  # the same W&B run, resumed ...
    run = runs[ids["wandb"]]
    assert run["attempts"] == 2 and run["exit_codes"] == [143, 0]
    _assert_logged(run["history"], rows)  # ... each row logged once
    ml = _mlflow_runs(uri)["topk-k4"]
    assert ml.info.run_id == ids["mlflow"] and ml.info.status == "FINISHED"
    _assert_logged(_mlflow_history(uri, ml.info.run_id, metrics_of(rows[0])), rows)
    assert not (out / "checkpoint.trackers.json").exists() and not (out / "checkpoint.pt").exists()


def test_a_new_run_of_a_resumed_job_first_logs_the_restored_rows(shards, stores, tmp_path, sigterm_at, monkeypatch):
    """log_to turned on between the preemption and the rerun: resumable, and the run is whole."""
    wandb_dir, _ = stores
    out = tmp_path / "topk-k4"
    sigterm_at(12)
    with pytest.raises(TrainingPreempted):
        train_sae(SAES["topk-k4"], CFG, shards, out)  # log_to: []
    monkeypatch.setattr(loop, "ShardStream", ShardStream)
    train_sae(SAES["topk-k4"], replace(CFG, log_to=["wandb"]), shards, out)
    assert json.loads((out / "config.json").read_text())["run"]["resumed_at_steps"] == [13]
    (run,) = wandb_runs(wandb_dir).values()
    _assert_logged(run["history"], _rows(out))


def test_log_to_empty_creates_nothing(shards, stores, tmp_path):
    wandb_dir, uri = stores
    out = tmp_path / "topk-k4"
    train_sae(SAES["topk-k4"], CFG, shards, out)
    assert CFG.log_to == []
    assert list(wandb_dir.iterdir()) == [] and not (tmp_path / "mlruns").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "sae.safetensors", "train_log.jsonl"]


def test_log_to_changes_nothing_that_is_trained(shards):
    metas = [{"d_in": 16}]
    on = replace(CFG, log_to=["wandb", "mlflow"])
    assert job_key(SAES["topk-k4"], CFG, shards, metas) == job_key(SAES["topk-k4"], on, shards, metas)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["train"]["log_to"] = ["wandb"]
    jsonschema.validate(config, yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text()))
    with_log = expand_sweep(config, d_in=128)
    del config["train"]["log_to"]
    without = expand_sweep(config, d_in=128)
    assert list(with_log) == list(without)  # a list, yet no grid axis: same SAE ids
    # the train rule's params (rules/common.smk pack_train) leave runtime fields out: no rerun
    assert all(split_runtime(with_log[s]["train"])[0] == split_runtime(without[s]["train"])[0] for s in without)
    assert split_runtime(with_log["topk-k16-s0"]["train"])[1]["log_to"] == ["wandb"]


CHOICES = r"valid choices: \['mlflow', 'wandb'\]"


@pytest.mark.parametrize(
    ("log_to", "match"),
    [
        (["tensorboard"], r"train\.log_to: unknown tracker\(s\) \['tensorboard'\]; " + CHOICES),
        (["wandb", "wandb"], r"train\.log_to: a tracker listed twice .*; " + CHOICES),
        ("wandb", r"train\.log_to must be a list of tracker names \['mlflow', 'wandb'\], got 'wandb'"),
    ],
)
def test_invalid_log_to_is_a_config_error(log_to, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(log_to=log_to)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["train"]["log_to"] = log_to
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text()))


def test_missing_package_and_missing_mlflow_uri_are_clear(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError) as err:
        trackers.start_trackers(["wandb"], "topk-k4", {}, tmp_path / "checkpoint.pt", False, [])
    assert str(err.value) == (
        "train.log_to lists wandb but the wandb package is not installed: pip install wandb "
        "(or pip install 'saepipe[wandb]')"
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="train.log_to lists mlflow but MLFLOW_TRACKING_URI is not set"):
        trackers.start_trackers(["mlflow"], "topk-k4", {}, tmp_path / "checkpoint.pt", False, [])


class Flaky:
    """A tracker (the protocol) that fails on its second row and records what it got."""

    calls: list = []

    def start(self, run_name, config, group, resume_id):
        Flaky.calls.append(("start", run_name, group))
        return "flaky-1"

    def log(self, metrics, step):
        Flaky.calls.append(("log", step))
        if step == 5:
            raise ConnectionError("server gone")

    def finish(self, status):
        Flaky.calls.append(("finish", status))


def test_a_failing_tracker_is_dropped_and_training_goes_on(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.TRACKERS, "flaky", Flaky)  # the registry: no other change needed
    Flaky.calls = []
    train_sae(SAES["topk-k4"], replace(CFG, log_to=["flaky"]), shards, tmp_path / "topk-k4")
    assert Flaky.calls == [("start", "topk-k4", "topk"), ("log", 0), ("log", 5)]
    assert "flaky failed to log step 5" in capsys.readouterr().err
    assert [r["step"] for r in _rows(tmp_path / "topk-k4")] == STEPS
