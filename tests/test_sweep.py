"""Sweep expansion: grid axes, ids, matched configurations and config errors."""

import re

import pytest
import yaml
from conftest import REPO

from saepipe.saes import ARCHITECTURES, config_from_dict
from saepipe.sweep import SweepError, canonical, expand_sweep

TRAIN = {"tokens": 1000, "batch_size": 10, "lr": 1e-3}


def _expand(sweep, d_in=64):
    return expand_sweep({"train": TRAIN, "sweep": sweep}, d_in)


def test_default_config_sweep():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    points = expand_sweep(cfg, cfg["lm"]["d_model"])
    assert len(points) == 31
    assert {p["sae"]["arch"] for p in points.values()} == set(ARCHITECTURES)  # one of each
    # the comparison groups have two seeds each, pooled into one point
    assert points["switch_flop-k16-s1"]["point"] == "switch_flop-k16"
    assert {p["train"]["seed"] for sid, p in points.items() if p["point"] == "topk-k32"} == {0, 1, 2}
    assert {p["train"]["seed"] for sid, p in points.items() if p["point"] == "scale_flop-k32"} == {0, 1}
    assert points["switch_flop-k16-s0"]["sae"]["width"] == 4 * points["topk-k16-s0"]["sae"]["width"]
    assert points["switch_width-k16-s0"]["sae"]["width"] == points["topk-k16-s0"]["sae"]["width"]
    assert points["scale_flop-k16-s0"]["sae"]["width"] == 2 * points["topk-k16-s0"]["sae"]["width"]
    # the Scale e-ablation holds N and M fixed at scale_flop's (e = 2), only e changes
    scale = points["scale_flop-k32-s0"]["sae"]
    for e in (1, 4):
        ablation = points[f"scale_e-e{e}"]["sae"]
        assert (ablation["n_experts"], ablation["width"], ablation["k"]) == (scale["n_experts"], scale["width"], 32)
    assert points["scale_nofs-s0"]["sae"]["feature_scaling"] is False
    # every TopK-family SAE has AuxK (the architectures' default) with the same dead window
    assert all(p["sae"].get("auxk", True) for p in points.values())


def test_grid_axes_ids_and_training_overrides():
    points = _expand({"t": {"arch": "topk", "width": 256, "k": [4, 8], "lr": [1e-3, 3e-3]}})
    assert sorted(points) == ["t-k4-lr0.001", "t-k4-lr0.003", "t-k8-lr0.001", "t-k8-lr0.003"]
    scale = _expand(
        {
            "s": {
                "arch": "scale",
                "width": 256,
                "n_experts": 4,
                "active_experts": [1, 2],
                "feature_scaling": [True, False],
                "k": 8,
            }
        }
    )
    assert sorted(scale) == ["s-e1-fs0", "s-e1-fs1", "s-e2-fs0", "s-e2-fs1"]
    p = points["t-k8-lr0.003"]
    assert p["sae"] == {"arch": "topk", "width": 256, "k": 8}
    assert p["train"] == {**TRAIN, "lr": 3e-3}


def test_flop_matched_switch_is_derived_and_checked():
    sweep = {
        "dense": {"arch": "topk", "width": 512, "k": 8},
        "sw": {"arch": "switch", "n_experts": 4, "k": 8, "match": {"baseline": "dense", "by": "flops"}},
    }
    points = _expand(sweep)
    assert points["sw"]["sae"]["width"] == 2048
    sweep["sw"]["width"] = 1024
    with pytest.raises(SweepError, match=r"not: .* vs .* FLOPs/token"):
        _expand(sweep)
    sweep["sw"].update(width=512, match={"baseline": "dense", "by": "width"})
    assert _expand(sweep)["sw"]["sae"]["width"] == 512
    sweep["sw"]["width"] = 1024
    with pytest.raises(SweepError, match="width-matched"):
        _expand(sweep)


def test_unknown_field_for_the_arch_is_named():
    with pytest.raises(SweepError, match=r"\['n_experts'\] for arch 'topk'"):
        _expand({"t": {"arch": "topk", "width": 64, "k": 4, "n_experts": 4}})


def test_arch_constraints_are_checked_at_expansion():
    with pytest.raises(ValueError):
        _expand({"s": {"arch": "switch", "width": 100, "n_experts": 8, "k": 4}})


def test_canonical_ignores_key_order():
    assert canonical({"b": 1, "a": [1, 2]}) == canonical({"a": [1, 2], "b": 1})


def test_seeds_are_an_axis_with_readable_ids_and_point_ids():
    points = expand_sweep(
        {
            "train": {**TRAIN, "seed": [0, 1]},
            "sweep": {
                "t": {"arch": "topk", "width": 64, "k": [4, 8]},
                "one": {"arch": "topk", "width": 64, "k": 4, "seed": 7},
            },
        },
        64,
    )
    assert sorted(points) == ["one", "t-k4-s0", "t-k4-s1", "t-k8-s0", "t-k8-s1"]
    assert points["t-k8-s1"]["point"] == "t-k8" and points["t-k8-s1"]["train"]["seed"] == 1
    assert points["one"]["point"] == "one" and points["one"]["train"]["seed"] == 7  # the group's own value wins
    # a seed axis given in the group comes last in the id whatever its position in the YAML
    grouped = _expand({"t": {"arch": "topk", "seed": [3, 4], "width": 64, "k": [4, 8]}})
    assert sorted(grouped) == ["t-k4-s3", "t-k4-s4", "t-k8-s3", "t-k8-s4"]
    assert {p["point"] for p in grouped.values()} == {"t-k4", "t-k8"}


def test_lr_auto_is_accepted_as_a_training_field():
    points = _expand({"t": {"arch": "topk", "width": 64, "k": 4, "lr": "auto", "grad_clip": 1.0}})
    assert points["t"]["train"]["lr"] == "auto" and points["t"]["train"]["grad_clip"] == 1.0


def test_train_flops_matching_derives_the_widest_width_within_the_baseline_cost():
    train = {**TRAIN, "batch_size": 1024}
    sweep = {
        "dense": {"arch": "topk", "width": 512, "k": 8},
        "sw": {"arch": "switch", "n_experts": 4, "k": 8, "match": {"baseline": "dense", "by": "train_flops"}},
    }
    points = expand_sweep({"train": train, "sweep": sweep}, 64)
    sae = points["sw"]["sae"]
    cfg = lambda w: config_from_dict({**sae, "width": w, "d_in": 64})  # noqa: E731
    base = config_from_dict({**points["dense"]["sae"], "d_in": 64}).train_flops_per_token(1024)
    assert sae["width"] % 4 == 0
    assert cfg(sae["width"]).train_flops_per_token(1024) <= base < cfg(sae["width"] + 4).train_flops_per_token(1024)
    # cheaper to train per forward FLOP than Adam over 4x the parameters allows: narrower than FLOP-matched
    assert sae["width"] < 4 * 512
    with pytest.raises(SweepError, match="numeric train.batch_size"):
        expand_sweep({"train": {**TRAIN, "batch_size": "auto"}, "sweep": sweep}, 64)


def test_errors_name_the_group_and_key():
    with pytest.raises(SweepError, match=r"sweep\.t\.n_experts: unknown key"):
        _expand({"t": {"arch": "topk", "width": 64, "k": 4, "n_experts": 4}})
    with pytest.raises(SweepError, match=r"sweep\.t \(point t\): topk field 'k' must be an int, got 'eight'"):
        _expand({"t": {"arch": "topk", "width": 64, "k": "eight"}})
    # every field is checked against its annotation in the config dataclass (no per-arch list)
    for spec, message in (
        ({"arch": "topk", "width": 64, "k": 4, "auxk": 1}, "topk field 'auxk' must be a bool, got 1"),
        ({"arch": "topk", "width": 64, "k": 4, "k_aux": 2.5}, "topk field 'k_aux' must be an int or null, got 2.5"),
        ({"arch": "switch", "width": 64, "k": 4, "n_experts": "4"}, "switch field 'n_experts' must be an int, got '4'"),
        ({"arch": "relu", "width": 64, "k": 4, "l1_coeff": "big"}, "relu field 'l1_coeff' must be a number, got 'big'"),
    ):
        with pytest.raises(SweepError, match=rf"sweep\.t \(point t\): {re.escape(message)}"):
            _expand({"t": spec})
    # a matched group reads its baseline at its own axis values (the seed axis is no error)
    points = _expand(
        {
            "t": {"arch": "topk", "width": 64, "k": 4, "seed": [0, 1]},
            "s": {"arch": "switch", "n_experts": 4, "k": 4, "seed": [0, 1], "match": {"baseline": "t", "by": "width"}},
        }
    )
    assert sorted(points) == ["s-s0", "s-s1", "t-s0", "t-s1"] and points["s-s1"]["sae"]["width"] == 64


def test_a_list_valued_field_is_one_value_and_a_list_of_lists_its_axis():
    mat = {"arch": "matryoshka", "width": 64, "k": 4}
    one = _expand({"m": {**mat, "matryoshka_widths": [16, 32, 64]}})
    assert list(one) == ["m"] and one["m"]["sae"]["matryoshka_widths"] == [16, 32, 64]
    two = _expand({"m": {**mat, "matryoshka_widths": [[16, 64], [8, 32, 64]]}})
    assert list(two) == ["m-matryoshka_widths16_64", "m-matryoshka_widths8_32_64"]
    assert two["m-matryoshka_widths8_32_64"]["sae"]["matryoshka_widths"] == [8, 32, 64]
    with pytest.raises(SweepError, match=r"sweep\.s \(point s\): width=100 must be divisible by n_experts=8"):
        _expand({"s": {"arch": "switch", "width": 100, "n_experts": 8, "k": 4}})
