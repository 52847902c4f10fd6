"""Shared figure conventions: one colour and marker per sweep group in every figure."""
from __future__ import annotations

MARKERS = "osD^v<>ph*P"


def group_styles(groups) -> dict[str, dict]:
    """Group name -> matplotlib kwargs (color, marker), stable for a given set of groups."""
    return {name: dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)])
            for i, name in enumerate(sorted(set(groups)))}


def finish(fig, axes, title: str, out_png: str) -> None:
    """One de-duplicated legend below the panels, a title, an atomic PNG write, close."""
    import matplotlib.pyplot as plt

    from saepipe.io import atomic_path

    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle(title, fontsize=12)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
