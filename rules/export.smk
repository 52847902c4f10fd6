# Export: every SAE whose architecture has a SAELens mapping (its SAELENS_ARCH trait) as a
# SAELens 6.x directory, results/export/saelens/<id>/ (saepipe/interop/export.py). In
# `rule all` when config `export.saelens` is true (the default). A local job in Snakemake's
# own process: it folds the saved weights and reads the evaluate stage's firing counts
# (latent_stats.safetensors), no LM and no pass over the shards, so a job of its own would
# cost more in process start-up than the work.

from os.path import dirname

from saepipe.interop.export import export_saelens, saelens_arch

SAELENS_EXPORTS = [sid for sid in SAES if saelens_arch(SAES[sid]["sae"]["arch"]) is not None]


rule export_saelens:
    input:
        weights=rules.publish.output.weights,
        config=rules.publish.output.config,
        metrics=rules.evaluate.output.metrics,
        latent_stats=rules.evaluate.output.latent_stats,
        shards=expand("results/activations/eval/{shard}.zarr", shard=SHARDS["eval"]),
    output:
        cfg="results/export/saelens/{sae}/cfg.json",
        weights="results/export/saelens/{sae}/sae_weights.safetensors",
        sparsity="results/export/saelens/{sae}/sparsity.safetensors",
        card="results/export/saelens/{sae}/README.md",
    log:
        "results/logs/export/{sae}.log",
    localrule: True
    params:
        code=fingerprint("saepipe.interop.export"),
    run:
        export_saelens(
            dirname(input.weights),
            input.shards,
            dirname(output.cfg),
            input.metrics,
            input.latent_stats,
            device="cpu",
            log_path=log[0],
        )
