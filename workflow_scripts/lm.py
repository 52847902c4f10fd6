"""Snakemake adapter: rule lm -> saepipe.lm.train_lm (native model) or
saepipe.lm.prepare_pretrained (model.source: pretrained, nothing trained)."""

import json
from pathlib import Path

from saepipe.devices import set_threads
from saepipe.io import log_to
from saepipe.lm import LMConfig, ModelConfig, prepare_pretrained, train_lm

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    model_dir = Path(snakemake.output.weights).parent
    pretrained = json.loads(snakemake.params.model)
    if pretrained is not None:
        prepare_pretrained(ModelConfig(**pretrained), model_dir)
    else:
        train_lm(LMConfig(**json.loads(snakemake.params.cfg)), Path(snakemake.input[0]).parent, model_dir)
