"""A toy figure registered from outside saepipe (the plugin path; tests/test_toy_figure.py).

Everything a new figure needs is this one module (with its caption, toy_figure.rst, next to
it): a drawing function and one ``register_figure`` call. The pipeline finds it through the
config's ``plugins: [toy_figure]`` (this directory on PYTHONPATH), builds
results/plots/toy_l0.png with rule plot_toy_l0 wherever the sweep has a fixed-L0 SAE, and
lists it in the report.
"""

from __future__ import annotations

from pathlib import Path

from saepipe.plots.availability import row_trait
from saepipe.plots.registry import register_figure


def plot_toy_l0(table_parquet: str, out_png: str) -> None:
    """Bar chart of the measured L0 of every fixed-L0 SAE of the table, against its k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    rows = sorted(
        (r for r in pq.read_table(table_parquet).to_pylist() if row_trait(r, "l0_fixed")), key=lambda r: r["sae_id"]
    )
    if not rows:
        raise ValueError(f"{table_parquet} has no fixed-L0 SAE; the toy figure applies only to sweeps with one")
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(rows), 3))
    ax.bar([r["sae_id"] for r in rows], [r["l0"] for r in rows], label="measured L0")
    ax.scatter([r["sae_id"] for r in rows], [r["k"] for r in rows], color="k", marker="_", s=200, label="k")
    ax.set_ylabel("L0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


register_figure(
    "toy_l0",
    f"{__name__}.plot_toy_l0",
    ["table"],
    str(Path(__file__).with_name("toy_figure.rst")),
    "6. Toy",
    applies=lambda rows: any(row_trait(r, "l0_fixed") for r in rows),
)
