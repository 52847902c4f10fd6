"""Snakemake adapter: rule plot_scaling -> saepipe.plots.scaling.plot_scaling."""
from saepipe.io import log_to
from saepipe.plots.scaling import plot_scaling

with log_to(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    plot_scaling(snakemake.input[0], snakemake.output[0])
