"""Snakemake adapter: every rule plot_<name> -> the drawing function of figure <name> in
saepipe.plots.registry (called with the rule's named inputs, see Figure.draw)."""

import saepipe.saes  # noqa: F401 - first: imports the plugin modules ($SAEPIPE_PLUGINS), their figures too
from saepipe.io import log_to
from saepipe.plots.registry import figure

with log_to(snakemake.log[0]):
    figure(snakemake.params.figure).draw(snakemake.input, snakemake.output[0])
