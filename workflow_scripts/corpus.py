"""Snakemake adapter: rule corpus -> saepipe.data.corpus.build_corpus."""

import json
from pathlib import Path

from saepipe.data.corpus import CorpusConfig, build_corpus
from saepipe.io import log_to

with log_to(snakemake.log[0]):
    tokenizer = json.loads(snakemake.params.tokenizer) or {}  # the pretrained model's, if any
    build_corpus(
        CorpusConfig(**json.loads(snakemake.params.cfg)),
        Path(snakemake.output.stats).parent,
        pretrained_tokenizer=tokenizer.get("name_or_path"),
        revision=tokenizer.get("revision"),
    )
