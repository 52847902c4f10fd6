# SAE stages: train the SAEs one pack at a time (train.pack, saepipe/train/packs.py; a pack
# of one by default), publish each into results/saes/<id>/, evaluate it on the held-out shards.


rule train:
    input:
        shards=expand("results/activations/train/{shard}.zarr", shard=SHARDS["train"]),
    output:
        pack="results/packs/{pack}/pack.json",
    log:
        "results/logs/train/{pack}.log",
    benchmark:
        "results/benchmarks/train/{pack}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=pack_mem_mb,
    params:
        saes=pack_saes,
        train=pack_train,  # runtime fields: from config
        code=fingerprint("saepipe.train"),
    script:
        "../workflow_scripts/train.py"


rule publish:
    input:
        pack_manifest,
    output:
        weights="results/saes/{sae}/sae.safetensors",
        config="results/saes/{sae}/config.json",
        log="results/saes/{sae}/train_log.jsonl",
    log:
        "results/logs/publish/{sae}.log",
    localrule: True
    run:
        publish(os.path.dirname(input[0]), wildcards.sae, os.path.dirname(output.weights))


rule lm_baseline:
    input:
        model=rules.lm.output.weights,
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
    output:
        baseline="results/eval/lm_baseline.json",
        # the clean logits for every evaluate job's KL: float32, up to
        # evaluate.clean_logits_max_gb (0.8 GB at the default config), else an empty array
        clean_logits="results/eval/clean_logits.npy",
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
        weights=rules.publish.output.weights,
        config=rules.publish.output.config,
        model=rules.lm.output.weights,
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
        baseline=rules.lm_baseline.output.baseline,
        clean_logits=rules.lm_baseline.output.clean_logits,
    output:
        metrics="results/saes/{sae}/metrics.json",
        latent_stats="results/saes/{sae}/latent_stats.safetensors",
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
