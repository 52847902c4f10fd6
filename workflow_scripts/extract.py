"""Snakemake adapter: rule extract -> saepipe.extract.extract_shard (one shard)."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.extract import ExtractConfig, extract_shard
from saepipe.io import log_to
from saepipe.lease import gpu_lease

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    extract_shard(
        ExtractConfig(**json.loads(snakemake.params.cfg)),
        model_dir=Path(snakemake.input.model).parent,
        corpus_dir=Path(snakemake.input.corpus).parent,
        split=snakemake.wildcards.split,
        index=int(snakemake.wildcards.shard),
        out_path=snakemake.output[0],
    )
