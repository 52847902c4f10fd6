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

`match` derives `width`: `width` keeps the baseline's total latents; `flops` gives equal
forward FLOPs per token (Switch: expert width = dense width). The derived configuration
is checked against the baseline's FLOPs and a mismatch is a config error naming both.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import fields

from saepipe.saes import ARCHITECTURES, config_from_dict

# Fields of the saved SAE config that the pipeline fills in, never the user.
PIPELINE_FIELDS = {"d_in", "act_norm_factor", "hook", "model_id", "training_tokens"}
FLOP_TOLERANCE = 0.05  # relative; the router's 2dN FLOPs make exact equality impossible


class SweepError(ValueError):
    pass


# Short names of grid axes in SAE ids: `scale-e2` rather than `scale-active_experts2`.
ID_FIELD_NAMES = {"active_experts": "e", "n_experts": "N", "feature_scaling": "fs", "width": "w"}


def _id_value(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def arch_fields(arch: str) -> set[str]:
    if arch not in ARCHITECTURES:
        raise SweepError(f"unknown arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    return {f.name for f in fields(ARCHITECTURES[arch][1])} - PIPELINE_FIELDS


def canonical(obj) -> str:
    """The form params take: key-sorted JSON, so reordering YAML keys reruns nothing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _sae_config(values: dict, d_in: int):
    return config_from_dict({**values, "d_in": d_in})


def _apply_match(group: str, values: dict, match: dict, groups: dict, d_in: int) -> dict:
    base_name = match["baseline"]
    if base_name not in groups:
        raise SweepError(f"sweep.{group}.match.baseline: no group named {base_name!r}")
    base = groups[base_name]
    if isinstance(base.get("width"), list) or "width" not in base:
        raise SweepError(f"sweep.{group}.match: baseline {base_name!r} needs one fixed width")
    base_values = {k: v for k, v in base.items() if k in arch_fields(base["arch"])}
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
    if width is None:  # derive: same active encoder width as the baseline
        trial = _sae_config({**values, "width": baseline.width}, d_in)
        width = round(baseline.width * baseline.encoder_fraction() / trial.encoder_fraction())
    derived = _sae_config({**values, "width": width}, d_in)
    ratio = derived.flops_per_token() / baseline.flops_per_token()
    if abs(ratio - 1) > FLOP_TOLERANCE:
        raise SweepError(
            f"sweep.{group} is declared FLOP-matched to {base_name!r} but is not: "
            f"{derived.flops_per_token():,} vs {baseline.flops_per_token():,} FLOPs/token "
            f"(ratio {ratio:.3f}, tolerance {FLOP_TOLERANCE})"
        )
    return {**values, "width": width}


def expand_sweep(config: dict, d_in: int) -> dict[str, dict]:
    """SAE id -> {"group", "sae", "train", "match"} for every point of the sweep."""
    defaults, groups = config["train"], config["sweep"]
    points: dict[str, dict] = {}
    for group, spec in groups.items():
        spec = dict(spec)
        match = spec.pop("match", None)
        arch = spec.get("arch")
        allowed = arch_fields(arch) | set(defaults)
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise SweepError(
                f"sweep.{group}: unknown key(s) {unknown} for arch {arch!r}; "
                f"valid keys: {sorted(allowed)}"
            )
        axes = {k: v for k, v in spec.items() if isinstance(v, list)}
        for combo in itertools.product(*axes.values()):
            values = {**spec, **dict(zip(axes, combo))}
            sid = group + "".join(f"-{ID_FIELD_NAMES.get(k, k)}{_id_value(v)}" for k, v in zip(axes, combo))
            sae = {k: v for k, v in values.items() if k in arch_fields(arch)}
            if match:
                sae = _apply_match(group, sae, match, groups, d_in)
            _sae_config(sae, d_in)  # validates the architecture's own constraints
            train = {**defaults, **{k: v for k, v in values.items() if k in defaults}}
            if sid in points:
                raise SweepError(f"two sweep points are both named {sid!r}")
            points[sid] = {"group": group, "sae": sae, "train": train, "match": match or {}}
    return points
