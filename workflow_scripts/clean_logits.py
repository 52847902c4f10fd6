"""Snakemake adapter: rule clean_logits -> saepipe.evaluate.metrics.write_clean_logits."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.evaluate.metrics import EvalConfig, write_clean_logits
from saepipe.io import log_to
from saepipe.lease import gpu_lease

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    write_clean_logits(
        EvalConfig(**json.loads(snakemake.params.cfg)),
        Path(snakemake.input.model).parent,
        list(snakemake.input.shards),
        snakemake.output[0],
    )
