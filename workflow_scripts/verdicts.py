"""Snakemake adapter: rule verdicts -> saepipe.verdicts (table -> verdicts.json, report page, summary)."""
import json
import sys

from saepipe.io import log_to
from saepipe.verdicts import VerdictConfig, format_table, read_table_rows, verdicts, write_outputs

with log_to(snakemake.log[0]):  # noqa: F821 - injected by Snakemake
    cfg = VerdictConfig(**json.loads(snakemake.params.thresholds))  # noqa: F821
    result = verdicts(read_table_rows(snakemake.input.table), cfg)  # noqa: F821
    write_outputs(result, snakemake.output.json, snakemake.output.html, snakemake.output.summary)  # noqa: F821
    print(format_table(result), file=sys.stderr)  # the table, in the log too
