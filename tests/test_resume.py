"""Preemption and resume: a SIGTERM'd or crashed training run, rerun, ends with the weights
of an uninterrupted run (bitwise, CPU); stale or half-written checkpoints are not resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import random_shards
from safetensors.torch import load_file

import saepipe.data.loader as loader
import saepipe.train as train
from saepipe.data.loader import ShardStream
from saepipe.train import TrainConfig, train_sae

REPO = Path(__file__).resolve().parents[1]
SAES = {
    "topk": {"arch": "topk", "width": 128, "k": 4, "dead_tokens": 128},  # some latents die: AuxK on
    "switch": {"arch": "switch", "width": 64, "k": 4, "n_experts": 4},
    "scale": {"arch": "scale", "width": 64, "k": 4, "n_experts": 4, "active_experts": 2},
}
# 60 steps of 64 rows over 3 shards of 700 rows: windows of 1400 and 700 rows, so batches
# straddle windows and epochs; no periodic checkpoint unless a test asks for one.
CFG = TrainConfig(
    tokens=60 * 64,
    batch_size=64,
    lr=1e-3,
    warmup_steps=5,
    log_every=5,
    buffer_shards=2,
    device="cpu",
    checkpoint_every_s=1e9,
)
TIMING = {"tokens_per_s", "elapsed_s"}

# Trains in a fresh process; with "pause_at" it stops before step N until a line on stdin,
# so that the test's SIGTERM arrives at a known step (the trainer's handler is the real one).
RUNNER = """
import json, sys, torch
import saepipe.train as train
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
if "pause_at" in args:
    class Paused(train.loop.ShardStream):
        def batches(self, start=0):
            for step, batch in enumerate(super().batches(start), start):
                if step == args["pause_at"]:
                    print("paused", flush=True)
                    sys.stdin.readline()
                yield batch
    train.loop.ShardStream = Paused
train.train_sae(args["sae"], train.TrainConfig(**args["train"]), args["shards"], args["out"])
"""


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return random_shards(tmp_path_factory.mktemp("shards"), n_shards=3, rows=700)


def _start(sae: dict, shards: list[str], out: Path, **extra) -> subprocess.Popen:
    args = {"sae": sae, "train": asdict(CFG), "shards": shards, "out": str(out), **extra}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(args)],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _assert_same_run(out: Path, ref: Path) -> None:
    """Bitwise-equal weights and the same log rows (timing columns aside)."""
    a, b = load_file(str(out / "sae.safetensors")), load_file(str(ref / "sae.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    rows, ref_rows = (
        [
            {k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (d / "train_log.jsonl").read_text().splitlines()
        ]
        for d in (out, ref)
    )
    assert [r["step"] for r in rows] == list(range(0, 60, 5)) + [59]
    assert rows == ref_rows


@pytest.mark.parametrize("arch", ["topk", "switch"])
def test_sigterm_checkpoints_and_rerun_resumes_bitwise(arch, shards, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    proc = _start(SAES[arch], shards, out, pause_at=23)
    train_sae(SAES[arch], CFG, shards, tmp_path / "ref")  # uninterrupted, while the child starts
    assert proc.stdout.readline() == "paused\n", _finish(proc)[1]
    os.kill(proc.pid, signal.SIGTERM)
    proc.stdin.write("\n")
    proc.stdin.flush()
    code, err = _finish(proc)
    assert code != 0 and "TrainingPreempted" in err and "Rerun the same job" in err, err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 24
    assert not (out / "sae.safetensors").exists()

    capsys.readouterr()
    train_sae(SAES[arch], CFG, shards, out)  # the rerun (here in the test's own process)
    err = capsys.readouterr().err
    assert "resuming from" in err and "24 steps done" in err and "resumed after step(s) [24]" in err
    assert not (out / "checkpoint.pt").exists()
    _assert_same_run(out, tmp_path / "ref")
    assert json.loads((out / "config.json").read_text())["run"]["resumed_at_steps"] == [24]


class Crash(Exception):
    """Stands in for a hard kill (SIGKILL, node failure): no cleanup, no SIGTERM checkpoint."""


def _crash(x):
    raise Crash


@pytest.fixture
def at_step(monkeypatch):
    """at_step(n, fn): in the next training runs, batch n is replaced by fn(batch) (or fn raises)."""

    def patch(n: int, fn) -> None:
        class Patched(ShardStream):
            def batches(self, start=0):
                for step, x in enumerate(super().batches(start), start):
                    yield fn(x) if step == n else x

        monkeypatch.setattr(train.loop, "ShardStream", Patched)

    return patch


def test_hard_kill_resumes_from_periodic_checkpoint(shards, tmp_path, at_step, monkeypatch, one_thread):
    cfg = TrainConfig(**{**asdict(CFG), "checkpoint_every_s": 0})  # a checkpoint after every step
    train_sae(SAES["scale"], cfg, shards, tmp_path / "ref")
    at_step(37, _crash)
    with pytest.raises(Crash):
        train_sae(SAES["scale"], cfg, shards, tmp_path / "out")
    assert torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)["step"] == 37
    monkeypatch.setattr(train.loop, "ShardStream", ShardStream)
    train_sae(SAES["scale"], cfg, shards, tmp_path / "out")
    _assert_same_run(tmp_path / "out", tmp_path / "ref")


def test_stale_checkpoint_is_reported_and_ignored(shards, tmp_path, at_step, monkeypatch, capsys, one_thread):
    cfg = TrainConfig(**{**asdict(CFG), "checkpoint_every_s": 0})
    at_step(10, _crash)
    with pytest.raises(Crash):
        train_sae(SAES["topk"], cfg, shards, tmp_path / "out")
    monkeypatch.setattr(train.loop, "ShardStream", ShardStream)
    capsys.readouterr()
    train_sae(SAES["topk"], TrainConfig(**{**asdict(cfg), "lr": 2e-3}), shards, tmp_path / "out")
    err = capsys.readouterr().err
    assert "is stale" in err and "train.lr: 0.001 -> 0.002" in err and "resuming" not in err
    assert json.loads((tmp_path / "out/config.json").read_text())["run"]["resumed_at_steps"] == []
    assert not (tmp_path / "out/checkpoint.pt").exists()


def test_kill_while_writing_keeps_previous_checkpoint(shards, tmp_path, monkeypatch, one_thread):
    cfg = TrainConfig(**{**asdict(CFG), "checkpoint_every_s": 0})
    real_save, calls = torch.save, []

    def dies_on_third_write(obj, f):
        calls.append(obj["step"])
        if len(calls) == 3:
            f.write(b"half a checkpoint")
            raise Crash("killed mid-write")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", dies_on_third_write)
    with pytest.raises(Crash):
        train_sae(SAES["topk"], cfg, shards, tmp_path / "out")
    assert calls == [1, 2, 3]
    assert torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)["step"] == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["checkpoint.pt"]  # no temp file left


def test_nan_loss_keeps_last_good_checkpoint(shards, tmp_path, at_step, one_thread):
    cfg = TrainConfig(**{**asdict(CFG), "checkpoint_every_s": 0})
    at_step(12, lambda x: torch.full_like(x, float("nan")))
    with pytest.raises(
        FloatingPointError,
        match=r"loss became nan at step 12; lower train.lr.*"
        r"last good checkpoint \(12 steps done\) is kept",
    ):
        train_sae(SAES["topk"], cfg, shards, tmp_path / "out")
    state = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
    assert state["step"] == 12 and all(torch.isfinite(t).all() for t in state["sae"].values())


def test_stream_resumes_at_any_step_without_reading_skipped_windows(shards, monkeypatch):
    full = list(ShardStream(shards, 64, 60 * 64, seed=3))
    reads, read_shard = [], loader.read_shard
    monkeypatch.setattr(loader, "read_shard", lambda p: reads.append(p) or read_shard(p))
    for start in (0, 21, 44, 59):
        reads.clear()
        assert all(
            torch.equal(a, b)
            for a, b in zip(ShardStream(shards, 64, 60 * 64, seed=3).batches(start), full[start:], strict=True)
        )
    assert len(reads) == 1  # step 59 is in the last window of epoch 1: that window's one shard
