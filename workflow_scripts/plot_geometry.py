"""Snakemake adapter: rules plot_feature_geometry / plot_tsne -> saepipe.plots.geometry."""
from pathlib import Path

from saepipe.io import log_to
from saepipe.plots.geometry import plot_feature_geometry, plot_tsne

sae_dirs = [str(Path(p).parent) for p in snakemake.input]  # noqa: F821 - injected by Snakemake
with log_to(snakemake.log[0]):  # noqa: F821
    if snakemake.rule == "plot_tsne":  # noqa: F821
        plot_tsne(sae_dirs[0], snakemake.output[0])  # noqa: F821
    else:
        plot_feature_geometry(sae_dirs, snakemake.output[0])  # noqa: F821
