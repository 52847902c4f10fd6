# SAE stages: train one SAE per sweep point, evaluate it on the held-out shards.


rule train:
    input:
        shards=expand("results/activations/train/{shard}.zarr", shard=SHARDS["train"]),
    output:
        weights="results/saes/{sae}/sae.safetensors",
        config="results/saes/{sae}/config.json",
        log="results/saes/{sae}/train_log.jsonl",
    log:
        "results/logs/train/{sae}.log",
    benchmark:
        "results/benchmarks/train/{sae}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=3000,
    params:
        sae=lambda wc: canonical(SAES[wc.sae]["sae"]),
        train=lambda wc: canonical(split_runtime(SAES[wc.sae]["train"])[0]),  # runtime fields: from config
        code=fingerprint("saepipe.train"),
    script:
        "../workflow_scripts/train.py"


rule lm_baseline:
    input:
        model=rules.lm.output.weights,
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
    output:
        "results/eval/lm_baseline.json",
    log:
        "results/logs/lm_baseline.log",
    benchmark:
        "results/benchmarks/lm_baseline.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
    params:
        cfg=canonical(config["evaluate"]),
        code=fingerprint("saepipe.evaluate.metrics"),
    script:
        "../workflow_scripts/lm_baseline.py"


rule evaluate:
    input:
        weights=rules.train.output.weights,
        config=rules.train.output.config,
        model=rules.lm.output.weights,
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
        baseline=rules.lm_baseline.output[0],
    output:
        "results/saes/{sae}/metrics.json",
    log:
        "results/logs/evaluate/{sae}.log",
    benchmark:
        "results/benchmarks/evaluate/{sae}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
    params:
        cfg=canonical(config["evaluate"]),
        code=fingerprint("saepipe.evaluate.metrics"),
    script:
        "../workflow_scripts/evaluate.py"
