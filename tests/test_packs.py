"""Packs (train.pack: K): K SAEs trained in one job on one stream of batches.

Each member ends with exactly the weights it gets trained alone (bitwise, CPU); a SIGTERM
mid-pack resumes every member bitwise; a member already finished is never trained again;
packs are formed deterministically (group, stream settings, seed); through Snakemake, a pack
is one train job and editing one pack reruns only that pack.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, random_shards, snakemake
from safetensors.torch import load_file
from test_retries import PREEMPT_ONCE

import saepipe.train.loop as loop
from saepipe.train import Member, TrainConfig, train_pack, train_sae
from saepipe.train.packs import form_packs, pack_of

SAES = {
    "topk": {"arch": "topk", "width": 128, "k": 4, "dead_tokens": 128},
    "switch": {"arch": "switch", "width": 64, "k": 4, "n_experts": 4},
    "relu": {"arch": "relu", "width": 64, "k": 4},
}
CFG = TrainConfig(
    tokens=40 * 64, batch_size=64, lr=1e-3, warmup_steps=5, log_every=5, device="cpu", checkpoint_every_s=1e9
)
LRS = {"topk": 1e-3, "switch": 2e-3, "relu": 5e-4}  # lr may differ within a pack


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    return random_shards(tmp_path_factory.mktemp("shards"), n_shards=2, rows=900, seed=1)


@pytest.fixture(scope="module")
def alone(shards, tmp_path_factory) -> Path:
    """Each SAE trained by itself (the reference)."""
    root = tmp_path_factory.mktemp("alone")
    torch.set_num_threads(1)
    for name, sae in SAES.items():
        train_sae(sae, replace(CFG, lr=LRS[name]), shards, root / name)
    return root


def _members(root: Path) -> list[Member]:
    return [Member(sae, replace(CFG, lr=LRS[name]), root / name) for name, sae in SAES.items()]


def _assert_same(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "sae.safetensors")), load_file(str(b / "sae.safetensors"))
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    timing = {"tokens_per_s", "elapsed_s"}
    rows = [
        [{k: v for k, v in json.loads(line).items() if k not in timing} for line in open(d / "train_log.jsonl")]
        for d in (a, b)
    ]
    assert rows[0] == rows[1]


def test_a_pack_trains_each_member_as_if_alone(shards, alone, tmp_path, one_thread):
    run = train_pack(_members(tmp_path), shards)
    for name in SAES:
        _assert_same(tmp_path / name, alone / name)
    assert run.steps == 40 and len(run.rows) == 3
    # the pack read the activations once: one epoch of 1800 rows < 40 x 64 = 2560 tokens -> 2 epochs
    assert run.bytes_read == 2 * run.shard_bytes
    walls = [json.loads((tmp_path / n / "config.json").read_text())["run"]["wall_time_s"] for n in SAES]
    assert all(w > 0 for w in walls)


def test_members_must_share_the_stream(tmp_path):
    members = [
        Member(SAES["topk"], CFG, tmp_path / "a"),
        Member(SAES["relu"], replace(CFG, batch_size=32), tmp_path / "b"),
    ]
    with pytest.raises(ValueError, match=r"a and b cannot share a pack: .*\['batch_size'\]"):
        train_pack(members, [])


# Trains the pack in a fresh process and stops before step N until a line on stdin, so the
# test's SIGTERM arrives at a known step (the trainer's handler is the real one).
RUNNER = """
import json, sys, torch
from pathlib import Path
import saepipe.train.loop as loop
from saepipe.train import Member, TrainConfig, train_pack
args = json.loads(sys.argv[1])
torch.set_num_threads(1)
class Paused(loop.ShardStream):
    def batches(self, start=0):
        for step, batch in enumerate(super().batches(start), start):
            if step == args["pause_at"]:
                print("paused", flush=True)
                sys.stdin.readline()
            yield batch
loop.ShardStream = Paused
members = [Member(m["sae"], TrainConfig(**m["train"]), Path(m["out"])) for m in args["members"]]
train_pack(members, args["shards"])
"""


def test_sigterm_mid_pack_resumes_every_member_bitwise(shards, alone, tmp_path, capsys, one_thread):
    members = _members(tmp_path)
    spec = [{"sae": m.sae_fields, "train": asdict(m.cfg), "out": str(m.out_dir)} for m in members]
    args = json.dumps({"members": spec, "shards": shards, "pause_at": 17})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, args],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline() == "paused\n", proc.communicate()[1]
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate("\n", timeout=120)
    assert proc.returncode != 0 and "TrainingPreempted" in err and "18 of 40 steps done" in err, err
    for name in SAES:
        assert torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["step"] == 18

    capsys.readouterr()
    train_pack(_members(tmp_path), shards)  # the rerun
    assert capsys.readouterr().err.count("18 steps done") == 3
    for name in SAES:
        _assert_same(tmp_path / name, alone / name)
        assert not (tmp_path / name / "checkpoint.pt").exists()
        assert json.loads((tmp_path / name / "config.json").read_text())["run"]["resumed_at_steps"] == [18]


def test_a_finished_member_is_not_trained_again(shards, alone, tmp_path, monkeypatch, one_thread):
    """Killed while saving the second member: the rerun trains nobody, it saves all three."""
    real_finish, saved = loop.Trainee.finish, []

    def dies_on_second(self, wall_s, device):
        if len(saved) == 1:
            raise KeyboardInterrupt("killed while saving")
        saved.append(self.member.out_dir.name)
        return real_finish(self, wall_s, device)

    monkeypatch.setattr(loop.Trainee, "finish", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_pack(_members(tmp_path), shards)
    monkeypatch.undo()
    steps = []
    real_step = loop.Trainee.step
    monkeypatch.setattr(loop.Trainee, "step", lambda self, *a: steps.append(1) or real_step(self, *a))
    train_pack(_members(tmp_path), shards)
    assert steps == []  # every member was done: no optimizer step
    for name in SAES:
        _assert_same(tmp_path / name, alone / name)
        assert not (tmp_path / name / "checkpoint.pt").exists()


def _point(group: str, **train) -> dict:
    base = {"tokens": 100, "batch_size": 10, "seed": 0, "lr": 1e-3, "pack": 2}
    return {"group": group, "train": {**base, **train}}


def test_packs_are_formed_by_group_stream_and_seed():
    saes = {
        "a-k4-s0": _point("a"),
        "a-k8-s0": _point("a"),
        "a-k16-s0": _point("a"),
        "a-k4-s1": _point("a", seed=1),
        "a-k8-s1": _point("a", seed=1),
        "b-lr0.001": _point("b"),  # lr differs: the same stream, one pack
        "b-lr0.002": _point("b", lr=2e-3),
        "c-b10": _point("c"),  # batch size differs: separate streams
        "c-b20": _point("c", batch_size=20),
        "d-k4": _point("d", pack=1),
        "d-k8": _point("d", pack=1),
    }
    packs = form_packs(saes)
    assert packs == {
        "a-k4-s0+1": ["a-k4-s0", "a-k8-s0"],
        "a-k16-s0": ["a-k16-s0"],
        "a-k4-s1+1": ["a-k4-s1", "a-k8-s1"],  # seeds never share a pack
        "b-lr0.001+1": ["b-lr0.001", "b-lr0.002"],
        "c-b10": ["c-b10"],
        "c-b20": ["c-b20"],
        "d-k4": ["d-k4"],
        "d-k8": ["d-k8"],
    }
    assert form_packs(dict(reversed(list(saes.items())))).keys() != packs.keys()  # sweep order decides
    assert pack_of(packs)["a-k8-s1"] == "a-k4-s1+1"
    with pytest.raises(ValueError, match="train.pack must be an int >= 1"):
        form_packs({"x": _point("x", pack=0)})


@pytest.mark.slow
def test_packs_through_snakemake(micro_copy, tmp_path):
    """train.pack 2 on the finished micro run: only the group with two compatible SAEs
    (topk, k = 4 and 8) forms a new pack; its job, preempted by a real SIGTERM and retried
    by Snakemake (--retries 1), resumes both and ends with the weights each got trained
    alone; then editing that group reruns that pack and nothing else's training."""
    results = micro_copy / "results"
    alone = {k: load_file(str(results / f"saes/topk-{k}/sae.safetensors")) for k in ("k4", "k8")}
    cfg = yaml.safe_load((micro_copy / "config.yaml").read_text())
    cfg["train"]["pack"] = 2
    (micro_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    dry = snakemake(micro_copy, "-n").stdout
    assert dry.count("rule train:") == 1 and "results/packs/topk-k4+1/pack.json" in dry, dry[-3000:]
    targets = [f"results/saes/topk-{k}/metrics.json" for k in ("k4", "k8")]
    hooks = tmp_path / "hooks"  # the train job's first attempt is preempted 3 steps in
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PREEMPT_ONCE)
    proc = snakemake(micro_copy, "--cores", "2", "--retries", "1", *targets, pythonpath=(hooks,))
    assert (hooks / "preempted").exists() and "Trying to restart job" in proc.stdout + proc.stderr
    for k in ("k4", "k8"):
        run = json.loads((results / f"saes/topk-{k}/config.json").read_text())["run"]
        assert run["resumed_at_steps"] == [4], k  # the retry went on from the SIGTERM checkpoint
    manifest = json.loads((results / "packs/topk-k4+1/pack.json").read_text())
    assert manifest["members"] == ["topk-k4", "topk-k8"]
    assert manifest["bytes_read"] == manifest["shard_bytes"]  # one epoch, read once for both SAEs
    for k, ref in alone.items():
        w = load_file(str(results / f"saes/topk-{k}/sae.safetensors"))
        assert all(torch.equal(w[n], ref[n]) for n in ref), k

    cfg["sweep"]["topk"]["dead_tokens"] = 2048  # edit the packed group
    (micro_copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    dry = snakemake(micro_copy, "-n", *targets, "results/saes/relu/sae.safetensors").stdout
    assert dry.count("rule train:") == 1 and "results/packs/topk-k4+1/pack.json" in dry, dry[-3000:]
