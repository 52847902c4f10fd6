"""Snakemake adapter: the rules plot_<figure> -> saepipe.plots.moe.plot_<figure>."""
from pathlib import Path

from saepipe.io import log_to
from saepipe.plots import moe

figure = snakemake.rule.removeprefix("plot_")  # noqa: F821 - injected by Snakemake
logs = {Path(p).parent.name: p for p in snakemake.input.get("logs", [])}  # noqa: F821
table = snakemake.input.get("table", snakemake.input[0])  # noqa: F821
args = {"expert_load": (logs,), "omega": (table, logs)}.get(figure, (table,))
with log_to(snakemake.log[0]):  # noqa: F821
    getattr(moe, f"plot_{figure}")(*args, snakemake.output[0])  # noqa: F821
