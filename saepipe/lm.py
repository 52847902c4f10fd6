"""The language model whose activations the SAEs learn, through TransformerLens 4.x.

Two sources, chosen by the optional `model:` section of config.yaml (`ModelConfig`):

- `native` (the default, no `model:` section needed): a small TL-native transformer
  (`TransformerBridge.boot_native`), trained briefly on the corpus by the `lm` stage and
  saved as `model.safetensors` plus `model.json` (`"kind": "native"`).
- `pretrained`: any Hugging Face causal LM that TransformerLens 4.x supports, by hub name
  (`gpt2`) or local directory (`save_pretrained` output), loaded with
  `TransformerBridge.boot_transformers` and its own tokenizer (`AutoTokenizer`). Nothing is
  trained: the `lm` stage only checks the model and writes `model.json` (`"kind":
  "pretrained"`, name, dtype, width, id) plus the tokenizer files into the model directory.

Every later stage receives that model directory and goes through `load_lm`,
`load_tokenizer`, `model_id`, `capture`, `ce_loss` and `splice_ce_kl`, which handle both kinds.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saepipe.io import atomic_path, read_json, write_json

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelConfig:
    """The optional `model:` section: which language model the SAEs are trained on."""

    source: str = "native"
    """`native`: the small TL-native model trained by the `lm` stage (section `lm`).
    `pretrained`: a Hugging Face model (`name_or_path`), loaded through TransformerLens 4.x
    `TransformerBridge.boot_transformers`; the `lm` stage then trains nothing."""
    name_or_path: str | None = None
    """pretrained only: a hub name (`gpt2`, `EleutherAI/pythia-70m`) or a local directory
    holding `config.json`, the weights and the tokenizer files. Hub names need the hub or a
    filled HF cache (set HF_HUB_OFFLINE=1 on machines without network)."""
    d_model: int | None = None
    """pretrained only: the residual width (GPT-2 small: 768). Stated in the config so the
    sweep (FLOP matching needs d) expands without loading the model; the `lm` stage checks it
    against the real model."""
    dtype: str = "float32"
    """pretrained only: float32 | float16 | bfloat16, the dtype the model runs in during
    extraction and evaluation (activations are always stored as float16)."""
    revision: str | None = None
    """pretrained only: a hub revision (branch, tag or commit); None = the default branch."""

    def __post_init__(self):
        if self.source not in ("native", "pretrained"):
            raise ValueError(f"model.source must be native or pretrained, not {self.source!r}")
        if self.source == "pretrained" and not (self.name_or_path and self.d_model):
            raise ValueError(
                "model.source: pretrained needs model.name_or_path (a hub name or a "
                "local directory) and model.d_model (its residual width, e.g. 768 for gpt2)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")

    @property
    def pretrained_name(self) -> str:
        """`name_or_path` of a pretrained model (set: __post_init__ checks it)."""
        if not self.name_or_path:
            raise ValueError("model.name_or_path is not set: a pretrained model needs its hub name or directory")
        return self.name_or_path


def model_config(config: dict) -> ModelConfig:
    """The `model:` section of a whole config (absent: the native default)."""
    return ModelConfig(**(config.get("model") or {}))


def d_model(config: dict) -> int:
    """Residual width of the configured model (the SAEs' d_in), known without loading it."""
    cfg = model_config(config)
    return int(cfg.d_model) if cfg.source == "pretrained" and cfg.d_model else int(config["lm"]["d_model"])


@dataclass
class LMConfig:
    d_model: int = 128
    """Residual stream width (the SAEs' d_in)."""
    n_layers: int = 2
    """Transformer blocks."""
    n_heads: int = 4
    """Attention heads per block (d_head = d_model / n_heads)."""
    d_mlp: int = 512
    """MLP hidden width."""
    steps: int = 400
    """Optimizer steps of the brief pre-training."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 40
    """Linear warm-up steps."""
    seed: int = 0
    """Seed of the initialisation and of the batch order."""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"lm.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"lm.d_model ({self.d_model}) must be divisible by lm.n_heads ({self.n_heads}): "
                f"each head gets d_model / n_heads dimensions; e.g. n_heads: "
                f"{max(h for h in range(1, self.n_heads + 1) if self.d_model % h == 0)}"
            )


# The hook points of the TransformerLens-native model (TransformerBridge.boot_native), known
# without importing TransformerLens (seconds at every Snakefile parse): the names of one block,
# with {i} its index, and the model-level ones. tests/test_lm.py checks them against a booted model.
NATIVE_BLOCK_HOOKS = tuple(
    f"blocks.{{i}}.{name}"
    for name in (
        *(
            f"attn.hook_{h}"
            for h in (
                "attn_in",
                "attn_scores",
                "hidden_states",
                "in",
                "k",
                "k_input",
                "out",
                "pattern",
                "q",
                "q_input",
                "result",
                "v",
                "v_input",
                "z",
            )
        ),
        *(f"attn.{p}.hook_{io}" for p in "koqv" for io in ("in", "out")),
        *(
            f"hook_{h}"
            for h in (
                "attn_in",
                "attn_out",
                "in",
                "k_input",
                "mlp_in",
                "mlp_out",
                "out",
                "q_input",
                "resid_mid",
                "resid_post",
                "resid_pre",
                "v_input",
            )
        ),
        *(f"{ln}.{h}" for ln in ("ln1", "ln2") for h in ("hook_in", "hook_normalized", "hook_out", "hook_scale")),
        *(f"mlp.hook_{h}" for h in ("in", "out", "post", "pre")),
        *(f"mlp.{p}.hook_{io}" for p in ("in", "out") for io in ("in", "out")),
    )
)
NATIVE_MODEL_HOOKS = (
    "embed.hook_in",
    "embed.hook_out",
    "hook_embed",
    "hook_pos_embed",
    "hook_unembed",
    "ln_final.hook_in",
    "ln_final.hook_normalized",
    "ln_final.hook_out",
    "ln_final.hook_scale",
    "pos_embed.hook_in",
    "pos_embed.hook_out",
    "unembed.hook_in",
    "unembed.hook_out",
)


def native_hook_names(n_layers: int) -> list[str]:
    """Every hook name of the native model with `n_layers` blocks, sorted (as `hook_names`)."""
    return sorted([h.format(i=i) for i in range(n_layers) for h in NATIVE_BLOCK_HOOKS] + list(NATIVE_MODEL_HOOKS))


def check_native_config(lm: dict, hook: str) -> LMConfig:
    """The `lm:` section as an LMConfig, with `extract.hook` checked against the native model's
    hook names: a config error at parse time (before any job), naming the valid hooks."""
    known = {f.name for f in fields(LMConfig)}
    unknown = sorted(set(lm) - known)
    if unknown:
        raise ValueError(f"unknown lm field(s) {unknown}; valid: {sorted(known)}")
    cfg = LMConfig(**lm)
    valid = native_hook_names(cfg.n_layers)
    if hook not in valid:
        raise ValueError(
            f"extract.hook {hook!r} does not exist in the native model ({cfg.n_layers} blocks). "
            f"Set extract.hook in config.yaml to one of these {len(valid)} names:\n  " + "\n  ".join(valid)
        )
    return cfg


def _bridge_config(arch: dict):
    from transformer_lens.config import TransformerBridgeConfig

    return TransformerBridgeConfig(**arch, act_fn="gelu", normalization_type="LN")


def build_native(cfg: LMConfig, vocab_size: int, n_ctx: int):
    """A randomly initialised TL-native transformer (no download)."""
    from transformer_lens.model_bridge.sources.native import boot

    arch = _native_arch(cfg, vocab_size, n_ctx)
    return boot(_bridge_config(arch)), arch


def _native_arch(cfg: LMConfig, vocab_size: int, n_ctx: int) -> dict:
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"lm.d_model ({cfg.d_model}) must be divisible by lm.n_heads ({cfg.n_heads})")
    return dict(
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_head=cfg.d_model // cfg.n_heads,
        d_mlp=cfg.d_mlp,
        d_vocab=vocab_size,
        n_ctx=n_ctx,
        seed=cfg.seed,
    )


def _lr_at(step: int, cfg: LMConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def _mean_loss(model, tokens: np.ndarray, batch_size: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(tokens[start : start + batch_size]).long()
        total += model(batch, return_type="loss").item() * len(batch)
        count += len(batch)
    return total / max(count, 1)


def train_lm(cfg: LMConfig, corpus_dir: str | Path, out_dir: str | Path) -> dict:
    """The `lm` stage: pre-train the default model briefly and save it."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    corpus = read_json(corpus_dir / "corpus.json")
    train = np.load(corpus_dir / "train.npy")
    model, arch = build_native(cfg, corpus["vocab_size"], corpus["seq_len"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    losses, t0 = [], time.time()
    bar = tqdm(range(cfg.steps), desc="lm", file=sys.stderr, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        batch = torch.from_numpy(train[rng.integers(0, len(train), cfg.batch_size)]).long()
        loss = model(batch, return_type="loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    eval_tokens = np.load(corpus_dir / "eval.npy")[:256]
    info = {
        "kind": "native",
        "arch": arch,
        "train_config": asdict(cfg),
        "tokenizer": "tokenizer.json",
        "train_loss_first": float(np.mean(losses[:10])),
        "train_loss_last": float(np.mean(losses[-10:])),
        "eval_loss": _mean_loss(model, eval_tokens, cfg.batch_size),
        "uniform_loss": math.log(corpus["vocab_size"]),
        "seconds": time.time() - t0,
    }
    save_native(model, out_dir, info)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tmp.write_bytes((corpus_dir / "tokenizer.json").read_bytes())
    print(
        f"lm: loss {info['train_loss_first']:.2f} -> {info['train_loss_last']:.2f}, "
        f"eval {info['eval_loss']:.2f} (uniform {info['uniform_loss']:.2f})",
        file=sys.stderr,
    )
    return info


def save_native(model, out_dir: str | Path, info: dict) -> None:
    """Write a native model directory: `model.safetensors` and `model.json` (`info`, which
    holds at least `"kind": "native"` and the `arch` that `build_native` returned)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(out_dir / "model.json", info)


def _boot_pretrained(name_or_path: str, dtype: str, revision: str | None, device, tokenizer=None):
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(
            name_or_path, device=device, dtype=DTYPES[dtype], revision=revision, tokenizer=tokenizer
        )
    except OSError as err:  # not on disk, not in the HF cache, no network
        raise OSError(
            f"could not load the pretrained model {name_or_path!r}: {err}\nmodel.name_or_path must be a "
            "local directory with config.json and weights, or a hub name available in the Hugging Face "
            "cache (download it once on a machine with network: `huggingface-cli download <name>`)"
        ) from err


def load_hf_tokenizer(name_or_path: str | Path, revision: str | None = None):
    """The model's own fast tokenizer (`AutoTokenizer`); errors clearly if it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
    except OSError as err:
        raise OSError(f"could not load the tokenizer of {name_or_path!r}: {err}") from err
    if not tok.is_fast:
        raise ValueError(
            f"the tokenizer of {name_or_path!r} has no fast (tokenizers) version; "
            "saepipe needs one (tokenizer.json) to tokenise and decode"
        )
    return tok


def _weights_digest(directory: Path) -> str:
    """sha256 over a local model directory's weight files (name and bytes), 12 hex digits."""
    files = sorted(
        p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file()
    )
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {directory}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def _pretrained_id(cfg: ModelConfig) -> str:
    """`<name>@<12 hex>`: the hash of a local directory's weights, or the hub snapshot's commit."""
    name = cfg.pretrained_name
    path = Path(name)
    if path.is_dir():
        return f"{path.resolve().name}@{_weights_digest(path)}"
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(name, revision=cfg.revision, allow_patterns=["config.json"]))
    return f"{name}@{snapshot.name[:12]}"


def prepare_pretrained(cfg: ModelConfig, out_dir: str | Path) -> dict:
    """The `lm` stage for `model.source: pretrained`: no training. Loads the model once
    (checking that it exists, that TransformerLens supports it and that `model.d_model` is
    right), then writes `model.json` and the tokenizer files (`save_pretrained`, which
    includes `tokenizer.json`) into `out_dir`, the model directory of every later stage."""
    out_dir = Path(out_dir)
    name = cfg.pretrained_name
    tokenizer = load_hf_tokenizer(name, cfg.revision)
    model = _boot_pretrained(name, cfg.dtype, cfg.revision, "cpu", tokenizer)
    if model.cfg.d_model != cfg.d_model:
        raise ValueError(
            f"model.d_model is {cfg.d_model} but {name!r} has d_model "
            f"{model.cfg.d_model}; set model.d_model: {model.cfg.d_model} in the config"
        )
    info = {
        "kind": "pretrained",
        "name_or_path": str(Path(name).resolve()) if Path(name).is_dir() else name,
        "revision": cfg.revision,
        "dtype": cfg.dtype,
        "d_model": int(model.cfg.d_model),
        "n_layers": int(model.cfg.n_layers),
        "n_ctx": int(model.cfg.n_ctx),
        "d_vocab": int(model.cfg.d_vocab),
        "model_id": _pretrained_id(cfg),
        "tokenizer": "tokenizer.json",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    write_json(out_dir / "model.json", info)
    print(
        f"lm: pretrained {info['model_id']} (d_model {info['d_model']}, {info['n_layers']} layers, "
        f"{cfg.dtype}); nothing trained",
        file=sys.stderr,
    )
    return info


def load_lm(model_dir: str | Path, device: torch.device | str = "cpu"):
    """The model of a model directory (written by the `lm` stage) as a TransformerBridge in
    eval mode: the native model's saved weights, or the pretrained model `model.json` names."""
    model_dir = Path(model_dir)
    info = read_json(model_dir / "model.json")
    if info.get("kind") == "pretrained":
        tokenizer = load_hf_tokenizer(model_dir)
        model = _boot_pretrained(info["name_or_path"], info["dtype"], info.get("revision"), device, tokenizer)
        return model.eval()
    from transformer_lens.model_bridge.sources.native import boot

    model = boot(_bridge_config(info["arch"]))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.to(device).eval()


def load_tokenizer(model_dir: str | Path):
    """`decode(ids) -> str` with the tokenizer of a model directory (either kind): its
    `tokenizer.json` (written by the corpus stage or by `save_pretrained`)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


def model_id(model_dir: str | Path) -> str:
    """A readable id for shard metadata: for the native model the directory's name plus a hash
    of its weights; for a pretrained one the id `prepare_pretrained` recorded."""
    info = read_json(Path(model_dir) / "model.json")
    if info.get("kind") == "pretrained":
        return info["model_id"]
    path = Path(model_dir) / "model.safetensors"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{Path(model_dir).name}@{digest}"


def hook_names(model) -> list[str]:
    """Every hook name the model accepts (canonical names and TransformerLens aliases)."""
    names = set(model.hook_dict)
    names.update(getattr(model, "hook_aliases", {}) or {})
    return sorted(names)


def check_hook(model, hook: str) -> None:
    valid = hook_names(model)
    if hook not in valid:
        raise ValueError(
            f"hook {hook!r} does not exist in this model. Set extract.hook in config.yaml "
            f"to one of these {len(valid)} names:\n  " + "\n  ".join(valid)
        )


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture(model, tokens_BS: torch.Tensor, hook: str) -> torch.Tensor:
    """Activations at `hook` [B, S, d]; the forward pass stops right after the hook fires."""
    captured: dict[str, torch.Tensor] = {}

    def grab(act, hook):
        captured["act"] = act.detach()
        raise _StopForward

    try:
        model.run_with_hooks(tokens_BS, fwd_hooks=[(hook, grab)])
    except _StopForward:
        pass
    if "act" not in captured:
        raise RuntimeError(f"hook {hook!r} never fired during the forward pass")
    return captured["act"]


def keep_positions_clean(
    replace: Callable[[torch.Tensor], torch.Tensor], keep_positions: Sequence[int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`replace` for a hook splice, except that the sequence positions `keep_positions` keep
    the clean activation.

    The returned function maps the hook's activation `act_BS...` (batch first, sequence
    second: `[B, S, d]` for the residual stream) to `replace(act_BS...)` (cast to the
    activation's dtype) with `out[:, p] = act[:, p]` for every `p` in `keep_positions`.
    A position `p >= S` is simply absent from that batch. This is how the CE losses honour
    the shards' `exclude_positions` (e.g. GPT-2's BOS, residual norm ~50x the others): those
    positions are never trained on nor scored by the reconstruction metrics, so both the SAE
    splice and the zero-ablation baseline must leave them clean (docs/reference.md §5), or every SAE is
    charged for a token it never saw. `replace` still runs on the whole activation (its
    output at the kept positions is discarded, NaN/inf included). Empty `keep_positions`:
    `replace` itself.
    """
    keep = sorted({int(p) for p in keep_positions})
    if not keep:
        return replace
    if keep[0] < 0:
        raise ValueError(
            f"keep_positions must be sequence positions >= 0, got {keep}; check the shards' exclude_positions metadata"
        )

    def spliced(act_BS: torch.Tensor) -> torch.Tensor:
        if act_BS.dim() < 2:
            raise ValueError(
                f"keep_positions needs a hook activation with a sequence dimension "
                f"[B, S, ...], got shape {tuple(act_BS.shape)}"
            )
        new_BS = replace(act_BS).to(act_BS.dtype)
        if new_BS.shape != act_BS.shape:
            raise ValueError(
                f"the replacement has shape {tuple(new_BS.shape)} but the hook "
                f"activation is {tuple(act_BS.shape)}; it must return the same shape"
            )
        S = act_BS.shape[1]
        present = [p for p in keep if p < S]
        if not present:
            return new_BS
        keep_S = torch.zeros(S, dtype=torch.bool, device=act_BS.device)
        keep_S[torch.tensor(present, device=act_BS.device)] = True
        keep_1S = keep_S.view(1, S, *([1] * (act_BS.dim() - 2)))
        return torch.where(keep_1S, act_BS, new_BS)

    return spliced


@torch.no_grad()
def ce_loss(
    model,
    tokens_BS: torch.Tensor,
    hook: str | None = None,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_positions: Sequence[int] = (),
) -> float:
    """Mean next-token cross-entropy over `tokens_BS`, optionally with the activation at
    `hook` replaced by `replace(act)` (same shape), except at the sequence positions
    `keep_positions`, which keep the clean activation (see `keep_positions_clean`)."""
    if replace is None:
        return model(tokens_BS, return_type="loss").item()
    if hook is None:
        raise ValueError("ce_loss: `replace` needs the `hook` whose activation it replaces")
    replace = keep_positions_clean(replace, keep_positions)

    def patch(act, hook):
        return replace(act).to(act.dtype)

    return model.run_with_hooks(tokens_BS, return_type="loss", fwd_hooks=[(hook, patch)]).item()


def _shifted_exp(x_NV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(x - max), logsumexp, sum of exp(x - max)) along the last dimension."""
    max_N1 = x_NV.amax(-1, keepdim=True)
    e_NV = (x_NV - max_N1).exp_()
    s_N = e_NV.sum(-1)
    return e_NV, s_N.log() + max_N1.squeeze(-1), s_N


def next_token_ce_kl(
    clean_logits_BSV: torch.Tensor, logits_BSV: torch.Tensor, tokens_BS: torch.Tensor, chunk_elems: int = 1 << 24
) -> tuple[float, float, float]:
    """`(CE clean, CE, KL)` over the B x (S-1) next-token predictions of `tokens_BS`
    (positions 0..S-2 predict tokens 1..S-1; the last position predicts nothing), each the
    mean over those predictions:

    - CE = -log p(next token), p = softmax(logits): TransformerLens's `lm_cross_entropy_loss`
      (what `ce_loss` returns), for the clean and the given logits;
    - KL = KL(p_clean || p) = sum_v p_clean(v) (log p_clean(v) - log p(v)), computed as
      sum_v p_clean(v) (a_v - b_v) + lse(b) - lse(a) for logits a (clean) and b: exactly 0
      where a = b.

    In float32 whatever the model's dtype, `chunk_elems` logits at a time (a few temporaries
    of that size, whatever the vocabulary). SAEBench's core eval (`get_recons_loss`) uses the
    same per-token KL but averages it over every position, the last included."""
    if clean_logits_BSV.shape != logits_BSV.shape or clean_logits_BSV.dim() != 3:
        raise ValueError(
            f"next_token_ce_kl needs two [B, S, V] logits of one shape, got "
            f"{tuple(clean_logits_BSV.shape)} and {tuple(logits_BSV.shape)}"
        )
    if tuple(tokens_BS.shape) != tuple(logits_BSV.shape[:2]):
        raise ValueError(f"tokens {tuple(tokens_BS.shape)} do not match the logits {tuple(logits_BSV.shape)}")
    V = logits_BSV.shape[-1]
    return prediction_ce_kl(clean_logits_BSV[:, :-1].reshape(-1, V), logits_BSV, tokens_BS, chunk_elems)


def prediction_ce_kl(
    clean_NV: torch.Tensor, logits_BSV: torch.Tensor, tokens_BS: torch.Tensor, chunk_elems: int = 1 << 24
) -> tuple[float, float, float]:
    """:func:`next_token_ce_kl` with the clean logits given for the predictions only: ``clean_NV``
    = ``clean_logits_BSV[:, :-1].reshape(-1, V)`` (e.g. read from a cache of them)."""
    V = logits_BSV.shape[-1]
    new_NV = logits_BSV[:, :-1].reshape(-1, V)
    if clean_NV.shape != new_NV.shape:
        raise ValueError(f"clean logits {tuple(clean_NV.shape)} do not match the predictions {tuple(new_NV.shape)}")
    target_N1 = tokens_BS[:, 1:].reshape(-1, 1).to(device=new_NV.device, dtype=torch.long)
    rows = max(1, chunk_elems // V)
    ce_clean = ce_new = kl = 0.0
    for start in range(0, len(new_NV), rows):
        a_NV = clean_NV[start : start + rows].float()
        b_NV = new_NV[start : start + rows].float()
        t_N1 = target_N1[start : start + rows]
        e_NV, lse_a_N, s_N = _shifted_exp(a_NV)
        _, lse_b_N, _ = _shifted_exp(b_NV)  # the same code path as lse_a: equal logits, equal lse
        cross_N = torch.linalg.vecdot(e_NV, a_NV - b_NV) / s_N  # sum_v p_clean(v) (a_v - b_v)
        kl += (cross_N + lse_b_N - lse_a_N).sum().item()
        ce_clean += (lse_a_N - a_NV.gather(-1, t_N1).squeeze(-1)).sum().item()
        ce_new += (lse_b_N - b_NV.gather(-1, t_N1).squeeze(-1)).sum().item()
    n = max(len(new_NV), 1)
    return ce_clean / n, ce_new / n, kl / n


@torch.no_grad()
def splice_ce_kl(
    model,
    tokens_BS: torch.Tensor,
    hook: str,
    replace: Callable[[torch.Tensor], torch.Tensor],
    keep_positions: Sequence[int] = (),
    clean_NV: torch.Tensor | None = None,
) -> tuple[float, float, float]:
    """`(CE clean, CE spliced, KL)` of one batch: the clean model and the model with the
    activation at `hook` replaced by `replace(act)` except at `keep_positions`, which keep the
    clean activation (the same splice as `ce_loss`, see `keep_positions_clean`), compared by
    `next_token_ce_kl` over the B x (S-1) next-token predictions: the CEs are `ce_loss`'s
    (to float rounding), KL is the mean of KL(p_clean || p_spliced). Two forward passes (the
    logits only: both CEs and the KL come from one log-sum-exp per logit row), or one when
    the clean logits of the predictions are given (`clean_NV`, as :func:`prediction_ce_kl`)."""
    replace = keep_positions_clean(replace, keep_positions)

    def patch(act, hook):
        return replace(act).to(act.dtype)

    spliced_BSV = model.run_with_hooks(tokens_BS, return_type="logits", fwd_hooks=[(hook, patch)])
    if clean_NV is None:
        clean_NV = model(tokens_BS, return_type="logits")[:, :-1].reshape(-1, spliced_BSV.shape[-1])
    return prediction_ce_kl(clean_NV, spliced_BSV, tokens_BS)
