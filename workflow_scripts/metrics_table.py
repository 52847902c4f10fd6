"""Snakemake adapter: rule metrics_table -> saepipe.plots.metrics_table.metrics_table."""

from saepipe.io import log_to
from saepipe.plots.metrics_table import metrics_table

with log_to(snakemake.log[0]):
    metrics_table(snakemake.input[0], snakemake.output[0])
