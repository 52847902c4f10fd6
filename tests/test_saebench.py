"""SAEBench core results (saepipe/interop/saebench.py).

Every SAE of the micro pipeline run has ``results/saebench/core/<id>_eval_results.json``; each
is strict JSON and valid against the output schema of the sae-bench 0.6.0 wheel (its declared
JSON Schema draft, and a closed copy that rejects any key the schema does not name and any
float where it says integer), and against SAEBench's own pydantic models. Its numbers are
metrics.json's where the metric is the same, and its per-latent weight statistics and misc
metrics are what SAEBench's own functions (run from the wheel's source) compute on the
exported SAELens weights. Known-answer tests check the mapping on hand-made inputs.

The wheel is downloaded once (``pip download --no-deps sae-bench==0.6.0``) into
``.cache/sae-bench-0.6.0/`` at the repository root (git-ignored); without access to the
package index the tests that need it are skipped, unless CI is set: then it is a failure.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from conftest import MICRO_SAES, REPO, micro_config
from safetensors.torch import load_file, save_file
from test_export import CASES, random_sae

from saepipe.interop import export, saebench
from saepipe.saes import build_sae, config_from_dict, load_sae, save_sae

VERSION = saebench.SAEBENCH_VERSION  # "0.6.0"
CACHE = REPO / ".cache" / f"sae-bench-{VERSION}"
MARKER = CACHE / "wheel.json"
SCHEMA_FILE = "sae_bench/evals/core/eval_output_schema_core.json"
WHEEL_FILES = (  # what the tests read from the wheel: the schema, the models, the formulas
    "sae_bench/__init__.py",
    "sae_bench/evals/base_eval_output.py",
    "sae_bench/evals/core/eval_config.py",
    "sae_bench/evals/core/eval_output.py",
    "sae_bench/evals/core/main.py",
    "sae_bench/sae_bench_utils/graphing_utils.py",
    SCHEMA_FILE,
)
# SAEBench functions the tests run (compiled from the wheel's source: the modules themselves
# import sae_lens, transformer_lens, plotting libraries): on the exported weights, from
# evals/core/main.py; the loader of SAEBench's plots, from sae_bench_utils/graphing_utils.py
REFERENCE_FUNCTIONS = {
    "sae_bench/evals/core/main.py": (
        "calculate_max_cosine_sim",
        "get_featurewise_weight_based_metrics",
        "calculate_misc_metrics",
    ),
    "sae_bench/sae_bench_utils/graphing_utils.py": ("find_eval_results_files", "get_eval_results", "get_d_sae_string"),
}
WEIGHT_TOLERANCE = 1e-5  # SAEBench computes in float32, saepipe in float64


# ---- the sae-bench wheel, cached ---------------------------------------------------------------


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--timeout", "30", "--retries", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _cached() -> bool:
    try:
        recorded = json.loads(MARKER.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("version") == VERSION and all((CACHE / f).is_file() for f in WHEEL_FILES)


def _fetch(tmp: Path) -> None:
    """Download the wheel (no dependencies) and unpack :data:`WHEEL_FILES` into :data:`CACHE`."""
    proc = _pip("download", "--no-deps", "-q", "-d", str(tmp), f"sae-bench=={VERSION}")
    if proc.returncode != 0:
        raise RuntimeError(f"pip download sae-bench=={VERSION} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    wheel = next(tmp.glob("sae_bench-*.whl"))
    staging = tmp / "unpacked"
    with zipfile.ZipFile(wheel) as zf:
        for name in WHEEL_FILES:
            zf.extract(name, staging)
    (staging / MARKER.name).write_text(json.dumps({"version": VERSION, "wheel": wheel.name}, indent=2) + "\n")
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), CACHE)


def _index_reachable() -> bool:
    """Whether pip reaches the package index at all (the download may fail for other reasons)."""
    try:
        return _pip("index", "versions", "sae-bench", timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def _lock():
    """One downloader at a time (parallel pytest sessions share the cache)."""
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / f"{CACHE.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def saebench_wheel(tmp_path_factory) -> Path:
    """The unpacked files of the sae-bench wheel (see the module docstring)."""
    with _lock():
        if _cached():
            return CACHE
        try:
            _fetch(tmp_path_factory.mktemp("sae-bench-wheel"))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            if os.environ.get("CI"):
                pytest.fail(f"cannot fetch the sae-bench {VERSION} wheel (CI is set):\n{e}")
            if not _index_reachable():
                pytest.skip(f"pip cannot reach the package index for sae-bench=={VERSION} (and CI is not set)")
            raise
    return CACHE


@pytest.fixture(scope="session")
def schema(saebench_wheel) -> dict:
    return json.loads((saebench_wheel / SCHEMA_FILE).read_text())


@pytest.fixture(scope="session")
def reference(saebench_wheel) -> dict[str, Any]:
    """SAEBench's own :data:`REFERENCE_FUNCTIONS`, compiled from the wheel's source files (these
    functions need only torch, json and os)."""
    functions: dict[str, Any] = {}
    for file, names in REFERENCE_FUNCTIONS.items():
        path = saebench_wheel / file
        tree = ast.parse(path.read_text())
        body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
        assert {node.name for node in body} == set(names), file
        namespace: dict[str, Any] = {"torch": torch, "json": json, "os": os, "Any": Any, "SAE": object}
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
        functions.update({name: namespace[name] for name in names})
    return functions


@pytest.fixture(scope="session")
def core_output_model(saebench_wheel):
    """SAEBench's pydantic ``CoreEvalOutput`` (from the wheel's files), as a TypeAdapter."""
    pydantic = pytest.importorskip("pydantic")
    sys.path.insert(0, str(saebench_wheel))
    try:
        with warnings.catch_warnings():  # its validators use a form pydantic 2.12 deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            from sae_bench.evals.core.eval_output import CoreEvalOutput  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(saebench_wheel))
    return pydantic.TypeAdapter(CoreEvalOutput)


# ---- schema helpers ----------------------------------------------------------------------------


def schema_validator_class(schema: dict) -> type:
    """The validator of the draft the schema declares (``$schema``); pydantic 2, which generates
    SAEBench's schema, writes Draft 2020-12 without declaring it."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls


def closed(schema: dict) -> dict:
    """A copy in which every object the schema describes by its ``properties`` requires all of
    them and allows no other key (objects that say ``additionalProperties: true`` stay open)."""
    out = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
                node["required"] = sorted(node["properties"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


def strict_validator(schema: dict):
    """The closed schema's validator, with ``integer`` meaning a JSON integer (not 3.0)."""
    cls = schema_validator_class(schema)
    checker = cls.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(cls, type_checker=checker)(closed(schema))


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity (not JSON)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def errors(validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


# ---- hand-made inputs --------------------------------------------------------------------------

F = 2.0  # act_norm_factor of the hand-made SAEs: the fold must show

CONTEXT = saebench.EvalContext(
    model_name="m", hook_name="h", context_size=4, dataset="toy", exclude_positions=[0], batch_size_prompts=2
)


def tiny_sae(arch: str = "topk", **tensors: torch.Tensor):
    """An SAE of ``arch`` with d = 2, M = 3 and normalised-space weights:
    encoder columns e1, e2, (e1 + e2)/sqrt(2); decoder rows e1, (e1 + e2)/sqrt(2), -e2."""
    sae = build_sae(
        config_from_dict(
            {"arch": arch, "d_in": 2, "width": 3, "k": 1, "act_norm_factor": F, "hook": "h", "model_id": "m"}
        )
    )
    r = 1 / math.sqrt(2)
    saved = {name: torch.zeros_like(t) for name, t in sae.saved_tensors().items()}
    saved.update(
        W_enc=torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r]]),
        W_dec=torch.tensor([[1.0, 0.0], [r, r], [0.0, -1.0]]),
        b_enc=torch.tensor([0.1, -0.2, 0.3]) if "b_gate" not in saved else torch.zeros(3),
        **tensors,
    )
    sae.load_saved_tensors(saved)
    return sae.eval()


def tiny_stats(n_tokens: int = 1000, n_sequences: int = 10) -> saebench.LatentStats:
    return saebench.LatentStats(
        fire_count_M=torch.tensor([0, 30, 200]),
        seq_count_M=torch.tensor([0, 3, 10]),
        act_sum_M=torch.tensor([0.0, 6.0, 100.0], dtype=torch.float64),
        n_tokens=n_tokens,
        n_sequences=n_sequences,
    )


def tiny_metrics(**overrides: Any) -> dict[str, Any]:
    """A metrics.json (schema 6) with distinct values for every key the result reads."""
    keys = [key for fields in saebench.METRICS_MAP.values() for key in fields.values()]
    metrics: dict[str, Any] = {key: 0.01 * (i + 1) for i, key in enumerate(keys)}
    metrics.update(n_tokens=1000, n_sequences=10, ce_tokens=48, schema_version=6, l0=0.23, dead_fraction=1 / 3)
    metrics.update(overrides)
    return metrics


def core_result(sae=None, metrics=None, stats=None) -> dict:
    return saebench.saebench_core_result(
        tiny_sae() if sae is None else sae,
        "toy",
        tiny_metrics() if metrics is None else metrics,
        tiny_stats() if stats is None else stats,
        CONTEXT,
        eval_id="id",
        datetime_epoch_millis=1,
    )


# ---- known answers -----------------------------------------------------------------------------


def test_densities_and_frequency_metrics_known_answer():
    stats = saebench.LatentStats(
        fire_count_M=torch.tensor([0, 5, 10, 11, 150]),
        seq_count_M=torch.tensor([0, 5, 2, 11, 10]),
        act_sum_M=torch.zeros(5, dtype=torch.float64),
        n_tokens=1000,
        n_sequences=20,
    )
    density_M, cah_M = saebench.feature_densities(stats)
    assert density_M.tolist() == pytest.approx([0, 0.005, 0.01, 0.011, 0.15])
    assert math.isnan(cah_M[0]) and cah_M[1:].tolist() == pytest.approx([1, 5, 1, 15])
    freq = saebench.frequency_metrics(density_M)
    assert freq == pytest.approx(
        {
            "frac_alive": 4 / 5,
            "freq_over_1_percent": 2 / 5,  # > 1%: 0.011 and 0.15 (0.01 itself is not over)
            "freq_over_10_percent": 1 / 5,
            "normalized_freq_over_1_percent": (0.011 + 0.15) / 0.176,
            "normalized_freq_over_10_percent": 0.15 / 0.176,
        }
    )
    dead = saebench.frequency_metrics(torch.zeros(3, dtype=torch.float64))
    assert dead == {k: 0.0 for k in freq}  # nothing fired: SAEBench's 0, not 0/0


def test_weight_metrics_known_answer_in_raw_space():
    sae = tiny_sae()
    W_enc_DM, W_dec_MD, b_enc_M = saebench.raw_space_weights(sae)
    assert torch.allclose(W_enc_DM, F * sae.W_enc.detach()) and torch.allclose(W_dec_MD, sae.W_dec.detach() / F)
    w = saebench.weight_metrics(W_enc_DM, W_dec_MD, b_enc_M)
    r = 1 / math.sqrt(2)
    assert w["encoder_norm"].tolist() == pytest.approx([F, F, F])  # unit columns, times f
    assert w["encoder_bias"].tolist() == pytest.approx([0.1, -0.2, 0.3])  # on pre-activations: unchanged
    assert w["encoder_decoder_cosine_sim"].tolist() == pytest.approx([1, r, -r])
    assert w["max_encoder_cosine_sim"].tolist() == pytest.approx([r, r, r])
    # decoder rows e1, (e1+e2)/√2, -e2: cosines e1·d2 = r, e1·d3 = 0, d2·d3 = -r (signed: -e2's best is e1)
    assert w["max_decoder_cosine_sim"].tolist() == pytest.approx([r, r, 0])
    assert saebench.max_cosine_sim(torch.ones(4, 1)).tolist() == [-math.inf]  # one latent: no other


def test_gated_encoder_bias_is_b_mag():
    sae = tiny_sae("gated", b_mag=torch.tensor([0.5, 0.6, 0.7]), b_gate=torch.tensor([1.0, 2.0, 3.0]))
    assert saebench.raw_space_weights(sae)[2].tolist() == pytest.approx([0.5, 0.6, 0.7])


@pytest.mark.parametrize("arch, extra", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_every_architecture_has_raw_encoder_and_decoder(arch, extra, one_thread):
    """Every registered architecture: W_enc [d, M] is the forward's encoder (Scale: W_hat; routed:
    all experts' columns) times f, W_dec [M, d] over f, the bias SAELens' class has."""
    sae = random_sae(arch, extra)
    W_enc_DM, W_dec_MD, b_enc_M = saebench.raw_space_weights(sae)
    D, M = sae.cfg.d_in, sae.cfg.width
    assert (W_enc_DM.shape, W_dec_MD.shape, b_enc_M.shape) == ((D, M), (M, D), (M,))
    f = sae.cfg.act_norm_factor
    assert torch.allclose(W_enc_DM, f * sae.encoder_features_MD().T, atol=1e-6)
    assert torch.allclose(W_dec_MD, sae.W_dec.detach() / f, atol=1e-7)
    exported = export.saelens_tensors(sae)
    assert torch.equal(b_enc_M, exported.get("b_mag", exported.get("b_enc", torch.zeros(M))))
    w = saebench.weight_metrics(W_enc_DM, W_dec_MD, b_enc_M)
    cos_M = torch.nn.functional.cosine_similarity(sae.encoder_features_MD().double(), sae.W_dec.detach().double())
    assert torch.allclose(w["encoder_decoder_cosine_sim"], cos_M, atol=1e-6)  # the fold keeps directions


def test_core_result_maps_our_metrics():
    metrics = tiny_metrics()
    result = core_result(metrics=metrics)
    for category, fields in saebench.METRICS_MAP.items():
        for name, key in fields.items():
            assert result["eval_result_metrics"][category][name] == metrics[key], (category, name)
    assert result["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] == metrics["loss_recovered"]
    assert result["eval_result_metrics"]["token_stats"] == {
        "total_tokens_eval_reconstruction": 48,
        "total_tokens_eval_sparsity_variance": 1000,
    }
    misc = result["eval_result_metrics"]["misc_metrics"]
    assert misc["frac_alive"] == pytest.approx(1 - metrics["dead_fraction"])
    assert misc["freq_over_1_percent"] == pytest.approx(2 / 3) and misc["freq_over_10_percent"] == pytest.approx(1 / 3)
    details = result["eval_result_details"]
    assert [d["index"] for d in details] == [0, 1, 2]
    assert [d["feature_density"] for d in details] == [0.0, 0.03, 0.2]
    # never fired: SAEBench's 0/0 = NaN, written -1 as SAEBench does; 30 tokens in 3 sequences: 10
    assert [d["consistent_activation_heuristic"] for d in details] == [-1.0, 10.0, 20.0]
    assert result["eval_result_unstructured"]["saepipe"]["undefined"] == [
        "eval_result_details.consistent_activation_heuristic (1 latents)"
    ]
    config = result["eval_config"]
    assert config["context_size"] == 4 and config["exclude_special_tokens_from_reconstruction"] is True
    assert config["n_eval_reconstruction_batches"] == 6  # 48 tokens = 12 sequences of 4, 2 per batch
    assert config["n_eval_sparsity_variance_batches"] == 5  # 10 sequences, 2 per batch
    assert result["sae_cfg_dict"] == export.saelens_config(tiny_sae(), CONTEXT.shard_meta(), "toy")
    strict_json(json.dumps(result, allow_nan=False))


def test_undefined_metrics_are_minus_one_and_listed():
    result = core_result(metrics=tiny_metrics(kl_div_score=None, relative_reconstruction_bias=float("inf")))
    metrics = result["eval_result_metrics"]
    assert metrics["model_behavior_preservation"]["kl_div_score"] == -1.0
    assert metrics["shrinkage"]["relative_reconstruction_bias"] == -1.0
    undefined = result["eval_result_unstructured"]["saepipe"]["undefined"]
    assert {"model_behavior_preservation.kl_div_score", "shrinkage.relative_reconstruction_bias"} <= set(undefined)


def test_inconsistent_inputs_are_refused():
    with pytest.raises(ValueError, match="different evaluations"):
        core_result(stats=tiny_stats(n_tokens=999))
    with pytest.raises(ValueError, match="schema_version 5"):
        core_result(metrics=tiny_metrics(schema_version=5))
    with pytest.raises(ValueError, match="has 64 latents"):
        core_result(sae=random_sae("topk", {}))


def test_dataset_description():
    hub = {"dataset": {"path": "Skylion007/openwebtext", "name": None, "split": "train"}, "source": "dataset"}
    assert saebench.dataset_description(hub).startswith("Skylion007/openwebtext, ")
    docs = {"dataset": None, "source": "python_docs", "python": "3.11.7"}
    assert saebench.dataset_description(docs).startswith("saepipe python_docs (Python 3.11.7), ")


def _write_inputs(root: Path) -> dict[str, Path]:
    """A published SAE directory with metrics.json and latent statistics, corpus.json and
    lm_baseline.json, as the pipeline writes them."""
    sae_dir = root / "saes" / "toy"
    save_sae(tiny_sae(), sae_dir)
    (sae_dir / "metrics.json").write_text(json.dumps(tiny_metrics()))
    stats = tiny_stats()
    save_file(
        {"fire_count": stats.fire_count_M, "seq_count": stats.seq_count_M, "act_sum": stats.act_sum_M},
        str(sae_dir / saebench.LATENT_STATS),
        metadata={"n_tokens": str(stats.n_tokens), "n_sequences": str(stats.n_sequences)},
    )
    corpus = root / "corpus.json"
    corpus.write_text(json.dumps({"source": "python_docs", "dataset": None, "seq_len": 4, "prepend_bos": True}))
    baseline = root / "lm_baseline.json"
    baseline.write_text(json.dumps({"model": "m", "hook": "h", "exclude_positions": [0]}))
    return {"sae_dir": sae_dir, "corpus_json": corpus, "baseline_json": baseline}


def test_write_saebench_is_reproducible(tmp_path):
    inputs = _write_inputs(tmp_path)
    first = saebench.write_saebench(out_json=tmp_path / "a.json", batch_size_prompts=2, **inputs)
    second = saebench.write_saebench(out_json=tmp_path / "b.json", batch_size_prompts=2, **inputs)
    assert first.read_bytes() == second.read_bytes()
    result = strict_json(first.read_text())
    metrics_json = inputs["sae_dir"] / "metrics.json"
    assert result["datetime_epoch_millis"] == metrics_json.stat().st_mtime_ns // 1_000_000
    assert result["sae_cfg_dict"]["metadata"]["prepend_bos"] is True
    metrics_json.write_text(json.dumps(tiny_metrics(l0=0.5)))  # a new evaluation: a new eval_id
    third = strict_json(
        saebench.write_saebench(out_json=tmp_path / "c.json", batch_size_prompts=2, **inputs).read_text()
    )
    assert third["eval_id"] != result["eval_id"]


def test_results_path_is_saebench_layout():
    # SAEBench's graphing utilities tell a core result by "core" in its path
    path = saebench.results_path("results/saebench", "topk-k4")
    assert path == Path("results/saebench/core/topk-k4_eval_results.json")


# ---- against the sae-bench wheel ---------------------------------------------------------------


def test_schema_draft_and_closed_copy(schema):
    """The schema's draft is the one validated against; the closed copy rejects unknown keys
    wherever the schema names its keys, the schema itself only where it forbids them."""
    cls = schema_validator_class(schema)
    if "$schema" in schema:
        assert cls.META_SCHEMA["$schema"] == schema["$schema"]
    else:  # pydantic 2's Draft 2020-12: $defs for the definitions
        assert cls is jsonschema.Draft202012Validator and "$defs" in schema
    result = core_result()
    raw, strict = cls(schema), strict_validator(schema)
    assert errors(raw, result) == [] and errors(strict, result) == []
    # a wrong type inside a $ref'd definition is caught: the references resolve
    bad = copy.deepcopy(result)
    bad["eval_result_metrics"]["misc_metrics"]["frac_alive"] = "all"
    assert errors(raw, bad)
    bad["eval_result_metrics"]["misc_metrics"]["frac_alive"] = 1  # an integer is a number
    assert not errors(raw, bad)
    bad["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] = 48.0
    assert errors(strict, bad)  # a float where the schema says integer
    # an unknown key at each level
    defs = schema["$defs"]
    places = [
        ([], schema),
        (["eval_config"], defs["CoreEvalConfig"]),
        (["eval_result_metrics"], defs["CoreMetricCategories"]),
        (["eval_result_metrics", "sparsity"], defs["SparsityMetrics"]),
        (["eval_result_details", 0], defs["CoreFeatureMetric"]),
    ]
    for where, node in places:
        bad = copy.deepcopy(result)
        target = bad
        for key in where:
            target = target[key]
        target["l0_typo"] = 1.0
        assert errors(strict, bad), where
        assert bool(errors(raw, bad)) == (node.get("additionalProperties") is False), where
    bad = copy.deepcopy(result)
    del bad["eval_result_metrics"]["misc_metrics"]["frac_alive"]
    assert errors(raw, bad)  # a missing required metric


def test_hand_made_result_loads_in_saebench_models(core_output_model):
    loaded = core_output_model.validate_python(core_result())
    assert loaded.eval_result_metrics.sparsity.l1 == tiny_metrics()["l1"]


def _micro_result(micro_run: Path, sid: str) -> dict:
    path = saebench.results_path(micro_run / "results" / "saebench", sid)
    assert path.is_file(), f"the pipeline wrote no {path} (config export.saebench is true by default)"
    return strict_json(path.read_text())


@pytest.mark.slow
def test_every_micro_sae_is_a_valid_core_result(micro_run, schema, reference, core_output_model, tmp_path):
    raw, strict = schema_validator_class(schema)(schema), strict_validator(schema)
    corpus_json = micro_run / "results/corpus/corpus.json"
    baseline_json = micro_run / "results/eval/lm_baseline.json"
    baseline = json.loads(baseline_json.read_text())
    eval_ids = set()
    for sid in sorted(MICRO_SAES):
        result = _micro_result(micro_run, sid)
        assert errors(raw, result) == [] and errors(strict, result) == [], sid
        core_output_model.validate_python(result)
        eval_ids.add(result["eval_id"])
        sae_dir = micro_run / "results/saes" / sid
        metrics = json.loads((sae_dir / "metrics.json").read_text())
        sae = load_sae(sae_dir)
        stats = saebench.read_latent_stats(sae_dir / saebench.LATENT_STATS)
        got = result["eval_result_metrics"]
        # the same metric, the same number
        for category, fields in saebench.METRICS_MAP.items():
            for name, key in fields.items():
                expected = -1.0 if metrics[key] is None else metrics[key]
                assert got[category][name] == expected, (sid, category, name)
        assert got["token_stats"]["total_tokens_eval_sparsity_variance"] == metrics["n_tokens"] == stats.n_tokens
        assert got["misc_metrics"]["frac_alive"] == pytest.approx(1 - metrics["dead_fraction"], abs=1e-12)
        details = result["eval_result_details"]
        assert [d["index"] for d in details] == list(range(sae.cfg.width))
        density = [d["feature_density"] for d in details]
        assert sum(density) == pytest.approx(metrics["l0"], rel=1e-8)  # L0 = sum of the densities
        assert float(stats.act_sum_M.sum()) / stats.n_tokens == pytest.approx(metrics["l1"], rel=1e-9)
        # what SAEBench's own functions compute on the exported SAELens weights
        exported = micro_run / "results/export/saelens" / sid
        sl_cfg = json.loads((exported / export.CFG_FILE).read_text())
        assert result["sae_cfg_dict"] == sl_cfg, sid
        tensors = load_file(str(exported / export.WEIGHTS_FILE))
        shim = types.SimpleNamespace(
            **tensors, cfg=types.SimpleNamespace(d_sae=sl_cfg["d_sae"], architecture_str=sl_cfg["architecture"])
        )
        theirs = reference["get_featurewise_weight_based_metrics"](shim)
        for name, values in theirs.items():
            ours = [d[name] for d in details]
            diff = max(abs(a - b) for a, b in zip(ours, values))
            assert diff <= WEIGHT_TOLERANCE, (sid, name, diff)
        density_M, _ = saebench.feature_densities(stats)
        misc = reference["calculate_misc_metrics"]({**theirs, "feature_density": density_M.tolist()})
        assert got["misc_metrics"] == pytest.approx(misc, abs=1e-6), sid
        config = result["eval_config"]
        assert config["context_size"] == micro_config()["corpus"]["seq_len"]
        assert config["model_name"] == baseline["model"] == sl_cfg["metadata"]["model_name"]
        assert config["exclude_special_tokens_from_reconstruction"] == bool(baseline["exclude_positions"])
        # a rerun on the same inputs writes the same bytes
        again = saebench.write_saebench(
            sae_dir,
            tmp_path / f"{sid}.json",
            corpus_json,
            baseline_json,
            batch_size_prompts=micro_config()["evaluate"]["ce_batch_size"],
        )
        assert again.read_bytes() == saebench.results_path(micro_run / "results/saebench", sid).read_bytes(), sid
    assert len(eval_ids) == len(MICRO_SAES)
    # SAEBench's loader for its plots reads them (it tells a core result by "core" in the path)
    files = reference["find_eval_results_files"]([str(micro_run / "results" / "saebench")])
    loaded = reference["get_eval_results"](files)
    assert set(loaded) == MICRO_SAES
    for sid, row in loaded.items():
        sl_cfg = json.loads((micro_run / "results/export/saelens" / sid / export.CFG_FILE).read_text())
        assert (
            row["sae_class"] == sl_cfg["architecture"]
            and row["l0"] == _micro_result(micro_run, sid)["eval_result_metrics"]["sparsity"]["l0"]
        )
