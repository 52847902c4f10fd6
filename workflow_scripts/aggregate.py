"""Snakemake adapter: rule aggregate -> saepipe.aggregate.aggregate."""

import json
from pathlib import Path

from saepipe.aggregate import aggregate
from saepipe.io import log_to

with log_to(snakemake.log[0]):
    groups = json.loads(snakemake.params.groups)
    sae_dirs = [str(Path(p).parent) for p in snakemake.input.metrics]
    aggregate(
        sae_dirs,
        list(snakemake.input.metrics),
        [groups[Path(d).name] for d in sae_dirs],
        snakemake.output[0],  # groups: sae id -> {"group", "baseline"?, "by"?}
        extras=list(snakemake.input.extra),
    )
