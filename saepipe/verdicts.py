"""Verdicts on the papers' claims (docs/reference.md §6): measured effect, CI over seeds, one status.

A claim is a row of ``CLAIMS``, a declarative spec, not code: side A and side B are
selectors over table-row fields, the architecture's traits rather than its name (``routed ==
True``, ``has_omega == False``, ``match_by == "flops"``, ...; rows without the trait columns
get them from ``saepipe.saes.arch_traits``), the
two sides are joined on ``k``, ``seed`` and the claim's extra fields (e.g. the Switch row's
``match_baseline`` equals the TopK row's ``group``), and the claim states which metric
should move in which direction. ``verdicts(rows, cfg)`` turns the rows of
``results/table.parquet`` into one verdict per (claim, k, A point, B point): with the usual
sweep that is one verdict per claim at every k the sweep covers. A claim without any
pair in the sweep is listed once, with status ``not_in_sweep``.

Statistics. Rows of A and B with the same seed form a pair; the effect is the mean of the
per-seed paired differences -- relative, ``(A - B) / B``, or an absolute difference of a
fraction (redundancy), per claim -- with a two-sided Student-t interval
(``saepipe.stats.mean_ci``, ``confidence`` from the config).

Status, first rule that applies (the reason string starts with the code in brackets):

1. no pair of rows -> ``not_in_sweep`` [not_in_sweep];
2. fewer than ``min_seeds`` pairs -> ``inconclusive`` [single_seed] (the effect is still
   reported, without an interval);
3. an SAE involved has ``dead_fraction > max_dead_fraction`` -> ``inconclusive``
   [undertrained];
4. the metric is 0 on both sides for every pair (redundancy claims), or a relative effect
   divides by 0 -> ``inconclusive`` [nothing_to_measure];
5. the CI lies entirely on the claimed side of 0 -> ``supported`` [ci_excludes]; entirely
   on the other side -> ``contradicted`` [ci_excludes]; else ``inconclusive`` [ci_overlap].
   Claim 2 ("close") compares the CI with ``close_tolerance`` instead of 0.

Outputs: ``results/verdicts.json`` (``verdicts_schema()`` is its JSON Schema, built from the
dataclasses below, one description per field), an HTML page for the report, an HTML
fragment for the report's landing page, and a plain-text table:
``python -m saepipe.verdicts results/verdicts.json`` prints it. This module imports
neither matplotlib nor snakemake.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import types
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from saepipe.htmlpage import write_page
from saepipe.io import atomic_path, write_json
from saepipe.stats import finite, mean_ci, point_of

SCHEMA_VERSION = "1.0"
Status = Literal["supported", "contradicted", "inconclusive", "not_in_sweep"]
STATUS_COLOURS = {
    "supported": "#1a7f37",
    "contradicted": "#c62828",
    "inconclusive": "#a15c00",
    "not_in_sweep": "#666666",
}


def _field(doc: str, default: Any = MISSING) -> Any:
    """A dataclass field with its description (kept in metadata for the JSON Schema)."""
    return field(metadata={"doc": doc}) if default is MISSING else field(default=default, metadata={"doc": doc})


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class VerdictConfig:
    """Thresholds that turn measured effects into statuses (the `verdicts:` section of config.yaml)."""

    confidence: float = _field(
        "Two-sided confidence level of every interval (Student t over the per-seed paired differences).", 0.95
    )
    min_seeds: int = _field(
        "Seed pairs a comparison needs before it can be supported or contradicted (an interval needs at least 2).", 2
    )
    max_dead_fraction: float = _field(
        "An SAE with a larger share of dead latents counts as under-trained: its comparisons are inconclusive.", 0.15
    )
    close_tolerance: float = _field(
        "Claim 2: the width-matched Switch SAE is 'close' to TopK when "
        "its relative l2 excess is below this (0.25 = 25%).",
        0.25,
    )

    def __post_init__(self):
        problems = []
        if not (isinstance(self.confidence, (int, float)) and 0 < self.confidence < 1):
            problems.append(f"confidence must be in (0, 1), e.g. 0.95; got {self.confidence!r}")
        if not (isinstance(self.min_seeds, int) and not isinstance(self.min_seeds, bool) and self.min_seeds >= 2):
            problems.append(
                f"min_seeds must be an integer >= 2 (a confidence interval needs two seeds); got {self.min_seeds!r}"
            )
        if not (isinstance(self.max_dead_fraction, (int, float)) and 0 <= self.max_dead_fraction <= 1):
            problems.append(f"max_dead_fraction must be in [0, 1]; got {self.max_dead_fraction!r}")
        if not (isinstance(self.close_tolerance, (int, float)) and self.close_tolerance > 0):
            problems.append(
                f"close_tolerance must be > 0 (a relative difference, 0.25 = 25%); got {self.close_tolerance!r}"
            )
        if problems:
            raise ValueError("invalid verdicts config: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: dict) -> VerdictConfig:
        """From the whole pipeline config; an absent `verdicts:` section means the defaults."""
        section = config.get("verdicts") or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} in the verdicts section of the config; valid fields: {sorted(known)}"
            )
        return cls(**section)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------ claim specs


@dataclass(frozen=True)
class Where:
    """One condition on a table row: ``row[field] <op> value`` (a missing column reads None)."""

    field: str = _field("Table column the condition reads.")
    op: Literal["==", ">="] = _field("Comparison: equality, or at least (false when the value is None).")
    value: Any = _field("Value the column is compared with.")

    def __call__(self, row: dict) -> bool:
        got = row.get(self.field)
        if self.op == "==":
            return got == self.value
        return got is not None and got >= self.value

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.value!r}"


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a label for readers and the conditions that select its rows."""

    label: str = _field("What the side is, in words (e.g. 'FLOP-matched Switch').")
    where: tuple[Where, ...] = _field("Conditions a row must meet (all of them).")

    def selects(self, row: dict) -> bool:
        return all(cond(row) for cond in self.where)

    def __str__(self) -> str:
        return " and ".join(map(str, self.where))


@dataclass(frozen=True)
class ClaimSpec:
    """A testable claim: side A should beat side B on `metric` in `direction`, paired by seed."""

    id: str = _field("Stable identifier of the claim.")
    number: str = _field("Its number in docs/reference.md §6.")
    text: str = _field("The claim in words.")
    short: str = _field("A few words for narrow tables.")
    paper: str = _field("The papers' reported effect.")
    metric: str = _field("Table column compared.")
    direction: Literal["lower", "higher", "close"] = _field(
        "What the claim says of A vs B: lower, higher, or close (A at most close_tolerance worse)."
    )
    effect: Literal["relative", "difference"] = _field(
        "relative: per seed (A - B) / B; difference: A - B of a fraction metric (shown in percentage points)."
    )
    a: Side = _field("Side A (the architecture the claim is about).")
    b: Side = _field("Side B (what A is compared with).")
    join: tuple[tuple[str, str], ...] = _field(
        "Pairs (A column, B column) that must be equal for two rows to be compared, besides k and seed.", ()
    )
    nothing_to_measure: str | None = _field(
        "If set, a metric of 0 on both sides for every seed means nothing to measure; the text names it.", None
    )


# Sides by architecture traits (saepipe.saes.arch_traits), never by name:
# Switch-type = routed without omega; TopK-type = dense, k fixes L0, no learned threshold;
# Scale-type = routed with a learned omega (feature scaling).
_SWITCH = (Where("routed", "==", True), Where("has_omega", "==", False))
_SWITCH_FLOP = Side("FLOP-matched Switch", (*_SWITCH, Where("match_by", "==", "flops")))
_TOPK_BASELINE = Side(
    "its TopK baseline",
    (Where("routed", "==", False), Where("l0_fixed", "==", True), Where("has_threshold", "==", False)),
)
_BASELINE_OF_A = (("match_baseline", "group"),)
_SCALE = (Where("routed", "==", True), Where("has_omega", "==", True))
_SCALE_FS = Side("Scale, feature scaling on", (*_SCALE, Where("feature_scaling", "==", True)))
_SCALE_NO_FS = Side("Scale, feature scaling off", (*_SCALE, Where("feature_scaling", "==", False)))
_SAME_SCALE_SHAPE = (("n_experts", "n_experts"), ("active_experts", "active_experts"), ("width", "width"))

CLAIMS: tuple[ClaimSpec, ...] = (
    ClaimSpec(
        "switch_flop_lower_l2",
        "1",
        "A FLOP-matched Switch SAE has lower reconstruction error (l2 per token) than its TopK baseline at equal k.",
        "Switch (FLOP-matched) < TopK, l2",
        "Switch paper: -20.6% l2 at k=64 (GPT-2 layer 8)",
        "l2_per_token",
        "lower",
        "relative",
        _SWITCH_FLOP,
        _TOPK_BASELINE,
        _BASELINE_OF_A,
    ),
    ClaimSpec(
        "switch_width_close",
        "2",
        "A width-matched Switch SAE is close to its TopK baseline in l2 per token (at most "
        "close_tolerance worse) at ~N-fold fewer FLOPs.",
        "Switch (width-matched) ≈ TopK, l2",
        "Switch paper: +15.6% l2 at ~N-fold fewer FLOPs",
        "l2_per_token",
        "close",
        "relative",
        Side("width-matched Switch", (*_SWITCH, Where("match_by", "==", "width"))),
        _TOPK_BASELINE,
        _BASELINE_OF_A,
    ),
    ClaimSpec(
        "scale_lower_l2_than_switch",
        "3",
        "A Scale SAE (e >= 2 active experts, feature scaling) has lower l2 per token than a "
        "Switch SAE FLOP-matched to the same baseline, at equal k.",
        "Scale (e≥2) < Switch, l2",
        "Scale paper: -24% reconstruction error vs MoE SAEs",
        "l2_per_token",
        "lower",
        "relative",
        Side(
            "FLOP-matched Scale, e >= 2",
            (
                *_SCALE,
                Where("active_experts", ">=", 2),
                Where("feature_scaling", "==", True),
                Where("match_by", "==", "flops"),
            ),
        ),
        Side("FLOP-matched Switch, same baseline", _SWITCH_FLOP.where),
        (("match_baseline", "match_baseline"),),
    ),
    ClaimSpec(
        "feature_scaling_lower_redundancy",
        "4",
        "Feature scaling lowers decoder redundancy (share of features with a cosine > 0.9 "
        "twin): Scale with vs without it, all else equal.",
        "Feature scaling lowers redundancy",
        "Scale paper: -99% redundancy vs MoE SAEs",
        "redundancy_09",
        "lower",
        "difference",
        _SCALE_FS,
        _SCALE_NO_FS,
        _SAME_SCALE_SHAPE,
        "zero redundancy",
    ),
    ClaimSpec(
        "feature_scaling_lower_similarity",
        "4b",
        "Feature scaling lowers activation similarity (overlap of two tokens' active-latent "
        "sets): Scale with vs without it, all else equal.",
        "Feature scaling lowers act. similarity",
        "Scale paper: -6.19% average activation similarity",
        "activation_similarity",
        "lower",
        "relative",
        _SCALE_FS,
        _SCALE_NO_FS,
        _SAME_SCALE_SHAPE,
    ),
    ClaimSpec(
        "moe_duplicates",
        "5",
        "A FLOP-matched Switch SAE's features duplicate across experts: more decoder redundancy "
        "(cosine > 0.9) than its TopK baseline at equal k.",
        "Switch features duplicate (> TopK redundancy)",
        "Switch paper: features duplicate across experts (redundancy falls with scale)",
        "redundancy_09",
        "higher",
        "difference",
        _SWITCH_FLOP,
        _TOPK_BASELINE,
        _BASELINE_OF_A,
        "zero redundancy",
    ),
)


# ------------------------------------------------------------------------------ output types


@dataclass(frozen=True)
class Interval:
    """Mean of per-seed values with its confidence interval (low = high = mean when n = 1)."""

    mean: float = _field("Mean over the seeds.")
    low: float = _field("Lower end of the interval.")
    high: float = _field("Upper end of the interval.")
    n: int = _field("Number of values (seeds or seed pairs).")
    confidence: float = _field("Two-sided confidence level.")
    values: tuple[float, ...] = _field("The values, in seed order.")

    @classmethod
    def of(cls, values: list[float], confidence: float) -> Interval:
        est = mean_ci(values, confidence)
        return cls(est.mean, est.low, est.high, est.n, est.confidence, est.values)


@dataclass(frozen=True)
class Verdict:
    """One claim tested at one k on one pair of sweep points (A vs B), paired by seed."""

    claim: str = _field("Claim id (see `claims`).")
    number: str = _field("Claim number in docs/reference.md §6.")
    claim_text: str = _field("The claim in words.")
    paper: str = _field("The papers' reported effect, as text.")
    k: int | None = _field("The k of both sides (None for a claim not in the sweep).")
    metric: str = _field("Table column compared.")
    direction: Literal["lower", "higher", "close"] = _field("What the claim expects of A vs B.")
    effect_kind: Literal["relative", "difference"] = _field(
        "relative: (A - B) / B per seed; difference: A - B per seed (a fraction)."
    )
    status: Status = _field("supported | contradicted | inconclusive | not_in_sweep.")
    reason: str = _field(
        "Why, starting with a code: ci_excludes, ci_overlap, single_seed, undertrained, "
        "nothing_to_measure or not_in_sweep."
    )
    n: int = _field("Number of seed pairs.")
    effect: Interval | None = _field("Paired effect of A vs B over the seeds (None when undefined or not in sweep).")
    tolerance: float | None = _field("Claim 2 only: the close_tolerance the effect is compared with.")
    a_label: str = _field("Side A in words.")
    b_label: str = _field("Side B in words.")
    a_point: str | None = _field("Sweep point of side A (SAE id without the seed).")
    b_point: str | None = _field("Sweep point of side B.")
    a_saes: list[str] = _field("SAE ids of side A, in seed order.")
    b_saes: list[str] = _field("SAE ids of side B, in seed order.")
    seeds: list[int | None] = _field("The paired seeds.")
    a_metric: Interval | None = _field("Side A's metric over its seeds.")
    b_metric: Interval | None = _field("Side B's metric over its seeds.")
    delta_loss_recovered: Interval | None = _field(
        "Paired loss_recovered difference A - B (seeds where both have it; None if none)."
    )
    max_dead_fraction: float | None = _field("Largest dead_fraction among the SAEs involved.")
    max_dead_sae: str | None = _field("The SAE with that dead fraction.")
    flop_ratio: float | None = _field("Forward FLOPs per token of B / A (analytic; claim 2: the ~N-fold saving).")
    train_flop_ratio: float | None = _field("Training FLOPs per token of B / A, where the table has them.")


@dataclass(frozen=True)
class VerdictReport:
    """results/verdicts.json: the verdict of every claim of docs/reference.md §6 the sweep can test."""

    schema_version: str = _field("Version of this format.")
    config: VerdictConfig = _field("The thresholds used.")
    claims: tuple[ClaimSpec, ...] = _field("The claims tested, with their selectors.")
    verdicts: list[Verdict] = _field(
        "One per (claim, k, A point, B point); one not_in_sweep entry per untestable claim."
    )


# ------------------------------------------------------------------------------ the verdicts

_num = finite  # a finite number, or None (missing column, None, NaN)
_point = point_of  # the sweep point of a row


def _seed(row: dict) -> Any:
    """The row's training seed: the `seed` column, else `train_seed` (the run's train config), else None."""
    seed = row.get("seed")
    return row.get("train_seed") if seed is None else seed


def _seed_key(seed: Any) -> tuple:
    return (seed is None, seed if seed is not None else 0)


def _k_key(k: Any) -> tuple:
    return (k is None, k if k is not None else 0)


def _pairs(spec: ClaimSpec, rows: list[dict]) -> dict[tuple, dict[Any, tuple[dict, dict]]]:
    """(k, A point, B point) -> {seed: (A row, B row)} for every joinable pair of rows."""
    a_rows = [r for r in rows if spec.a.selects(r) and _num(r.get(spec.metric)) is not None]
    b_rows = [r for r in rows if spec.b.selects(r) and _num(r.get(spec.metric)) is not None]
    groups: dict[tuple, dict[Any, tuple[dict, dict]]] = {}
    for a in a_rows:
        for b in b_rows:
            if a is b or a.get("k") != b.get("k") or _seed(a) != _seed(b):
                continue
            if any(a.get(fa) != b.get(fb) for fa, fb in spec.join):
                continue
            pairs = groups.setdefault((a.get("k"), _point(a), _point(b)), {})
            seed = _seed(a)
            if seed in pairs:
                old = pairs[seed]
                raise ValueError(
                    f"claim {spec.id}: two rows per side for seed {seed!r} of points {_point(a)!r} vs "
                    f"{_point(b)!r} (SAEs {old[0]['sae_id']}/{old[1]['sae_id']} and {a['sae_id']}/"
                    f"{b['sae_id']}): point_id and seed must identify one row of the table; check the "
                    "point_id and seed columns of results/table.parquet"
                )
            pairs[seed] = (a, b)
    return groups


def _untestable(spec: ClaimSpec, rows: list[dict]) -> Verdict:
    """The one not_in_sweep entry of a claim without pairs, saying what is missing."""
    has_a = [r for r in rows if spec.a.selects(r)]
    has_b = [r for r in rows if spec.b.selects(r)]
    if not has_a:
        why = f"no {spec.a.label} SAE in the sweep ({spec.a})"
    elif not has_b:
        why = f"no {spec.b.label} SAE in the sweep ({spec.b})"
    elif not any(_num(r.get(spec.metric)) is not None for r in has_a + has_b):
        why = f"no {spec.metric} in the table for these SAEs"
    else:
        join = ", ".join(["k", "seed"] + [f"A.{fa} == B.{fb}" for fa, fb in spec.join])
        why = f"no {spec.a.label} and {spec.b.label} rows with equal {join} and a {spec.metric} value"
    return Verdict(
        **_claim_fields(spec),
        k=None,
        status="not_in_sweep",
        reason=f"not_in_sweep: {why}",
        n=0,
        effect=None,
        tolerance=None,
        a_point=None,
        b_point=None,
        a_saes=[],
        b_saes=[],
        seeds=[],
        a_metric=None,
        b_metric=None,
        delta_loss_recovered=None,
        max_dead_fraction=None,
        max_dead_sae=None,
        flop_ratio=None,
        train_flop_ratio=None,
    )


def _claim_fields(spec: ClaimSpec) -> dict:
    """The fields of a Verdict that come from its claim."""
    return dict(
        claim=spec.id,
        number=spec.number,
        claim_text=spec.text,
        paper=spec.paper,
        metric=spec.metric,
        direction=spec.direction,
        effect_kind=spec.effect,
        a_label=spec.a.label,
        b_label=spec.b.label,
    )


def fmt_effect(kind: str, value: float | None) -> str:
    """An effect in its unit: relative as a signed percent, difference as percentage points."""
    if value is None:
        return "—"
    return f"{value * 100:+.1f}%" if kind == "relative" else f"{value * 100:+.2f} pp"


def _ratio(pairs: list[tuple[dict, dict]], column: str) -> float | None:
    ratios = [y / x for x, y in ((_num(a.get(column)), _num(b.get(column))) for a, b in pairs) if x and y is not None]
    return sum(ratios) / len(ratios) if ratios else None


def _value(row: dict, column: str) -> float:
    """A metric of a paired row: finite by construction (`_pairs` keeps only such rows)."""
    value = _num(row.get(column))
    if value is None:
        raise ValueError(f"{row.get('sae_id')}: {column} is missing or not finite in the table")
    return value


def _status(
    spec: ClaimSpec,
    cfg: VerdictConfig,
    n: int,
    effect: Interval | None,
    a_vals: list[float],
    b_vals: list[float],
    dead: float | None,
    dead_sae: str | None,
) -> tuple[Status, str]:
    if n < cfg.min_seeds:
        return "inconclusive", (
            f"single_seed: {n} seed pair{'s' if n != 1 else ''} < min_seeds "
            f"{cfg.min_seeds}; the effect has no usable confidence interval"
        )
    if dead is not None and dead > cfg.max_dead_fraction:
        return "inconclusive", (
            f"undertrained: dead fraction {dead:.2f} > bound {cfg.max_dead_fraction:.2f} ({dead_sae})"
        )
    if spec.nothing_to_measure and all(x == 0 and y == 0 for x, y in zip(a_vals, b_vals)):
        return "inconclusive", (
            f"nothing_to_measure: {spec.nothing_to_measure} ({spec.metric} = 0 on both sides for every seed)"
        )
    if effect is None:
        return "inconclusive", (
            f"nothing_to_measure: {spec.metric} is 0 for {spec.b.label}, so the relative difference is undefined"
        )
    bound = cfg.close_tolerance if spec.direction == "close" else 0.0
    low, high = fmt_effect(spec.effect, effect.low), fmt_effect(spec.effect, effect.high)
    ci = f"the {effect.confidence:.0%} CI [{low}, {high}]"
    bound_text = f"the tolerance {fmt_effect(spec.effect, bound)}" if spec.direction == "close" else "0"
    below, above = effect.high < bound, effect.low > bound
    if below or above:
        claimed = below if spec.direction in ("lower", "close") else above
        side = "below" if below else "above"
        return ("supported" if claimed else "contradicted"), f"ci_excludes: {ci} lies {side} {bound_text}"
    return "inconclusive", f"ci_overlap: {ci} contains {bound_text}"


def _judge(spec: ClaimSpec, key: tuple, by_seed: dict[Any, tuple[dict, dict]], cfg: VerdictConfig) -> Verdict:
    k, a_point, b_point = key
    seeds = sorted(by_seed, key=_seed_key)
    pairs = [by_seed[s] for s in seeds]
    a_vals = [_value(a, spec.metric) for a, _ in pairs]
    b_vals = [_value(b, spec.metric) for _, b in pairs]
    effect = None
    if spec.effect == "difference":
        effect = Interval.of([x - y for x, y in zip(a_vals, b_vals)], cfg.confidence)
    elif all(y != 0 for y in b_vals):
        effect = Interval.of([(x - y) / y for x, y in zip(a_vals, b_vals)], cfg.confidence)
    lr = [
        (x, y)
        for x, y in ((_num(a.get("loss_recovered")), _num(b.get("loss_recovered"))) for a, b in pairs)
        if x is not None and y is not None
    ]
    dead = [(d, r["sae_id"]) for pair in pairs for r in pair if (d := _num(r.get("dead_fraction"))) is not None]
    max_dead, max_dead_sae = max(dead, key=lambda d: d[0]) if dead else (None, None)
    status, reason = _status(spec, cfg, len(pairs), effect, a_vals, b_vals, max_dead, max_dead_sae)
    return Verdict(
        **_claim_fields(spec),
        k=k,
        status=status,
        reason=reason,
        n=len(pairs),
        effect=effect,
        tolerance=cfg.close_tolerance if spec.direction == "close" else None,
        a_point=a_point,
        b_point=b_point,
        a_saes=[a["sae_id"] for a, _ in pairs],
        b_saes=[b["sae_id"] for _, b in pairs],
        seeds=seeds,
        a_metric=Interval.of(a_vals, cfg.confidence),
        b_metric=Interval.of(b_vals, cfg.confidence),
        delta_loss_recovered=Interval.of([x - y for x, y in lr], cfg.confidence) if lr else None,
        max_dead_fraction=max_dead,
        max_dead_sae=max_dead_sae,
        flop_ratio=_ratio(pairs, "flops_per_token"),
        train_flop_ratio=_ratio(pairs, "train_flops_per_token"),
    )


def claim_verdicts(spec: ClaimSpec, rows: list[dict], cfg: VerdictConfig) -> list[Verdict]:
    """The verdicts of one claim: one per (k, A point, B point), or one not_in_sweep entry."""
    groups = _pairs(spec, rows)
    if not groups:
        return [_untestable(spec, rows)]
    order = sorted(groups, key=lambda key: (_k_key(key[0]), key[1], key[2]))
    return [_judge(spec, key, groups[key], cfg) for key in order]


def _plain(obj: Any) -> Any:
    """Dataclasses/tuples -> JSON-ready dicts/lists (the form written to verdicts.json)."""
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def verdicts(rows: list[dict], cfg: VerdictConfig = VerdictConfig(), claims: tuple[ClaimSpec, ...] = CLAIMS) -> dict:
    """Every claim's verdicts from table rows (dicts; a missing column reads as None).

    Returns the content of results/verdicts.json: {"schema_version", "config", "claims",
    "verdicts"} (see `VerdictReport`; `verdicts_schema()` is its JSON Schema).
    """
    for i, row in enumerate(rows):
        if not row.get("sae_id"):
            raise ValueError(f"table row {i} has no sae_id; verdicts need the rows of results/table.parquet")
    rows = [_with_traits(row) for row in rows]
    found = [v for spec in claims for v in claim_verdicts(spec, rows, cfg)]
    return _plain(VerdictReport(SCHEMA_VERSION, cfg, claims, found))


TRAIT_COLUMNS = ("arch_label", "arch_order", "l0_fixed", "routed", "has_omega", "has_threshold")
"""The table's architecture-trait columns (= ``saepipe.saes.registry.TRAIT_COLUMNS``, not
imported: this module stays free of torch)."""


def _with_traits(row: dict) -> dict:
    """The row with its architecture's trait columns filled in where missing (tables written
    before the trait columns, hand-made rows); rows of unregistered archs are left as they are.
    The registry (torch) is imported only then: the table's rows carry the traits."""
    if all(row.get(key) is not None for key in TRAIT_COLUMNS):
        return row
    from saepipe.saes.registry import arch_traits

    try:
        traits = arch_traits(str(row.get("arch")))
    except ValueError:
        return row
    return {**row, **{k: v for k, v in traits.items() if row.get(k) is None}}


def read_table_rows(table_parquet: str | Path) -> list[dict]:
    """The rows of results/table.parquet as dicts."""
    import pyarrow.parquet as pq

    return pq.read_table(str(table_parquet)).to_pylist()


# ------------------------------------------------------------------------------ JSON Schema


def _type_schema(tp: Any) -> dict:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return {}
    if tp is type(None):
        return {"type": "null"}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object"}
    if tp in simple:
        return {"type": simple[tp]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is tuple:
        return {
            "type": "array",
            "prefixItems": [_type_schema(a) for a in args],
            "minItems": len(args),
            "maxItems": len(args),
        }
    if is_dataclass(tp):
        hints = get_type_hints(tp)
        return {
            "type": "object",
            "description": (tp.__doc__ or "").strip(),
            "additionalProperties": False,
            "required": [f.name for f in fields(tp)],
            "properties": {
                f.name: {**_type_schema(hints[f.name]), "description": f.metadata.get("doc", "")} for f in fields(tp)
            },
        }
    raise TypeError(f"no JSON Schema for type {tp!r}: extend saepipe.verdicts._type_schema")


def verdicts_schema() -> dict:
    """JSON Schema (2020-12) of results/verdicts.json, generated from the dataclasses' field docs."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "saepipe verdicts",
        **_type_schema(VerdictReport),
    }


# ------------------------------------------------------------------------------ writers


def _effect_text(v: dict) -> str:
    """Effect with its CI, e.g. '-20.6% [-25.1%, -16.0%]' (no interval with one seed)."""
    eff = v.get("effect")
    if not eff:
        return "—"
    text = fmt_effect(v["effect_kind"], eff["mean"])
    if eff["n"] >= 2:
        text += f" [{fmt_effect(v['effect_kind'], eff['low'])}, {fmt_effect(v['effect_kind'], eff['high'])}]"
    return text


def _pair_text(v: dict) -> str:
    return f"{v['a_point']} vs {v['b_point']}" if v.get("a_point") else "—"


def _ratio_text(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "—"


def format_table(result: dict) -> str:
    """The verdicts as a plain-text table for a terminal (one line per verdict)."""
    head = ("claim", "k", "A vs B", "effect [CI]", "n", "FLOPs B/A", "status", "reason")
    lines = [
        (
            f"{v['number']} {v['claim']}",
            "—" if v["k"] is None else str(v["k"]),
            _pair_text(v),
            _effect_text(v),
            str(v["n"]),
            _ratio_text(v.get("flop_ratio")),
            v["status"],
            v["reason"],
        )
        for v in result["verdicts"]
    ]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head) - 1)]
    cfg = result["config"]
    out = [
        f"Verdicts on the papers' claims (docs/reference.md §6): {cfg['confidence']:.0%} CI over seeds, "
        "paired by seed; "
        f"min_seeds {cfg['min_seeds']}, max_dead_fraction {cfg['max_dead_fraction']}, "
        f"close_tolerance {cfg['close_tolerance']}"
    ]
    for row in [head, *lines]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    counts = {s: sum(v["status"] == s for v in result["verdicts"]) for s in STATUS_COLOURS}
    out.append("  ".join(f"{s}: {c}" for s, c in counts.items()))
    return "\n".join(out)


def _status_html(status: str, reason: str = "") -> str:
    code = reason.split(":", 1)[0] if reason else ""
    shown = code and code not in (status, "ci_excludes")  # "supported" says it already
    small = f"<br><small>{html.escape(code.replace('_', ' '))}</small>" if shown else ""
    return (
        f"<span class='status' style='color:#fff;background:{STATUS_COLOURS[status]};padding:1px 6px;"
        f"border-radius:3px;white-space:nowrap'>{html.escape(status.replace('_', ' '))}</span>{small}"
    )


def _how_to_read(cfg: dict) -> str:
    return (
        "One row per claim of the Switch and Scale SAE papers (docs/reference.md §6) at every k the sweep covers. "
        "Side A is the architecture the claim is about, side B what it is compared with; the two are "
        "paired by seed (same k, same seed, same matching). <b>Effect</b> = mean over the seed pairs of "
        "the relative difference (A − B) / B (or, for redundancy, the difference A − B in percentage "
        f"points), with its {cfg['confidence']:.0%} Student-t confidence interval; n = number of seed pairs. "
        "<b>supported</b>: the interval lies on the side the claim predicts; <b>contradicted</b>: it lies "
        "on the other side; <b>inconclusive</b>: the interval contains 0 (ci overlap), fewer than "
        f"{cfg['min_seeds']} seeds (single seed), an SAE with more than {cfg['max_dead_fraction']:.0%} "
        "dead latents (undertrained), or nothing to measure (e.g. zero redundancy on both sides); "
        "<b>not in sweep</b>: the sweep has no pair of SAEs that tests the claim. Claim 2 is 'close' when "
        f"the whole interval lies below +{cfg['close_tolerance']:.0%}. Δ loss recovered is A − B, paired. "
        "Thresholds: the verdicts section of config.yaml. Everything is in results/verdicts.json."
    )


def verdicts_page(result: dict, out_html: str | Path) -> None:
    """The report page: a readable table of every verdict, with how to read it."""
    rows = []
    for v in result["verdicts"]:
        lr = v.get("delta_loss_recovered")
        lr_text = (
            "—"
            if not lr
            else (f"{lr['mean']:+.4f}" + (f" [{lr['low']:+.4f}, {lr['high']:+.4f}]" if lr["n"] >= 2 else ""))
        )
        sides = (
            f"<b>A</b> {html.escape(v['a_label'])}: {html.escape(', '.join(v['a_saes']) or '—')}<br>"
            f"<b>B</b> {html.escape(v['b_label'])}: {html.escape(', '.join(v['b_saes']) or '—')}"
        )
        dead = "—" if v["max_dead_fraction"] is None else f"{v['max_dead_fraction']:.1%}"
        rows.append(
            f"<tr><td><b>{html.escape(v['number'])}.</b> {html.escape(v['claim_text'])}"
            f"<br><small>{html.escape(v['paper'])}</small></td><td>{sides}</td>"
            f"<td class='num'>{'—' if v['k'] is None else v['k']}</td>"
            f"<td class='num'>{html.escape(_effect_text(v))}<br><small>{html.escape(v['metric'])}</small></td>"
            f"<td class='num'>{v['n']}</td><td class='num'>{html.escape(lr_text)}</td>"
            f"<td class='num'>{dead}</td><td class='num'>{_ratio_text(v.get('flop_ratio'))}</td>"
            f"<td>{_status_html(v['status'])}</td><td>{html.escape(v['reason'])}</td></tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "Claim",
            "A vs B (SAEs)",
            "k",
            "Effect [CI]",
            "n",
            "Δ loss recovered",
            "max dead",
            "FLOPs B/A",
            "Status",
            "Reason",
        )
    )
    write_page(
        out_html,
        "Verdicts on the papers' claims",
        f"<table><tr>{head}</tr>{''.join(rows)}</table>",
        _how_to_read(result["config"]),
        "td small { color: #555; }",
    )


def landing_summary(result: dict, out_html: str | Path) -> None:
    """An HTML fragment for the report's landing page: claim, k, effect, status, one line each.

    report/workflow.rst includes it (docutils ``raw:: html``) above the workflow description,
    so its styles are scoped to its own id.
    """
    shorts = {c["id"]: c["short"] for c in result["claims"]}
    rows = "".join(
        f"<tr><td>{html.escape(v['number'])}. {html.escape(shorts[v['claim']])}</td>"
        f"<td>{'—' if v['k'] is None else v['k']}</td><td class='eff'>{html.escape(_effect_text(v))}</td>"
        f"<td>{_status_html(v['status'], v['reason'])}</td></tr>"
        for v in result["verdicts"]
    )
    cfg = result["config"]
    fragment = (
        "<div id='saepipe-verdicts'><style>"
        "#saepipe-verdicts { font-size: 12px; margin-bottom: 1em; }"
        "#saepipe-verdicts p.title { font-size: 15px; font-weight: 700; margin: 0 0 .3em; }"
        "#saepipe-verdicts table { border-collapse: collapse; margin: 0; }"
        "#saepipe-verdicts td, #saepipe-verdicts th { padding: 2px 4px; border-bottom: 1px solid #ddd; "
        "text-align: left; vertical-align: top; }"
        "#saepipe-verdicts td.eff { white-space: nowrap; } #saepipe-verdicts p { margin: .3em 0; }</style>"
        "<p class='title'>Verdicts on the papers' claims</p>"
        f"<table><tr><th>Claim</th><th>k</th><th>Effect [CI]</th><th>Status</th></tr>{rows}</table>"
        f"<p>Effect: A vs B paired by seed, mean [{cfg['confidence']:.0%} CI]. Supported or contradicted "
        f"needs ≥ {cfg['min_seeds']} seeds and ≤ {cfg['max_dead_fraction']:.0%} dead latents.</p></div>"
    )
    with atomic_path(out_html) as tmp:
        tmp.write_text(fragment, encoding="utf-8")


def write_outputs(
    result: dict, out_json: str | Path, out_html: str | Path | None = None, out_summary: str | Path | None = None
) -> None:
    """verdicts.json, and optionally the report page and the landing-page fragment."""
    write_json(out_json, result)
    if out_html is not None:
        verdicts_page(result, out_html)
    if out_summary is not None:
        landing_summary(result, out_summary)


# ------------------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m saepipe.verdicts", description="Print the verdict table of a run (results/verdicts.json)."
    )
    parser.add_argument("path", nargs="?", default="results/verdicts.json", help="verdicts.json of a run")
    parser.add_argument("--schema", action="store_true", help="print the JSON Schema of verdicts.json instead")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(verdicts_schema(), indent=2))
        return 0
    path = Path(args.path)
    if not path.is_file():
        print(
            f"no verdicts at {path}: run the pipeline first (`make demo`, or `snakemake --cores all "
            f"results/verdicts.json`)",
            file=sys.stderr,
        )
        return 2
    result = json.loads(path.read_text())
    if result.get("schema_version") != SCHEMA_VERSION:
        print(
            f"{path} has schema_version {result.get('schema_version')!r}, this saepipe reads "
            f"{SCHEMA_VERSION!r}: rerun the verdicts rule (`snakemake --cores 1 --forcerun verdicts "
            "results/verdicts.json`)",
            file=sys.stderr,
        )
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
