# SAEBench: every SAE's core results in SAEBench 0.6.0's output format,
# results/saebench/core/<id>_eval_results.json (saepipe/interop/saebench.py), built from the
# evaluate stage's metrics.json and latent statistics and the SAE's weights: no LM, no shards,
# so a local job in Snakemake's own process. In `rule all` when config `export.saebench` is
# true (the default).

from saepipe.evaluate.metrics import EvalConfig
from saepipe.interop.saebench import write_saebench


rule export_saebench:
    input:
        weights=rules.publish.output.weights,
        config=rules.publish.output.config,
        metrics=rules.evaluate.output.metrics,
        latent_stats=rules.evaluate.output.latent_stats,
        corpus=rules.corpus.output.stats,
        baseline=rules.lm_baseline.output.baseline,
    output:
        json="results/saebench/core/{sae}_eval_results.json",
    log:
        "results/logs/saebench/{sae}.log",
    localrule: True
    conda:
        "../envs/saepipe.yaml"
    params:
        batch_size_prompts=EvalConfig(**config["evaluate"]).ce_batch_size,  # sequences per CE/KL forward
        llm_dtype=MODEL.dtype,
        code=fingerprint("saepipe.interop.saebench"),
    run:
        write_saebench(
            sae_dir=os.path.dirname(input.weights),
            out_json=output.json,
            corpus_json=input.corpus,
            baseline_json=input.baseline,
            batch_size_prompts=params.batch_size_prompts,
            llm_dtype=params.llm_dtype,
            metrics_json=input.metrics,
            latent_stats=input.latent_stats,
            log=log[0],
        )
