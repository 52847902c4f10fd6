"""Snakemake adapter: rule verdicts -> saepipe.verdicts (table -> verdicts.json, report page, summary)."""

import json
import sys

from saepipe.io import log_to
from saepipe.verdicts import VerdictConfig, format_table, read_table_rows, verdicts, write_outputs

with log_to(snakemake.log[0]):
    cfg = VerdictConfig(**json.loads(snakemake.params.thresholds))
    result = verdicts(read_table_rows(snakemake.input.table), cfg)
    write_outputs(result, snakemake.output.json, snakemake.output.html, snakemake.output.summary)
    print(format_table(result), file=sys.stderr)  # the table, in the log too
