"""Snakemake adapter: rule export_saelens -> saepipe.interop.export.export_saelens (one SAE)."""

from pathlib import Path

from saepipe.devices import set_threads
from saepipe.interop.export import export_saelens
from saepipe.io import log_to
from saepipe.lease import gpu_lease

# gpu_lease: this job's own GPU (or Slurm's, or the CPU) before torch touches CUDA
with log_to(snakemake.log[0]), gpu_lease():
    set_threads(snakemake.threads)
    export_saelens(
        sae_dir=Path(snakemake.input.weights).parent,
        shards=list(snakemake.input.shards),
        out_dir=Path(snakemake.output.cfg).parent,
        metrics_json=snakemake.input.metrics,
    )
