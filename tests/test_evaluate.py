"""Evaluation metrics with known answers: perfect and b_dec-only SAEs on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saepipe.data.shards import write_shard
from saepipe.evaluate.metrics import EvalConfig, evaluate_sae, lm_baseline
from saepipe.lm import LMConfig, build_native, capture, model_id
from saepipe.saes import build_sae, save_sae

HOOK = "blocks.1.hook_resid_pre"
D, SEQ = 16, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny TL-native model and one eval shard of its activations at HOOK."""
    root = tmp_path_factory.mktemp("eval")
    model, arch = build_native(LMConfig(d_model=D, n_layers=2, n_heads=2, d_mlp=32), vocab_size=64, n_ctx=SEQ)
    model_dir = root / "lm"
    model_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / "model.safetensors"))
    (model_dir / "model.json").write_text(json.dumps({"kind": "native", "arch": arch}))
    tokens = torch.randint(0, 64, (16, SEQ), generator=torch.Generator().manual_seed(0))
    acts = capture(model.eval(), tokens, HOOK).reshape(-1, D).numpy().astype(np.float16)
    shard = str(root / "000.zarr")
    write_shard(shard, acts, tokens.reshape(-1).numpy(), np.tile(np.arange(SEQ), 16),
                {"model": model_id(model_dir), "hook": HOOK, "dtype": "float16", "d_in": D,
                 "token_count": len(acts), "mean_norm": float(np.linalg.norm(acts, axis=1).mean()),
                 "seq_len": SEQ})
    cfg = EvalConfig(ce_tokens=16 * SEQ, ce_batch_size=8, batch_size=100, similarity_tokens=64, device="cpu")
    lm_baseline(cfg, str(model_dir), [shard], str(root / "baseline.json"))
    return root, model_dir, shard, cfg, acts.astype(np.float32)


def _evaluate(setup, sae, name):
    root, model_dir, shard, cfg, _ = setup
    sae.cfg.hook, sae.cfg.model_id = HOOK, model_id(model_dir)
    save_sae(sae, root / name)
    return evaluate_sae(cfg, str(root / name), str(model_dir), [shard], str(root / "baseline.json"),
                        str(root / name / "metrics.json"))


def test_perfect_reconstruction(setup):
    # W_enc = [I, -I], W_dec = [I; -I], every latent kept: x_hat = ReLU(x) - ReLU(-x) = x
    sae = build_sae({"arch": "topk", "d_in": D, "width": 2 * D, "k": 2 * D, "auxk": False})
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    m = _evaluate(setup, sae, "perfect")
    assert m.fvu == pytest.approx(0, abs=1e-6) and m.mse == pytest.approx(0, abs=1e-6)
    assert m.loss_recovered == pytest.approx(1, abs=1e-4) and m.delta_ce == pytest.approx(0, abs=1e-4)
    assert m.explained_variance == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("bias", ["zero", "mean"])
def test_bdec_only_sae_gives_the_ablation_values(setup, bias):
    acts = setup[4]
    sae = build_sae({"arch": "topk", "d_in": D, "width": 2 * D, "k": 2, "auxk": False})
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(torch.zeros(D) if bias == "zero" else torch.from_numpy(acts.mean(0)))
    m = _evaluate(setup, sae, f"bdec-{bias}")
    if bias == "zero":  # output 0 everywhere: exactly the zero-ablation CE
        assert m.ce_loss_reconstructed == pytest.approx(m.ce_loss_zero, abs=1e-5)
        assert m.loss_recovered == pytest.approx(0, abs=1e-4)
        assert m.l2_per_token == pytest.approx(float((acts**2).sum(1).mean()), rel=1e-4)
    else:  # mean ablation explains no variance
        assert m.fvu == pytest.approx(1, abs=1e-4)


def test_metrics_json_is_complete(setup):
    root = setup[0]
    sae = build_sae({"arch": "switch", "d_in": D, "width": 64, "k": 4, "n_experts": 4})
    m = _evaluate(setup, sae, "switch")
    saved = json.loads((root / "switch" / "metrics.json").read_text())
    assert set(saved) == set(m.__dataclass_fields__)
    assert sum(saved["expert_counts"]) == saved["n_tokens"] and len(saved["expert_counts"]) == 4
    assert 0 <= saved["activation_similarity"] <= 1 and saved["intra_expert_redundancy"] is not None
