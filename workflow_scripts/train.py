"""Snakemake adapter: rule train -> saepipe.train.train_sae (one sweep point)."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.io import log_to
from saepipe.lease import gpu_lease
from saepipe.train import TrainConfig, split_runtime, train_sae

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    runtime = split_runtime(snakemake.config["train"])[1]
    train_sae(
        json.loads(snakemake.params.sae),
        TrainConfig(**json.loads(snakemake.params.train), **runtime),
        list(snakemake.input.shards),
        Path(snakemake.output.weights).parent,
    )
