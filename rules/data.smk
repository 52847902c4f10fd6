# Data stages: corpus -> language model -> activation shards (one job per shard).


def extract_slice(split):
    """The part of config["extract"] that one split's shards depend on."""
    cfg = dict(config["extract"])
    other = "eval" if split == "train" else "train"
    cfg.pop(f"{other}_tokens")
    return canonical(cfg)


rule corpus:
    output:
        train="results/corpus/train.npy",
        eval="results/corpus/eval.npy",
        tokenizer="results/corpus/tokenizer.json",
        stats="results/corpus/corpus.json",
    params:
        cfg=canonical(config["corpus"]),
        code=fingerprint("saepipe.data.corpus"),
    threads: 8  # capped by --cores
    resources:
        mem_mb=2000,
    log:
        "results/logs/corpus.log",
    benchmark:
        "results/benchmarks/corpus.tsv",
    script:
        "../workflow_scripts/corpus.py"


rule lm:
    input:
        rules.corpus.output,
    output:
        weights="results/lm/model.safetensors",
        info="results/lm/model.json",
        tokenizer="results/lm/tokenizer.json",
    params:
        cfg=canonical(config["lm"]),
        code=fingerprint("saepipe.lm"),
    threads: 8  # capped by --cores
    resources:
        mem_mb=3000,
    log:
        "results/logs/lm.log",
    benchmark:
        "results/benchmarks/lm.tsv",
    script:
        "../workflow_scripts/lm.py"


rule extract:
    input:
        model=rules.lm.output.weights,
        info=rules.lm.output.info,
        corpus=rules.corpus.output.stats,
        tokens="results/corpus/{split}.npy",
    output:
        directory("results/activations/{split}/{shard}.zarr"),
    params:
        cfg=lambda wc: extract_slice(wc.split),
        code=fingerprint("saepipe.extract"),
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
    log:
        "results/logs/extract/{split}-{shard}.log",
    benchmark:
        "results/benchmarks/extract/{split}-{shard}.tsv",
    script:
        "../workflow_scripts/extract.py"
