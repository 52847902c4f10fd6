"""Snakemake adapter: the rules plot_<figure> -> saepipe.plots.<module>.plot_<figure>."""
import importlib
from pathlib import Path

from saepipe.io import log_to

MODULE = {"expert_usage": "experts", "expert_load": "experts", "redundancy": "redundancy",
          "activation_similarity": "redundancy", "omega": "omega"}

figure = snakemake.rule.removeprefix("plot_")  # noqa: F821 - injected by Snakemake
logs = {Path(p).parent.name: p for p in snakemake.input.get("logs", [])}  # noqa: F821
table = snakemake.input.get("table", snakemake.input[0])  # noqa: F821
args = {"expert_load": (logs,), "omega": (table, logs)}.get(figure, (table,))
with log_to(snakemake.log[0]):  # noqa: F821
    plot = getattr(importlib.import_module(f"saepipe.plots.{MODULE[figure]}"), f"plot_{figure}")
    plot(*args, snakemake.output[0])  # noqa: F821
