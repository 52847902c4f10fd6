"""Uncertainty over seeds: the mean of a few per-seed values and its confidence interval.

One convention for every figure and verdict: a point trained with n seeds is shown as the
mean of its n values with a two-sided Student-t confidence interval (default 95%),
``mean ± t_{(1+c)/2, n-1} * sd / sqrt(n)`` (sd with Bessel's correction). With n = 1 there is
no interval (``low = high = mean``, ``n = 1`` says so). Comparisons between two SAEs are
PAIRED by seed: the interval is that of the per-seed differences, which removes the
variance the two share (same data order and init seed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from scipy import stats as _st


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with a ``confidence`` interval [low, high] (low = high when n = 1)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    values: tuple[float, ...]

    @property
    def has_interval(self) -> bool:
        return self.n >= 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval lies strictly on one side of ``value`` (needs n >= 2)."""
        return self.has_interval and (self.low > value or self.high < value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = list(self.values)
        return d


def finite(v) -> float | None:
    """``v`` as a float when it is a finite number, else None (None, NaN, inf, strings, bools):
    how figures and verdicts read a table cell that may be missing."""
    if v is None or isinstance(v, (bool, str, bytes)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def point_of(row: dict) -> str:
    """The sweep point a table row belongs to: ``point_id`` (the seeds of one point share it),
    or ``sae_id`` when the table has no (or an empty) ``point_id``: every row its own point."""
    return row.get("point_id") or row["sae_id"]


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Estimate:
    """Mean and Student-t confidence interval of ``values`` (finite floats, at least one)."""
    xs = tuple(float(v) for v in values)
    if not xs:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in xs):
        raise ValueError(f"mean_ci got a non-finite value: {xs}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Estimate(mean, mean, mean, 1, confidence, xs)
    sd = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1))
    half = float(_st.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n, confidence, xs)
