"""The corpus stage: real English text available offline -> tokenizer -> train/eval token arrays.

The default source, `python_docs`, is the documentation that ships with this Python
installation: the language reference topics of `pydoc_data` plus every docstring of the
standard library (tests included) and of the packages listed in `corpus.packages`
(pinned in constraints.txt, so the text is reproducible). It is technical English prose
with code examples, a few MB, and needs no download. Documents are written to JSONL and
loaded through `datasets` (the same path a hub or local dataset takes), split into
train/eval by a salted hash of each document (stable when documents are added), and a
byte-level BPE tokenizer is trained on the train split only.

Outputs (in one directory): train.npy / eval.npy (int32 [n_seq, seq_len]), tokenizer.json,
corpus.json (statistics and provenance).
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from saepipe.io import atomic_path, write_json

EOT = "<|endoftext|>"


@dataclass
class CorpusConfig:
    source: str = "python_docs"
    """Where the text comes from. `python_docs`: documentation shipped with this Python."""
    packages: list[str] = field(default_factory=lambda: ["numpy", "matplotlib"])
    """Installed packages whose docstrings are added to the standard library's."""
    min_doc_chars: int = 80
    """Docstrings shorter than this are dropped (mostly one-line signatures)."""
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary trained on the train split."""
    seq_len: int = 128
    """Tokens per training sequence (the LM's context length)."""
    eval_fraction: float = 0.1
    """Fraction of documents held out for evaluation (by a salted hash of the text)."""
    min_tokens: int = 1_000_000
    """Fail unless the train split has at least this many tokens."""
    seed: int = 0
    """Salt of the train/eval split."""


def _docstrings(top: Path, min_chars: int) -> Iterator[tuple[str, str]]:
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", "site-packages"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = Path(root) / name
            try:
                with warnings.catch_warnings():  # old escape sequences in third-party code
                    warnings.simplefilter("ignore")
                    tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        yield f"{path.relative_to(top)}:{getattr(node, 'name', '<module>')}", doc


def python_docs(packages: list[str], min_chars: int) -> list[dict]:
    """Documents from this Python's reference topics and docstrings, deduplicated, in a fixed order."""
    import pydoc_data.topics

    docs = [{"id": f"pydoc:{k}", "text": v} for k, v in sorted(pydoc_data.topics.topics.items())]
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                f"corpus.packages lists {pkg!r}, which is not an installed package; "
                "remove it from config.yaml or install it"
            )
        roots.append((pkg, Path(list(spec.submodule_search_locations)[0])))
    for label, root in roots:
        docs.extend({"id": f"{label}:{i}", "text": t} for i, t in _docstrings(root, min_chars))
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d["text"] not in seen:
            seen.add(d["text"])
            unique.append(d)
    return unique


SOURCES = {"python_docs": lambda cfg: python_docs(cfg.packages, cfg.min_doc_chars)}


def is_eval_doc(text: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha1(f"{seed}:{text}".encode()).digest()[:8], "little")
    return (h % 1_000_000) < fraction * 1_000_000


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Tokenise, join documents with the end-of-text token, cut into [n_seq, seq_len]."""
    eot = tokenizer.token_to_id(EOT)
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    n_seq = len(ids) // seq_len
    return np.asarray(ids[: n_seq * seq_len], dtype=np.int32).reshape(n_seq, seq_len)


def build_corpus(cfg: CorpusConfig, out_dir: str | os.PathLike) -> dict:
    """Run the corpus stage; returns the statistics written to corpus.json."""
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown corpus.source {cfg.source!r}; known: {sorted(SOURCES)}")
    import datasets

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "documents.jsonl"
        with jsonl.open("w") as f:
            for doc in SOURCES[cfg.source](cfg):
                f.write(json.dumps(doc) + "\n")
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=tmp)
        texts = ds["text"]
    train_texts = [t for t in texts if not is_eval_doc(t, cfg.eval_fraction, cfg.seed)]
    eval_texts = [t for t in texts if is_eval_doc(t, cfg.eval_fraction, cfg.seed)]
    print(f"corpus: {len(train_texts)} train / {len(eval_texts)} eval documents", file=sys.stderr)

    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    splits = {"train": pack(tokenizer, train_texts, cfg.seq_len), "eval": pack(tokenizer, eval_texts, cfg.seq_len)}
    if splits["train"].size < cfg.min_tokens:
        raise ValueError(
            f"the corpus gives {splits['train'].size:,} train tokens but corpus.min_tokens asks for "
            f"{cfg.min_tokens:,}; lower corpus.min_tokens or add text (corpus.packages)"
        )
    stats = {
        "source": cfg.source,
        "python": sys.version.split()[0],
        "documents": {"train": len(train_texts), "eval": len(eval_texts)},
        "tokens": {k: int(v.size) for k, v in splits.items()},
        "sequences": {k: int(v.shape[0]) for k, v in splits.items()},
        "seq_len": cfg.seq_len,
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": tokenizer.token_to_id(EOT),
    }
    for name, arr in splits.items():
        with atomic_path(out_dir / f"{name}.npy") as tmp_path:
            with open(tmp_path, "wb") as f:
                np.save(f, arr)
    with atomic_path(out_dir / "tokenizer.json") as tmp_path:
        tokenizer.save(str(tmp_path))
    write_json(out_dir / "corpus.json", stats)
    print(f"corpus: {stats['tokens']['train']:,} train / {stats['tokens']['eval']:,} eval tokens", file=sys.stderr)
    return stats
