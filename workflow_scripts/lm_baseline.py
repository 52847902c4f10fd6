"""Snakemake adapter: rule lm_baseline -> saepipe.evaluate.metrics.lm_baseline."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.evaluate.metrics import EvalConfig, lm_baseline
from saepipe.io import log_to
from saepipe.lease import gpu_lease

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    lm_baseline(
        EvalConfig(**json.loads(snakemake.params.cfg)),
        Path(snakemake.input.model).parent,
        list(snakemake.input.shards),
        snakemake.output.baseline,
        clean_logits_out=snakemake.output.clean_logits,
    )
