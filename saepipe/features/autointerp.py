"""The optional `autointerp` stage: an LLM explains features, then judges held-out examples.

As in the papers' automated interpretability (explain-then-detect): for each feature the
judge model first reads its top-activating contexts (from the `maxact` stage, active
tokens marked <<like this>>) and writes a one-sentence explanation; then it sees, unmarked
and shuffled, the feature's held-out activating contexts (`random` examples, drawn
uniformly over all its activations) and as many contexts where it never fires
(`negative`), and says which ones match. Detection accuracy is the score; 0.5 is chance.

The judge is any OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`):
a hosted API or a local server (vLLM, llama.cpp, Ollama ...). Plain urllib, no client library.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saepipe.io import atomic_path, write_json

ENV_BASE_URL = "SAEPIPE_AUTOINTERP_BASE_URL"
ENV_MODEL = "SAEPIPE_AUTOINTERP_MODEL"

EXPLAIN_PROMPT = (
    "You are an interpretability researcher. Below are text excerpts from a corpus. One "
    "feature of a sparse autoencoder trained on a language model's activations is active on "
    "the tokens marked <<like this>>. In one short sentence, say what the feature responds "
    "to. Reply with the explanation only."
)
DETECT_PROMPT = (
    "You are an interpretability researcher. A feature of a sparse autoencoder trained on a "
    "language model's activations has this explanation:\n\n{explanation}\n\nBelow are {n} "
    "numbered text excerpts. For each, decide whether the feature is active somewhere in it. "
    "Reply with a JSON list of {n} integers in order, 1 if active and 0 if not, and nothing else."
)


@dataclass
class AutointerpConfig:
    enabled: bool = False
    """Run the stage (it calls an external model: off by default)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 ($SAEPIPE_AUTOINTERP_BASE_URL overrides)."""
    model: str | None = None
    """Judge model name ($SAEPIPE_AUTOINTERP_MODEL overrides)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (none sent if unset)."""
    features: int = 16
    """Features judged per SAE (the first of the `maxact` sample)."""
    explain_examples: int = 10
    """Top-activating contexts shown to the explainer."""
    seed: int = 0
    """Seed of the order in which held-out examples are shown."""
    timeout_s: float = 60.0
    """Seconds to wait for one reply."""
    retries: int = 3
    """Retries of a failed request (with back-off) before the stage fails."""


def resolve(cfg: dict) -> AutointerpConfig:
    """The config with environment overrides applied; errors name what is missing."""
    out = AutointerpConfig(**cfg)
    out.base_url = os.environ.get(ENV_BASE_URL) or out.base_url
    out.model = os.environ.get(ENV_MODEL) or out.model
    if out.enabled and not (out.base_url and out.model):
        raise ValueError(
            "autointerp.enabled is true but the judge endpoint is not set: give autointerp.base_url "
            f"and autointerp.model in config.yaml (or ${ENV_BASE_URL} / ${ENV_MODEL}), or set "
            "autointerp.enabled: false"
        )
    return out


def chat(cfg: AutointerpConfig, system: str, user: str) -> str:
    """One chat completion; retries transient failures, then raises with the endpoint named."""
    if not cfg.base_url:
        raise ValueError(
            "autointerp.base_url is not set: give the OpenAI-compatible endpoint in config.yaml "
            "or $SAEPIPE_AUTOINTERP_BASE_URL"
        )
    url = cfg.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps(
        {
            "model": cfg.model,
            "temperature": 0.0,
            "max_tokens": 256,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get(cfg.api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[cfg.api_key_env]}"
    for attempt in range(cfg.retries + 1):
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=cfg.timeout_s) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, TimeoutError, KeyError, json.JSONDecodeError) as err:
            client_error = isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500 and err.code != 429
            if client_error or attempt == cfg.retries:
                raise RuntimeError(
                    f"autointerp: request to {url} (model {cfg.model!r}) failed: {err}; "
                    "check autointerp.base_url / model and that the server is up"
                ) from err
            time.sleep(min(30.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


def marked_text(tokens: list[str], acts: list[float]) -> str:
    """Context with every token on which the feature is active marked <<like this>>."""
    return "".join(f"<<{t}>>" if a > 0 else t for t, a in zip(tokens, acts))


def parse_judgement(reply: str, n: int) -> list[int] | None:
    """The first JSON list of n 0/1 values in `reply`, or None."""
    for match in re.finditer(r"\[[^\[\]]*\]", reply):
        try:
            values = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if len(values) == n and all(v in (0, 1) for v in values):
            return [int(v) for v in values]
    return None


def judge_feature(cfg: AutointerpConfig, examples: list[dict], rng: random.Random) -> dict:
    """Explain one feature from its top examples, then score detection on held-out ones."""
    top = sorted((e for e in examples if e["kind"] == "top"), key=lambda e: e["rank"])[: cfg.explain_examples]
    shown = "\n".join(f"{i + 1}. {marked_text(e['tokens'], e['token_acts'])}" for i, e in enumerate(top))
    explanation = chat(cfg, EXPLAIN_PROMPT, shown).strip()
    held_out = [e for e in examples if e["kind"] in ("random", "negative")]
    rng.shuffle(held_out)
    truth = [int(e["kind"] == "random") for e in held_out]
    listing = "\n".join(f"{i + 1}. {''.join(e['tokens'])}" for i, e in enumerate(held_out))
    reply = chat(cfg, DETECT_PROMPT.format(explanation=explanation, n=len(held_out)), listing)
    said = parse_judgement(reply, len(held_out))
    result = {
        "explanation": explanation,
        "n_examples": len(held_out),
        "parsed": said is not None,
        "accuracy": None,
        "balanced_accuracy": None,
    }
    if said is not None and held_out:
        tp = sum(s and t for s, t in zip(said, truth))
        tn = sum(not s and not t for s, t in zip(said, truth))
        pos, neg = sum(truth), len(truth) - sum(truth)
        result["accuracy"] = (tp + tn) / len(truth)
        rates = ([tp / pos] if pos else []) + ([tn / neg] if neg else [])
        result["balanced_accuracy"] = sum(rates) / len(rates)
    return result


def autointerp(
    cfg: AutointerpConfig, maxact_parquet: str | Path, out_parquet: str | Path, out_json: str | Path
) -> dict:
    """The `autointerp` stage for one SAE: per-feature parquet + a summary json for the table."""
    rows = pq.read_table(maxact_parquet).to_pylist()
    by_feature: dict[int, list[dict]] = {}
    for r in rows:
        by_feature.setdefault(r["feature"], []).append(r)
    features = sorted(by_feature)[: cfg.features]
    rng = random.Random(cfg.seed)
    sae_id = rows[0]["sae_id"] if rows else Path(maxact_parquet).parent.name
    results = []
    for i, f in enumerate(features):
        results.append({"sae_id": sae_id, "feature": f, **judge_feature(cfg, by_feature[f], rng)})
        print(
            f"autointerp {sae_id}: feature {f} ({i + 1}/{len(features)}): "
            f"accuracy {results[-1]['accuracy']}, {results[-1]['explanation'][:80]!r}",
            file=sys.stderr,
        )
    with atomic_path(out_parquet) as tmp:
        pq.write_table(pa.Table.from_pylist(results), str(tmp))
    scored = [r for r in results if r["accuracy"] is not None]
    summary = {
        "autointerp_model": cfg.model,
        "autointerp_features": len(scored),
        "autointerp_unparsed": len(results) - len(scored),
        "autointerp_accuracy": sum(r["accuracy"] for r in scored) / len(scored) if scored else None,
        "autointerp_balanced_accuracy": (sum(r["balanced_accuracy"] for r in scored) / len(scored) if scored else None),
    }
    write_json(out_json, summary)
    return summary


def endpoint_params(cfg: dict) -> dict:
    """What the stage's outputs depend on (for Snakemake params): the resolved config, no key."""
    return asdict(resolve(cfg))
