"""The SAELens export (saepipe/interop/export.py) without SAELens: the exported raw-space weights,
run through a plain-torch re-implementation of each SAELens forward pass (and of the plugin's
routed one), reproduce saepipe's forward on raw activations; the files and fields exist.

The real library loads the same files in tests/test_saelens_roundtrip.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import REPO, random_shards
from safetensors.torch import load_file

from saepipe.interop import export
from saepipe.saes import ARCHITECTURES, config_from_dict, save_sae
from saepipe.saes.registry import build_sae

D, M, K = 16, 64, 4
FACTOR = 2.5  # act_norm_factor: the fold must matter
SCALE = 3.0  # raw activation scale

# (arch, extra config fields): every built-in architecture and the routed SAEs' flags
CASES = [
    ("topk", {}),
    ("batchtopk", {}),
    ("relu", {}),
    ("jumprelu", {}),
    ("gated", {}),
    ("switch", {"n_experts": 4}),
    ("switch", {"n_experts": 4, "heaviside": True}),
    ("scale", {"n_experts": 4, "active_experts": 2}),
    ("scale", {"n_experts": 4, "active_experts": 2, "weight_order": "before_topk"}),
    ("scale", {"n_experts": 4, "active_experts": 2, "expert_weighting": "renorm_logits", "lowpass": "learned"}),
    (
        "scale",
        {"n_experts": 4, "active_experts": 3, "expert_weighting": "code_softmax_of_probs", "lowpass": "identity"},
    ),
    ("scale", {"n_experts": 4, "active_experts": 2, "feature_scaling": False}),
]
CASES += [(arch, {}) for arch in sorted(ARCHITECTURES) if arch not in {a for a, _ in CASES} and arch != "toymoe"]


def random_sae(arch: str, extra: dict, seed: int = 0):
    """An SAE of `arch` with random weights in every saved tensor (thresholds >= 0; the
    biases an architecture refuses to be nonzero stay zero), in eval mode."""
    cfg = config_from_dict(
        {"arch": arch, "d_in": D, "width": M, "k": K, "act_norm_factor": FACTOR, "hook": "h", "model_id": "m", **extra}
    )
    sae = build_sae(cfg)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in sae.saved_tensors().items():
        r = torch.randn(t.shape, generator=gen)
        if name == "threshold":
            r = r.abs() * 0.3 + 0.05
        elif name == "lowpass_A":
            r = torch.eye(D) + 0.05 * r
        elif name.startswith("W_"):
            r = r / D**0.5
        else:
            r = 0.2 * r
        tensors[name] = r
    try:
        sae.load_saved_tensors(tensors)
    except ValueError:  # Switch: no b_enc, no router bias
        sae.load_saved_tensors({**tensors, "b_enc": torch.zeros(M), "router_bias": torch.zeros(cfg.expert_count)})
    return sae.eval()


def reference_encode(sl_cfg: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens' encode for the exported files, written out in plain torch (dense [B, d_sae])."""
    arch = sl_cfg["architecture"]
    assert sl_cfg["apply_b_dec_to_input"] and sl_cfg["normalize_activations"] == "none"
    sae_in = x - t["b_dec"]
    if arch == "gated":
        assert "b_enc" not in t
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        return gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return torch.relu(pre)
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > t["threshold"])
    if arch == "topk":
        assert not sl_cfg["rescale_acts_by_decoder_norm"]
        vals, idx = pre.topk(sl_cfg["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    assert arch in ("saepipe_switch", "saepipe_scale"), arch
    return reference_routed(sl_cfg, t, x, pre)


def reference_routed(sl_cfg: dict, t: dict, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """The plugin's routed forward (saepipe/interop/saelens.py docstring), one token at a time."""
    N, e, k = sl_cfg["n_experts"], sl_cfg["active_experts"], sl_cfg["k"]
    n = sl_cfg["d_sae"] // N
    out = torch.zeros_like(pre)
    for b in range(len(x)):
        logits = (x[b] - t["b_router"]) @ t["W_router"] + t["router_bias"]
        probs = logits.softmax(-1)
        experts = probs.argsort(descending=True)[:e]
        w = {
            "prob": probs[experts],
            "renorm_logits": logits[experts].softmax(-1),
            "code_softmax_of_probs": probs[experts].softmax(-1),
            "one": torch.ones(e),
        }[sl_cfg["expert_weighting"]]
        latents = torch.cat([torch.arange(i * n, (i + 1) * n) for i in experts.tolist()])
        weight = w.repeat_interleave(n)
        weighted = pre[b, latents] * weight
        key = weighted if sl_cfg["weight_order"] == "before_topk" else pre[b, latents]
        top = key.topk(k).indices
        out[b, latents[top]] = weighted[top].relu()
    return out


def ours_dense(sae, x: torch.Tensor) -> torch.Tensor:
    """saepipe's code of raw `x` as the values the decoder sums (Switch: times its gate), dense."""
    enc = sae.encode(x)
    acts = enc.acts_BK if enc.gate_B is None else enc.acts_BK * enc.gate_B[:, None]
    return torch.zeros(len(x), sae.cfg.width).scatter_add(1, enc.idx_BK, acts)


@pytest.mark.parametrize("arch, extra", CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_folded_weights_reproduce_the_raw_forward(arch, extra, one_thread):
    sae = random_sae(arch, extra)
    sl_cfg = export.saelens_config(sae, {"model": "m", "hook": "h", "seq_len": 64})
    tensors = export.saelens_tensors(sae)
    assert sl_cfg["architecture"] == type(sae.cfg).SAELENS_ARCH
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["W_enc"].shape == (D, M) and tensors["W_dec"].shape == (M, D) and tensors["b_dec"].shape == (D,)
    x = SCALE * torch.randn(256, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_acts = ours_dense(sae, x)
        ours_recon = sae(x).x_hat_BD
        ref_acts = reference_encode(sl_cfg, tensors, x)
    ref_recon = ref_acts @ tensors["W_dec"] + tensors["b_dec"]
    assert torch.equal((ours_acts > 0).sum(-1), (ref_acts > 0).sum(-1))  # L0 per token
    assert torch.equal(ours_acts > 0, ref_acts > 0)  # the same latents
    assert (ours_acts - ref_acts).abs().max() <= 1e-5 * ours_acts.abs().max()
    assert (ours_recon - ref_recon).abs().max() <= 1e-5 * x.abs().max()
    assert (ours_acts > 0).sum(-1).float().mean() > 0.5  # something fires


def test_the_fold_and_the_names():
    sae = random_sae("gated", {})
    t = export.saelens_tensors(sae)
    saved = sae.saved_tensors()
    assert set(t) == {"W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"}  # no b_enc in SAELens' gated
    assert torch.allclose(t["W_enc"], saved["W_enc"] * FACTOR)
    assert torch.allclose(t["W_dec"], saved["W_dec"] / FACTOR) and torch.allclose(t["b_dec"], saved["b_dec"] / FACTOR)
    assert torch.equal(t["b_gate"], saved["b_gate"])
    bt = export.saelens_tensors(random_sae("batchtopk", {}))
    assert bt["threshold"].shape == (M,) and bt["threshold"].unique().numel() == 1  # scalar broadcast
    sc = random_sae("scale", {"n_experts": 4, "active_experts": 2})
    t = export.saelens_tensors(sc)
    assert "omega" not in t and torch.allclose(t["W_enc"], sc.encoder_features_MD().T * FACTOR)  # W_hat
    assert torch.allclose(t["W_router"], sc.W_router * FACTOR) and torch.allclose(t["b_router"], sc.b_router / FACTOR)
    cfg = export.saelens_config(sc, {"model": "m", "hook": "h", "seq_len": 64})
    assert cfg["architecture"] == "saepipe_scale" and cfg["k"] == K
    assert (cfg["n_experts"], cfg["active_experts"], cfg["expert_weighting"]) == (4, 2, "prob")
    assert "k" not in export.saelens_config(random_sae("jumprelu", {}), {})
    assert "k" not in export.saelens_config(random_sae("batchtopk", {}), {})  # the threshold decides


def test_plugin_registers_the_architectures_the_traits_name():
    """The plugin (not importable here: no sae_lens) defines the names switch.py/scale.py declare,
    and imports nothing but torch, sae_lens and the standard library."""
    source = (REPO / "saepipe/interop/saelens.py").read_text()
    names = set(re.findall(r'return "(saepipe_\w+)"', source))
    routed = {cfg.SAELENS_ARCH for _, cfg in ARCHITECTURES.values() if cfg.ROUTED and cfg.SAELENS_ARCH}
    assert routed and routed <= names
    imports = set(re.findall(r"^(?:from|import) (\w+)", source, re.M))
    assert imports <= {"__future__", "math", "dataclasses", "torch", "sae_lens"}, imports


def test_export_writes_the_files_and_fields(tmp_path, one_thread):
    shards = random_shards(tmp_path / "shards", n_shards=2, rows=300, d=D)
    sae = random_sae("scale", {"n_experts": 4, "active_experts": 2})
    sae_dir = save_sae(sae, tmp_path / "saes" / "scale-k4", run={"wall_time_s": 1.0})
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"l0": 4.0, "fvu": 0.25, "loss_recovered": 0.9, "n_tokens": 600}))
    out = export.export_saelens(sae_dir, shards, tmp_path / "export" / "scale-k4", metrics, device="cpu")
    assert sorted(p.name for p in out.iterdir()) == sorted(export.FILES)
    cfg = json.loads((out / export.CFG_FILE).read_text())
    for key in ("architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations"):
        assert key in cfg, key
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == (D, M, "none")
    assert cfg["metadata"]["hook_name"] == "h" and cfg["metadata"]["model_name"] == "m"
    assert cfg["metadata"]["sae_lens_version"] == export.SAELENS_VERSION
    weights = load_file(out / export.WEIGHTS_FILE)
    assert torch.equal(weights["W_dec"], export.saelens_tensors(sae)["W_dec"])
    sparsity = load_file(out / export.SPARSITY_FILE)["sparsity"]
    assert sparsity.shape == (M,) and bool((sparsity <= 0).all()) and bool((sparsity >= -10).all())
    # the firing frequencies are those of the code on the shards' tokens
    from saepipe.data.shards import read_shard

    x = torch.cat([torch.from_numpy(read_shard(p).kept_acts()).float() for p in shards])
    with torch.no_grad():
        freq = (ours_dense(sae, x) > 0).double().mean(0)
    assert torch.allclose(sparsity, torch.log10(freq + 1e-10).float())
    card = (out / export.CARD_FILE).read_text()
    assert card.startswith("---\nlibrary_name: saelens")
    assert "| CE loss recovered | 0.9 |" in card and "saepipe.interop.saelens" in card and "scale-k4" in card
