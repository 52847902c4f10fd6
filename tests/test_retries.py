"""A preempted job under Snakemake: `--retries` resubmits it, the retry resumes from the
checkpoint and ends bitwise where the uninterrupted run ended; finished shards and SAEs
are not redone. The preemption is a real SIGTERM to the real train job (the trainer's own
handler), sent from a `sitecustomize` module that the test puts first on PYTHONPATH."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import snakemake
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SAE = "switch_flop-k4"
# Imported by every Python process of the run; acts in a train job while no marker file
# exists: SIGTERM to itself 3 steps after it started or resumed (what Slurm sends before a
# preemption or a time limit).
PREEMPT_ONCE = """
import os, signal, sys
from pathlib import Path

marker = Path(__file__).with_name("preempted")
if sys.argv[0].endswith(".train.py") and not marker.exists():
    marker.write_text(str(os.getpid()))
    import saepipe.train.loop as train

    class Preempted(train.ShardStream):
        def batches(self, start=0):
            for step, batch in enumerate(super().batches(start), start):
                if step == start + 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

    train.ShardStream = Preempted
"""


def test_preempted_train_job_is_retried_and_resumes(micro_copy, tmp_path):
    results = micro_copy / "results"
    sae_dir = results / "saes" / SAE
    reference = load_file(str(sae_dir / "sae.safetensors"))  # the uninterrupted run's weights
    untouched = [
        p
        for p in (*results.glob("activations/*/*.zarr/zarr.json"), *results.glob("saes/*/sae.safetensors"))
        if SAE not in str(p)
    ]
    mtimes = {p: p.stat().st_mtime_ns for p in untouched}
    pack_dir = results / "packs" / SAE  # train.pack 1: the pack is named after its SAE
    for name in ("sae.safetensors", "config.json", "train_log.jsonl"):
        (sae_dir / name).unlink()  # this SAE was never trained: its train job is due
        (pack_dir / SAE / name).unlink()
    (pack_dir / "pack.json").unlink()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(PREEMPT_ONCE)

    target = f"results/saes/{SAE}/sae.safetensors"
    without_retry = snakemake(micro_copy, "--cores", "1", target, check=False, pythonpath=(hooks,))
    assert without_retry.returncode != 0 and (hooks / "preempted").exists()
    log = (results / "logs/train" / f"{SAE}.log").read_text()
    assert "TrainingPreempted" in log and "4 of 64 steps done" in log, log[-2000:]
    assert (pack_dir / SAE / "checkpoint.pt").exists() and not (sae_dir / "sae.safetensors").exists()

    (hooks / "preempted").unlink()  # the next attempt is preempted too; --retries 1 absorbs it
    proc = snakemake(micro_copy, "--cores", "1", "--retries", "1", target, pythonpath=(hooks,))
    assert "Trying to restart job" in proc.stdout + proc.stderr
    run = json.loads((sae_dir / "config.json").read_text())["run"]
    assert run["resumed_at_steps"] == [4, 8]  # each attempt went on from where the last stopped
    assert not (pack_dir / SAE / "checkpoint.pt").exists()
    weights = load_file(str(sae_dir / "sae.safetensors"))
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[k], reference[k]) for k in weights)
    assert {p: p.stat().st_mtime_ns for p in untouched} == mtimes  # nothing finished was redone
