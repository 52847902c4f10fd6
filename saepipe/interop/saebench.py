"""SAEBench core results for a saepipe SAE, built from saepipe's own evaluation (docs/reference.md §7).

``results/saebench/core/<id>_eval_results.json`` follows the output schema of SAEBench 0.6.0's
core eval (``sae_bench/evals/core/eval_output_schema_core.json``; the pydantic models in
``eval_output.py``, the formulas in ``main.py``), so SAEBench's own tools read it beside the
files SAEBench writes (``sae_bench_utils.graphing_utils.get_eval_results`` recognises a core
result by ``core`` in its path). Nothing is recomputed on activations: every number comes from
the evaluate stage's ``metrics.json`` and ``latent_stats.safetensors`` (per-latent firing
counts on the kept eval tokens) and from the SAE's weights, so the job needs no LM and no shard.

- ``eval_result_metrics``: CE, KL, reconstruction, shrinkage and sparsity from metrics.json
  (``ce_loss_score`` = ``loss_recovered``, ``kl_div_with_sae`` = ``kl_div_reconstructed``, ...);
  ``misc_metrics`` from the per-latent densities and cosines as SAEBench's
  ``calculate_misc_metrics`` computes them.
- ``eval_result_details``: one entry per latent: ``feature_density`` = fire_count / n_tokens,
  ``consistent_activation_heuristic`` = fire_count / seq_count, and the weight statistics of
  SAEBench's ``get_featurewise_weight_based_metrics`` on the RAW-space weights the SAELens export
  writes (:func:`saepipe.interop.export.saelens_tensors`), i.e. what SAEBench computes on the
  exported SAE loaded with ``SAE.load_from_disk`` and passed to it as an object.
- A value SAEBench would leave NaN (0/0: the heuristic of a latent that never fired, a ratio
  with a zero denominator) is written as -1, as SAEBench's ``replace_nans_with_negative_one``
  does; the JSON stays strict (no NaN, no Infinity) and ``eval_result_unstructured.saepipe``
  lists every metric so replaced.

Where saepipe's definition of a metric differs from SAEBench's (``mse``, ``explained_variance``,
which positions the CE and KL average over, ...), the value is saepipe's and docs/reference.md
§7 lists the difference. ``eval_id`` is a UUID5 of the SAE id and the bytes of every input, so a
rerun on the same inputs writes the same file; ``datetime_epoch_millis`` is the modification
time of metrics.json (when the evaluation finished), not the time of the export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from saepipe.evaluate.geometry import max_other_cos, unit_rows
from saepipe.evaluate.metrics import LATENT_STATS, LatentStats, read_latent_stats
from saepipe.interop.export import SAELENS_VERSION, saelens_config, saelens_tensors
from saepipe.io import atomic_path, read_json
from saepipe.saes import SAE, load_sae

SAEBENCH_VERSION = "0.6.0"
"""The sae-bench release whose core output schema the files follow (tests/test_saebench.py
validates them against the schema in its wheel)."""

EVAL_TYPE_ID = "core"
RESULTS_DIR = "core"
"""Sub-directory of the results: SAEBench's graphing utilities tell a core result by ``core``
in its path (``graphing_utils.get_eval_results``)."""
RESULTS_SUFFIX = "_eval_results.json"
"""SAEBench's file name ends so (``general_utils.get_results_filepath``)."""

SAE_BENCH_COMMIT_HASH = f"saepipe (sae-bench {SAEBENCH_VERSION} core schema; not run by SAEBench)"
"""``sae_bench_commit_hash``: no SAEBench code ran; this says what wrote the file instead."""

FLOAT_PRECISION = 10
"""Decimals of the per-latent values (SAEBench's ``DEFAULT_FLOAT_PRECISION``)."""

UNDEFINED = -1.0
"""What SAEBench writes for a NaN (``replace_nans_with_negative_one``); saepipe writes it for
every undefined or non-finite value, so the JSON stays strict."""

MIN_METRICS_SCHEMA = 6
"""metrics.json schema version with the fields read here (l1, l2 norms, explained_variance_legacy,
n_sequences) and the latent statistics file beside it."""

DENSITY_THRESHOLDS = {"1": 0.01, "10": 0.1}
"""``freq_over_<p>_percent``: latents whose density exceeds p% (SAEBench's two thresholds)."""
MISC_FREQUENCY_ORDER = (
    "freq_over_1_percent",
    "freq_over_10_percent",
    "normalized_freq_over_1_percent",
    "normalized_freq_over_10_percent",
)


@dataclass(frozen=True)
class EvalContext:
    """What the evaluation ran on, for ``eval_config`` and ``sae_cfg_dict``."""

    model_name: str
    hook_name: str
    context_size: int
    """Tokens per eval sequence (corpus.seq_len)."""
    dataset: str
    """Where the eval documents come from (:func:`dataset_description`)."""
    exclude_positions: list[int] = field(default_factory=list)
    prepend_bos: bool = False
    llm_dtype: str = "float32"
    batch_size_prompts: int = 32
    """Sequences per LM forward pass of the CE and KL splices (evaluate.ce_batch_size)."""

    def shard_meta(self) -> dict[str, Any]:
        """The eval shards' metadata fields :func:`saepipe.interop.export.saelens_config` reads."""
        return {
            "model": self.model_name,
            "hook": self.hook_name,
            "seq_len": self.context_size,
            "prepend_bos": self.prepend_bos,
            "exclude_positions": list(self.exclude_positions),
        }


class _Undefined:
    """Collects the JSON paths of values written as :data:`UNDEFINED`."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def number(self, value: Any, path: str) -> float:
        """``value`` as a float, or :data:`UNDEFINED` (recorded) when it is None or not finite."""
        if value is None or not math.isfinite(float(value)):
            self.paths.append(path)
            return UNDEFINED
        return float(value)

    def vector(self, values_M: Tensor, path: str) -> Tensor:
        """``values_M`` (float64) with non-finite entries replaced by :data:`UNDEFINED`; records
        the path and the count."""
        finite_M = torch.isfinite(values_M)
        n_bad = int((~finite_M).sum())
        if n_bad:
            self.paths.append(f"{path} ({n_bad} latents)")
        return torch.where(finite_M, values_M.double(), UNDEFINED)


def feature_densities(stats: LatentStats) -> tuple[Tensor, Tensor]:
    """(``feature_density_M``, ``consistent_activation_heuristic_M``), float64: the share of the
    kept eval tokens on which each latent fires, and the tokens it fires on per sequence on which
    it fires at all (SAEBench's ``total_feature_acts / total_feature_prompts``). The heuristic of
    a latent that never fired is 0/0: NaN here (:data:`UNDEFINED` in the file)."""
    if stats.n_tokens <= 0:
        raise ValueError("latent statistics over 0 tokens")
    fire_M = stats.fire_count_M.double()
    density_M = fire_M / stats.n_tokens
    cah_M = fire_M / stats.seq_count_M.double()  # 0/0 = NaN for a latent that never fired
    return density_M, cah_M


def frequency_metrics(density_M: Tensor) -> dict[str, float]:
    """``frac_alive``, ``freq_over_{1,10}_percent`` and their ``normalized_`` forms from the
    per-latent densities, as SAEBench's ``calculate_misc_metrics``: the share of latents with a
    density > 0 (> 1%, > 10%), and the share of all firings that the > 1% (> 10%) latents make
    (0 when nothing fired)."""
    total = float(density_M.sum())
    out = {"frac_alive": float((density_M > 0).double().mean())}
    for pct, threshold in DENSITY_THRESHOLDS.items():
        over_M = density_M > threshold
        out[f"freq_over_{pct}_percent"] = float(over_M.double().mean())
        out[f"normalized_freq_over_{pct}_percent"] = float(density_M[over_M].sum()) / total if total > 0 else 0.0
    return out


def max_cosine_sim(vectors_DF: Tensor) -> Tensor:
    """[F] (float64): each column's largest cosine similarity with any OTHER column of
    ``vectors_DF`` [D, F], as SAEBench's ``calculate_max_cosine_sim`` computes it (float32, unit
    columns, a zero column has cosine 0 with every other; -inf when F = 1): the tiled search of
    the redundancy metrics (:func:`saepipe.evaluate.geometry.max_other_cos`, never F x F)."""
    if vectors_DF.shape[1] < 2:
        return torch.full((vectors_DF.shape[1],), -math.inf, dtype=torch.float64)
    return max_other_cos(unit_rows(vectors_DF.T), chunk=4096).double()


def weight_metrics(W_enc_DM: Tensor, W_dec_MD: Tensor, b_enc_M: Tensor) -> dict[str, Tensor]:
    """SAEBench's ``get_featurewise_weight_based_metrics`` (float64 [M] each): ``encoder_bias``,
    ``encoder_norm`` (L2 norm of each encoder column), ``encoder_decoder_cosine_sim`` (latent j's
    encoder column vs its decoder row; NaN for a zero column, as there), ``max_encoder_cosine_sim``
    and ``max_decoder_cosine_sim`` (:func:`max_cosine_sim`)."""
    W_enc_DM, W_dec_DM = W_enc_DM.double(), W_dec_MD.double().T
    unit_enc_DM = W_enc_DM / W_enc_DM.norm(dim=0, keepdim=True)
    unit_dec_DM = W_dec_DM / W_dec_DM.norm(dim=0, keepdim=True)
    return {
        "encoder_bias": b_enc_M.double(),
        "encoder_norm": W_enc_DM.norm(dim=0),
        "encoder_decoder_cosine_sim": torch.nn.functional.cosine_similarity(unit_dec_DM.T, unit_enc_DM.T, dim=1),
        "max_encoder_cosine_sim": max_cosine_sim(W_enc_DM),
        "max_decoder_cosine_sim": max_cosine_sim(W_dec_DM),
    }


def raw_space_weights(sae: SAE) -> tuple[Tensor, Tensor, Tensor]:
    """(``W_enc_DM``, ``W_dec_MD``, ``b_enc_M``) in raw activation units, as SAEBench sees the
    exported SAE: for an architecture with a SAELens mapping, the tensors of
    :func:`saepipe.interop.export.saelens_tensors` (``W_enc`` is the encoder the forward pass uses:
    Scale's feature-scaled ``W_hat``, every expert's columns side by side for the routed SAEs;
    the encoder bias is ``b_mag`` where SAELens' class has one (gated, as SAEBench reads it), else
    ``b_enc``, else zeros). Otherwise the same fold (``W_enc * f``, ``W_dec / f``) of
    ``encoder_features_MD`` and ``W_dec``, with the saved ``b_enc`` (zeros if none)."""
    if type(sae.cfg).SAELENS_ARCH is not None:
        tensors = saelens_tensors(sae)
        W_enc_DM, W_dec_MD = tensors["W_enc"], tensors["W_dec"]
        bias_M = tensors.get("b_mag", tensors.get("b_enc"))
    else:
        f = float(sae.cfg.act_norm_factor)
        W_enc_DM = sae.encoder_features_MD().detach().to("cpu", torch.float32).T * f
        W_dec_MD = sae.W_dec.detach().to("cpu", torch.float32) / f
        bias_M = sae.saved_tensors().get("b_enc")
    b_enc_M = torch.zeros(sae.cfg.width) if bias_M is None else bias_M.detach().to("cpu", torch.float32)
    return W_enc_DM, W_dec_MD, b_enc_M


def dataset_description(corpus: dict[str, Any]) -> str:
    """``eval_config.dataset`` from the corpus stage's corpus.json: the hub or local dataset
    (``path``, its configuration name), or saepipe's built-in source; then the split."""
    dataset = corpus.get("dataset") or {}
    if dataset.get("path"):
        where = str(dataset["path"]) + (f" ({dataset['name']})" if dataset.get("name") else "")
    else:
        python = f" (Python {corpus['python']})" if corpus.get("python") else ""
        where = f"saepipe {corpus.get('source', 'corpus')}{python}"
    return f"{where}, saepipe eval split (held-out documents)"


def _n_batches(items: int, batch: int) -> int:
    return max(1, math.ceil(items / max(batch, 1)))


def core_eval_config(metrics: dict[str, Any], context: EvalContext) -> dict[str, Any]:
    """``eval_config`` (SAEBench's ``CoreEvalConfig``, its field order). Batches are counted in
    SAEBench's unit, ``batch_size_prompts`` sequences of ``context_size`` tokens: the CE/KL
    sequences for the reconstruction batches, the kept tokens' sequences for the
    sparsity/variance batches. Every ``compute_*`` flag is true (saepipe computes them all)."""
    ce_sequences = math.ceil(int(metrics["ce_tokens"]) / context.context_size)
    return {
        "model_name": context.model_name,
        "llm_dtype": context.llm_dtype,
        "batch_size_prompts": context.batch_size_prompts,
        "n_eval_reconstruction_batches": _n_batches(ce_sequences, context.batch_size_prompts),
        "n_eval_sparsity_variance_batches": _n_batches(int(metrics["n_sequences"]), context.batch_size_prompts),
        "dataset": context.dataset,
        "context_size": context.context_size,
        "compute_kl": True,
        "compute_ce_loss": True,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": bool(context.exclude_positions),
        "verbose": False,
    }


# SAEBench category -> its metrics, each from a metrics.json key (CoreMetricCategories' order).
METRICS_MAP: dict[str, dict[str, str]] = {
    "model_behavior_preservation": {
        "kl_div_score": "kl_div_score",
        "kl_div_with_ablation": "kl_div_zero",
        "kl_div_with_sae": "kl_div_reconstructed",
    },
    "model_performance_preservation": {
        "ce_loss_score": "loss_recovered",
        "ce_loss_with_ablation": "ce_loss_zero",
        "ce_loss_with_sae": "ce_loss_reconstructed",
        "ce_loss_without_sae": "ce_loss_original",
    },
    "reconstruction_quality": {
        "explained_variance": "explained_variance",
        "explained_variance_legacy": "explained_variance_legacy",
        "mse": "mse",
        "cossim": "cossim",
    },
    "shrinkage": {
        "l2_norm_in": "l2_norm_in",
        "l2_norm_out": "l2_norm_out",
        "l2_ratio": "l2_ratio",
        "relative_reconstruction_bias": "relative_reconstruction_bias",
    },
    "sparsity": {"l0": "l0", "l1": "l1"},
}


def _check_inputs(sae: SAE, metrics: dict[str, Any], stats: LatentStats, sae_id: str) -> None:
    """metrics.json and the latent statistics must be the same evaluation of this SAE."""
    version = int(metrics.get("schema_version", 0))
    if version < MIN_METRICS_SCHEMA:
        raise ValueError(
            f"{sae_id}: metrics.json has schema_version {version} (< {MIN_METRICS_SCHEMA}: no l1, l2 norms, "
            "explained_variance_legacy or latent statistics); rerun the evaluate stage"
        )
    width = sae.cfg.width
    shapes = {name: tuple(t.shape) for name, t in vars(stats).items() if isinstance(t, Tensor)}
    if any(shape != (width,) for shape in shapes.values()):
        raise ValueError(f"{sae_id}: latent statistics of shapes {shapes}, but the SAE has {width} latents")
    if (stats.n_tokens, stats.n_sequences) != (metrics["n_tokens"], metrics["n_sequences"]):
        raise ValueError(
            f"{sae_id}: latent statistics over {stats.n_tokens} tokens / {stats.n_sequences} sequences but "
            f"metrics.json over {metrics['n_tokens']} / {metrics['n_sequences']}: they come from different "
            "evaluations; rerun the evaluate stage"
        )


def sae_cfg_dict(sae: SAE, context: EvalContext, sae_id: str, sae_config: dict[str, Any]) -> dict[str, Any]:
    """``sae_cfg_dict``: the SAELens cfg.json of the export (:func:`saelens_config`) for an
    architecture with a SAELens mapping; else saepipe's config.json (``sae_config``) with
    ``architecture`` (the saepipe arch) and ``d_sae`` added where missing, the two keys SAEBench's
    graphing utilities read."""
    if type(sae.cfg).SAELENS_ARCH is not None:
        return saelens_config(sae, context.shard_meta(), sae_id)
    return {**sae_config, "architecture": sae_config.get("architecture", sae.cfg.arch), "d_sae": sae.cfg.width}


def saebench_core_result(
    sae: SAE,
    sae_id: str,
    metrics: dict[str, Any],
    stats: LatentStats,
    context: EvalContext,
    eval_id: str,
    datetime_epoch_millis: int,
    sae_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One SAE's SAEBench core result (the ``CoreEvalOutput`` fields, in their order) from its
    evaluation: ``metrics`` (metrics.json), ``stats`` (its latent statistics), the SAE's weights
    and ``context`` (what the evaluation ran on). ``sae_config``: saepipe's config.json, for
    ``sae_cfg_dict`` when the architecture has no SAELens mapping. Every float is finite
    (:data:`UNDEFINED` where SAEBench's value would be NaN; listed in
    ``eval_result_unstructured.saepipe.undefined``)."""
    _check_inputs(sae, metrics, stats, sae_id)
    undefined = _Undefined()
    density_M, cah_M = feature_densities(stats)
    weights = weight_metrics(*raw_space_weights(sae))
    categories: dict[str, dict[str, Any]] = {
        category: {name: undefined.number(metrics[key], f"{category}.{name}") for name, key in fields.items()}
        for category, fields in METRICS_MAP.items()
    }
    categories["token_stats"] = {
        "total_tokens_eval_reconstruction": int(metrics["ce_tokens"]),
        "total_tokens_eval_sparsity_variance": int(metrics["n_tokens"]),
    }
    freq = frequency_metrics(density_M)
    categories["misc_metrics"] = {  # MiscMetrics' field order
        **{name: freq[name] for name in MISC_FREQUENCY_ORDER},
        **{
            f"average_max_{part}_cosine_sim": undefined.number(
                float(weights[f"max_{part}_cosine_sim"].mean()), f"misc_metrics.average_max_{part}_cosine_sim"
            )
            for part in ("encoder", "decoder")
        },
        "frac_alive": freq["frac_alive"],
    }
    columns = {
        "feature_density": density_M,
        "consistent_activation_heuristic": cah_M,
        "encoder_bias": weights["encoder_bias"],
        "encoder_norm": weights["encoder_norm"],
        "encoder_decoder_cosine_sim": weights["encoder_decoder_cosine_sim"],
        "max_decoder_cosine_sim": weights["max_decoder_cosine_sim"],
        "max_encoder_cosine_sim": weights["max_encoder_cosine_sim"],
    }
    values = {name: undefined.vector(v, f"eval_result_details.{name}").tolist() for name, v in columns.items()}
    details = [
        {"index": j, **{name: round(values[name][j], FLOAT_PRECISION) for name in columns}}
        for j in range(sae.cfg.width)
    ]
    cfg_dict = sae_cfg_dict(sae, context, sae_id, sae_config or {})
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": core_eval_config(metrics, context),
        "eval_id": eval_id,
        "datetime_epoch_millis": int(datetime_epoch_millis),
        "eval_result_metrics": categories,
        "eval_result_details": details,
        "sae_bench_commit_hash": SAE_BENCH_COMMIT_HASH,
        "sae_lens_id": sae_id,
        "sae_lens_release_id": None,
        "sae_lens_version": SAELENS_VERSION if type(sae.cfg).SAELENS_ARCH is not None else None,
        "sae_cfg_dict": cfg_dict,
        "eval_result_unstructured": {
            "saepipe": {
                "writer": "saepipe.interop.saebench",
                "saebench_schema": f"sae-bench {SAEBENCH_VERSION} core",
                "definitions": "docs/reference.md §7 (SAEBench core results): mapping and differences of definition",
                "sae_id": sae_id,
                "arch": sae.cfg.arch,
                "metrics_schema_version": int(metrics["schema_version"]),
                "weights": "raw activation space (act_norm_factor folded, as the SAELens export)",
                "eval_sequences": stats.n_sequences,
                "exclude_positions": list(context.exclude_positions),
                "undefined": undefined.paths,
            }
        },
    }


def eval_id_for(sae_id: str, inputs: Iterable[str | os.PathLike]) -> str:
    """A UUID5 of the SAE id and the bytes of every input file (in order): the same inputs give
    the same ``eval_id``, a new evaluation a new one."""
    digest = hashlib.sha256()
    for path in inputs:
        digest.update(Path(path).read_bytes())
        digest.update(b"\0")
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"saepipe:saebench-core:{sae_id}:{digest.hexdigest()}"))


def results_path(results_dir: str | os.PathLike, sae_id: str) -> Path:
    """Where an SAE's result goes under ``results_dir`` (SAEBench's layout: ``core/<id>_eval_results.json``)."""
    return Path(results_dir) / RESULTS_DIR / f"{sae_id}{RESULTS_SUFFIX}"


def write_saebench(
    sae_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    corpus_json: str | os.PathLike,
    baseline_json: str | os.PathLike,
    batch_size_prompts: int,
    llm_dtype: str = "float32",
    metrics_json: str | os.PathLike | None = None,
    latent_stats: str | os.PathLike | None = None,
    log: str | os.PathLike | TextIO | None = None,
) -> Path:
    """The `export_saebench` stage for one SAE: write its SAEBench core result to ``out_json``
    (atomically; strict JSON, indent 2 as SAEBench).

    ``sae_dir``: the published SAE (``sae.safetensors``, ``config.json``; ``metrics.json`` and
    ``latent_stats.safetensors`` unless given); ``corpus_json``: the corpus stage's corpus.json
    (dataset, context size, BOS); ``baseline_json``: lm_baseline.json (model, hook, excluded
    positions); ``batch_size_prompts``: evaluate.ce_batch_size; ``llm_dtype``: the dtype the LM
    ran in; ``log``: where the one-line summary goes (a stream or a file path; default stderr).
    """
    sae_dir = Path(sae_dir)
    sae_id = sae_dir.name
    metrics_json = Path(metrics_json) if metrics_json is not None else sae_dir / "metrics.json"
    latent_stats = Path(latent_stats) if latent_stats is not None else sae_dir / LATENT_STATS
    sae = load_sae(sae_dir)
    metrics, corpus, baseline = read_json(metrics_json), read_json(corpus_json), read_json(baseline_json)
    if sae.cfg.hook != baseline["hook"] or sae.cfg.model_id != baseline["model"]:
        raise ValueError(
            f"SAE {sae_dir} was trained on {sae.cfg.model_id} / {sae.cfg.hook} but {baseline_json} is "
            f"{baseline['model']} / {baseline['hook']}; rerun the pipeline so both match"
        )
    context = EvalContext(
        model_name=baseline["model"],
        hook_name=baseline["hook"],
        context_size=int(corpus["seq_len"]),
        dataset=dataset_description(corpus),
        exclude_positions=list(baseline.get("exclude_positions", [])),
        prepend_bos=bool(corpus.get("prepend_bos", False)),
        llm_dtype=llm_dtype,
        batch_size_prompts=int(batch_size_prompts),
    )
    inputs = [
        sae_dir / "sae.safetensors",
        sae_dir / "config.json",
        metrics_json,
        latent_stats,
        corpus_json,
        baseline_json,
    ]
    result = saebench_core_result(
        sae,
        sae_id,
        metrics,
        read_latent_stats(latent_stats),
        context,
        eval_id=eval_id_for(sae_id, inputs),
        datetime_epoch_millis=os.stat(metrics_json).st_mtime_ns // 1_000_000,
        sae_config=read_json(sae_dir / "config.json"),
    )
    out = Path(out_json)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    misc = result["eval_result_metrics"]["misc_metrics"]
    summary = (
        f"saebench {sae_id}: core result, {sae.cfg.width} latents (alive {misc['frac_alive']:.3f}), "
        f"ce_loss_score {result['eval_result_metrics']['model_performance_preservation']['ce_loss_score']:.4f}, "
        f"{len(result['eval_result_unstructured']['saepipe']['undefined'])} undefined -> {out}"
    )
    if isinstance(log, (str, os.PathLike)):
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(summary + "\n")
    else:
        print(summary, file=log or sys.stderr)
    return out
