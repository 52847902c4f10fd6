"""Evaluation metrics with known answers: perfect and b_dec-only SAEs on a tiny model, CE
splices that keep excluded positions clean, expert usage over every routed expert."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saepipe.data.shards import read_shard, write_shard
from saepipe.evaluate.metrics import EvalConfig, evaluate_sae, lm_baseline, reconstruction_stats
from saepipe.lm import LMConfig, build_native, capture, model_id
from saepipe.saes import build_sae, save_sae

HOOK = "blocks.1.hook_resid_pre"
D, SEQ = 16, 32


def _write_eval_shard(path, model_dir, acts, tokens, exclude_positions=None) -> str:
    """One eval shard of `acts` [T, D] / `tokens` [B, SEQ]; `exclude_positions` in its metadata
    when given (None: the key is absent, as in shards of older code)."""
    meta = {
        "model": model_id(model_dir),
        "hook": HOOK,
        "dtype": "float16",
        "d_in": D,
        "token_count": len(acts),
        "mean_norm": float(np.linalg.norm(acts, axis=1).mean()),
        "seq_len": SEQ,
    }
    if exclude_positions is not None:
        meta["exclude_positions"] = list(exclude_positions)
    write_shard(str(path), acts, tokens.reshape(-1).numpy(), np.tile(np.arange(SEQ), len(tokens)), meta)
    return str(path)


def _tiny_model(root, bos_spike: float = 0.0):
    """A saved tiny TL-native model (directory `root/lm`) and the model itself. `bos_spike`
    is added to dimension 0 of the position-0 embedding: position 0's residual then stands
    out like GPT-2's BOS, whose norm is ~50x the others'."""
    model, arch = build_native(LMConfig(d_model=D, n_layers=2, n_heads=2, d_mlp=32), vocab_size=64, n_ctx=SEQ)
    with torch.no_grad():
        model.state_dict()["pos_embed.weight"][0, 0] += bos_spike
    model_dir = root / "lm"
    model_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / "model.safetensors"))
    (model_dir / "model.json").write_text(json.dumps({"kind": "native", "arch": arch}))
    return model.eval(), model_dir


def _tokens() -> torch.Tensor:
    return torch.randint(0, 64, (16, SEQ), generator=torch.Generator().manual_seed(0))


EVAL_CFG = EvalConfig(ce_tokens=16 * SEQ, ce_batch_size=8, batch_size=100, similarity_tokens=64, device="cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny TL-native model and one eval shard of its activations at HOOK."""
    root = tmp_path_factory.mktemp("eval")
    model, model_dir = _tiny_model(root)
    tokens = _tokens()
    acts = capture(model, tokens, HOOK).reshape(-1, D).numpy().astype(np.float16)
    shard = _write_eval_shard(root / "000.zarr", model_dir, acts, tokens)
    cfg = EVAL_CFG
    lm_baseline(cfg, str(model_dir), [shard], str(root / "baseline.json"))
    return root, model_dir, shard, cfg, acts.astype(np.float32)


def _evaluate_on(root, model_dir, shard, baseline_json, sae, name):
    sae.cfg.hook, sae.cfg.model_id = HOOK, model_id(model_dir)
    save_sae(sae, root / name)
    return evaluate_sae(
        EVAL_CFG, str(root / name), str(model_dir), [str(shard)], str(baseline_json), str(root / name / "metrics.json")
    )


def _evaluate(setup, sae, name):
    root, model_dir, shard, _, _ = setup
    return _evaluate_on(root, model_dir, shard, root / "baseline.json", sae, name)


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


# ---- excluded positions in the CE splices (docs/reference.md §5) -----------------------------------------

BOS_SPIKE, BOS_THRESHOLD = 60.0, 20.0  # x[0] at position 0 ~ 60, elsewhere |x[0]| of order 1


@pytest.fixture(scope="module")
def bos_setup(tmp_path_factory):
    """A tiny model whose position-0 residual stands out (a BOS-like spike on dimension 0),
    the same eval activations written twice: with `exclude_positions: [0]` and without the
    key, and the lm_baseline of each."""
    root = tmp_path_factory.mktemp("eval_bos")
    model, model_dir = _tiny_model(root, bos_spike=BOS_SPIKE)
    tokens = _tokens()
    acts_BSD = capture(model, tokens, HOOK)
    # precondition of the garbage SAE below: only position 0 crosses the threshold on dim 0
    assert (acts_BSD[:, 0, 0] > BOS_THRESHOLD).all(), acts_BSD[:, 0, 0]
    assert (acts_BSD[:, 1:, 0] < BOS_THRESHOLD).all(), acts_BSD[:, 1:, 0].max()
    acts = acts_BSD.reshape(-1, D).numpy().astype(np.float16)
    shards, baselines = {}, {}
    for name, excl in (("excl", [0]), ("none", None)):
        shards[name] = _write_eval_shard(root / f"{name}.zarr", model_dir, acts, tokens, excl)
        baselines[name] = root / f"baseline-{name}.json"
        lm_baseline(EVAL_CFG, str(model_dir), [shards[name]], str(baselines[name]))
    return {
        "root": root,
        "model": model,
        "model_dir": model_dir,
        "tokens": tokens,
        "shards": shards,
        "baselines": baselines,
    }


def _perfect_sae(bos_garbage: torch.Tensor | None = None):
    """TopK SAE with x_hat = ReLU(x) - ReLU(-x) = x exactly (W_enc = [I, -I], W_dec = [I; -I],
    every latent kept). With `bos_garbage` [D], one more latent ReLU(x[0] - BOS_THRESHOLD)
    decodes to that vector: exact everywhere except at the spiked position 0, where it adds
    huge noise, like an SAE meeting GPT-2's BOS that it was never trained on."""
    extra = 0 if bos_garbage is None else 1
    width = 2 * D + extra
    sae = build_sae({"arch": "topk", "d_in": D, "width": width, "k": width, "auxk": False})
    eye = torch.eye(D)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[:, : 2 * D] = torch.cat([eye, -eye], 1)
        sae.W_dec[: 2 * D] = torch.cat([eye, -eye], 0)
        if extra:
            sae.W_enc[:, 2 * D] = eye[0]
            sae.b_enc[2 * D] = -BOS_THRESHOLD
            sae.W_dec[2 * D] = bos_garbage
    return sae


def _bos_evaluate(bos, sae, name, shard="excl", baseline=None):
    return _evaluate_on(
        bos["root"], bos["model_dir"], bos["shards"][shard], bos["baselines"][baseline or shard], sae, name
    )


def test_ce_splice_keeps_excluded_positions_clean(bos_setup):
    garbage_D = 100.0 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    perfect = _bos_evaluate(bos_setup, _perfect_sae(), "perfect-excl")
    excluded = _bos_evaluate(bos_setup, _perfect_sae(garbage_D), "garbage-excl")
    included = _bos_evaluate(bos_setup, _perfect_sae(garbage_D), "garbage-none", shard="none")
    # with exclude_positions [0]: the garbage at position 0 is never spliced in, so the CE
    # equals that of a perfect output at position 0 (and the clean CE)
    assert excluded.ce_loss_reconstructed == pytest.approx(perfect.ce_loss_reconstructed, abs=1e-6)
    assert excluded.ce_loss_reconstructed == pytest.approx(excluded.ce_loss_original, abs=1e-5)
    assert excluded.loss_recovered == pytest.approx(1, abs=1e-4)
    assert excluded.fvu == pytest.approx(0, abs=1e-6)  # the reconstruction metrics skip it too
    # without the exclusion the same SAE is charged for position 0 (an untrained tiny model
    # moves little: ~0.03 nats here, 1000x the tolerance above)
    assert abs(included.ce_loss_reconstructed - included.ce_loss_original) > 0.01
    assert included.loss_recovered != pytest.approx(1, abs=0.01)


def test_zero_ablation_baseline_keeps_excluded_positions_clean(bos_setup):
    model, tokens = bos_setup["model"], bos_setup["tokens"]
    excl = json.loads(bos_setup["baselines"]["excl"].read_text())
    none = json.loads(bos_setup["baselines"]["none"].read_text())
    assert excl["exclude_positions"] == [0] and none["exclude_positions"] == []
    assert excl["ce_loss_original"] == pytest.approx(none["ce_loss_original"], abs=1e-6)

    def zero_but_position_0(act, hook):
        out = torch.zeros_like(act)
        out[:, 0] = act[:, 0]
        return out

    def ce(hook_fn):  # equal-size batches: the mean of the batch means is the mean
        losses = [
            model.run_with_hooks(tokens[i : i + 8], return_type="loss", fwd_hooks=[(HOOK, hook_fn)]).item()
            for i in range(0, len(tokens), 8)
        ]
        return sum(losses) / len(losses)

    assert excl["ce_loss_zero"] == pytest.approx(ce(zero_but_position_0), abs=1e-5)
    assert none["ce_loss_zero"] == pytest.approx(ce(lambda act, hook: torch.zeros_like(act)), abs=1e-5)
    assert abs(excl["ce_loss_zero"] - none["ce_loss_zero"]) > 1e-3
    # an SAE that outputs 0 everywhere is spliced exactly like the zero-ablation
    zero_sae = build_sae({"arch": "topk", "d_in": D, "width": 2 * D, "k": 2, "auxk": False})
    with torch.no_grad():
        zero_sae.W_dec.zero_()
        zero_sae.b_dec.zero_()
    m = _bos_evaluate(bos_setup, zero_sae, "zero-excl")
    assert m.ce_loss_reconstructed == pytest.approx(excl["ce_loss_zero"], abs=1e-5)
    assert m.loss_recovered == pytest.approx(0, abs=1e-4)


def test_baseline_with_other_exclusions_is_refused(bos_setup):
    with pytest.raises(ValueError, match="exclude_positions.*lm_baseline"):
        _bos_evaluate(bos_setup, _perfect_sae(), "mismatch", shard="excl", baseline="none")


# ---- expert usage over every routed expert ---------------------------------------------------


def test_expert_usage_counts_every_routed_expert_of_scale(setup):
    _, _, shard, _, _ = setup
    sae = build_sae({"arch": "scale", "d_in": D, "width": 64, "k": 4, "n_experts": 4, "active_experts": 2}).eval()
    stats = reconstruction_stats(sae, [shard], batch_size=100, device="cpu", similarity_tokens=64)
    assert sum(stats["expert_counts"]) == 2 * stats["n_tokens"]
    with torch.no_grad():  # independently: both selected experts of every eval token
        x_BD = torch.from_numpy(read_shard(shard).kept_acts()).float()
        experts_BE = sae(x_BD).experts_BE
    assert experts_BE.shape == (stats["n_tokens"], 2)
    assert stats["expert_counts"] == torch.bincount(experts_BE.reshape(-1), minlength=4).tolist()
    # the top-1 counts alone would differ: column 1 is routed too
    assert stats["expert_counts"] != torch.bincount(experts_BE[:, 0], minlength=4).tolist()
    shares = torch.tensor(sorted(stats["expert_counts"], reverse=True), dtype=torch.float64)
    assert stats["expert_cdf"] == pytest.approx((shares.cumsum(0) / shares.sum()).tolist())


def test_activation_similarity_uses_the_measured_l0(setup):
    """A ReLU SAE's config k is nominal; the similarity divides by the L0 of its token set."""
    _, _, shard, _, _ = setup
    sae = build_sae({"arch": "relu", "d_in": D, "width": 64, "k": 4, "l1_coeff": 3.0}).eval()
    stats = reconstruction_stats(sae, [shard], batch_size=100, device="cpu", similarity_tokens=64)
    with torch.no_grad():  # brute force on the same first 64 kept tokens
        out = sae(torch.from_numpy(read_shard(shard).kept_acts()[:64]).float())
    sets = [set(out.idx_BK[t][out.acts_BK[t] > 0].tolist()) for t in range(64)]
    l0 = sum(map(len, sets)) / 64
    assert abs(l0 - sae.cfg.k) > 1  # the case this test is about
    overlap = sum(len(a & b) for i, a in enumerate(sets) for j, b in enumerate(sets) if i != j)
    assert stats["activation_similarity"] == pytest.approx(overlap / (64 * 63 * l0))
