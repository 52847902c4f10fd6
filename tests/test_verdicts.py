"""saepipe.verdicts on hand-made metric tables: every status and reason, the CI against a
hand computation, pairing by seed, the JSON Schema, the config section and the printers."""

from __future__ import annotations

import html
import json
import math
import random
from pathlib import Path

import jsonschema
import pytest
import yaml

from saepipe.verdicts import (
    CLAIMS,
    SCHEMA_VERSION,
    VerdictConfig,
    format_table,
    landing_summary,
    main,
    verdicts,
    verdicts_page,
    verdicts_schema,
    write_outputs,
)

REPO = Path(__file__).resolve().parents[1]
T_975_DF1 = 12.706204736174698  # Student t quantile 0.975, 1 degree of freedom (tables)
T_975_DF2 = 4.302652729911275  # ... 2 degrees of freedom

# group -> fixed fields of its rows (a micro version of the default sweep)
GROUPS = {
    "topk": dict(arch="topk", width=128, flops_per_token=1000.0, train_flops_per_token=3000.0),
    "switch_flop": dict(
        arch="switch",
        width=512,
        n_experts=4,
        active_experts=1,
        match_baseline="topk",
        match_by="flops",
        flops_per_token=1040.0,
        train_flops_per_token=9000.0,
    ),
    "switch_width": dict(
        arch="switch",
        width=128,
        n_experts=4,
        match_baseline="topk",
        match_by="width",
        flops_per_token=250.0,
        train_flops_per_token=2000.0,
    ),
    "scale_flop": dict(
        arch="scale",
        width=256,
        n_experts=4,
        active_experts=2,
        feature_scaling=True,
        match_baseline="topk",
        match_by="flops",
        flops_per_token=1050.0,
    ),
    "scale_nofs": dict(
        arch="scale",
        width=256,
        n_experts=4,
        active_experts=2,
        feature_scaling=False,
        match_baseline="topk",
        match_by="flops",
        flops_per_token=1050.0,
    ),
    "scale_e1": dict(
        arch="scale",
        width=512,
        n_experts=4,
        active_experts=1,
        feature_scaling=True,
        match_baseline="topk",
        match_by="flops",
        flops_per_token=1050.0,
    ),
}


def row(group: str, k: int, seed: int | None, **metrics) -> dict:
    """One table row of `group` at `k` and `seed` (metrics default to harmless values)."""
    point = f"{group}-k{k}"
    r = dict(
        sae_id=point if seed is None else f"{point}-s{seed}",
        point_id=point,
        seed=seed,
        group=group,
        k=k,
        n_experts=None,
        active_experts=None,
        feature_scaling=None,
        match_baseline=None,
        match_by=None,
        l0=float(k),
        l2_per_token=1.0,
        fvu=0.1,
        loss_recovered=0.9,
        delta_ce=0.1,
        dead_fraction=0.01,
        redundancy_09=0.01,
        redundancy_08=0.02,
        mean_max_cos=0.5,
        activation_similarity=0.1,
        train_wall_s_per_token=1e-6,
    )
    r.update(GROUPS[group])
    r.update(metrics)
    return r


def series(group: str, k: int, metric: str, values: list[float], **fields) -> list[dict]:
    """Rows of one sweep point, seed i taking values[i]."""
    return [row(group, k, seed, **{metric: v}, **fields) for seed, v in enumerate(values)]


def of(result: dict, claim: str) -> list[dict]:
    return [v for v in result["verdicts"] if v["claim"] == claim]


def one(result: dict, claim: str) -> dict:
    found = of(result, claim)
    assert len(found) == 1, found
    return found[0]


def paper_sweep(seeds: int = 3) -> list[dict]:
    """Every claim testable at k=8 and k=16 (claims 4/4b at k=16), with clear effects."""
    rows = []
    for k in (8, 16):
        for s in range(seeds):
            jitter = 0.01 * s
            rows += [
                row("topk", k, s, l2_per_token=1.0 + jitter, redundancy_09=0.00 + jitter / 10),
                row("switch_flop", k, s, l2_per_token=0.80 + jitter, redundancy_09=0.05 + jitter),
                row("switch_width", k, s, l2_per_token=1.10 + jitter),
                row(
                    "scale_flop",
                    k,
                    s,
                    l2_per_token=0.60 + jitter,
                    redundancy_09=0.001,
                    activation_similarity=0.090 + jitter / 10,
                ),
            ]
            if k == 16:
                rows.append(
                    row(
                        "scale_nofs",
                        k,
                        s,
                        l2_per_token=0.65,
                        redundancy_09=0.02 + jitter,
                        activation_similarity=0.100 + jitter / 10,
                    )
                )
    return rows


# ---------------------------------------------------------------- statistics


def test_ci_over_three_seeds_matches_a_hand_computation():
    topk, switch = [1.0, 2.0, 4.0], [0.8, 1.7, 3.0]  # relative differences -0.20, -0.15, -0.25
    rows = series("topk", 8, "l2_per_token", topk) + series("switch_flop", 8, "l2_per_token", switch)
    v = one(verdicts(rows), "switch_flop_lower_l2")
    half = T_975_DF2 * 0.05 / math.sqrt(3)  # sd of the differences = 0.05
    assert v["n"] == 3 and v["seeds"] == [0, 1, 2]
    assert v["effect"]["values"] == pytest.approx([-0.20, -0.15, -0.25])
    assert v["effect"]["mean"] == pytest.approx(-0.20)
    assert v["effect"]["low"] == pytest.approx(-0.20 - half) and v["effect"]["high"] == pytest.approx(-0.20 + half)
    assert v["status"] == "supported" and v["reason"].startswith("ci_excludes:")
    assert v["a_saes"] == ["switch_flop-k8-s0", "switch_flop-k8-s1", "switch_flop-k8-s2"]
    assert v["b_saes"] == ["topk-k8-s0", "topk-k8-s1", "topk-k8-s2"]
    assert v["a_metric"]["mean"] == pytest.approx(5.5 / 3) and v["b_metric"]["mean"] == pytest.approx(7 / 3)


def test_ci_over_two_seeds_matches_a_hand_computation_and_overlaps_zero():
    rows = series("topk", 8, "l2_per_token", [1.0, 2.0]) + series("switch_flop", 8, "l2_per_token", [0.9, 2.1])
    v = one(verdicts(rows), "switch_flop_lower_l2")  # differences -0.10 and +0.05
    half = T_975_DF1 * (0.15 / math.sqrt(2)) / math.sqrt(2)
    assert v["effect"]["mean"] == pytest.approx(-0.025)
    assert (v["effect"]["low"], v["effect"]["high"]) == pytest.approx((-0.025 - half, -0.025 + half))
    assert v["status"] == "inconclusive" and v["reason"].startswith("ci_overlap:")
    assert "contains 0" in v["reason"]


def test_confidence_comes_from_the_config():
    rows = series("topk", 8, "l2_per_token", [1.0, 2.0]) + series("switch_flop", 8, "l2_per_token", [0.9, 2.1])
    wide = one(verdicts(rows, VerdictConfig(confidence=0.95)), "switch_flop_lower_l2")["effect"]
    narrow = one(verdicts(rows, VerdictConfig(confidence=0.5)), "switch_flop_lower_l2")["effect"]
    assert narrow["confidence"] == 0.5 and narrow["high"] - narrow["low"] < (wide["high"] - wide["low"]) / 10


def test_pairing_is_by_seed_not_by_row_order():
    rows = paper_sweep()
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert verdicts(shuffled) == verdicts(rows)
    # seeds that do not pair: a Switch seed without its TopK twin is left out
    extra = rows + [row("switch_flop", 8, 7, l2_per_token=100.0)]
    v = of(verdicts(extra), "switch_flop_lower_l2")[0]
    assert v["n"] == 3 and 7 not in v["seeds"]


def test_pairs_are_matched_on_seed_not_position():
    # TopK seed 1 is the worse one; pairing by position after a sort by value would flip the sign
    rows = [
        row("topk", 8, 0, l2_per_token=1.0),
        row("topk", 8, 1, l2_per_token=3.0),
        row("switch_flop", 8, 1, l2_per_token=2.7),
        row("switch_flop", 8, 0, l2_per_token=0.9),
    ]
    v = one(verdicts(rows), "switch_flop_lower_l2")
    assert v["effect"]["values"] == pytest.approx([-0.1, -0.1])


def test_loss_recovered_delta_dead_fraction_and_cost_ratios():
    rows = series("topk", 8, "loss_recovered", [0.90, 0.92, 0.94]) + series(
        "switch_flop", 8, "loss_recovered", [0.95, 0.95, 0.98], l2_per_token=0.5
    )
    rows[4]["dead_fraction"] = 0.12  # switch_flop-k8-s1, below the bound
    v = one(verdicts(rows), "switch_flop_lower_l2")
    assert v["delta_loss_recovered"]["values"] == pytest.approx([0.05, 0.03, 0.04])
    assert v["delta_loss_recovered"]["mean"] == pytest.approx(0.04)
    assert v["max_dead_fraction"] == pytest.approx(0.12) and v["max_dead_sae"] == "switch_flop-k8-s1"
    assert v["flop_ratio"] == pytest.approx(1000 / 1040) and v["train_flop_ratio"] == pytest.approx(3000 / 9000)
    rows[0]["loss_recovered"] = None  # a seed without it on one side: the others still count
    assert one(verdicts(rows), "switch_flop_lower_l2")["delta_loss_recovered"]["n"] == 2


# ---------------------------------------------------------------- every status and reason


def test_a_full_sweep_tests_every_claim_at_every_k():
    result = verdicts(paper_sweep())
    got = {(v["claim"], v["k"], v["a_point"], v["b_point"]): v["status"] for v in result["verdicts"]}
    assert got == {
        ("switch_flop_lower_l2", 8, "switch_flop-k8", "topk-k8"): "supported",
        ("switch_flop_lower_l2", 16, "switch_flop-k16", "topk-k16"): "supported",
        ("switch_width_close", 8, "switch_width-k8", "topk-k8"): "supported",
        ("switch_width_close", 16, "switch_width-k16", "topk-k16"): "supported",
        ("scale_lower_l2_than_switch", 8, "scale_flop-k8", "switch_flop-k8"): "supported",
        ("scale_lower_l2_than_switch", 16, "scale_flop-k16", "switch_flop-k16"): "supported",
        ("feature_scaling_lower_redundancy", 16, "scale_flop-k16", "scale_nofs-k16"): "supported",
        ("feature_scaling_lower_similarity", 16, "scale_flop-k16", "scale_nofs-k16"): "supported",
        ("moe_duplicates", 8, "switch_flop-k8", "topk-k8"): "supported",
        ("moe_duplicates", 16, "switch_flop-k16", "topk-k16"): "supported",
    }
    assert [v["k"] for v in of(result, "switch_flop_lower_l2")] == [8, 16]  # sorted by k
    assert {c["id"] for c in result["claims"]} == {v["claim"] for v in result["verdicts"]} == {c.id for c in CLAIMS}
    redundancy = of(result, "feature_scaling_lower_redundancy")[0]
    assert redundancy["effect_kind"] == "difference"
    assert redundancy["effect"]["mean"] == pytest.approx(0.001 - 0.03)  # percentage points of a fraction


def test_contradicted_when_the_ci_lies_on_the_other_side():
    rows = series("topk", 8, "l2_per_token", [1.0, 1.0, 1.0]) + series(
        "switch_flop", 8, "l2_per_token", [1.2, 1.3, 1.25]
    )
    v = one(verdicts(rows), "switch_flop_lower_l2")
    assert v["status"] == "contradicted" and v["reason"].startswith("ci_excludes:") and "above 0" in v["reason"]
    # claim 5 expects MORE redundancy: a lower one contradicts it
    rows = series("topk", 8, "redundancy_09", [0.10, 0.11, 0.12]) + series(
        "switch_flop", 8, "redundancy_09", [0.01, 0.02, 0.02]
    )
    v = one(verdicts(rows), "moe_duplicates")
    assert v["status"] == "contradicted" and "below 0" in v["reason"]


def test_single_seed_is_inconclusive_but_reports_the_effect():
    rows = [row("topk", 8, 0, l2_per_token=1.0), row("switch_flop", 8, 0, l2_per_token=0.5)]
    v = one(verdicts(rows), "switch_flop_lower_l2")
    assert v["status"] == "inconclusive" and v["reason"].startswith("single_seed:")
    assert v["n"] == 1 and v["effect"]["mean"] == pytest.approx(-0.5)
    assert v["effect"]["low"] == v["effect"]["high"] == v["effect"]["mean"]
    # min_seeds is the bound, not "1": three seeds are too few when 4 are asked for
    rows = paper_sweep(seeds=3)
    v = of(verdicts(rows, VerdictConfig(min_seeds=4)), "switch_flop_lower_l2")[0]
    assert v["status"] == "inconclusive" and v["reason"].startswith("single_seed: 3 seed pairs < min_seeds 4")


def test_missing_seed_and_point_columns_read_as_one_unseeded_run():
    rows = [row("topk", 8, None, l2_per_token=1.0), row("switch_flop", 8, None, l2_per_token=0.5)]
    for r in rows:
        del r["seed"], r["point_id"]
    v = one(verdicts(rows), "switch_flop_lower_l2")
    assert v["seeds"] == [None] and v["a_point"] == "switch_flop-k8" and v["reason"].startswith("single_seed:")
    # a table with the run's train_seed but no seed column pairs on train_seed
    rows = series("topk", 8, "l2_per_token", [1.0, 2.0]) + series("switch_flop", 8, "l2_per_token", [0.5, 1.0])
    for r in rows:
        r["train_seed"] = r.pop("seed") + 10
    assert one(verdicts(rows), "switch_flop_lower_l2")["seeds"] == [10, 11]


def test_dead_latents_above_the_bound_make_it_undertrained():
    rows = paper_sweep()
    for r in rows:
        if r["sae_id"] == "switch_flop-k8-s2":
            r["dead_fraction"] = 0.59
    result = verdicts(rows)
    v = of(result, "switch_flop_lower_l2")[0]
    assert v["status"] == "inconclusive"
    assert v["reason"] == "undertrained: dead fraction 0.59 > bound 0.15 (switch_flop-k8-s2)"
    assert v["effect"]["mean"] < 0  # still measured
    assert of(result, "switch_flop_lower_l2")[1]["status"] == "supported"  # k=16 is unaffected
    assert of(verdicts(rows, VerdictConfig(max_dead_fraction=0.6)), "switch_flop_lower_l2")[0]["status"] == "supported"


def test_zero_redundancy_on_both_sides_is_nothing_to_measure():
    rows = (
        series("topk", 8, "redundancy_09", [0.0, 0.0])
        + series("switch_flop", 8, "redundancy_09", [0.0, 0.0])
        + series("scale_flop", 8, "redundancy_09", [0.0, 0.0])
        + series("scale_nofs", 8, "redundancy_09", [0.0, 0.0])
    )
    result = verdicts(rows)
    for claim in ("moe_duplicates", "feature_scaling_lower_redundancy"):
        v = one(result, claim)
        assert v["status"] == "inconclusive" and v["reason"].startswith("nothing_to_measure: zero redundancy"), v
    # zero on one side only is a measurement
    rows[2]["redundancy_09"], rows[3]["redundancy_09"] = 0.02, 0.03
    assert one(verdicts(rows), "moe_duplicates")["reason"].startswith(("ci_", "single_seed"))


def test_relative_effect_over_a_zero_baseline_is_nothing_to_measure():
    rows = series("scale_flop", 8, "activation_similarity", [0.1, 0.1]) + series(
        "scale_nofs", 8, "activation_similarity", [0.0, 0.2]
    )
    v = one(verdicts(rows), "feature_scaling_lower_similarity")
    assert v["effect"] is None and v["status"] == "inconclusive"
    assert v["reason"].startswith("nothing_to_measure:") and "undefined" in v["reason"]


def test_claim_two_is_judged_against_the_tolerance_both_ways():
    def claim2(switch_l2: list[float], tolerance: float = 0.25) -> dict:
        rows = series("topk", 8, "l2_per_token", [1.0, 1.0, 1.0]) + series("switch_width", 8, "l2_per_token", switch_l2)
        return one(verdicts(rows, VerdictConfig(close_tolerance=tolerance)), "switch_width_close")

    close = claim2([1.14, 1.15, 1.16])  # +15% +- 1%: within 25%
    assert close["status"] == "supported" and "below the tolerance +25.0%" in close["reason"]
    assert close["tolerance"] == 0.25 and close["flop_ratio"] == pytest.approx(1000 / 250)  # the ~N-fold saving
    far = claim2([1.39, 1.40, 1.41])
    assert far["status"] == "contradicted" and "above the tolerance" in far["reason"]
    straddle = claim2([1.10, 1.25, 1.40])
    assert straddle["status"] == "inconclusive" and straddle["reason"].startswith("ci_overlap:")
    assert "contains the tolerance" in straddle["reason"]
    assert claim2([1.14, 1.15, 1.16], tolerance=0.1)["status"] == "contradicted"


def test_claims_select_only_their_architectures():
    rows = paper_sweep()
    rows += [row("scale_e1", 8, s, l2_per_token=0.1) for s in range(3)]  # e = 1: not claim 3's Scale
    # a BatchTopK point in the baseline's group (as if the group mixed archs): not a TopK baseline
    rows += [
        row("topk", 8, s, l2_per_token=9.0, arch="batchtopk", point_id="btk-k8", sae_id=f"btk-k8-s{s}")
        for s in range(3)
    ]
    result = verdicts(rows)
    assert [v["a_point"] for v in of(result, "scale_lower_l2_than_switch")] == ["scale_flop-k8", "scale_flop-k16"]
    assert {v["b_point"] for v in of(result, "switch_flop_lower_l2")} == {"topk-k8", "topk-k16"}
    # claims 4/4b: only Scale SAEs of the same shape are compared (scale_e1 has e=1, another width)
    rows += [row("scale_e1", 16, s) for s in range(3)]
    assert {v["a_point"] for v in of(verdicts(rows), "feature_scaling_lower_redundancy")} == {"scale_flop-k16"}


def test_a_baseline_is_its_own_matched_group():
    rows = paper_sweep()
    for r in rows:  # Switch now matched to a group that is not in the sweep
        if r["group"] == "switch_flop":
            r["match_baseline"] = "topk_wide"
    v = one(verdicts(rows), "switch_flop_lower_l2")
    assert v["status"] == "not_in_sweep" and "A.match_baseline == B.group" in v["reason"]


def test_untestable_claims_are_listed_once_with_what_is_missing():
    result = verdicts(series("topk", 8, "l2_per_token", [1.0, 1.0]))
    assert len(result["verdicts"]) == len(CLAIMS)
    for v in result["verdicts"]:
        assert v["status"] == "not_in_sweep" and v["k"] is None and v["n"] == 0 and v["effect"] is None
        assert v["reason"].startswith("not_in_sweep: no ")
    assert "no FLOP-matched Switch SAE in the sweep" in one(result, "switch_flop_lower_l2")["reason"]
    # both sides present, but no seed in common
    rows = [row("topk", 8, 0), row("switch_flop", 8, 1)]
    reason = one(verdicts(rows), "switch_flop_lower_l2")["reason"]
    assert reason.startswith("not_in_sweep: no FLOP-matched Switch and its TopK baseline rows with equal k, seed")
    # both sides present but without the metric
    rows = [row("topk", 8, 0, l2_per_token=None), row("switch_flop", 8, 0, l2_per_token=float("nan"))]
    assert "no l2_per_token in the table" in one(verdicts(rows), "switch_flop_lower_l2")["reason"]


def test_two_rows_for_one_seed_of_a_point_is_an_error():
    rows = paper_sweep() + [row("topk", 8, 0, sae_id="topk-k8-s0-copy")]
    with pytest.raises(ValueError, match="point_id and seed must identify one row"):
        verdicts(rows)
    with pytest.raises(ValueError, match="no sae_id"):
        verdicts([{"arch": "topk"}])


# ---------------------------------------------------------------- output format


def test_output_validates_against_its_schema_and_round_trips(tmp_path):
    result = verdicts(paper_sweep())
    schema = verdicts_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(result, schema)
    jsonschema.validate(verdicts([row("topk", 8, 0)]), schema)  # not_in_sweep entries too
    assert result["schema_version"] == SCHEMA_VERSION
    assert result["config"] == {"confidence": 0.95, "min_seeds": 2, "max_dead_fraction": 0.15, "close_tolerance": 0.25}
    write_outputs(result, tmp_path / "v.json", tmp_path / "v.html", tmp_path / "s.html")
    assert json.loads((tmp_path / "v.json").read_text()) == result
    verdict = schema["properties"]["verdicts"]["items"]["properties"]
    for name in (
        "claim",
        "k",
        "effect",
        "n",
        "status",
        "reason",
        "a_saes",
        "b_saes",
        "paper",
        "delta_loss_recovered",
        "max_dead_fraction",
        "flop_ratio",
    ):
        assert verdict[name]["description"], name
    bad = json.loads(json.dumps(result))
    bad["verdicts"][0]["status"] = "probably"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_text_table_and_command_line(tmp_path, capsys):
    result = verdicts(paper_sweep() + [row("topk", 32, 0), row("switch_flop", 32, 0, l2_per_token=0.5)])
    text = format_table(result)
    lines = text.splitlines()
    assert "95% CI" in lines[0] and "close_tolerance 0.25" in lines[0]
    assert lines[1].split()[:4] == ["claim", "k", "A", "vs"]
    claim1 = [line for line in lines if line.startswith("1 switch_flop_lower_l2")]
    assert [line.split()[2] for line in claim1] == ["8", "16", "32"]
    assert "supported" in claim1[0] and "-19.8% [" in claim1[0]  # -0.2 / (1.00, 1.01, 1.02)
    assert "single_seed" in claim1[2] and "-50.0%  " in claim1[2]  # no interval with one seed
    assert lines[-1].startswith("supported: ")
    write_outputs(result, tmp_path / "verdicts.json")
    assert main([str(tmp_path / "verdicts.json")]) == 0
    assert capsys.readouterr().out.strip() == text
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "run the pipeline first" in capsys.readouterr().err
    assert main(["--schema"]) == 0 and json.loads(capsys.readouterr().out) == verdicts_schema()


def test_html_page_and_landing_summary(tmp_path):
    rows = paper_sweep()
    rows[1]["dead_fraction"] = 0.5
    result = verdicts(rows)
    verdicts_page(result, tmp_path / "verdicts.html")
    page = (tmp_path / "verdicts.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Verdicts on the papers&#x27; claims" in page
    for v in result["verdicts"]:
        assert html.escape(v["claim_text"]) in page and html.escape(v["reason"]) in page
    assert ">supported</span>" in page and ">inconclusive</span>" in page
    assert "95% Student-t confidence interval" in page and "more than 15% dead latents" in page
    landing_summary(result, tmp_path / "summary.html")
    fragment = (tmp_path / "summary.html").read_text()
    assert fragment.startswith("<div id='saepipe-verdicts'>") and "<html" not in fragment
    assert fragment.count("<tr>") == len(result["verdicts"]) + 1
    assert "Switch (FLOP-matched) &lt; TopK, l2" in fragment and "undertrained" in fragment


# ---------------------------------------------------------------- config


def test_config_section_is_optional_and_checked():
    assert VerdictConfig.from_config({}) == VerdictConfig()
    assert VerdictConfig.from_config({"verdicts": None}) == VerdictConfig()
    assert VerdictConfig.from_config({"verdicts": {"min_seeds": 3}}).min_seeds == 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['min_seed'\].*valid fields"):
        VerdictConfig.from_config({"verdicts": {"min_seed": 3}})
    with pytest.raises(ValueError, match="min_seeds must be an integer >= 2"):
        VerdictConfig(min_seeds=1)
    with pytest.raises(ValueError, match="confidence must be in"):
        VerdictConfig(confidence=95)


def test_shipped_config_states_the_defaults_and_matches_the_schema():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert VerdictConfig.from_config(config) == VerdictConfig()
    schema = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())
    section = schema["properties"]["verdicts"]
    assert set(section["properties"]) == set(VerdictConfig().to_dict())
    jsonschema.validate(config["verdicts"], section)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"min_seeds": 1}, section)
    assert "verdicts" not in schema.get("required", [])


def test_module_imports_neither_matplotlib_nor_snakemake():
    import subprocess
    import sys

    code = (
        "import sys, saepipe.verdicts; bad = [m for m in ('matplotlib', 'snakemake', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
