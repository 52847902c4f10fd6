"""SAE base classes: config dataclass, module base, output tuples.

Units and the saved format
--------------------------
Every SAE works internally in a *normalised space*: raw activations ``x`` are multiplied by
``cfg.act_norm_factor`` before the encoder (``x_n = x * act_norm_factor``). ``encode`` and
``forward`` take RAW activations; ``decode`` / ``forward`` return ``x_hat`` in RAW units
(``x_hat = x_hat_n / act_norm_factor``). Latent activations (``acts_BK``) and all losses are in
the normalised space: ``mse = ||x_n - x_hat_n||^2 / d`` (mean over tokens) equals the raw
``||x - x_hat||^2 / d`` times ``act_norm_factor**2``. A coefficient that the papers define
against the RAW squared error (the MoE balance weight ``alpha``) is therefore multiplied by
``act_norm_factor**2`` in the normalised loss (see ``alpha_units`` in :mod:`saepipe.saes.moe`).

The saved weights (``sae.safetensors``, docs/reference.md §2: ``W_enc [d, M]``, ``b_enc [M]``,
``W_dec [M, d]``, ``b_dec [d]``, MoE archs add ``W_router [d, N]``, ``b_router [d]``,
``router_bias [N]``) are the normalised-space weights. To use them on raw activations:
``x_n = x * act_norm_factor`` (``act_norm_factor`` from ``config.json``), run the
architecture's forward pass (docs/reference.md §1) on ``x_n``, then divide ``x_hat_n`` by
``act_norm_factor``. Feature directions (rows of ``W_dec``) are unchanged by this scaling.

Training protocol expected from the trainer: ``init_from_batch(first_batch)`` once;
per step ``out = sae(x)``; ``sum(out.losses.values()).backward()``;
``sae.before_optimizer_step()``; ``opt.step()``; ``sae.after_optimizer_step()``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import kernels

DEFAULT_DEAD_TOKENS = 10_000_000
"""Tokens without firing after which a latent counts as dead, for configs without the field."""

ADAM_FLOPS_PER_PARAM = 12
"""FLOPs Adam spends per parameter per step (two moment updates, bias corrections, sqrt,
divide, weight update); used by :meth:`SAEConfig.train_flops_per_token`."""

DECODER_FLOPS_PER_WEIGHT = 6
"""FLOPs per decoder weight per step for the unit-norm constraint (parallel-gradient removal:
dot, scale, subtract; renormalisation: square-sum, divide); see ``train_flops_per_token``."""

METADATA_KEYS = frozenset(
    {"n_experts", "active_experts", "d_sae", "format", "format_version", "dtype", "weights_space", "run"}
)
"""Informational keys written to config.json that are not config fields of every arch."""


@dataclass
class SAEConfig:
    """Hyper-parameters shared by every architecture (see subclasses for arch-specific ones)."""

    arch: str  # registry name: "topk" | "switch"
    d_in: int  # d, width of the input activations (d_model)
    width: int  # M, total number of latents
    k: int  # active latents per token (TopK over the relevant latents)
    act_norm_factor: float = 1.0  # raw activations are multiplied by this before the SAE
    hook: str = ""  # hook point the activations come from (informational)
    model_id: str = ""  # model the activations come from (informational)
    training_tokens: int = 0  # tokens the SAE was trained on (informational)
    seed: int = 0  # RNG seed used for the init

    ARCH: ClassVar[str] = ""  # registry name this config class belongs to ("" = any)

    # ---- traits: what the rest of saepipe (table, figures, rules, verdicts) knows of an
    # architecture; callers read these (via ``registry.arch_traits`` or the table's trait
    # columns), never the registry name.
    LABEL: ClassVar[str] = ""  # display label in figures and tables ("" = the registry name)
    ORDER: ClassVar[int] = 100  # sort order of the architecture in figures (smaller first)
    L0_FIXED: ClassVar[bool] = True  # True: k sets L0 per token; False: L0 is measured (k = its
    #                                  expected value, only used by the FLOP estimate)
    ROUTED: ClassVar[bool] = False  # a router picks experts (blocks of latents) per token
    HAS_OMEGA: ClassVar[bool] = False  # learned per-expert feature-scaling gain ``omega``
    HAS_THRESHOLD: ClassVar[bool] = False  # learned activation threshold (inference or per latent)
    # SAELens 6.x architecture whose inference class computes this arch's forward pass once the
    # activation normalisation is folded into the weights (saepipe/interop/export.py): a built-in
    # one ("standard", "topk", "jumprelu", "gated") or a class of the plugin
    # saepipe/interop/saelens.py ("saepipe_switch", "saepipe_scale"); None: no export.
    SAELENS_ARCH: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for name in ("d_in", "width", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.k > self.width:
            raise ValueError(f"k={self.k} must be <= width={self.width}")
        if not self.act_norm_factor > 0:
            raise ValueError(f"act_norm_factor must be > 0, got {self.act_norm_factor!r}")
        if self.ARCH and self.arch != self.ARCH:
            raise ValueError(f"{type(self).__name__} needs arch={self.ARCH!r}, got {self.arch!r}")

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (docs/reference.md §1, multiply-add = 2 FLOPs).

        Default: the dense family, ``2 d M`` encoder + ``2 d k`` sparse decoder (for archs
        whose L0 is measured, ``k`` is the expected L0). MoE archs override it.
        """
        return 2 * self.d_in * self.width + 2 * self.d_in * self.k

    def n_params(self) -> int:
        """Number of trainable parameters (analytic; equals ``sum(p.numel())`` of the built SAE).

        Default: the dense family (TopK, BatchTopK, ReLU): ``W_enc [d, M]``, ``b_enc [M]``,
        ``W_dec [M, d]``, ``b_dec [d]`` = ``2 d M + M + d``. Other archs override it.
        """
        d, M = self.d_in, self.width
        return 2 * d * M + M + d

    def train_flops_per_token(self, batch_size: int) -> float:
        """Training FLOPs per token, one formula for every architecture (docs/reference.md §5 cost matching)::

            3 * flops_per_token()                                  # forward + backward (~2x fwd)
            + (ADAM_FLOPS_PER_PARAM * n_params()                   # Adam touches every parameter
               + DECODER_FLOPS_PER_WEIGHT * width * d_in) / batch_size   # decoder unit-norm step

        with ``ADAM_FLOPS_PER_PARAM = 12`` and ``DECODER_FLOPS_PER_WEIGHT = 6``. The per-step
        terms are spread over the ``batch_size`` tokens of a step, so they matter for MoE SAEs
        (N times the parameters of their FLOP-matched dense twin) and small batches. The decoder
        term is charged to every arch (the ReLU SAE has no unit-norm step: it is overestimated
        by ``6 M d / batch_size``).
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int (tokens per step), got {batch_size!r}")
        per_step = ADAM_FLOPS_PER_PARAM * self.n_params() + DECODER_FLOPS_PER_WEIGHT * self.width * self.d_in
        return 3.0 * self.flops_per_token() + per_step / batch_size

    @property
    def expert_count(self) -> int:
        """Experts N the latents are split into (1 for dense SAEs; MoE: ``n_experts``)."""
        return 1

    @property
    def experts_per_token(self) -> int:
        """Experts routed per token, e (1 for dense SAEs and Switch; Scale: ``active_experts``)."""
        return 1

    @property
    def omega_active(self) -> bool:
        """Whether the learned ``omega`` enters the forward pass (``HAS_OMEGA`` and not switched
        off by a flag such as Scale's ``feature_scaling``)."""
        return self.HAS_OMEGA

    def encoder_fraction(self) -> float:
        """Fraction of the M encoder rows computed per token (dense 1, Switch 1/N).

        FLOP matching uses it: a FLOP-matched config has width = baseline active width / fraction.
        """
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the config fields (the valid keys of :meth:`from_dict`)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Build from a dict; unknown keys raise ``ValueError`` naming them and the valid keys."""
        valid = cls.field_names()
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(valid)}")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():
            if not value_matches(value, hints[key]):
                raise ValueError(
                    f"{cls.ARCH or cls.__name__} field {key!r} must be {type_name(hints[key])}, got {value!r}"
                )
        return cls(**d)


def value_matches(value: Any, annotation: Any) -> bool:
    """Whether a config value (as read from YAML/JSON) fits a field's annotation.

    Understands what config fields use: int (not bool), float (an int is accepted), bool,
    str, None, unions (``int | None``), ``Literal[...]`` and ``list[...]``/``tuple[...]``
    (their items checked); anything else is accepted (the dataclass's ``__post_init__``
    validates values further).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        item = args[0] if args and (origin is list or (len(args) == 2 and args[1] is Ellipsis)) else None
        return item is None or all(value_matches(v, item) for v in value)
    return True


def type_name(annotation: Any) -> str:
    """'an int', 'a float or null', "one of ['paper', 'normalised']" for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple):
        return f"a list of {type_name(args[0])}" if args else "a list"
    names = {bool: "a bool", int: "an int", float: "a number", str: "a string", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


class AuxKConfigMixin:
    """Validation and the ``k_aux`` default shared by the configs that have Gao's AuxK.

    The dataclass using it declares the fields ``auxk: bool``, ``k_aux: int | None``,
    ``aux_coeff: float`` and ``dead_tokens: int`` and calls :meth:`_validate_auxk` from its
    ``__post_init__``. :meth:`SAE._auxk_selection` reads them.
    """

    auxk: bool
    k_aux: int | None
    aux_coeff: float
    dead_tokens: int
    d_in: int

    def _validate_auxk(self) -> None:
        if not isinstance(self.auxk, bool):
            raise ValueError(f"auxk must be a bool, got {self.auxk!r}")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or self.k_aux <= 0):
            raise ValueError(f"k_aux must be a positive int or None (= d_in // 2), got {self.k_aux!r}")
        if not self.aux_coeff >= 0:
            raise ValueError(f"aux_coeff must be >= 0, got {self.aux_coeff!r}")
        if self.dead_tokens < 0:
            raise ValueError(f"dead_tokens must be >= 0, got {self.dead_tokens!r}")

    @property
    def k_aux_effective(self) -> int:
        """``k_aux``, defaulting to ``d_in // 2`` (at least 1)."""
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)


class Encoding(NamedTuple):
    """Sparse code of a batch (normalised space).

    ``acts_BK`` / ``idx_BK`` are None only in the encoding that a dense-code training forward
    (:meth:`SAE._encode_decode_n` of ReLU, JumpReLU, Gated on a wide code) hands to the SAE's
    own loss and statistics hooks, with the code in ``dense_BM``; :meth:`SAE.encode` always
    returns the sparse code.
    """

    acts_BK: Tensor | None  # activation values (>= 0) of the selected latents
    idx_BK: Tensor | None  # long, GLOBAL latent index in [0, M) (Switch: expert * n + local)
    gate_B: Tensor | None = None  # Switch: p_{i*} (1 when heaviside); None for dense
    expert_B: Tensor | None = None  # Switch: routed expert per token
    probs_BN: Tensor | None = None  # Switch: router probabilities
    dense_BM: Tensor | None = None  # variable-L0 archs: the same code dense, when that decodes faster
    experts_BE: Tensor | None = None  # MoE: every routed (selected) expert per token, column 0 = top-1


class SAEOutput:
    """Result of ``SAE.forward`` (read by attribute).

    ``acts_BK`` / ``idx_BK``: the sparse code (padded for the variable-L0 archs, see
    :func:`kernels.padded_code`). A forward that computed the code densely (``dense_BM``,
    entries ``>= 0``, 0 = inactive) builds the padded code on first access only: the trainer
    reads it at its log steps, so the other steps never pay for it. Gradients flow through it
    either way.
    """

    __slots__ = ("x_hat_BD", "losses", "expert_B", "experts_BE", "dense_BM", "_acts_BK", "_idx_BK")

    def __init__(
        self,
        x_hat_BD: Tensor,  # reconstruction in RAW units
        acts_BK: Tensor | None,  # normalised-space activation values of the selected latents
        idx_BK: Tensor | None,  # global latent indices
        losses: dict[str, Tensor],  # named, already weighted scalar terms; total = their sum
        expert_B: Tensor | None = None,  # routed (top-1) expert (None for dense archs)
        experts_BE: Tensor | None = None,  # every routed expert [B, e] (Switch: e = 1; None for dense)
        dense_BM: Tensor | None = None,  # the code as a dense [B, M] tensor, when acts/idx are None
    ):
        if (acts_BK is None or idx_BK is None) and dense_BM is None:
            raise ValueError("SAEOutput needs the sparse code (acts_BK, idx_BK) or dense_BM")
        self.x_hat_BD, self.losses, self.expert_B, self.experts_BE = x_hat_BD, losses, expert_B, experts_BE
        self.dense_BM, self._acts_BK, self._idx_BK = dense_BM, acts_BK, idx_BK

    def _sparse_code(self) -> tuple[Tensor, Tensor]:
        if self._acts_BK is None or self._idx_BK is None:
            assert self.dense_BM is not None
            self._acts_BK, self._idx_BK = kernels.padded_code(self.dense_BM, self.dense_BM.detach() > 0)
        return self._acts_BK, self._idx_BK

    @property
    def acts_BK(self) -> Tensor:
        """Normalised-space activation values of the selected latents (padding: 0)."""
        return self._sparse_code()[0]

    @property
    def idx_BK(self) -> Tensor:
        """Global latent indices of ``acts_BK`` (padding: 0)."""
        return self._sparse_code()[1]


class SAE(nn.Module):
    """Base SAE: decoder, pre-bias, sparse decode, decoder-norm hooks, dead-latent stats.

    Subclasses create their parameters, then call :meth:`reset_parameters`; they implement
    ``_encode_n`` (normalised input -> (Encoding, extras)),
    ``_init_encoder``, ``flops_per_token`` and may extend ``_aux_losses``,
    ``init_from_batch``, ``saved_tensors`` and ``load_saved_tensors``; an SAE that computes
    encoder and decoder together (dense-code training) overrides ``_encode_decode_n``.

    Callers outside ``saepipe.saes`` read an SAE through the config's traits and properties
    (``ROUTED``, ``expert_count``, ...) and these methods, never by probing attributes:
    :meth:`expert_counts` (routed tokens per expert of a batch), :meth:`extra_stats`
    (learned statistics such as Scale's omega) and :meth:`encoder_features_MD`.
    """

    tokens_since_fired: Tensor  # buffer [M], long: tokens since each latent last fired

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, M = cfg.d_in, cfg.width
        self.W_dec = nn.Parameter(torch.empty(M, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("tokens_since_fired", torch.zeros(M, dtype=torch.long))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seeded init (``cfg.seed``); subclasses call this at the end of ``__init__``."""
        gen = torch.Generator(device=self.W_dec.device).manual_seed(self.cfg.seed)
        self._init_encoder(gen)
        self.tokens_since_fired.zero_()

    # ---- to implement -------------------------------------------------------------------
    def _init_encoder(self, gen: torch.Generator) -> None:
        """Initialise encoder (and decoder, via ``_init_decoder_from_encoder``) weights."""
        raise NotImplementedError

    def _encode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor]]:
        raise NotImplementedError

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (docs/reference.md §1, multiply-add = 2 FLOPs); see the config's method."""
        return self.cfg.flops_per_token()

    # ---- public API ---------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        """Total number of latents M."""
        return self.cfg.width

    def encode(self, x_BD: Tensor) -> Encoding:
        """Sparse code of RAW activations ``x_BD``."""
        return self._encode_n(x_BD * self.cfg.act_norm_factor)[0]

    def decode(self, enc: Encoding) -> Tensor:
        """Reconstruction in RAW units from an :class:`Encoding`."""
        return self._decode_n(enc) / self.cfg.act_norm_factor

    def forward(self, x_BD: Tensor) -> SAEOutput:
        """Encode + decode RAW ``x_BD``; losses in normalised space; updates dead stats in training."""
        x_n_BD = x_BD * self.cfg.act_norm_factor
        enc, extras, x_hat_n_BD = self._encode_decode_n(x_n_BD)
        losses = {"mse": (x_n_BD - x_hat_n_BD).pow(2).mean()}
        losses.update(self._aux_losses(x_n_BD, x_hat_n_BD, enc, extras))
        if self.training:
            self._update_dead_stats(enc)
        x_hat_BD = x_hat_n_BD / self.cfg.act_norm_factor
        return SAEOutput(x_hat_BD, enc.acts_BK, enc.idx_BK, losses, enc.expert_B, enc.experts_BE, dense_BM=enc.dense_BM)

    def _encode_decode_n(self, x_n_BD: Tensor) -> tuple[Encoding, dict[str, Tensor], Tensor]:
        """``(code, extras, x_hat_n)`` of normalised ``x_n_BD``: :meth:`_encode_n` then
        :meth:`_decode_n`. The dense-code archs override it to run encoder, activation and
        decoder as one autograd node in training (see :mod:`saepipe.saes.dense_code`)."""
        enc, extras = self._encode_n(x_n_BD)
        return enc, extras, self._decode_n(enc)

    @torch.no_grad()
    def init_from_batch(self, x_BD: Tensor) -> None:
        """Data-dependent init on the first batch: ``b_dec`` = geometric median (normalised)."""
        x_n_BD = x_BD.to(self.b_dec.device, torch.float32) * self.cfg.act_norm_factor
        self.b_dec.copy_(kernels.geometric_median(x_n_BD))

    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row."""
        kernels.remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        """Renormalise the decoder rows to unit norm."""
        kernels.normalise_rows_(self.W_dec.data)

    def dead_threshold(self) -> int:
        """Tokens without firing after which a latent is dead (``cfg.dead_tokens`` or 10M)."""
        return int(getattr(self.cfg, "dead_tokens", DEFAULT_DEAD_TOKENS))

    def dead_mask(self) -> Tensor:
        """Bool ``[M]``: latents that have not fired for more than ``dead_threshold()`` tokens."""
        return self.tokens_since_fired > self.dead_threshold()

    def dead_fraction(self) -> float:
        """Fraction of latents currently dead (see :meth:`dead_mask`)."""
        return float(self.dead_mask().float().mean())

    # ---- statistics callers read (train log, evaluation, figures) ---------------------------
    @torch.no_grad()
    def expert_counts(self, out: SAEOutput) -> list[int] | None:
        """Tokens routed to each of the ``cfg.expert_count`` experts in the batch of ``out``,
        counting every selected expert of a token (``out.experts_BE``, else the top-1
        ``out.expert_B``); None for SAEs that route nothing (dense)."""
        routed = out.experts_BE if out.experts_BE is not None else out.expert_B
        if routed is None:
            return None
        return torch.bincount(routed.reshape(-1), minlength=self.cfg.expert_count).tolist()

    def extra_stats(self) -> dict[str, list[float]]:
        """Learned per-SAE quantities logged during training and stored in ``metrics.json``
        (name -> values; Scale: ``{"omega": [...]}``, one per expert). Default: none."""
        return {}

    def encoder_features_MD(self) -> Tensor:
        """Encoder feature directions as the forward pass uses them, one row per latent
        ``[M, d]`` (default: the saved ``W_enc [d, M]`` transposed; Scale: its feature-scaled
        ``W_hat``)."""
        W_enc_DM = self.saved_tensors().get("W_enc")
        if W_enc_DM is None:
            raise NotImplementedError(
                f"{type(self).__name__} saves no 'W_enc'; override encoder_features_MD() to "
                "return its encoder directions [M, d]"
            )
        return W_enc_DM.detach().T

    def _auxk_selection(self) -> tuple[Tensor | None, int]:
        """``(dead_mask_M, k_aux)`` when AuxK applies to this forward, else ``(None, 0)``.

        AuxK applies in training mode, with ``cfg.auxk`` on (configs with
        :class:`AuxKConfigMixin`) and at least one dead latent; ``k_aux = min(k_aux, n_dead)``.
        One host sync per training step (the dead count).
        """
        cfg = self.cfg
        if not (self.training and isinstance(cfg, AuxKConfigMixin) and cfg.auxk):
            return None, 0
        dead_M = self.dead_mask()
        n_dead = int(dead_M.sum())
        return (dead_M, min(cfg.k_aux_effective, n_dead)) if n_dead else (None, 0)

    # ---- shared internals ---------------------------------------------------------------
    def _decode_n(self, enc: Encoding) -> Tensor:
        """``b_dec + gate * sum_j acts_j W_dec[idx_j]`` in normalised space (sparse, or one matmul
        when the encoding carries the code densely)."""
        if enc.acts_BK is None or enc.idx_BK is None:
            assert enc.dense_BM is not None, "an Encoding without acts_BK/idx_BK needs dense_BM"
            return enc.dense_BM @ self.W_dec + self.b_dec
        acts_BK = enc.acts_BK if enc.gate_B is None else enc.acts_BK * enc.gate_B[:, None]
        return kernels.decode(enc.idx_BK, acts_BK, self.W_dec, enc.dense_BM) + self.b_dec

    def _aux_losses(
        self, x_n_BD: Tensor, x_hat_n_BD: Tensor, enc: Encoding, extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Architecture-specific extra loss terms (already weighted)."""
        return {}

    @torch.no_grad()
    def _update_dead_stats(self, enc: Encoding) -> None:
        """Add the batch's tokens to every latent's counter; reset latents that fired (act > 0)."""
        if enc.acts_BK is None or enc.idx_BK is None:  # dense code: one max over the batch
            assert enc.dense_BM is not None
            fired_M = enc.dense_BM.amax(0) > 0
            n_tokens = enc.dense_BM.shape[0]
        else:
            fired_M = torch.zeros(self.cfg.width, device=enc.idx_BK.device)
            fired_M.index_add_(0, enc.idx_BK.reshape(-1), (enc.acts_BK > 0).reshape(-1).float())
            n_tokens = enc.idx_BK.shape[0]
        self.tokens_since_fired.add_(n_tokens)
        self.tokens_since_fired.masked_fill_(fired_M > 0, 0)

    def _init_decoder_from_encoder(self, W_enc_DM: Tensor) -> None:
        """``W_dec = W_enc^T`` with rows normalised."""
        self.W_dec.copy_(W_enc_DM.t())
        kernels.normalise_rows_(self.W_dec.data)

    def saved_tensors(self) -> dict[str, Tensor]:
        """The tensors of the saved format (``sae.safetensors``), by their docs/reference.md §2
        names and shapes: ``W_dec [M, d]`` and ``b_dec [d]`` here; every architecture adds its
        own (``W_enc [d, M]``, ``b_enc [M]``, thresholds, router, ...) by extending this dict.
        :func:`saepipe.saes.save_sae` writes them (as float32, on CPU);
        :meth:`load_saved_tensors` is the inverse."""
        return {"W_dec": self.W_dec, "b_dec": self.b_dec}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy a dict written from :meth:`saved_tensors` (same names and shapes) into this SAE's
        parameters and buffers; architectures extend it for the tensors they add."""
        self.W_dec.copy_(tensors["W_dec"])
        self.b_dec.copy_(tensors["b_dec"])

    def saved_metadata(self) -> dict[str, Any]:
        """Extra informational keys for config.json (must be in ``METADATA_KEYS`` or fields)."""
        return {
            "n_experts": self.cfg.expert_count,
            "active_experts": self.cfg.experts_per_token,
            "d_sae": self.cfg.width,
            "format": "saepipe-sae",
            "format_version": 1,
            "dtype": "float32",
            "weights_space": "normalised: use on x * act_norm_factor",
        }
