# Aggregate every SAE's metrics into one table, then draw the report's figures.


rule aggregate:
    input:
        metrics=expand("results/saes/{sae}/metrics.json", sae=SAES),
        configs=expand("results/saes/{sae}/config.json", sae=SAES),
        extra=expand("results/saes/{sae}/autointerp.json", sae=INSPECTED) if AUTOINTERP["enabled"] else [],
    output:
        "results/table.parquet",
    params:
        groups=canonical({sid: {"group": p["group"], "point": p["point"], **p["match"]} for sid, p in SAES.items()}),
        code=fingerprint("saepipe.aggregate"),
    log:
        "results/logs/aggregate.log",
    benchmark:
        "results/benchmarks/aggregate.tsv",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/aggregate.py"


rule metrics_table:
    input:
        rules.aggregate.output,
    output:
        report("results/plots/metrics.html", caption="../report/metrics.rst", category="0. Metrics"),
    params:
        code=fingerprint("saepipe.plots.metrics_table"),
    log:
        "results/logs/metrics_table.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/metrics_table.py"


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
    conda:
        "../envs/saepipe.yaml"
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
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_scaling.py"


rule plot_redundancy:
    input:
        rules.aggregate.output,
    output:
        report("results/plots/redundancy.png", caption="../report/redundancy.rst",
               category="3. Feature geometry"),
    params:
        code=fingerprint("saepipe.plots.redundancy"),
    log:
        "results/logs/plot_redundancy.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_moe.py"


rule plot_activation_similarity:
    input:
        rules.aggregate.output,
    output:
        report("results/plots/activation_similarity.png", caption="../report/activation_similarity.rst",
               category="3. Feature geometry"),
    params:
        code=fingerprint("saepipe.plots.redundancy"),
    log:
        "results/logs/plot_activation_similarity.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_moe.py"


rule plot_expert_usage:
    input:
        rules.aggregate.output,
    output:
        report("results/plots/expert_usage.png", caption="../report/expert_usage.rst",
               category="4. Experts"),
    params:
        code=fingerprint("saepipe.plots.experts"),
    log:
        "results/logs/plot_expert_usage.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_moe.py"


rule plot_expert_load:
    input:
        logs=moe_logs(),
    output:
        report("results/plots/expert_load.png", caption="../report/expert_load.rst",
               category="4. Experts"),
    params:
        code=fingerprint("saepipe.plots.experts"),
    log:
        "results/logs/plot_expert_load.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_moe.py"


rule plot_omega:
    input:
        table=rules.aggregate.output,
        logs=moe_logs("has_omega"),
    output:
        report("results/plots/omega.png", caption="../report/omega.rst", category="4. Experts"),
    params:
        code=fingerprint("saepipe.plots.omega"),
    log:
        "results/logs/plot_omega.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_moe.py"


rule plot_feature_geometry:
    input:
        geometry_inputs,
    output:
        report("results/plots/feature_geometry.png", caption="../report/feature_geometry.rst",
               category="3. Feature geometry"),
    params:
        code=fingerprint("saepipe.plots.geometry"),
    log:
        "results/logs/plot_feature_geometry.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_geometry.py"


rule plot_tsne:
    input:
        lambda wc: geometry_inputs(wc)[:1],
    output:
        report("results/plots/tsne.png", caption="../report/tsne.rst", category="3. Feature geometry"),
    params:
        code=fingerprint("saepipe.plots.geometry"),
    log:
        "results/logs/plot_tsne.log",
    conda:
        "../envs/saepipe.yaml"
    script:
        "../workflow_scripts/plot_geometry.py"
