"""Frontier and scaling figures (saepipe.plots.frontier / scaling) on hand-made tables with
several seeds per sweep point: the plotted means and 95% CI half-widths against values
computed by hand, error bars only where there are >= 2 seeds, the equal-training-cost row
only when the table has train_* columns, and the PNGs written."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.container import ErrorbarContainer

from saepipe.plots.frontier import frontier_figure, frontier_points, plot_frontier
from saepipe.plots.scaling import plot_scaling, scaling_figure, scaling_points


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# two-sided 95% Student-t quantiles t_{0.975, n-1}, from a printed t table (not from scipy,
# which is what the code under test uses)
T975 = {2: 12.706204736, 3: 4.302652730}

WALL_TITLE = "Equal training cost (measured): ‖x − x̂‖² vs training s/token\n(lower-left is better)"
FLOPS_TITLE = "Equal training cost (FLOPs): ‖x − x̂‖² vs training FLOPs/token\n(lower-left is better)"

# per seed: (l0, l2_per_token, loss_recovered, train_wall_s_per_token, train_flops_per_token)
TOPK8 = [(8.0, 10.0, 0.90, 1.0e-6, 4.0e8), (8.0, 11.0, 0.92, 1.2e-6, 4.0e8), (8.0, 13.0, 0.91, 1.1e-6, 4.0e8)]
TOPK32 = [(32.0, 6.0, 0.97, 2.0e-6, 4.2e8), (32.0, 6.5, 0.96, 2.2e-6, 4.2e8), (32.0, 5.5, 0.98, 2.6e-6, 4.2e8)]
RELU = [(20.0, 9.0, 0.93, 0.8e-6, 3.0e8), (26.0, 8.0, 0.95, 0.9e-6, 3.0e8)]  # L0 varies by seed
SWITCH8 = [(8.0, 12.0, 0.88, 0.3e-6, 9.0e8), (8.0, 12.4, 0.89, 0.4e-6, 9.0e8)]


def _row(
    point: str,
    seed: int,
    group: str,
    arch: str,
    k: int,
    values: tuple,
    *,
    width=1024,
    n_experts=1,
    base=None,
    by=None,
    cost=True,
    point_id=True,
) -> dict:
    l0, l2, lr, wall, flops = values
    row = {
        "sae_id": f"{point}-s{seed}",
        "seed": seed,
        "group": group,
        "arch": arch,
        "k": k,
        "width": width,
        "n_experts": n_experts,
        "active_experts": 1 if n_experts > 1 else None,
        "feature_scaling": None,
        "match_baseline": base,
        "match_by": by,
        "l0": l0,
        "l2_per_token": l2,
        "loss_recovered": lr,
        "flops_per_token": 2.0 * 64 * (width // n_experts + k),
        "training_tokens": 100_000,
    }
    if point_id:
        row["point_id"] = point
    if cost:
        row.update(train_wall_s_per_token=wall, train_flops_per_token=flops)
    return row


def _table(n_seeds: int | None = None, **kw) -> list[dict]:
    """topk k=8, k=32 (3 seeds), relu (2 seeds, L0 varies), switch k=8 FLOP-matched to topk
    (2 seeds); `n_seeds` keeps only the first n seeds of every point."""
    specs = [
        ("topk-k8", "topk", "topk", 8, TOPK8, {}),
        ("topk-k32", "topk", "topk", 32, TOPK32, {}),
        ("relu-k16", "relu", "relu", 16, RELU, {}),
        ("switch-k8", "switch", "switch", 8, SWITCH8, dict(width=8192, n_experts=8, base="topk", by="flops")),
    ]
    return [
        _row(pid, s, g, a, k, v, **extra, **kw)
        for pid, g, a, k, seeds, extra in specs
        for s, v in enumerate(seeds[:n_seeds])
    ]


def _ci(xs: list[float]) -> tuple[float, float]:
    """Mean and 95% Student-t half-width, by hand."""
    n = len(xs)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, T975[n] * sd / math.sqrt(n)


def _errorbars(ax) -> dict[str, list[tuple[float, float, float]]]:
    """The error bars drawn on `ax`: {"y": [(x, low, high)], "x": [(y, low, high)]}."""
    out = {"x": [], "y": []}
    for c in ax.containers:
        if not isinstance(c, ErrorbarContainer):
            continue
        for coll in c.lines[2]:
            for seg in coll.get_segments():
                (x0, y0), (x1, y1) = seg
                if x0 == x1:
                    out["y"].append((x0, min(y0, y1), max(y0, y1)))
                else:
                    out["x"].append((y0, min(x0, x1), max(x0, x1)))
    return out


def _by_title(fig) -> dict[str, list]:
    axes = {}
    for ax in fig.axes:
        if ax.get_visible() and ax.axison:
            axes.setdefault(ax.get_title(), []).append(ax)
    return axes


def test_frontier_points_are_seed_means_with_hand_computed_ci():
    points = {p["point_id"]: p for p in frontier_points(_table())}
    assert set(points) == {"topk-k8", "topk-k32", "relu-k16", "switch-k8"}
    p = points["topk-k8"]
    assert p["n_seeds"] == 3 and p["seeds"] == [0, 1, 2] and p["group"] == "topk" and p["k"] == 8
    for col, i in (("l2_per_token", 1), ("train_wall_s_per_token", 3)):
        mean, half = _ci([v[i] for v in TOPK8])
        assert p[col].mean == pytest.approx(mean) and p[col].n == 3
        assert p[col].high - p[col].mean == pytest.approx(half, rel=1e-6)
        assert p[col].mean - p[col].low == pytest.approx(half, rel=1e-6)
    mean, half = _ci([1 - v[2] for v in TOPK8])
    assert p["one_minus_lr"].mean == pytest.approx(mean)
    assert p["one_minus_lr"].high - p["one_minus_lr"].mean == pytest.approx(half, rel=1e-6)
    assert p["l0"].mean == 8.0 and p["l0"].low == p["l0"].high == 8.0  # TopK: L0 = k every seed
    r = points["relu-k16"]  # two seeds: t_{0.975,1} = 12.7; L0 has an interval
    for col, i in (("l0", 0), ("l2_per_token", 1)):
        mean, half = _ci([v[i] for v in RELU])
        assert r[col].mean == pytest.approx(mean) and r[col].n == 2
        assert r[col].high - r[col].mean == pytest.approx(half, rel=1e-6)
    # n = 2: sd = |a - b| / sqrt(2), so the half-width is t * |a - b| / 2 = 12.706 * 3
    assert r["l0"].high - r["l0"].low == pytest.approx(2 * 12.706204736 * 3.0, rel=1e-6)


def test_frontier_points_without_point_id_or_train_columns():
    points = frontier_points(_table(point_id=False, cost=False))
    assert len(points) == len(_table())  # every row its own point
    assert all(p["n_seeds"] == 1 and not p["l2_per_token"].has_interval for p in points)
    assert all(p["train_wall_s_per_token"] is None and p["train_flops_per_token"] is None for p in points)


def test_frontier_points_reject_inconsistent_seeds():
    rows = _table()
    rows[1] = {**rows[1], "width": 2048}  # seed 1 of topk-k8 is another SAE config
    with pytest.raises(ValueError, match="topk-k8.*width"):
        frontier_points(rows)
    rows = _table()
    rows[1] = {**rows[1], "seed": 0}
    with pytest.raises(ValueError, match="seed more than once"):
        frontier_points(rows)


def test_frontier_figure_draws_the_intervals_and_the_cost_row():
    fig = frontier_figure(_table())
    assert "mean ± 95% CI (Student t) over n=2–3 seeds" in fig._suptitle.get_text()
    axes = _by_title(fig)
    assert set(axes) == {"All SAEs", "FLOP-matched to topk", WALL_TITLE, FLOPS_TITLE}
    l2_ax = next(ax for ax in axes["All SAEs"] if ax.get_yscale() == "linear")
    bars = _errorbars(l2_ax)
    mean, half = _ci([v[1] for v in TOPK8])
    assert any(
        x == 8.0 and lo == pytest.approx(mean - half) and hi == pytest.approx(mean + half) for x, lo, hi in bars["y"]
    )
    assert len(bars["y"]) == 4  # one per point (relu's and switch's included)
    mean_l0, half_l0 = _ci([v[0] for v in RELU])
    assert [(lo, hi) for _, lo, hi in bars["x"]] == [pytest.approx((mean_l0 - half_l0, mean_l0 + half_l0))]
    (wall_ax,) = axes[WALL_TITLE]
    assert wall_ax.get_xscale() == "log" and "wall-clock" in wall_ax.get_xlabel()
    topk = next(line for line in wall_ax.get_lines() if line.get_label().startswith("topk"))
    expected_x = [_ci([v[3] for v in seeds])[0] for seeds in (TOPK8, TOPK32)]  # in order of k
    assert list(topk.get_xdata()) == pytest.approx(expected_x)
    assert len(_errorbars(wall_ax)["x"]) == 4  # measured wall-clock varies between seeds
    (flops_ax,) = axes[FLOPS_TITLE]
    assert "forward + backward + optimizer" in flops_ax.get_xlabel()
    assert _errorbars(flops_ax)["x"] == []  # training FLOPs are the same for every seed


def test_single_seed_table_has_no_error_bars():
    fig = frontier_figure(_table(n_seeds=1))
    assert "n=1: no interval" in fig._suptitle.get_text()
    assert all(not isinstance(c, ErrorbarContainer) for ax in fig.axes for c in ax.containers)
    assert any(line.get_label().startswith("relu") for ax in fig.axes for line in ax.get_lines())


def test_table_without_train_columns_draws_without_cost_row():
    fig = frontier_figure(_table(cost=False))
    assert set(_by_title(fig)) == {"All SAEs", "FLOP-matched to topk"}
    rows = [{k: v for k, v in r.items() if k != "train_flops_per_token"} for r in _table()]
    fig = frontier_figure(rows)  # wall-clock only: its panel, and a note where FLOPs would be
    assert set(_by_title(fig)) == {"All SAEs", "FLOP-matched to topk", WALL_TITLE}
    assert any(t.get_text() == "no train_flops_per_token in the table" for ax in fig.axes for t in ax.texts)


def test_plot_frontier_and_scaling_write_pngs(tmp_path):
    """From parquet to PNG: the frontier from a table as older pipelines wrote it (no
    point_id, no train_* columns), the scaling figure from the seeded table."""
    for plot, name, rows in (
        (plot_frontier, "frontier.png", _table(point_id=False, cost=False)),
        (plot_scaling, "scaling.png", _table()),
    ):
        table = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), table)
        plot(str(table), str(tmp_path / name))
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_scaling_points_and_bars_are_seed_means():
    points = {p["point_id"]: p for p in scaling_points(_table())}
    assert set(points) == {"topk-k8", "topk-k32", "switch-k8"}  # relu is not fixed-k
    mean, half = _ci([v[1] for v in SWITCH8])
    sw = points["switch-k8"]
    assert sw["l2_per_token"].mean == pytest.approx(mean)
    assert sw["l2_per_token"].high - sw["l2_per_token"].mean == pytest.approx(half, rel=1e-6)
    assert sw["training_flops"].mean == pytest.approx(3 * 2.0 * 64 * (1024 + 8) * 100_000)
    fig = scaling_figure(_table())
    (ax,) = [ax for ax in fig.axes if ax.get_title() == "k = 8"]  # the only k two groups share
    bars = _errorbars(ax)
    expected = sorted((m - h, m + h) for m, h in (_ci([v[1] for v in TOPK8]), (mean, half)))
    assert sorted((lo, hi) for _, lo, hi in bars["y"]) == [pytest.approx(e) for e in expected]
    assert bars["x"] == []
    assert "over n=2–3 seeds" in fig._suptitle.get_text()
    single = scaling_figure(_table(n_seeds=1))
    assert all(not isinstance(c, ErrorbarContainer) for ax in single.axes for c in ax.containers)
