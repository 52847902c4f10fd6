"""Expand the `sweep:` section of config.yaml into one configuration per SAE.

    sweep:
      topk:                     # group name (becomes the prefix of every SAE id)
        arch: topk
        width: 2048
        k: [8, 16, 32]          # any list-valued field is a grid axis
      switch_flop:
        arch: switch
        n_experts: 8
        k: [8, 16, 32]
        match: {baseline: topk, by: flops}   # width derived from the baseline group

Every point is {"sae": <architecture fields>, "train": <training fields>}; training
fields not given in the group come from the top-level `train:` section. The SAE id is
the group name plus `-<field><value>` for each grid axis, e.g. `topk-k16`, with short
names for some fields (`ID_FIELD_NAMES`: `scale-e2` for active_experts, booleans as 0/1).
A group gives one point's hyperparameters to all of its points: to change one point
alone, give it a group of its own.

Seeds (and any other training field) are axes too: `seed: [0, 1]` in a group, or in the
top-level `train:` section to train every point of every group with each seed (a group's
own value wins). The seed axis is written `-s<seed>` and comes last in the id
(`topk-k16-s1`); every point also has a `point` id, its SAE id without the seed
(`topk-k16`), which the table, the figures and the verdicts use to pool the seeds of one
sweep point (mean and confidence interval, comparisons paired by seed).

`match` derives `width`: `width` keeps the baseline's total latents; `flops` gives equal
forward FLOPs per token (Switch: expert width = dense width); `train_flops` gives equal
TRAINING FLOPs per token (forward + backward + optimizer, `SAEConfig.train_flops_per_token`
at the point's batch size, which must then be a number, not "auto"): the widest width the
architecture allows whose training FLOPs do not exceed the baseline's. The derived
configuration is checked against the baseline's FLOPs and a mismatch is a config error
naming both.
"""

from __future__ import annotations

import itertools
import json
import types
import typing
from dataclasses import fields

from saepipe.saes import ARCHITECTURES, config_from_dict
from saepipe.train import RUNTIME_FIELDS, TrainConfig

# Fields of the saved SAE config that the pipeline fills in, never the user.
PIPELINE_FIELDS = {"d_in", "act_norm_factor", "hook", "model_id", "training_tokens"}
TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - set(RUNTIME_FIELDS) - {"device", "log_every"}
"""Training fields a group may set (its own value, or an axis); the rest come from `train:`."""
FLOP_TOLERANCE = 0.05  # relative; the router's 2dN FLOPs make exact equality impossible


class SweepError(ValueError):
    pass


# Short names of grid axes in SAE ids: `scale-e2` rather than `scale-active_experts2`.
ID_FIELD_NAMES = {"active_experts": "e", "n_experts": "N", "feature_scaling": "fs", "width": "w", "seed": "s"}
SEED_FIELD = "seed"  # the axis pooled into one point (its id part is dropped from `point`)


def _id_value(v) -> str:
    if isinstance(v, list):  # one value of a list-valued field: 64_128_256
        return "_".join(map(_id_value, v))
    return str(int(v)) if isinstance(v, bool) else str(v)


def list_fields(arch: str) -> set[str]:
    """The arch's config fields whose value is itself a list (e.g. Matryoshka's
    ``matryoshka_widths``): there a list is one value, and an axis is a list of lists."""
    hints = typing.get_type_hints(ARCHITECTURES[arch][1])
    return {name for name, hint in hints.items() if _holds_list(hint)}


def _holds_list(hint) -> bool:
    if typing.get_origin(hint) in (list, tuple):
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and any(map(_holds_list, typing.get_args(hint)))


def is_axis(key: str, value, list_valued: set[str]) -> bool:
    """Whether a group's `value` for `key` is a grid axis: a list, except for a list-valued
    field (``list_valued``), where only a list of lists is."""
    if not isinstance(value, list):
        return False
    return key not in list_valued or all(isinstance(v, list) for v in value)


def arch_fields(arch: str) -> set[str]:
    if arch not in ARCHITECTURES:
        raise SweepError(f"unknown arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    return {f.name for f in fields(ARCHITECTURES[arch][1])} - PIPELINE_FIELDS


def canonical(obj) -> str:
    """The form params take: key-sorted JSON, so reordering YAML keys reruns nothing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _sae_config(values: dict, d_in: int):
    return config_from_dict({**values, "d_in": d_in})


def _train_flops(cfg, train: dict, group: str) -> float:
    batch = train.get("batch_size")
    if not isinstance(batch, int) or isinstance(batch, bool):
        raise SweepError(
            f"sweep.{group}: match by train_flops needs a numeric train.batch_size (the optimizer's "
            f"FLOPs per token depend on it), got {batch!r}; set batch_size in the group or in `train`"
        )
    return cfg.train_flops_per_token(batch)


def _match_train_flops(group: str, values: dict, baseline, base_train: dict, train: dict, d_in: int) -> int:
    """The widest valid width whose training FLOPs/token do not exceed the baseline's (monotone in width)."""
    target = _train_flops(baseline, base_train, group)
    step = int(values.get("n_experts", 1))

    def cost(width: int) -> float | None:  # None: the architecture rejects this width
        try:
            return _train_flops(_sae_config({**values, "width": width}, d_in), train, group)
        except SweepError:
            raise
        except ValueError:
            return None

    lo = step
    while (lo_cost := cost(lo)) is None:  # the smallest valid width (e.g. k <= M / N)
        lo *= 2
        if lo > 2**40:
            raise SweepError(f"sweep.{group}: no valid width for {values}")
    if lo_cost > target:
        raise SweepError(
            f"sweep.{group}: even the smallest valid width ({lo}) costs more training "
            f"FLOPs/token ({lo_cost:,.0f}) than the baseline ({target:,.0f})"
        )

    def fits(width: int) -> bool:  # widths >= lo are valid (the constraints only bound M from below)
        c = cost(width)
        return c is not None and c <= target

    hi = lo
    while fits(hi):
        hi *= 2
        if hi > 2**40:
            raise SweepError(f"sweep.{group}: no width reaches the baseline's training FLOPs")
    while hi - lo > step:  # invariant: width lo fits, width hi does not
        mid = (lo + hi) // 2 // step * step
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _apply_match(group: str, values: dict, match: dict, groups: dict, d_in: int, train: dict, base_train: dict) -> dict:
    base_name = match["baseline"]
    if base_name not in groups:
        raise SweepError(f"sweep.{group}.match.baseline: no group named {base_name!r}")
    base = groups[base_name]
    if isinstance(base.get("width"), list) or "width" not in base:
        raise SweepError(f"sweep.{group}.match: baseline {base_name!r} needs one fixed width")
    # the baseline at this point's axis values (k, seed, ...; its own first value otherwise)
    listed = list_fields(base["arch"])
    base_values = {
        k: (values.get(k, v[0]) if is_axis(k, v, listed) else v)
        for k, v in base.items()
        if k in arch_fields(base["arch"])
    }
    base_values["k"] = values["k"]
    baseline = _sae_config(base_values, d_in)
    if match["by"] == "width":
        if values.get("width", baseline.width) != baseline.width:
            raise SweepError(
                f"sweep.{group} is declared width-matched to {base_name!r} but has width "
                f"{values['width']} vs {baseline.width}; drop `width` to derive it"
            )
        return {**values, "width": baseline.width}
    width = values.get("width")
    if match["by"] == "train_flops":
        if width is None:
            width = _match_train_flops(group, values, baseline, base_train, train, d_in)
        derived = _sae_config({**values, "width": width}, d_in)
        mine, theirs = _train_flops(derived, train, group), _train_flops(baseline, base_train, group)
        kind, matched = "training FLOPs/token", "training-FLOP-matched"
    else:
        if width is None:  # derive: same active encoder width as the baseline
            trial = _sae_config({**values, "width": baseline.width}, d_in)
            width = round(baseline.width * baseline.encoder_fraction() / trial.encoder_fraction())
        derived = _sae_config({**values, "width": width}, d_in)
        mine, theirs = derived.flops_per_token(), baseline.flops_per_token()
        kind, matched = "FLOPs/token", "FLOP-matched"
    ratio = mine / theirs
    if abs(ratio - 1) > FLOP_TOLERANCE:
        raise SweepError(
            f"sweep.{group} is declared {matched} to {base_name!r} but is not: "
            f"{mine:,.0f} vs {theirs:,.0f} {kind} (ratio {ratio:.3f}, tolerance {FLOP_TOLERANCE}); "
            "drop `width` to derive it"
        )
    return {**values, "width": width}


def expand_sweep(config: dict, d_in: int) -> dict[str, dict]:
    """SAE id -> {"group", "point", "sae", "train", "match"} for every point of the sweep.

    "point" is the id without the seed axis (the same for every seed of one sweep point).
    """
    defaults, groups = config["train"], config["sweep"]
    # runtime fields (train.log_to: a list) are never axes: they change no SAE, jobs read them from `train:`
    default_axes = {k: v for k, v in defaults.items() if isinstance(v, list) and k not in RUNTIME_FIELDS}
    points: dict[str, dict] = {}
    for group, spec in groups.items():
        spec = dict(spec)
        match = spec.pop("match", None)
        arch = spec.get("arch")
        if not isinstance(arch, str):
            raise SweepError(f"sweep.{group}.arch: missing or not a name ({arch!r}); known: {sorted(ARCHITECTURES)}")
        allowed = arch_fields(arch) | set(defaults) | TRAIN_FIELDS
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise SweepError(
                f"{', '.join(f'sweep.{group}.{key}' for key in unknown)}: unknown key(s) {unknown} "
                f"for arch {arch!r}; valid keys: {sorted(allowed)}"
            )
        # list-valued `train` fields are axes of every group that does not set them itself
        spec = {**{k: v for k, v in default_axes.items() if k not in spec}, **spec}
        listed = list_fields(arch)
        axes = {k: v for k, v in spec.items() if is_axis(k, v, listed) and k not in RUNTIME_FIELDS}
        if SEED_FIELD in axes:  # the seed axis last, so `point` is a prefix of the id
            axes[SEED_FIELD] = axes.pop(SEED_FIELD)
        for combo in itertools.product(*axes.values()):
            values = {**spec, **dict(zip(axes, combo))}
            parts = [(k, f"-{ID_FIELD_NAMES.get(k, k)}{_id_value(v)}") for k, v in zip(axes, combo)]
            sid = group + "".join(p for _, p in parts)
            point = group + "".join(p for k, p in parts if k != SEED_FIELD)
            sae = {k: v for k, v in values.items() if k in arch_fields(arch)}
            train = {**defaults, **{k: v for k, v in values.items() if k in defaults or k in TRAIN_FIELDS}}
            try:  # matching, then the architecture's own constraints (its config dataclass)
                if match:
                    base_train = {
                        **defaults,
                        **{
                            k: v
                            for k, v in groups.get(match["baseline"], {}).items()
                            if k in defaults or k in TRAIN_FIELDS
                        },
                    }
                    base_train = {k: (train[k] if isinstance(v, list) else v) for k, v in base_train.items()}
                    sae = _apply_match(group, sae, match, groups, d_in, train, base_train)
                _sae_config(sae, d_in)
            except SweepError:
                raise
            except (ValueError, TypeError) as err:
                raise SweepError(f"sweep.{group} (point {sid}): {err}") from err
            if sid in points:
                raise SweepError(f"two sweep points are both named {sid!r}")
            points[sid] = {"group": group, "point": point, "sae": sae, "train": train, "match": match or {}}
    return points
