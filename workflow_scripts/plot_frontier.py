"""Snakemake adapter: rule plot_frontier -> saepipe.plots.frontier.plot_frontier."""
from saepipe.io import log_to
from saepipe.plots.frontier import plot_frontier

with log_to(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    plot_frontier(snakemake.input[0], snakemake.output[0])
