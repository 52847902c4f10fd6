"""The `export` stage: a saved saepipe SAE as a SAELens 6.x directory (docs/reference.md §7).

``results/export/saelens/<id>/`` holds what ``sae_lens.SAE.load_from_disk`` reads, plus a
model card, so the folder can be uploaded to the Hugging Face hub as is:

- ``cfg.json``: ``architecture`` (the arch's ``SAELENS_ARCH`` trait), ``d_in``, ``d_sae``,
  ``dtype``, ``device``, ``apply_b_dec_to_input`` (true: every saepipe SAE subtracts ``b_dec``
  first), ``normalize_activations: "none"``, ``k`` where the forward keeps exactly k latents,
  the routing fields of the routed SAEs, and ``metadata`` (model, hook, context size, BOS,
  ``sae_lens_version``; SAELens reads a cfg without a version >= 6 through a legacy path that
  silently defaults the architecture).
- ``sae_weights.safetensors``: raw-space weights (activation normalisation folded in: raw
  activations in, raw reconstruction out; see :func:`saelens_tensors`).
- ``sparsity.safetensors``: ``sparsity`` [d_sae], log10 of each latent's firing frequency on
  the eval shards' kept tokens (``log10(freq + 1e-10)``, SAELens' convention).
- ``README.md``: model card (what the SAE is, its metrics.json, its config, how to load it).

Which SAELens class computes an architecture's forward pass is the config class's trait
``SAELENS_ARCH`` (declared in its own file in saepipe/saes/); the weights follow from the
saved tensors' names (docs/reference.md §2) and the traits ``ROUTED``, ``L0_FIXED`` and
``HAS_THRESHOLD``, never from the architecture's name. The routed SAEs (Switch, Scale) map to
the classes of the plugin :mod:`saepipe.interop.saelens`; a routed architecture outside
saepipe exports correctly when its forward is Scale's (docs/reference.md §1) with its routing
fields (``n_experts``, ``experts_per_token``, ``expert_weighting``, ``weight_order``; Switch:
one expert, weighted by its probability, or by 1 with ``heaviside``).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from saepipe.data.shards import check_compatible, read_meta, read_shard
from saepipe.devices import resolve_device
from saepipe.evaluate.metrics import read_latent_stats
from saepipe.io import atomic_path, read_json
from saepipe.saes import ARCHITECTURES, SAE, load_sae

SAELENS_VERSION = "6.54.12"
"""SAELens version the export is tested against (tests/test_saelens_roundtrip.py); written to
``metadata.sae_lens_version``."""

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
CARD_FILE = "README.md"
FILES = (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE, CARD_FILE)

LOG_SPARSITY_EPS = 1e-10
"""Added to the firing frequency before the log10 (SAELens' value: a dead latent reads -10)."""

# How each saved tensor (docs/reference.md §2) changes when the activation normalisation
# x_n = f x (f = act_norm_factor) is folded into the weights: the encoder sees
# f x - b_dec = f (x - b_dec / f) and the decoder output is divided by f.
TIMES_F = ("W_enc", "W_router")  # applied to raw activations
OVER_F = ("W_dec", "b_dec", "b_router")  # in activation units
UNCHANGED = ("b_enc", "threshold", "b_gate", "r_mag", "b_mag", "router_bias")  # on pre-activations / logits
IN_ENCODER = ("omega", "lowpass_A")  # feature scaling: already in encoder_features_MD() (Scale's W_hat)


def saelens_arch(arch: str) -> str | None:
    """The SAELens architecture a registered saepipe architecture exports to (its config
    class's ``SAELENS_ARCH``; None: not exported)."""
    return ARCHITECTURES[arch][1].SAELENS_ARCH


def saelens_architecture(sae: SAE) -> str:
    """The SAELens architecture of an SAE (its config class's ``SAELENS_ARCH``); an error for
    architectures without one."""
    arch = type(sae.cfg).SAELENS_ARCH
    if arch is None:
        raise ValueError(
            f"architecture {sae.cfg.arch!r} has no SAELens mapping: set SAELENS_ARCH in its config "
            "class (saepipe/interop/export.py) or turn the export off (config: export: {saelens: false})"
        )
    return arch


def saelens_tensors(sae: SAE) -> dict[str, Tensor]:
    """The SAE's weights as SAELens' class for it names them, in raw activation units (float32, CPU).

    With ``f = act_norm_factor``: ``W_enc' = f W_enc``, ``W_dec' = W_dec / f``,
    ``b_dec' = b_dec / f``, routed SAEs ``W_router' = f W_router``, ``b_router' = b_router / f``;
    biases, thresholds and gate parameters act on pre-activations and stay as they are. The
    encoder is the one the forward pass uses (``encoder_features_MD``: Scale's feature-scaled
    ``W_hat``, fixed after training, so ``omega`` and the low-pass are not exported). A 0-dim
    inference threshold (BatchTopK) becomes SAELens JumpReLU's per-latent ``threshold``
    [d_sae], clamped at 0 as saepipe's inference applies it (for a threshold >= 0, thresholding
    ``ReLU(pre)`` and ``pre`` keep the same latents). SAELens' gated SAE has ``b_gate`` and
    ``b_mag`` instead of ``b_enc``: a saved ``b_enc`` (zeros) is dropped next to ``b_gate``.
    """
    f = float(sae.cfg.act_norm_factor)
    saved = {name: t.detach().to("cpu", torch.float32) for name, t in sae.saved_tensors().items()}
    saved["W_enc"] = sae.encoder_features_MD().to("cpu", torch.float32).T
    out: dict[str, Tensor] = {}
    for name, t in saved.items():
        if name in TIMES_F:
            out[name] = t * f
        elif name in OVER_F:
            out[name] = t / f
        elif name in UNCHANGED:
            out[name] = t.clone()
        elif name not in IN_ENCODER:
            raise ValueError(
                f"{sae.cfg.arch!r} saves a tensor {name!r} that the SAELens export does not know "
                f"(known: {sorted(TIMES_F + OVER_F + UNCHANGED + IN_ENCODER)}); extend "
                "saepipe/interop/export.py"
            )
    if "threshold" in out:
        out["threshold"] = out["threshold"].clamp_min(0).expand(sae.cfg.width).clone()
    if "b_gate" in out and "b_enc" in out:
        if bool(out["b_enc"].any()):
            raise ValueError(f"{sae.cfg.arch!r}: SAELens' gated SAE has no b_enc, but the saved one is not zero")
        del out["b_enc"]
    return {name: t.contiguous() for name, t in out.items()}


def routing_fields(sae: SAE) -> dict[str, Any]:
    """cfg.json fields of the plugin's routed classes (:mod:`saepipe.interop.saelens`), read
    from the config: experts, experts per token, how the selected experts' latents are weighted
    (``expert_weighting``; Switch: ``"prob"``, or ``"one"`` with ``heaviside``) and whether the
    weights are applied before or after the TopK (``weight_order``)."""
    cfg = sae.cfg
    weighting = getattr(cfg, "expert_weighting", None)
    if weighting is None:
        weighting = "one" if getattr(cfg, "heaviside", False) else "prob"
    return {
        "n_experts": cfg.expert_count,
        "active_experts": cfg.experts_per_token,
        "expert_weighting": weighting,
        "weight_order": getattr(cfg, "weight_order", "after_topk"),
    }


def saelens_config(sae: SAE, shard_meta: dict[str, Any], sae_id: str = "") -> dict[str, Any]:
    """cfg.json for SAELens 6.x (see the module docstring); ``shard_meta``: the eval shards'
    metadata (model, hook, sequence length, BOS, excluded positions)."""
    cfg, cls = sae.cfg, type(sae.cfg)
    out: dict[str, Any] = {
        "architecture": saelens_architecture(sae),
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cls.L0_FIXED and not cls.HAS_THRESHOLD:  # the forward keeps exactly k latents per token
        out["k"] = cfg.k
    if cls.ROUTED:
        out.update(routing_fields(sae))
    elif "k" in out:
        out["rescale_acts_by_decoder_norm"] = False  # TopK on the pre-activations as they are
    out["metadata"] = {
        "model_name": shard_meta.get("model", cfg.model_id),
        "hook_name": shard_meta.get("hook", cfg.hook),
        "context_size": shard_meta.get("seq_len"),
        "prepend_bos": bool(shard_meta.get("prepend_bos", False)),
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,
        "saepipe": {
            "sae_id": sae_id,
            "arch": cfg.arch,
            "act_norm_factor_folded": cfg.act_norm_factor,
            "training_tokens": cfg.training_tokens,
            "seed": cfg.seed,
            "exclude_positions": list(shard_meta.get("exclude_positions", [])),
        },
    }
    return out


@torch.no_grad()
def log_firing_frequency(
    sae: SAE, shards: list[str], batch_size: int = 4096, device: str | torch.device = "cpu"
) -> Tensor:
    """``log10(freq + 1e-10)`` [M] (float32, CPU): each latent's share of the shards' kept tokens
    (``exclude_positions`` left out, as in evaluation) on which it is active (value > 0)."""
    counts_M = torch.zeros(sae.cfg.width, dtype=torch.long, device=device)
    n = 0
    for path in shards:
        acts = read_shard(path).kept_acts()
        for start in range(0, len(acts), batch_size):
            x_BD = torch.from_numpy(acts[start : start + batch_size]).to(device).float()
            enc = sae.encode(x_BD)
            assert enc.acts_BK is not None and enc.idx_BK is not None
            counts_M += torch.bincount(enc.idx_BK[enc.acts_BK > 0], minlength=sae.cfg.width)
            n += len(x_BD)
    if n == 0:
        raise ValueError(f"no kept tokens in the eval shards {shards}")
    return log_frequency(counts_M, n)


def log_frequency(fire_count_M: Tensor, n_tokens: int) -> Tensor:
    """``log10(fire_count / n_tokens + 1e-10)`` (float32, CPU): SAELens' sparsity values."""
    return torch.log10(fire_count_M.double().cpu() / n_tokens + LOG_SPARSITY_EPS).float()


CARD_METRICS = (
    ("l0", "L0 (active latents per token)"),
    ("explained_variance", "explained variance"),
    ("fvu", "fraction of variance unexplained"),
    ("mse", "MSE (raw units, per dim)"),
    ("loss_recovered", "CE loss recovered"),
    ("delta_ce", "CE increase (nats)"),
    ("ce_loss_original", "CE, clean"),
    ("ce_loss_reconstructed", "CE, SAE spliced in"),
    ("dead_fraction", "dead latents (never active on eval)"),
    ("n_tokens", "eval tokens"),
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(
    sae_id: str, sl_cfg: dict[str, Any], sae_config: dict[str, Any], metrics: dict[str, Any] | None, label: str
) -> str:
    """README.md of an exported SAE (Hugging Face model card with a YAML header)."""
    meta = sl_cfg["metadata"]
    routed = "n_experts" in sl_cfg
    lines = [
        "---",
        "library_name: saelens",
        "tags:",
        "- sparse-autoencoder",
        "- saelens",
        "- saepipe",
        "---",
        "",
        f"# {sae_id}: {label} SAE on `{meta['hook_name']}` of `{meta['model_name']}`",
        "",
        f"A {label} sparse autoencoder (saepipe architecture `{sae_config.get('arch')}`, SAELens "
        f"architecture `{sl_cfg['architecture']}`) with {sl_cfg['d_sae']} latents on the "
        f"{sl_cfg['d_in']}-dimensional activations of `{meta['hook_name']}`, trained by saepipe on "
        f"{sae_config.get('training_tokens', 0):,} tokens (seed {sae_config.get('seed')}).",
        "",
        "Raw activations in, raw reconstruction out: saepipe's activation normalisation "
        f"(factor {sae_config.get('act_norm_factor'):.6g}) is folded into the weights "
        "(`normalize_activations: none`); the latent values keep saepipe's scale.",
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["Held-out eval tokens (saepipe `metrics.json`, raw activation units).", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {text} | {_fmt(metrics[key])} |" for key, text in CARD_METRICS if metrics.get(key) is not None]
    else:
        lines += ["Not evaluated."]
    lines += [
        "",
        "`sparsity.safetensors` holds `sparsity` [d_sae]: log10 of each latent's firing frequency on the "
        "eval tokens (-10: never active).",
        "",
        "## Load",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
    ]
    if routed:
        lines += [
            "# SAELens has no routed (mixture-of-experts) SAE class: import saepipe's plugin first,",
            "# from saepipe (pip install --no-deps saepipe) or as the one file saepipe/interop/saelens.py",
            "import saepipe.interop.saelens  # registers saepipe_switch and saepipe_scale",
            "",
        ]
    lines += [
        f'sae = SAE.load_from_disk("path/to/{sae_id}")  # this folder',
        f'# or from the hub: SAE.from_pretrained("<user>/<repo>", "{sae_id}")',
        "feature_acts = sae.encode(activations)  # [..., d_sae]",
        "reconstruction = sae.decode(feature_acts)",
        "```",
        "",
    ]
    if routed:
        lines += [
            f"Routing: {sl_cfg['n_experts']} experts, {sl_cfg['active_experts']} per token, "
            f"expert weighting `{sl_cfg['expert_weighting']}` ({sl_cfg['weight_order']}); "
            "`encode` returns the weighted latent values, the ones the decoder sums.",
            "",
        ]
    shown = {k: v for k, v in sae_config.items() if k != "run"}
    lines += ["## saepipe config", "", "```json", json.dumps(shown, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def export_saelens(
    sae_dir: str | os.PathLike,
    shards: list[str],
    out_dir: str | os.PathLike,
    metrics_json: str | os.PathLike | None = None,
    latent_stats: str | os.PathLike | None = None,
    batch_size: int = 4096,
    device: str = "auto",
    log_path: str | os.PathLike | None = None,
) -> Path:
    """The `export` stage for one SAE: write :data:`FILES` into ``out_dir`` (each atomically).

    ``shards``: the eval shards (model/hook/context metadata; firing frequencies when no
    ``latent_stats``); ``metrics_json``: the SAE's metrics.json for the model card (None: no
    metrics); ``latent_stats``: the evaluate stage's per-latent counts on the same shards
    (``saepipe.evaluate.metrics.LATENT_STATS``), which spare running the SAE over them again;
    ``log_path``: a file for the one-line summary (default: stderr).
    """
    sae_dir, out = Path(sae_dir), Path(out_dir)
    sae_id = sae_dir.name
    dev = resolve_device(device)
    sae = load_sae(sae_dir, device=dev)
    metas = [read_meta(p) for p in shards]
    meta = check_compatible(metas, shards)
    if sae.cfg.hook != meta["hook"] or sae.cfg.model_id != meta["model"]:
        raise ValueError(
            f"SAE {sae_dir} was trained on {sae.cfg.model_id} / {sae.cfg.hook} but the eval shards "
            f"are {meta['model']} / {meta['hook']}; rerun the pipeline so both match"
        )
    sl_cfg = saelens_config(sae, meta, sae_id)
    tensors = saelens_tensors(sae)
    if latent_stats is not None:
        stats = read_latent_stats(latent_stats)
        log_sparsity = log_frequency(stats.fire_count_M, stats.n_tokens)
    else:
        log_sparsity = log_firing_frequency(sae, list(shards), batch_size, dev)
    sae_config = read_json(sae_dir / "config.json")
    metrics = read_json(metrics_json) if metrics_json is not None else None
    label = type(sae.cfg).LABEL or sae.cfg.arch
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(out / SPARSITY_FILE) as tmp:
        save_file({"sparsity": log_sparsity}, str(tmp))
    with atomic_path(out / CARD_FILE) as tmp:
        tmp.write_text(model_card(sae_id, sl_cfg, sae_config, metrics, label))
    with atomic_path(out / CFG_FILE) as tmp:
        tmp.write_text(json.dumps(sl_cfg, indent=2, sort_keys=True) + "\n")
    summary = (
        f"export {sae_id}: SAELens {sl_cfg['architecture']} ({len(tensors)} tensors, "
        f"{int((log_sparsity > math.log10(LOG_SPARSITY_EPS)).sum())}/{sae.cfg.width} latents fire on eval) -> {out}"
    )
    if log_path is None:
        print(summary, file=sys.stderr)
    else:
        Path(log_path).write_text(summary + "\n")
    return out
