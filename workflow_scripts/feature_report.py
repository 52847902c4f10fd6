"""Snakemake adapter: rule feature_report -> saepipe.features.report.feature_report."""

from saepipe.features.report import feature_report
from saepipe.io import log_to

with log_to(snakemake.log[0]):
    feature_report(list(snakemake.input.maxact), snakemake.output[0], list(snakemake.input.autointerp))
