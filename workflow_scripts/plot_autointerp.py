"""Snakemake adapter: rule plot_autointerp -> saepipe.plots.autointerp.plot_autointerp."""

from saepipe.io import log_to
from saepipe.plots.autointerp import plot_autointerp

with log_to(snakemake.log[0]):
    plot_autointerp(snakemake.input.table[0], list(snakemake.input.verdicts), snakemake.output[0])
