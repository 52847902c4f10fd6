"""Snakemake adapter: rule train -> saepipe.train.packs.run_pack (the SAEs of one pack)."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.io import log_to
from saepipe.lease import gpu_lease
from saepipe.train import split_runtime
from saepipe.train.packs import run_pack

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    run_pack(
        json.loads(snakemake.params.saes),
        json.loads(snakemake.params.train),
        split_runtime(snakemake.config["train"])[1],
        list(snakemake.input.shards),
        Path(snakemake.output.pack).parent,
    )
