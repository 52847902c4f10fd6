# Verdicts on the papers' claims (docs/reference.md §6) from the table: results/verdicts.json, the report's
# first page, and the summary fragment shown on the report's landing page (report/workflow.rst).
from saepipe.verdicts import VerdictConfig


rule verdicts:
    input:
        table="results/table.parquet",
    output:
        json="results/verdicts.json",
        html=report("results/plots/verdicts.html", caption="../report/verdicts.rst", category="0. Claim verdicts"),
        # sorts first: the report's first category
        summary="results/plots/verdicts_summary.html",
    log:
        "results/logs/verdicts.log",
    conda:
        "../envs/saepipe.yaml"
    params:
        thresholds=canonical(VerdictConfig.from_config(config).to_dict()),  # config errors stop the parse
        code=fingerprint("saepipe.verdicts"),
    script:
        "../workflow_scripts/verdicts.py"
