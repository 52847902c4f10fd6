"""Self-contained HTML pages for the Snakemake report (tables a PNG would render badly)."""

from __future__ import annotations

import html
from pathlib import Path

from saepipe.io import atomic_path

STYLE = """
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 1em; color: #222; }
h1 { font-size: 18px; } summary { font-size: 14px; font-weight: 600; cursor: pointer; margin: .6em 0; }
table { border-collapse: collapse; width: 100%; margin-bottom: 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; width: 1%; }
p.note { color: #555; max-width: 60em; }
"""


def write_page(out_html: str | Path, title: str, body: str, note: str = "", style: str = "") -> None:
    """An HTML page: `title` as heading, an optional explanatory note, then `body` (HTML)."""
    note_html = f"<p class='note'>{note}</p>" if note else ""
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>saepipe: {html.escape(title)}</title>"
        f"<style>{STYLE}{style}</style></head><body><h1>{html.escape(title)}</h1>{note_html}{body}</body></html>"
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
