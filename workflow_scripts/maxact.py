"""Snakemake adapter: rule maxact -> saepipe.features.maxact.max_activating_examples (one SAE)."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.features.maxact import MaxActConfig, max_activating_examples
from saepipe.io import log_to
from saepipe.lease import gpu_lease

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    max_activating_examples(
        MaxActConfig(**json.loads(snakemake.params.cfg)),
        sae_dir=Path(snakemake.input.weights).parent,
        tokenizer_dir=Path(snakemake.input.tokenizer).parent,
        shards=list(snakemake.input.shards),
        out_parquet=snakemake.output[0],
    )
