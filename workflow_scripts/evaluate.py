"""Snakemake adapter: rule evaluate -> saepipe.evaluate.metrics.evaluate_sae (one SAE)."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.evaluate.metrics import EvalConfig, evaluate_sae
from saepipe.io import log_to
from saepipe.lease import gpu_lease

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    evaluate_sae(
        EvalConfig(**json.loads(snakemake.params.cfg)),
        sae_dir=Path(snakemake.input.weights).parent,
        model_dir=Path(snakemake.input.model).parent,
        shards=list(snakemake.input.shards),
        baseline_json=snakemake.input.baseline,
        out_json=snakemake.output.metrics,
        latent_stats_out=snakemake.output.latent_stats,
        clean_logits=snakemake.input.clean_logits,
    )
