"""The report's metrics page: every SAE's scalar metrics (docs/reference.md §3) in one HTML table.

Rows follow the sweep (grouped by group, then k); a column is shown when at least one SAE
has a value. Per-expert lists (counts, CDF, omega) are in the figures and the parquet.
"""

from __future__ import annotations

import html
import math

import pyarrow.parquet as pq

from saepipe.htmlpage import write_page

# column -> (header, format); the order of the page
COLUMNS = {
    "arch": ("arch", "{}"),
    "width": ("M", "{:,}"),
    "k": ("k", "{}"),
    "n_experts": ("N", "{}"),
    "active_experts": ("e", "{}"),
    "feature_scaling": ("feat. scaling", "{}"),
    "l0": ("L0", "{:.1f}"),
    "mse": ("MSE", "{:.4g}"),
    "l2_per_token": ("l2/token", "{:.4g}"),
    "fvu": ("FVU", "{:.4f}"),
    "cossim": ("cos(x, x̂)", "{:.4f}"),
    "l2_ratio": ("‖x̂‖/‖x‖", "{:.4f}"),
    "relative_reconstruction_bias": ("rel. recon. bias", "{:.4f}"),
    "dead_fraction": ("dead", "{:.1%}"),
    "ce_loss_original": ("CE clean", "{:.4f}"),
    "ce_loss_reconstructed": ("CE recon.", "{:.4f}"),
    "ce_loss_zero": ("CE zero-abl.", "{:.4f}"),
    "loss_recovered": ("loss recovered", "{:.4f}"),
    "delta_ce": ("ΔCE", "{:.4f}"),
    "kl_div_reconstructed": ("KL recon.", "{:.4g}"),
    "kl_div_zero": ("KL zero-abl.", "{:.4g}"),
    "kl_div_score": ("KL score", "{:.4f}"),
    "redundancy_09": ("redund. >0.9", "{:.2%}"),
    "redundancy_08": ("redund. >0.8", "{:.2%}"),
    "mean_max_cos": ("mean max cos", "{:.3f}"),
    "intra_expert_redundancy": ("intra-expert red.", "{:.2%}"),
    "inter_expert_redundancy": ("inter-expert red.", "{:.2%}"),
    "activation_similarity": ("act. similarity", "{:.4f}"),
    "expert_entropy_normalised": ("routing entropy", "{:.3f}"),
    "omega_mean": ("mean ω", "{:.3f}"),
    "flops_per_token": ("FLOPs/token", "{:,}"),
    "train_tokens_per_s": ("train tok/s", "{:,.0f}"),
    "wall_time_s": ("train s", "{:.0f}"),
    "autointerp_accuracy": ("autointerp acc.", "{:.3f}"),
}


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td></td>"
    css = "num" if isinstance(value, (int, float)) and not isinstance(value, bool) else "txt"
    return f"<td class='{css}'>{html.escape(fmt.format(value))}</td>"


def metrics_table(table_parquet: str, out_html: str) -> None:
    rows = pq.read_table(table_parquet).to_pylist()
    for r in rows:
        omega = r.get("omega")
        r["omega_mean"] = sum(omega) / len(omega) if omega and r.get("feature_scaling") else None
    rows.sort(key=lambda r: (str(r["group"]), r.get("k") or 0, r["sae_id"]))
    shown = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    head = "<th>SAE</th>" + "".join(f"<th>{html.escape(COLUMNS[c][0])}</th>" for c in shown)
    body = "".join(
        "<tr><td>"
        + html.escape(r["sae_id"])
        + "</td>"
        + "".join(_cell(r.get(c), COLUMNS[c][1]) for c in shown)
        + "</tr>"
        for r in rows
    )
    n_tokens = {r.get("n_tokens") for r in rows}
    note = (
        f"Held-out tokens: {', '.join(f'{n:,}' for n in sorted(t for t in n_tokens if t))} for the "
        f"reconstruction metrics, {rows[0].get('ce_tokens', 0):,} for the CE losses. "
        "Units: raw activations of the hook. Loss recovered = (CE zero-abl. − CE recon.) / "
        "(CE zero-abl. − CE clean). KL recon. / KL zero-abl.: mean over the same next-token "
        "predictions of KL(p_clean ‖ p) with the reconstruction / zeros spliced in at the hook "
        "(excluded positions clean); KL score = 1 − KL recon. / KL zero-abl. (SAEBench). "
        "cos(x, x̂) and ‖x̂‖/‖x‖: per held-out token, averaged (‖x̂‖/‖x‖ &lt; 1: shrinkage). "
        "Rel. recon. bias: γ = E‖x̂‖² / E[x̂·x], the scale minimising E‖x̂/γ − x‖² "
        "(Rajamanoharan et al. 2024; 1 = unbiased, &lt; 1 = shrinkage). Redundancy: share of decoder "
        "rows with cosine above the threshold to another row. FLOPs/token: forward pass. Everything is in "
        "results/table.parquet."
    )
    write_page(
        out_html,
        "Metrics of every SAE",
        f"<table><tr>{head}</tr>{body}</table>",
        note,
        "table { width: auto; } td, th { font-size: 12px; white-space: nowrap; }",
    )
