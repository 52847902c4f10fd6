# Export: every SAE whose architecture has a SAELens mapping (its SAELENS_ARCH trait) as a
# SAELens 6.x directory, results/export/saelens/<id>/ (saepipe/interop/export.py). In
# `rule all` when config `export.saelens` is true (the default).

from saepipe.interop.export import saelens_arch

SAELENS_EXPORTS = [sid for sid in SAES if saelens_arch(SAES[sid]["sae"]["arch"]) is not None]


rule export_saelens:
    input:
        weights=rules.publish.output.weights,
        config=rules.publish.output.config,
        metrics=rules.evaluate.output[0],
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
    output:
        cfg="results/export/saelens/{sae}/cfg.json",
        weights="results/export/saelens/{sae}/sae_weights.safetensors",
        sparsity="results/export/saelens/{sae}/sparsity.safetensors",
        card="results/export/saelens/{sae}/README.md",
    log:
        "results/logs/export/{sae}.log",
    benchmark:
        "results/benchmarks/export/{sae}.tsv"
    conda:
        "../envs/saepipe.yaml"
    threads: 1
    resources:
        gpu=1,
        mem_mb=2000,
    params:
        code=fingerprint("saepipe.interop.export"),
    script:
        "../workflow_scripts/export.py"
