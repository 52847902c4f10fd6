# Aggregate every SAE's metrics into one table, then draw the report's figures.


rule aggregate:
    input:
        metrics=expand("results/saes/{sae}/metrics.json", sae=SAES),
        configs=expand("results/saes/{sae}/config.json", sae=SAES),
    output:
        "results/table.parquet",
    params:
        groups=canonical({sid: {"group": p["group"], **p["match"]} for sid, p in SAES.items()}),
        code=fingerprint("saepipe.aggregate"),
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv",
    script:
        "../workflow_scripts/aggregate.py"


rule plot_frontier:
    input:
        rules.aggregate.output,
    output:
        report(
            "results/plots/frontier.png",
            caption="../report/frontier.rst",
            category="1. Sparsity-reconstruction frontier",
        ),
    params:
        code=fingerprint("saepipe.plots.frontier"),
    log:
        "results/logs/plot_frontier.log",
    benchmark:
        "results/benchmarks/plot_frontier.tsv",
    script:
        "../workflow_scripts/plot_frontier.py"


rule plot_scaling:
    input:
        rules.aggregate.output,
    output:
        report(
            "results/plots/scaling.png",
            caption="../report/scaling.rst",
            category="2. Compute scaling",
        ),
    params:
        code=fingerprint("saepipe.plots.scaling"),
    log:
        "results/logs/plot_scaling.log",
    benchmark:
        "results/benchmarks/plot_scaling.tsv",
    script:
        "../workflow_scripts/plot_scaling.py"
