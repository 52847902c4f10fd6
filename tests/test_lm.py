"""The TransformerLens bridge helpers: hook validation, stopping at the hook, CE patching."""
import pytest
import torch

from saepipe.lm import LMConfig, build_native, capture, ce_loss, check_hook


@pytest.fixture(scope="module")
def model():
    m, _ = build_native(LMConfig(d_model=32, n_layers=3, n_heads=2, d_mlp=64), vocab_size=100, n_ctx=16)
    return m.eval()


def test_unknown_hook_lists_valid_names(model):
    with pytest.raises(ValueError) as err:
        check_hook(model, "blocks.9.hook_resid_pre")
    assert "blocks.2.hook_resid_post" in str(err.value) and "blocks.9" in str(err.value)
    check_hook(model, "blocks.1.hook_resid_pre")


def test_capture_stops_at_the_hook(model):
    tokens = torch.randint(0, 100, (2, 16))
    fired = []
    for name in ("blocks.1.attn.hook_in", "blocks.2.hook_in", "ln_final.hook_in"):
        model.hook_dict[name].add_hook(lambda act, hook: fired.append(hook.name))
    try:
        act = capture(model, tokens, "blocks.1.hook_resid_pre")
    finally:
        model.reset_hooks()
    assert act.shape == (2, 16, 32)
    assert fired == []   # nothing after the hook ran
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(act, cache["blocks.1.hook_resid_pre"])


def test_ce_loss_with_identity_and_zero_patch(model):
    tokens = torch.randint(0, 100, (2, 16))
    clean = ce_loss(model, tokens)
    assert ce_loss(model, tokens, "blocks.1.hook_resid_pre", lambda a: a) == pytest.approx(clean, abs=1e-5)
    assert ce_loss(model, tokens, "blocks.1.hook_resid_pre", torch.zeros_like) != pytest.approx(clean, abs=1e-3)
