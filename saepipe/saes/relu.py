"""ReLU (L1) SAE, Anthropic April-2024 recipe (docs/reference.md §1).

Forward (normalised space, ``x_n = x * act_norm_factor``)::

    f       = ReLU(W_enc^T (x_n - b_dec) + b_enc)       # [B, M], dense encoder (inherent)
    x_hat_n = b_dec + sum_{j: f_j > 0} f_j W_dec[j]

Two exact ways to compute it, chosen per batch by the code's width (L = most active latents
of a token, :func:`kernels.code_is_wide`; only speed depends on the choice):

- wide code (early training, unstructured inputs: about half the latents fire): in training,
  encoder, ReLU and decoder are one fused autograd node over dense ``[B, M]`` tensors
  (:func:`dense_code.relu_dense`); the sparse code of the output is built only when read;
- narrow code: the padded code below, an ``embedding_bag`` decode and a sparse encoder
  backward (:func:`kernels.gather_linear`: only the active entries reach ``W_enc``).

Loss terms (``losses``; every term is the paper's per-token loss divided by ``d``, because
the base ``mse`` term is the mean over tokens AND dims = ``||x - x_hat||^2 / d``)::

    mse = mean_b ||x_n - x_hat_n||^2 / d
    l1  = lambda_t * mean_b sum_j f_j ||W_dec[j]|| / d

so ``l1_coeff`` has the paper's meaning (penalty per unit of decoder-norm-weighted activation,
relative to the per-token squared error, in the normalised space where E||x_n|| ~ sqrt(d)).
No unit-norm constraint: ``before/after_optimizer_step`` are no-ops, and the decoder-norm
weighting is what stops the encoder/decoder scale trade-off.

Lambda warm-up: ``lambda_t = l1_coeff * min(1, tokens_seen / warmup_tokens)`` in training
mode, where ``tokens_seen`` (a buffer) counts the tokens of every training-mode forward
BEFORE the current batch (so the first step has lambda 0), and ``warmup_tokens`` =
``l1_warmup_tokens`` if given, else ``round(l1_warmup_fraction * training_tokens)`` (the
pipeline sets ``training_tokens`` before training; 5% by default = "first 5% of steps").
Counting tokens rather than steps makes the schedule independent of the batch size and needs
nothing from the trainer. ``warmup_tokens == 0`` -> no warm-up. Eval mode uses the full
``l1_coeff`` (a loaded SAE's loss is reported with its final lambda).

Variable L0 -> padded code (:func:`kernels.padded_indices`): ``(acts_BL, idx_BL)`` with
``L = max_b L0_b`` (>= 1; one host sync per forward): row ``b`` holds its active latents
(ascending index) and then padding entries with ``acts = 0`` and ``idx = 0``. Downstream
consumers are exact: ``l0 = (acts_BK > 0).sum(-1)``; padding adds ``0 * W_dec[0]`` in the
embedding_bag decode (and gets zero gradient); dead-latent stats only count ``acts > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dense_code, kernels
from .base import SAE, Encoding, SAEConfig


@dataclass
class ReLUConfig(SAEConfig):
    """ReLU (L1) SAE hyper-parameters.

    ``k`` is NOT used by the forward pass (L0 is measured, not set): it is the expected L0
    used for the FLOP estimate ``2 d M + 2 d k`` (sparse decode of k active latents).
    """

    l1_coeff: float = 5.0  # lambda of the decoder-norm-weighted L1, paper scale (see module)
    l1_warmup_fraction: float = 0.05  # lambda ramps up over this fraction of training_tokens
    l1_warmup_tokens: int | None = None  # explicit warm-up length in tokens (overrides fraction)
    dec_init_norm: float = 0.1  # initial L2 norm of every decoder row (random directions)
    dead_tokens: int = 10_000_000  # tokens without firing after which a latent counts as dead

    ARCH: ClassVar[str] = "relu"
    LABEL: ClassVar[str] = "ReLU (L1)"
    ORDER: ClassVar[int] = 2
    L0_FIXED: ClassVar[bool] = False  # L0 is measured; k is its expected value
    SAELENS_ARCH: ClassVar[str | None] = "standard"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l1_coeff >= 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff!r}")
        if not 0 <= self.l1_warmup_fraction <= 1:
            raise ValueError(f"l1_warmup_fraction must be in [0, 1], got {self.l1_warmup_fraction!r}")
        if self.l1_warmup_tokens is not None and (
            not isinstance(self.l1_warmup_tokens, int) or self.l1_warmup_tokens < 0
        ):
            raise ValueError(f"l1_warmup_tokens must be an int >= 0 or None, got {self.l1_warmup_tokens!r}")
        if not self.dec_init_norm > 0:
            raise ValueError(f"dec_init_norm must be > 0, got {self.dec_init_norm!r}")
        if self.dead_tokens < 0:
            raise ValueError(f"dead_tokens must be >= 0, got {self.dead_tokens!r}")

    @property
    def warmup_tokens(self) -> int:
        """Tokens over which lambda ramps up (0 = no warm-up)."""
        if self.l1_warmup_tokens is not None:
            return self.l1_warmup_tokens
        return round(self.l1_warmup_fraction * self.training_tokens)


class ReLUSAE(SAE):
    """ReLU SAE with decoder-norm-weighted L1, lambda warm-up, unconstrained decoder."""

    cfg: ReLUConfig
    tokens_seen: Tensor  # buffer [], long: training tokens so far (lambda warm-up)

    def __init__(self, cfg: ReLUConfig):
        super().__init__(cfg)
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.width))
        self.b_enc = nn.Parameter(torch.zeros(cfg.width))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def _init_encoder(self, gen: torch.Generator) -> None:
        """Decoder rows: random directions of norm ``dec_init_norm``; W_enc = W_dec^T; b_enc 0."""
        self.W_dec.normal_(generator=gen)
        kernels.normalise_rows_(self.W_dec.data).mul_(self.cfg.dec_init_norm)
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.tokens_seen.zero_()

    def l1_scale(self) -> Tensor | float:
        """Current warm-up factor of lambda in [0, 1] (1 in eval mode); no host sync."""
        warm = self.cfg.warmup_tokens
        if not self.training or warm <= 0:
            return 1.0
        return (self.tokens_seen.float() / warm).clamp(max=1.0)

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        """Padded code of the active latents (sparse encoder backward, :func:`kernels.gather_linear`);
        without autograd, a wide code also comes dense (decoded by one matmul)."""
        x_c_BD, b_eff_M = kernels.centred_input(x_n_BD, self.b_dec, self.W_enc, self.b_enc)
        with torch.no_grad():
            pre_BM = torch.addmm(b_eff_M, x_c_BD, self.W_enc)
        idx_BL, valid_BL = kernels.padded_indices(pre_BM > 0)
        pre_BL = kernels.gather_linear(x_c_BD, self.W_enc, b_eff_M, pre_BM, idx_BL, valid_BL)
        acts_BL = F.relu(pre_BL) * valid_BL
        wide = idx_BL.shape[1] >= pre_BM.shape[1] * kernels.DENSE_DECODE_MIN_FILL
        dense_BM = pre_BM.relu_() if wide and not torch.is_grad_enabled() else None
        return Encoding(acts_BL, idx_BL, dense_BM=dense_BM), {}

    def _encode_decode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor], Tensor]:
        """Training on a wide code: encoder, ReLU and decoder fused (:func:`dense_code.relu_dense`)."""
        if not (torch.is_grad_enabled() and self._wide(x_n_BD)):
            return super()._encode_decode_n(x_n_BD)
        x_hat_BD, f_BM, f_sum_M = dense_code.relu_dense(x_n_BD, self.b_dec, self.W_enc, self.b_enc, self.W_dec)
        return Encoding(None, None, dense_BM=f_BM), {"f_sum_M": f_sum_M}, x_hat_BD + self.b_dec

    @torch.no_grad()
    def _wide(self, x_n_BD: Tensor, rows: int = 256) -> bool:
        """Whether the code is wide (:func:`kernels.code_is_wide`), from the first ``rows`` tokens."""
        x_BD = x_n_BD[:rows]
        return kernels.code_is_wide(torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc) > 0)

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``{"l1": lambda_t / d * mean_b sum_j f_j ||W_dec[j]||}``; advances the warm-up."""
        lam = self.cfg.l1_coeff * self.l1_scale()
        norms_M = self.W_dec.norm(dim=1)
        if enc.acts_BK is None or enc.idx_BK is None:  # fused dense step: the code's column sums
            weighted = (extras["f_sum_M"] * norms_M).sum()
        else:  # padding: acts 0 -> contributes 0
            weighted = (enc.acts_BK * norms_M[enc.idx_BK]).sum()
        l1 = weighted * (lam / (self.cfg.d_in * x_n_BD.shape[0]))
        if self.training:
            self.tokens_seen.add_(x_n_BD.shape[0])
        return {"l1": l1}

    def before_optimizer_step(self) -> None:
        """No unit-norm constraint: the decoder gradient is left untouched."""

    def after_optimizer_step(self) -> None:
        """No unit-norm constraint: the decoder is not renormalised."""

    def saved_tensors(self) -> dict[str, Tensor]:
        return {**super().saved_tensors(), "W_enc": self.W_enc, "b_enc": self.b_enc}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        super().load_saved_tensors(tensors)
        self.W_enc.copy_(tensors["W_enc"])
        self.b_enc.copy_(tensors["b_enc"])


__all__ = ["ReLUConfig", "ReLUSAE"]
