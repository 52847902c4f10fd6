"""Snakemake adapter: rule autointerp -> saepipe.features.autointerp.autointerp (one SAE)."""

import json

from saepipe.features.autointerp import AutointerpConfig, autointerp
from saepipe.io import log_to

with log_to(snakemake.log[0]):
    autointerp(
        AutointerpConfig(**json.loads(snakemake.params.cfg)),
        snakemake.input[0],
        snakemake.output.table,
        snakemake.output.summary,
    )
