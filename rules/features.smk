# Feature inspection: MaxAct contexts per SAE, optional LLM autointerp, one HTML page. (The
# autointerp figure is a registered figure, saepipe/plots/registry.py, drawn by rules/report.smk.)


rule maxact:
    input:
        weights=rules.publish.output.weights,
        config=rules.publish.output.config,
        tokenizer="results/lm/tokenizer.json",
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
    output:
        "results/saes/{sae}/maxact.parquet",
    log:
        "results/logs/maxact/{sae}.log",
    benchmark:
        "results/benchmarks/maxact/{sae}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
    params:
        cfg=canonical(MAXACT),
        code=fingerprint("saepipe.features.maxact"),
    script:
        "../workflow_scripts/maxact.py"


rule autointerp:
    input:
        rules.maxact.output,
    output:
        table="results/saes/{sae}/autointerp.parquet",
        summary="results/saes/{sae}/autointerp.json",
    log:
        "results/logs/autointerp/{sae}.log",
    benchmark:
        "results/benchmarks/autointerp/{sae}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    params:
        cfg=canonical(AUTOINTERP),  # resolved endpoint and model, never the API key
        code=fingerprint("saepipe.features.autointerp"),
    script:
        "../workflow_scripts/autointerp.py"


rule feature_report:
    input:
        maxact=expand("results/saes/{sae}/maxact.parquet", sae=INSPECTED),  # first seed of each point
        autointerp=expand("results/saes/{sae}/autointerp.parquet", sae=INSPECTED) if AUTOINTERP["enabled"] else [],
    output:
        report("results/plots/features.html", caption="../report/features.rst", category="5. Feature inspection"),
    log:
        "results/logs/feature_report.log",
    conda:
        "../envs/saepipe.yaml"
    params:
        code=fingerprint("saepipe.features.report"),
    script:
        "../workflow_scripts/feature_report.py"
