"""How every figure looks: colours, markers, labels, legends, seed points, and saving.

Colours and markers. `group_styles` gives each sweep group one colour and marker, the same
in every figure that draws groups (frontier, scaling, autointerp); `palette` gives n
distinct colours for figures that colour SAEs or lines one by one (MoE, redundancy, omega);
`marker` picks the i-th of `MARKERS`. `TOKENS_AXIS` labels a training-progress axis,
`label_bars` writes values at bar ends.

Seeds. A sweep point (table column ``point_id``: the ``sae_id`` without its seed suffix) has
one table row per seed. `mean_over_seeds` folds those rows into one point whose metrics are
`saepipe.stats.Estimate` s (mean and two-sided Student-t 95% CI over the seeds); `draw_series`
draws the means with the intervals as error bars (none for a single-seed point);
`seeds_note` says in words what the markers and bars are, for the figure's subtitle. A table
without ``point_id`` (older pipelines) is read as one seed per point (point = ``sae_id``).

Legends and saving. `shared_legend` puts one de-duplicated legend under the panels,
`decorate` adds the title, `save` writes the PNG atomically at `DPI` and closes the figure;
every figure is saved by `save`.

This module reads no architecture trait (those, and the SAE labels built from them, are in
:mod:`saepipe.plots.rows`): a figure's code fingerprint (``saepipe.codeversion``) covers the
modules it imports, so the frontier, which imports only this module, is not redrawn when an
architecture's code changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from saepipe.io import atomic_path
from saepipe.stats import Estimate, finite, mean_ci, point_of

DPI = 130
"""Resolution of every saved figure (dots per inch)."""

MARKERS = "osD^v<>ph*P"
"""Marker cycle of the figures' lines and points (`marker`)."""

TOKENS_AXIS = "training tokens"
"""x-axis label of figures drawn over training."""

CONFIDENCE = 0.95
"""Confidence level of the seed intervals (two-sided Student t)."""

POINT_IDENTITY = (
    "group",
    "arch",
    "k",
    "width",
    "n_experts",
    "active_experts",
    "feature_scaling",
    "match_baseline",
    "match_by",
)
"""Columns the seeds of one point must agree on: two rows that differ here are two points."""


# --------------------------------------------------------------------------- colours, markers


def marker(i: int) -> str:
    """The i-th marker of `MARKERS` (cycling)."""
    return MARKERS[i % len(MARKERS)]


def group_styles(groups) -> dict[str, dict]:
    """Group name -> matplotlib kwargs (color, marker), stable for a given set of groups."""
    return {name: dict(color=f"C{i % 10}", marker=marker(i)) for i, name in enumerate(sorted(set(groups)))}


def palette(n: int) -> list:
    """n distinct colours: tab10, then tab20's ten lighter shades (tab20 order would put
    two shades of one hue next to each other)."""
    t20 = plt.get_cmap("tab20")
    order = [t20(2 * i) for i in range(10)] + [t20(2 * i + 1) for i in range(10)]
    return [order[i % 20] for i in range(n)]


# --------------------------------------------------------------------------- bar labels


def label_bars(ax, bars, values, fmt: str = "{:.3g}", fontsize: int = 7) -> None:
    """Value labels at the bar ends, on a white box so reference lines do not cross them."""
    for t in ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize=fontsize):
        t.set_bbox(dict(facecolor="white", edgecolor="none", alpha=0.85, pad=0.6))


# --------------------------------------------------------------------------- seeds


def mean_over_seeds(rows: Iterable[dict], metrics: Iterable[str], confidence: float = CONFIDENCE) -> list[dict]:
    """One dict per sweep point, in order of first appearance.

    Each point carries the first seed's columns (config, group, ...), except that every
    column in `metrics` is replaced by an `Estimate` over the point's seeds
    (`saepipe.stats.mean_ci`: mean, Student-t `confidence` interval, n), or None when no
    seed has a finite value for it (e.g. a column the table lacks). Seeds with a missing
    value are left out of that metric's estimate, so its ``n`` can be below ``n_seeds``.
    Added keys: ``point_id``, ``sae_ids`` and ``seeds`` (per seed, table order), ``n_seeds``.

    Raises ValueError when the rows of one point disagree on a `POINT_IDENTITY` column or
    repeat a seed: either would silently average different SAEs, or count one twice.
    """
    metrics = list(metrics)
    by_point: dict[str, list[dict]] = {}
    for r in rows:
        by_point.setdefault(point_of(r), []).append(r)
    points = []
    for pid, prow in by_point.items():
        for col in POINT_IDENTITY:
            values = {repr(r.get(col)) for r in prow}
            if len(values) > 1:
                raise ValueError(
                    f"point {pid!r}: its seeds differ in {col!r} ({sorted(values)}); "
                    "rows of one point_id must be the same SAE config"
                )
        seeds = [r.get("seed") for r in prow]
        known = [s for s in seeds if s is not None]
        if len(set(known)) < len(known):
            raise ValueError(f"point {pid!r} has a seed more than once: {seeds}")
        point = {k: v for k, v in prow[0].items() if k not in ("sae_id", "seed")}
        point.update(point_id=pid, sae_ids=[r["sae_id"] for r in prow], seeds=seeds, n_seeds=len(prow))
        for m in metrics:
            vals = [f for f in (finite(r.get(m)) for r in prow) if f is not None]
            point[m] = mean_ci(vals, confidence) if vals else None
        points.append(point)
    return points


def _n_range(ns: Iterable[int]) -> str:
    """'3' or '1–3'."""
    ns = sorted(set(ns))
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def seeds_note(ns: Iterable[int], confidence: float = CONFIDENCE) -> str:
    """What the markers and bars of a figure are, given the n (seeds) of its plotted points."""
    ns = sorted(set(ns))
    if not ns:
        return ""
    pct = f"{100 * confidence:g}%"
    if ns == [1]:
        return "each point: one seed (n=1: no interval)"
    note = f"points: mean ± {pct} CI (Student t) over n={_n_range(ns)} seeds"
    return note + ("; n=1 points have no bar" if ns[0] == 1 else "")


def n_suffix(ns: Iterable[int], all_ns: Iterable[int]) -> str:
    """', n=2' for a legend label when the figure's points do not all have the same n."""
    return f", n={_n_range(ns)}" if len(set(all_ns)) > 1 and ns else ""


def _err(ests: list[Estimate]) -> tuple[list[float], list[float]]:
    """Asymmetric error-bar lengths (below, above the mean). On a log axis a lower bound at
    or below zero is clipped by matplotlib: the bar runs to the panel's lower edge, capless."""
    return [e.mean - e.low for e in ests], [e.high - e.mean for e in ests]


def draw_series(
    ax, xs: list[Estimate], ys: list[Estimate], *, label: str, style: dict, connect: bool = True
) -> list[int]:
    """Markers at the means (joined by a line when `connect`), and 95% CI error bars: vertical
    where the point's y estimate has an interval (n >= 2), horizontal where its x estimate
    has one of non-zero width (e.g. L0 of an L1-penalised SAE varies between seeds; a TopK
    SAE's L0 does not). Returns the n of every y estimate drawn (for `seeds_note`)."""
    mx, my = [e.mean for e in xs], [e.mean for e in ys]
    ax.plot(
        mx,
        my,
        label=label,
        **{"linewidth": 1.8, "markersize": 6, **style, **({} if connect else {"linestyle": "none"})},
    )
    color = style.get("color")
    with_y = [i for i, e in enumerate(ys) if e.has_interval]
    with_x = [i for i, e in enumerate(xs) if e.has_interval and e.high > e.low]
    for idx, axis in ((with_y, "y"), (with_x, "x")):
        if not idx:
            continue
        ests = [(ys if axis == "y" else xs)[i] for i in idx]
        err = {f"{axis}err": _err(ests)}
        ax.errorbar(
            [mx[i] for i in idx],
            [my[i] for i in idx],
            fmt="none",
            ecolor=color,
            elinewidth=1.1,
            capsize=3,
            alpha=0.75,
            **err,
        )
    return [e.n for e in ys]


# --------------------------------------------------------------------------- legend, title, save


def shared_legend(fig, axes, ncol: int = 3, fontsize: int = 8) -> None:
    """One legend under the panels with every distinct label of `axes` (the first handle of
    each label, in panel order; labels starting with '_' are matplotlib's "no legend")."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    if seen:
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="outside lower center",
            ncol=min(ncol, len(seen)),
            fontsize=fontsize,
        )


def decorate(fig, axes, title: str, subtitle: str | None = None) -> None:
    """`shared_legend` below the panels and a title (with an optional second line saying e.g.
    what the error bars are)."""
    shared_legend(fig, axes)
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=12)


def save(fig, out_png: str) -> None:
    """Write the figure as a PNG at `DPI` (atomically: a crash leaves no partial file), then
    close it."""
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def finish(fig, axes, title: str, out_png: str, subtitle: str | None = None) -> None:
    """`decorate` then `save`: legend under the panels, title, atomic PNG write, close."""
    decorate(fig, axes, title, subtitle)
    save(fig, out_png)
