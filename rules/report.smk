# Aggregate every SAE's metrics into one table, then draw the report's figures.


rule aggregate:
    input:
        metrics=expand("results/saes/{sae}/metrics.json", sae=SAES),
        configs=expand("results/saes/{sae}/config.json", sae=SAES),
        extra=expand("results/saes/{sae}/autointerp.json", sae=INSPECTED) if AUTOINTERP["enabled"] else [],
    output:
        "results/table.parquet",
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv"
    conda:
        "../envs/saepipe.yaml"
    params:
        groups=canonical({sid: {"group": p["group"], "point": p["point"], **p["match"]} for sid, p in SAES.items()}),
        code=fingerprint("saepipe.aggregate"),
    script:
        "../workflow_scripts/aggregate.py"


rule metrics_table:
    input:
        rules.aggregate.output,
    output:
        report("results/plots/metrics.html", caption="../report/metrics.rst", category="0. Metrics"),
    log:
        "results/logs/metrics_table.log",
    conda:
        "../envs/saepipe.yaml"
    params:
        code=fingerprint("saepipe.plots.metrics_table"),
    script:
        "../workflow_scripts/metrics_table.py"


# One rule per figure the sweep has (saepipe/plots/registry.py; FIGURES_TO_BUILD, Snakefile):
# plot_<name> -> results/plots/<name>.png, drawn by the figure's function (workflow_scripts/plot.py).
for fig in FIGURES_TO_BUILD:

    rule:
        name:
            f"plot_{fig.name}"
        input:
            **figure_inputs(fig, rules.aggregate.output),
        output:
            report(fig.output, caption=fig.caption_path(workflow.basedir), category=fig.category),
        log:
            f"results/logs/plot_{fig.name}.log",
        benchmark:
            f"results/benchmarks/plot_{fig.name}.tsv"
        conda:
            "../envs/saepipe.yaml"
        params:
            figure=fig.name,
            code=fig.code(),
        script:
            "../workflow_scripts/plot.py"
