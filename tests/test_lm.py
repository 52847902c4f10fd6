"""The TransformerLens bridge helpers: hook validation, stopping at the hook, CE patching."""

import pytest
import torch

from saepipe.lm import LMConfig, build_native, capture, ce_loss, check_hook, keep_positions_clean


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
    assert fired == []  # nothing after the hook ran
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(act, cache["blocks.1.hook_resid_pre"])


def test_ce_loss_with_identity_and_zero_patch(model):
    tokens = torch.randint(0, 100, (2, 16))
    clean = ce_loss(model, tokens)
    assert ce_loss(model, tokens, "blocks.1.hook_resid_pre", lambda a: a) == pytest.approx(clean, abs=1e-5)
    assert ce_loss(model, tokens, "blocks.1.hook_resid_pre", torch.zeros_like) != pytest.approx(clean, abs=1e-3)


def test_keep_positions_clean_splice():
    act_BSD = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    spliced = keep_positions_clean(lambda a: torch.full_like(a, 7.0), [0, 3, 99])  # 99 >= S: absent
    out = spliced(act_BSD)
    assert torch.equal(out[:, [0, 3]], act_BSD[:, [0, 3]])
    assert (out[:, [1, 2, 4]] == 7.0).all()
    half = keep_positions_clean(lambda a: a.double() * 2, [1])(act_BSD.half())
    assert half.dtype == torch.float16 and torch.equal(half[:, 1], act_BSD.half()[:, 1])
    nan = keep_positions_clean(lambda a: torch.full_like(a, float("nan")), [0])(act_BSD)
    assert torch.equal(nan[:, 0], act_BSD[:, 0]) and nan[:, 1:].isnan().all()
    assert keep_positions_clean(torch.zeros_like, [7])(act_BSD).eq(0).all()  # nothing in range
    with pytest.raises(ValueError, match=">= 0"):
        keep_positions_clean(torch.zeros_like, [-1])
    with pytest.raises(ValueError, match="same shape"):
        keep_positions_clean(lambda a: a[:, :2], [0])(act_BSD)


def test_ce_loss_keeps_positions_clean(model):
    """Huge noise at position 0 is ignored when position 0 is kept, and only then."""
    hook = "blocks.1.hook_resid_pre"
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    clean = ce_loss(model, tokens)

    def noisy_at_0(act):
        out = act.clone()
        out[:, 0] += 1e3 * torch.randn(act[:, 0].shape, generator=torch.Generator().manual_seed(2))
        return out

    assert ce_loss(model, tokens, hook, noisy_at_0, keep_positions=[0]) == pytest.approx(clean, abs=1e-5)
    assert ce_loss(model, tokens, hook, noisy_at_0) != pytest.approx(clean, abs=1e-3)
    assert ce_loss(model, tokens, hook, noisy_at_0, keep_positions=[1]) != pytest.approx(clean, abs=1e-3)
    zero_kept = ce_loss(model, tokens, hook, torch.zeros_like, keep_positions=[0])
    assert zero_kept != pytest.approx(ce_loss(model, tokens, hook, torch.zeros_like), abs=1e-4)
    with pytest.raises(ValueError, match="hook"):
        ce_loss(model, tokens, None, torch.zeros_like)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_native_hook_names_match_the_booted_model(n_layers):
    """The parse-time hook list (no TransformerLens import) is the booted model's, exactly."""
    from saepipe.lm import LMConfig, build_native, hook_names, native_hook_names

    model, _ = build_native(LMConfig(d_model=16, n_layers=n_layers, n_heads=2, d_mlp=32), 50, 8)
    assert native_hook_names(n_layers) == hook_names(model)


def test_native_config_errors_name_the_fix():
    from saepipe.lm import check_native_config

    with pytest.raises(ValueError, match=r"lm.d_model \(30\) must be divisible by lm.n_heads \(4\).*n_heads: 3"):
        check_native_config({"d_model": 30, "n_heads": 4}, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match=r"(?s)'blocks.2.hook_resid_pre' does not exist .*blocks.1.hook_resid_post"):
        check_native_config({"n_layers": 2}, "blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match=r"unknown lm field\(s\) \['layers'\]"):
        check_native_config({"layers": 2}, "blocks.0.hook_resid_pre")
    assert check_native_config({"n_layers": 2}, "blocks.1.hook_resid_pre").n_layers == 2
