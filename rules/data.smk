# Data stages: corpus -> language model -> activation shards (one job per shard).
# `model.source: pretrained` (optional `model:` section): the corpus uses the model's own
# tokenizer and the `lm` rule trains nothing; it only checks the model and writes its
# descriptor (results/lm/model.json) and tokenizer files, the model directory of every
# later stage (see saepipe/lm.py).

from dataclasses import asdict
from pathlib import Path

from saepipe.data.corpus import local_dataset_files
from saepipe.lm import check_native_config, model_config

MODEL = model_config(config)
PRETRAINED = MODEL.source == "pretrained"
if not PRETRAINED and "lm" not in config:
    raise ValueError(
        "config.yaml has no `lm` section: the default native model needs one " "(or set model.source: pretrained)"
    )
if not PRETRAINED:  # before any job: lm.n_heads divides lm.d_model, extract.hook exists in the model
    check_native_config(config["lm"], config["extract"]["hook"])
# A pretrained model in a local directory: its files are inputs, so new weights (or a new
# tokenizer) rerun what depends on them. Hub models are pinned by model.revision instead.
MODEL_FILES = (
    sorted(str(p) for p in Path(MODEL.name_or_path).iterdir() if p.is_file())
    if PRETRAINED and Path(MODEL.name_or_path).is_dir()
    else []
)
TOKENIZER_FILES = [f for f in MODEL_FILES if "token" in Path(f).name or Path(f).name in ("vocab.json", "merges.txt")]
# Local dataset files (corpus.source: dataset) are inputs of the corpus too.
_LOCAL_DATA = (
    local_dataset_files(config["corpus"]["dataset"]["path"]) if config["corpus"]["source"] == "dataset" else None
)
DATASET_FILES = _LOCAL_DATA[1] if _LOCAL_DATA else []


rule corpus:
    input:
        TOKENIZER_FILES,
        DATASET_FILES,
    output:
        train="results/corpus/train.npy",
        eval="results/corpus/eval.npy",
        tokenizer="results/corpus/tokenizer.json",
        stats="results/corpus/corpus.json",
    log:
        "results/logs/corpus.log",
    benchmark:
        "results/benchmarks/corpus.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 8  # capped by --cores
    resources:
        mem_mb=2000,
    params:
        cfg=canonical(config["corpus"]),
        tokenizer=canonical({"name_or_path": MODEL.name_or_path, "revision": MODEL.revision} if PRETRAINED else None),
        code=fingerprint("saepipe.data.corpus"),
    script:
        "../workflow_scripts/corpus.py"


if not PRETRAINED:

    rule lm:
        input:
            rules.corpus.output,
        output:
            weights="results/lm/model.safetensors",
            info="results/lm/model.json",
            tokenizer="results/lm/tokenizer.json",
        log:
            "results/logs/lm.log",
        benchmark:
            "results/benchmarks/lm.tsv"
        conda:
            "../envs/saepipe.yaml"
        threads: 8  # capped by --cores
        resources:
            mem_mb=3000,
        params:
            cfg=canonical(config["lm"]),
            model=canonical(None),
            code=fingerprint("saepipe.lm"),
        script:
            "../workflow_scripts/lm.py"

else:

    rule lm:  # pretrained: no training; `weights` is the descriptor later rules depend on
        input:
            MODEL_FILES,
        output:
            weights="results/lm/model.json",
            tokenizer="results/lm/tokenizer.json",
        log:
            "results/logs/lm.log",
        benchmark:
            "results/benchmarks/lm.tsv"
        conda:
            "../envs/saepipe.yaml"
        threads: 8
        resources:
            mem_mb=3000,
        params:
            cfg=canonical(None),
            model=canonical(asdict(MODEL)),
            code=fingerprint("saepipe.lm"),
        script:
            "../workflow_scripts/lm.py"


rule extract:
    input:
        model=rules.lm.output.weights,
        corpus=rules.corpus.output.stats,
        tokens="results/corpus/{split}.npy",
    output:
        directory("results/activations/{split}/{shard}.zarr"),
    log:
        "results/logs/extract/{split}-{shard}.log",
    benchmark:
        "results/benchmarks/extract/{split}-{shard}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
    params:
        cfg=lambda wc: extract_slice(wc.split),
        code=fingerprint("saepipe.extract"),
    script:
        "../workflow_scripts/extract.py"
