# saepipe: corpus -> lm -> activation shards -> SAEs -> metrics -> table -> plots/report.
# Run:  snakemake --cores all            (add --resources gpu=N on a GPU workstation)
# Report: snakemake --report results/report.html
import math
import os
import re
import sys

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")

# Use the saepipe of this checkout, here and in every job's script.
sys.path.insert(0, workflow.basedir)
# (set, never read: jobs inherit it, so their scripts import this checkout's saepipe too)
os.environ.update(PYTHONPATH=os.pathsep.join([workflow.basedir, os.environ.get("PYTHONPATH", "")]))
# Architectures and figures outside saepipe (config `plugins`: importable modules that call
# saepipe.saes.register_architecture or saepipe.plots.registry.register_figure): imported
# here, before the figure list is built, and by every job, which inherits SAEPIPE_PLUGINS
# (saepipe.saes imports the modules it names).
os.environ.update(SAEPIPE_PLUGINS=",".join(config.get("plugins", [])))
from saepipe.saes import load_plugins

load_plugins(config.get("plugins", []))

from saepipe.codeversion import fingerprint
from saepipe.features.autointerp import endpoint_params
from saepipe.lm import d_model
from saepipe.plots.availability import geometry_ids, row_trait, sweep_rows
from saepipe.plots.registry import figures_for
from saepipe.sweep import canonical, expand_sweep
from saepipe.train import split_runtime
from saepipe.train.packs import form_packs, pack_of, publish

# Every SAE of the sweep: id -> {"group", "sae", "train"} (see saepipe/sweep.py).
SAES = expand_sweep(config, d_in=d_model(config))  # native lm.d_model or model.d_model
# Training jobs: packs of SAEs that share one stream of batches (train.pack; saepipe/train/packs.py).
PACKS = form_packs(SAES)  # pack name -> SAE ids
PACK_OF = pack_of(PACKS)  # SAE id -> pack name
# Feature inspection (MaxAct, autointerp) reads one SAE per sweep point: its first seed.
INSPECTED = list({p["point"]: sid for sid, p in reversed(list(SAES.items()))}.values())[::-1]
MAXACT = config.get("maxact", {})
AUTOINTERP = endpoint_params(config.get("autointerp", {}))  # env overrides applied; errors early
SHARDS = {
    split: [
        f"{i:03d}" for i in range(math.ceil(config["extract"][f"{split}_tokens"] / config["extract"]["shard_tokens"]))
    ]
    for split in ("train", "eval")
}

# Figures adapt to the sweep: a registered figure (saepipe/plots/registry.py, plugins) is built,
# with its rule plot_<name> (rules/report.smk), only where it `applies` to the sweep's SAEs
# and the optional stage it reads (autointerp) is on.
FIGURES_TO_BUILD = figures_for(sweep_rows(SAES), autointerp=AUTOINTERP["enabled"])
FIGURES = [fig.output for fig in FIGURES_TO_BUILD]
FIGURES += ["results/plots/metrics.html", "results/plots/features.html"]


report: "report/workflow.rst"


wildcard_constraints:
    split="train|eval",
    shard=r"\d{3}",
    sae="|".join(sorted(SAES, key=len, reverse=True)),
    pack="|".join(re.escape(name) for name in sorted(PACKS, key=len, reverse=True)),


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/sae.smk"
include: "rules/report.smk"
include: "rules/features.smk"
include: "rules/verdicts.smk"
include: "rules/export.smk"
include: "rules/saebench.smk"


rule all:
    input:
        "results/table.parquet",
        "results/verdicts.json",
        "results/plots/verdicts.html",
        FIGURES,
        expand(rules.export_saelens.output, sae=SAELENS_EXPORTS)
        if config.get("export", {}).get("saelens", True)
        else [],
        expand(rules.export_saebench.output.json, sae=SAES) if config.get("export", {}).get("saebench", True) else [],
