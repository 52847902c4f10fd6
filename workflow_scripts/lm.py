"""Snakemake adapter: rule lm -> saepipe.lm.train_lm."""
import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.io import log_to
from saepipe.lm import LMConfig, train_lm

with log_to(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    set_threads(snakemake.threads)
    train_lm(LMConfig(**json.loads(snakemake.params.cfg)),
             Path(snakemake.input[0]).parent, Path(snakemake.output.weights).parent)
