"""The reference training recipe: lr "auto" (width rule) and gradient-norm clipping."""

import math

import pytest
import torch

from saepipe.saes import build_sae
from saepipe.train import TrainConfig, auto_lr, resolve_lr, train_step


def test_auto_lr_is_the_width_rule_on_total_latents():
    assert auto_lr(2**14) == pytest.approx(2e-4)
    assert auto_lr(4 * 2**14) == pytest.approx(1e-4)
    # configs/paper-switch.yaml's widest Switch SAE: M = 196608 latents over all experts
    assert auto_lr(196_608) == pytest.approx(2e-4 / math.sqrt(12))
    assert auto_lr(1024) == pytest.approx(8e-4)
    assert resolve_lr("auto", 2**14) == pytest.approx(2e-4) and resolve_lr(3e-3, 2**14) == 3e-3


@pytest.mark.parametrize("bad", [{"lr": "fast"}, {"lr": -1.0}, {"grad_clip": 0}, {"grad_clip": "1"}])
def test_bad_recipe_fields_are_named(bad):
    with pytest.raises(ValueError, match=f"train.{next(iter(bad))}"):
        TrainConfig(**bad)


def test_grad_clip_bounds_the_global_gradient_norm():
    torch.manual_seed(0)
    x_BD = torch.randn(64, 16) * 10

    def update_norm(clip):
        sae = build_sae({"arch": "topk", "d_in": 16, "width": 64, "k": 4, "auxk": False}).train()
        sae.init_from_batch(x_BD)
        before = [p.detach().clone() for p in sae.parameters()]
        opt = torch.optim.SGD(sae.parameters(), lr=1.0)  # update = -(clipped) gradient
        sae.after_optimizer_step = lambda: None  # keep the raw SGD update measurable
        train_step(sae, opt, x_BD, None, clip)
        return torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(sae.parameters(), before))).item()

    free = update_norm(None)
    assert free > 1e-3
    assert update_norm(free / 10) == pytest.approx(free / 10, rel=1e-4)
    assert update_norm(free * 10) == pytest.approx(free, rel=1e-6)  # above the norm: no effect
