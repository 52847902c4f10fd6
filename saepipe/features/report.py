"""The feature-inspection page of the report: MaxAct contexts (and autointerp verdicts) as HTML.

One collapsible section per SAE, a table row per sampled feature: its top contexts with
each token shaded by the feature's activation on it (the example token boxed), then a few
random activating contexts; with autointerp, the explanation and detection accuracy.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq

from saepipe.htmlpage import write_page

STYLE = """
div.ctx { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre;
          overflow-x: hidden; text-overflow: ellipsis; margin: 1px 0; line-height: 1.5; }
div.label { color: #888; font-size: 11px; margin-top: 3px; }
span.tok { border-radius: 2px; } span.mark { outline: 1.5px solid #c0392b; }
span.act { color: #888; font-size: 11px; } span.nl { color: #aaa; }
"""


def _token_html(token: str, act: float, peak: float, marked: bool) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    text = html.escape(token).replace("\n", '<span class="nl">↵</span>').replace("\t", '<span class="nl">→</span>')
    classes = "tok mark" if marked else "tok"
    style = f' style="background: rgba(255,140,0,{alpha:.2f})"' if alpha > 0 else ""
    title = f' title="{act:.3g}"' if act > 0 else ""
    return f'<span class="{classes}"{style}{title}>{text}</span>'


def context_html(example: dict, peak: float) -> str:
    """One context line: tokens shaded by activation / the feature's peak, example boxed."""
    tokens = "".join(
        _token_html(t, a, peak, i == example["marked"])
        for i, (t, a) in enumerate(zip(example["tokens"], example["token_acts"]))
    )
    return f'<div class="ctx"><span class="act">{example["activation"]:6.2f} </span>{tokens}</div>'


def _feature_row(examples: list[dict], verdict: dict | None, n_top: int, n_random: int) -> str:
    first = examples[0]
    top = sorted((e for e in examples if e["kind"] == "top"), key=lambda e: e["rank"])
    rand = sorted((e for e in examples if e["kind"] == "random"), key=lambda e: -e["activation"])
    peak = max((e["activation"] for e in top), default=0.0)
    cells = [
        f'<td class="num">{first["feature"]}</td>',
        f'<td class="num">{"" if first["expert"] is None else first["expert"]}</td>',
        f'<td class="num">{100 * first["frequency"]:.3g}%</td>',
        f'<td class="num">{peak:.2f}</td>',
    ]
    if verdict is not None:
        acc = verdict.get("accuracy")
        cells.append(
            f"<td>{html.escape(verdict.get('explanation') or '')}</td>"
            f'<td class="num">{"unparsed" if acc is None else f"{acc:.2f}"}</td>'
        )
    shown = "".join(context_html(e, peak) for e in top[:n_top])
    if rand[:n_random]:
        shown += '<div class="label">random activating contexts:</div>' + "".join(
            context_html(e, peak) for e in rand[:n_random]
        )
    cells.append(f"<td>{shown}</td>")
    return "<tr>" + "".join(cells) + "</tr>"


def feature_report(
    maxact_parquets: list[str],
    out_html: str | Path,
    autointerp_parquets: Sequence[str] = (),
    n_top: int = 5,
    n_random: int = 2,
) -> None:
    """Write the HTML page from every SAE's maxact (and optional autointerp) parquet."""
    verdicts = {}
    for path in autointerp_parquets:
        for r in pq.read_table(path).to_pylist():
            verdicts[(r["sae_id"], r["feature"])] = r
    with_ai = bool(autointerp_parquets)
    head = ["feature", "expert", "freq.", "max act."] + (["explanation", "detection acc."] if with_ai else [])
    head.append(f"top {n_top} contexts (token shade = activation / feature max; boxed = example token)")
    sections = []
    for path in maxact_parquets:
        rows = pq.read_table(path).to_pylist()
        if not rows:
            continue
        sae_id = rows[0]["sae_id"]
        by_feature: dict[int, list[dict]] = {}
        for r in rows:
            by_feature.setdefault(r["feature"], []).append(r)
        body = "".join(
            _feature_row(ex, verdicts.get((sae_id, f)) if with_ai else None, n_top, n_random)
            for f, ex in sorted(by_feature.items())
        )
        sections.append(
            f"<details><summary>{html.escape(sae_id)} ({len(by_feature)} features)</summary>"
            f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{body}</table></details>"
        )
    note = (
        "Features sampled uniformly among those that fire on the held-out tokens; "
        "contexts from the eval shards. Activations are in the SAE's normalised units; "
        "freq. = share of tokens on which the feature fires. Click an SAE to expand it. "
        "Every example, with token ids, is in results/saes/&lt;sae&gt;/maxact.parquet."
    )
    write_page(out_html, "Top-activating contexts (MaxAct)", "".join(sections), note, STYLE)
