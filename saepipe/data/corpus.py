"""The corpus stage: text -> tokenizer -> train/eval token arrays.

Two text sources (`corpus.source`):
- `python_docs` (default, offline): see below.
- `dataset`: any `datasets` dataset (`corpus.dataset`, `DatasetConfig`): a hub dataset by
  name (OpenWebText: `Skylion007/openwebtext`), streamed by default, or local files
  (`.parquet`, `.jsonl`/`.json`, `.txt`: a file, a directory or a glob).

The tokenizer is the pretrained model's own when `model.source: pretrained` (its
`tokenizer.json`, so tokens match what the model was trained on); otherwise a byte-level
BPE trained here on the train split. Documents are split into train/eval by a salted hash
of their text, tokenised in batches, joined with the end-of-text token and cut into
sequences of `seq_len` (optionally each starting with BOS, `prepend_bos`) that are written
to disk as they fill: memory does not grow with the number of tokens. A streamed dataset is
read only until the train split has `max_tokens` tokens.

The `python_docs` source is `python_docs`, is the documentation that ships with this Python
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from saepipe.io import atomic_path, write_json

EOT = "<|endoftext|>"
DATASET_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


@dataclass
class DatasetConfig:
    """`corpus.dataset`: where `corpus.source: dataset` reads its documents."""

    path: str = ""
    """A hub dataset name (`Skylion007/openwebtext`), or local data: a `.parquet`, `.jsonl`/`.json`
    or `.txt` file, a directory of such files, or a glob. `.txt` files give one document per
    paragraph (blank-line separated)."""
    name: str | None = None
    """Hub dataset configuration name (the second argument of `datasets.load_dataset`)."""
    split: str = "train"
    """Split read; the train/eval split of saepipe is made from it by document hash."""
    text_column: str = "text"
    """Column holding each document's text."""
    streaming: bool = True
    """Stream (`load_dataset(..., streaming=True)`): read only as many documents as
    `corpus.max_tokens` needs, with no full download or Arrow cache. False downloads and
    caches the whole split first (HF cache) and reads it in order."""


def local_dataset_files(path: str) -> tuple[str, list[str]] | None:
    """(builder, files) when `path` names local data; None for a hub name."""
    import glob

    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix in DATASET_FORMATS and f.is_file())
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if p.is_file() else [])
    if not files:
        if p.exists() or path.startswith((".", "/")) or any(c in path for c in "*?["):
            raise FileNotFoundError(
                f"corpus.dataset.path {path!r} holds no data files ({', '.join(sorted(DATASET_FORMATS))})"
            )
        return None
    kinds = {DATASET_FORMATS.get(Path(f).suffix) for f in files}
    builder = kinds.pop() if len(kinds) == 1 else None
    if builder is None:
        raise ValueError(
            f"corpus.dataset.path {path!r} must hold files of one format among "
            f"{sorted(DATASET_FORMATS)}; found {sorted({Path(f).suffix for f in files})}"
        )
    return builder, files


def dataset_documents(cfg: DatasetConfig) -> Iterator[str]:
    """Document texts of a hub or local dataset, in its order, lazily when streaming."""
    import datasets

    datasets.disable_progress_bars()
    local = local_dataset_files(cfg.path)
    if local is None:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split, streaming=cfg.streaming)
    else:
        builder, files = local
        extra = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=cfg.streaming, **extra)
    for row in ds:  # a streamed dataset may not know its columns before the first row
        if cfg.text_column not in row:
            raise ValueError(
                f"corpus.dataset.text_column is {cfg.text_column!r} but {cfg.path!r} has "
                f"columns {sorted(row)}; set text_column to the one holding the text"
            )
        text = row[cfg.text_column]
        if text:
            yield text


@dataclass
class CorpusConfig:
    source: str = "python_docs"
    """Where the text comes from. `python_docs`: documentation shipped with this Python;
    `dataset`: the hub or local dataset of `dataset`."""
    dataset: dict | None = None
    """`source: dataset` only: the `DatasetConfig` fields (path, name, split, text_column, streaming)."""
    max_tokens: int | None = None
    """Stop reading documents once the train split has this many tokens (the eval split then
    has about eval_fraction / (1 - eval_fraction) times as many). None: every document.
    Set it for large datasets: OpenWebText is ~9B tokens."""
    prepend_bos: bool = False
    """Start every sequence with the tokenizer's BOS token (GPT-2: <|endoftext|>), followed by
    seq_len - 1 tokens of the packed text, as GPT-2-family SAE work does. Position 0 then always
    holds BOS, whose residual norm is huge in GPT-2: see extract.exclude_positions."""
    packages: list[str] = field(default_factory=lambda: ["numpy", "matplotlib"])
    """Installed packages whose docstrings are added to the standard library's."""
    min_doc_chars: int = 80
    """Docstrings shorter than this are dropped (mostly one-line signatures)."""
    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary trained on the train split (ignored with a
    pretrained model, which brings its own tokenizer)."""
    seq_len: int = 128
    """Tokens per sequence (the context length of extraction and CE evaluation; the native LM's
    n_ctx). Must not exceed a pretrained model's context (GPT-2: 1024)."""
    eval_fraction: float = 0.1
    """Fraction of documents held out for evaluation (by a salted hash of the text)."""
    min_tokens: int = 1_000_000
    """Fail unless the train split has at least this many tokens."""
    seed: int = 0
    """Salt of the train/eval split."""

    def __post_init__(self):
        if self.source == "dataset" and not (self.dataset or {}).get("path"):
            raise ValueError("corpus.source: dataset needs corpus.dataset.path (a hub name or local files)")


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


class SequenceWriter:
    """Packs a token stream into rows of `seq_len` and appends full rows to a raw int32 file
    as they fill (memory: one batch of documents), then turns it into a `.npy`."""

    def __init__(self, raw_path: Path, seq_len: int, bos: int | None):
        self.raw_path, self.seq_len, self.bos = raw_path, seq_len, bos
        self.body = seq_len - (bos is not None)  # text tokens per row
        self.pending: list[np.ndarray] = []
        self.pending_len = self.n_seq = 0
        self.file = open(raw_path, "wb")

    @property
    def tokens(self) -> int:
        return self.n_seq * self.seq_len

    def add(self, ids: list[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=np.int32))
        self.pending_len += len(ids)
        if self.pending_len >= self.body * 256:
            self._flush()

    def _flush(self) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.zeros(0, np.int32)
        n = len(stream) // self.body
        rows = stream[: n * self.body].reshape(n, self.body)
        if self.bos is not None:
            rows = np.hstack([np.full((n, 1), self.bos, np.int32), rows])
        rows.tofile(self.file)
        self.n_seq += n
        rest = stream[n * self.body :]
        self.pending, self.pending_len = [rest], len(rest)

    def save(self, out_npy: Path) -> None:
        """Write `[n_seq, seq_len]` int32 to `out_npy` atomically (the partial last row is dropped)."""
        self._flush()
        self.file.close()
        raw = (
            np.memmap(self.raw_path, np.int32, "r", shape=(self.n_seq, self.seq_len))
            if self.n_seq
            else np.zeros((0, self.seq_len), np.int32)
        )
        with atomic_path(out_npy) as tmp:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(self.n_seq, self.seq_len))
            for start in range(0, self.n_seq, 1 << 16):
                arr[start : start + (1 << 16)] = raw[start : start + (1 << 16)]
            arr.flush()
            del arr
        del raw
        self.raw_path.unlink()


def _write_documents(
    tokenizer, texts: Iterator[str], writers: dict, split_of, eot: int, max_tokens: int | None, batch: int = 512
) -> dict[str, int]:
    """Tokenise `texts` in batches into the split `split_of(text)` names; documents per split."""
    docs = {name: 0 for name in writers}
    done = False
    while not done:
        chunk = []
        for text in texts:
            chunk.append(text)
            if len(chunk) == batch:
                break
        done = len(chunk) < batch
        for text, enc in zip(chunk, tokenizer.encode_batch(chunk, add_special_tokens=False)):
            name = split_of(text)
            writers[name].add([*enc.ids, eot])
            docs[name] += 1
        if max_tokens is not None and writers["train"].tokens + writers["train"].pending_len >= max_tokens:
            break
    return docs


def _special_ids(tokenizer, hf_tokenizer, prepend_bos: bool) -> tuple[int, int | None]:
    """(end-of-text id between documents, BOS id or None)."""
    if hf_tokenizer is None:
        eot = bos = tokenizer.token_to_id(EOT)
    else:
        bos = hf_tokenizer.bos_token_id
        eot = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else bos
        if eot is None:
            raise ValueError("the model's tokenizer has neither an EOS nor a BOS token to separate documents")
    if prepend_bos and bos is None:
        raise ValueError("corpus.prepend_bos is true but the tokenizer has no BOS token; set it to false")
    return eot, (bos if prepend_bos else None)


def build_corpus(
    cfg: CorpusConfig, out_dir: str | os.PathLike, pretrained_tokenizer: str | None = None, revision: str | None = None
) -> dict:
    """Run the corpus stage; returns the statistics written to corpus.json.

    `pretrained_tokenizer`: the tokenizer of a pretrained model (hub name or directory, at
    `revision`) to use instead of training a BPE (`model.source: pretrained`)."""
    if cfg.source not in (*SOURCES, "dataset"):
        raise ValueError(f"unknown corpus.source {cfg.source!r}; known: {sorted([*SOURCES, 'dataset'])}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def split_of(text: str) -> str:
        return "eval" if is_eval_doc(text, cfg.eval_fraction, cfg.seed) else "train"

    hf_tokenizer = None
    if pretrained_tokenizer is not None:
        from saepipe.lm import load_hf_tokenizer

        hf_tokenizer = load_hf_tokenizer(pretrained_tokenizer, revision)
        tokenizer = hf_tokenizer.backend_tokenizer
    if cfg.source == "dataset":
        if cfg.dataset is None:
            raise ValueError(
                "corpus.source is 'dataset' but corpus.dataset is missing: give "
                "corpus.dataset: {path: ..., split: ..., text_column: ...}"
            )
        texts: Iterator[str] = dataset_documents(DatasetConfig(**cfg.dataset))
    else:
        texts = iter(_python_docs_texts(cfg))
    if hf_tokenizer is None:  # BPE trained on the train documents: they are read first
        docs = list(texts)
        tokenizer = train_tokenizer([t for t in docs if split_of(t) == "train"], cfg.vocab_size)
        texts = iter(docs)
    eot, bos = _special_ids(tokenizer, hf_tokenizer, cfg.prepend_bos)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        writers = {name: SequenceWriter(Path(tmp) / name, cfg.seq_len, bos) for name in ("train", "eval")}
        documents = _write_documents(tokenizer, texts, writers, split_of, eot, cfg.max_tokens)
        print(f"corpus: {documents['train']} train / {documents['eval']} eval documents", file=sys.stderr)
        if writers["train"].tokens + writers["train"].pending_len < cfg.min_tokens:
            raise ValueError(
                f"the corpus gives {writers['train'].tokens + writers['train'].pending_len:,} train tokens "
                f"but corpus.min_tokens asks for {cfg.min_tokens:,}; lower corpus.min_tokens or add text "
                "(corpus.packages, a larger dataset or corpus.max_tokens)"
            )
        for name, writer in writers.items():
            writer.save(out_dir / f"{name}.npy")
        tokens = {name: w.tokens for name, w in writers.items()}
        sequences = {name: w.n_seq for name, w in writers.items()}
    stats = {
        "source": cfg.source,
        "dataset": cfg.dataset,
        "python": sys.version.split()[0],
        "documents": documents,
        "tokens": tokens,
        "sequences": sequences,
        "seq_len": cfg.seq_len,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer": pretrained_tokenizer or "bpe",
        "eot_id": eot,
        "bos_id": bos,
        "prepend_bos": cfg.prepend_bos,
    }
    with atomic_path(out_dir / "tokenizer.json") as tmp_path:
        tokenizer.save(str(tmp_path))
    write_json(out_dir / "corpus.json", stats)
    print(f"corpus: {tokens['train']:,} train / {tokens['eval']:,} eval tokens", file=sys.stderr)
    return stats


def _python_docs_texts(cfg: CorpusConfig) -> list[str]:
    """The python_docs documents, through `datasets` (the path every JSONL source takes)."""
    import datasets

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "documents.jsonl"
        with jsonl.open("w") as f:
            for doc in SOURCES[cfg.source](cfg):
                f.write(json.dumps(doc) + "\n")
        datasets.disable_progress_bars()
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=tmp)
        return ds["text"]
