"""The pretrained-model path, offline: a tiny random GPT-2 and its own tokenizer saved to a
directory, a local JSONL dataset, and the pipeline run on them with `model.source: pretrained`
(the same code a real `gpt2` + OpenWebText run takes; nothing here is special-cased)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import copy_workflow, micro_config, snakemake

from saepipe.data.corpus import CorpusConfig, build_corpus
from saepipe.lm import ModelConfig, load_lm, load_tokenizer, model_id, prepare_pretrained

VOCAB = ["<|endoftext|>"] + [f"w{i}" for i in range(95)]
SEQ_LEN = 64


def _save_tiny_gpt2(directory, seed=0):
    """A 2-layer d=32 GPT-2 with random weights and a word-level tokenizer of VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=VOCAB[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=VOCAB[0], eos_token=VOCAB[0], unk_token=VOCAB[0]
    ).save_pretrained(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def _write_documents(path, n_docs=1500, seed=0):
    """JSONL documents of random words; a Zipf-like word distribution, 20-80 words each."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(VOCAB))
    with open(path, "w") as f:
        for i in range(n_docs):
            words = rng.choice(VOCAB[1:], size=rng.integers(20, 80), p=p / p.sum())
            f.write(json.dumps({"id": i, "body": " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return _save_tiny_gpt2(root / "tiny-gpt2"), _write_documents(root / "docs.jsonl")


def test_library_path_pretrained_model_and_local_dataset(assets, tmp_path):
    model_dir, docs = assets
    cfg = CorpusConfig(
        source="dataset",
        dataset={"path": str(docs), "text_column": "body"},
        seq_len=SEQ_LEN,
        prepend_bos=True,
        max_tokens=20_000,
        min_tokens=10_000,
    )
    stats = build_corpus(cfg, tmp_path / "corpus", pretrained_tokenizer=str(model_dir))
    train = np.load(tmp_path / "corpus" / "train.npy")
    assert train.shape[1] == SEQ_LEN and (train[:, 0] == 0).all()  # BOS first in every row
    assert 20_000 <= stats["tokens"]["train"] < 20_000 + 512 * 80 + SEQ_LEN  # stopped near max_tokens
    assert stats["documents"]["train"] < 1500 * 0.9  # did not read everything
    assert (train[:, 1:] > 0).mean() > 0.9  # words, few separators

    info = prepare_pretrained(
        ModelConfig(source="pretrained", name_or_path=str(model_dir), d_model=32), tmp_path / "lm"
    )
    assert info["kind"] == "pretrained" and model_id(tmp_path / "lm") == info["model_id"]
    assert load_tokenizer(tmp_path / "lm")([5, 7]) == "w4 w6"
    model = load_lm(tmp_path / "lm")
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    batch = torch.from_numpy(train[:4]).long()
    torch.testing.assert_close(model(batch), hf(batch).logits, atol=1e-4, rtol=1e-4)  # same model

    with pytest.raises(ValueError, match="model.d_model is 48 but .* has d_model 32"):
        prepare_pretrained(ModelConfig(source="pretrained", name_or_path=str(model_dir), d_model=48), tmp_path / "bad")
    with pytest.raises(OSError, match="could not load the tokenizer"):
        prepare_pretrained(
            ModelConfig(source="pretrained", name_or_path=str(tmp_path / "missing"), d_model=32), tmp_path / "bad"
        )


def test_model_id_follows_the_weights(assets, tmp_path):
    other = _save_tiny_gpt2(tmp_path / "tiny-gpt2", seed=1)
    ids = [
        prepare_pretrained(ModelConfig(source="pretrained", name_or_path=str(d), d_model=32), tmp_path / f"lm{i}")[
            "model_id"
        ]
        for i, d in enumerate((assets[0], other))
    ]
    assert ids[0].startswith("tiny-gpt2@") and ids[0] != ids[1]


def test_pipeline_extract_train_evaluate_on_a_pretrained_directory(assets, tmp_path):
    model_dir, docs = assets
    cfg = micro_config()
    cfg.pop("lm")  # not needed: nothing is trained
    cfg["model"] = {"source": "pretrained", "name_or_path": str(model_dir), "d_model": 32, "dtype": "float32"}
    cfg["corpus"] = {
        "source": "dataset",
        "dataset": {"path": str(docs), "text_column": "body"},
        "seq_len": SEQ_LEN,
        "prepend_bos": True,
        "vocab_size": 512,
        "eval_fraction": 0.15,
        "min_tokens": 16_384,
        "seed": 0,
    }
    cfg["extract"].update(exclude_positions=[0], shard_tokens=16_384)  # one shard per split
    cfg["sweep"] = {"topk": {**cfg["sweep"]["topk"], "k": [4]}}
    workdir = copy_workflow(tmp_path / "wf", cfg)
    targets = ["results/table.parquet", "results/saes/topk-k4/maxact.parquet"]
    plan = snakemake(workdir, "-n", *targets, "--quiet", "rules").stdout
    assert "corpus" in plan and "lm " in plan and "extract" in plan
    snakemake(workdir, "--cores", "2", *targets)

    lm = json.loads((workdir / "results/lm/model.json").read_text())
    assert lm["kind"] == "pretrained" and not (workdir / "results/lm/model.safetensors").exists()
    from saepipe.data.shards import read_meta

    meta = read_meta(workdir / "results/activations/train/000.zarr")
    assert meta["model"] == lm["model_id"] and meta["d_in"] == 32
    assert meta["exclude_positions"] == [0] and meta["prepend_bos"] is True
    metrics = json.loads((workdir / "results/saes/topk-k4/metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1 and np.isfinite(metrics["ce_loss_original"])
    sae_cfg = json.loads((workdir / "results/saes/topk-k4/config.json").read_text())
    assert sae_cfg["model_id"] == lm["model_id"] and sae_cfg["d_in"] == 32
    import pyarrow.parquet as pq

    texts = pq.read_table(workdir / "results/saes/topk-k4/maxact.parquet").column("text").to_pylist()
    assert texts and all(t.count("«") == 1 for t in texts) and any("w" in t for t in texts)
    assert yaml.safe_load((workdir / "config.yaml").read_text())["model"]["source"] == "pretrained"


@pytest.mark.parametrize("fmt", ["txt", "dir"])
def test_local_text_and_parquet_datasets(assets, tmp_path, fmt):
    model_dir, _ = assets
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.choice(VOCAB[1:], 30)) for _ in range(200)]
    if fmt == "txt":  # one document per paragraph
        path = tmp_path / "docs.txt"
        path.write_text("\n\n".join(docs) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (tmp_path / "d").mkdir()
        for i in range(2):
            pq.write_table(pa.table({"text": docs[i::2]}), tmp_path / "d" / f"part{i}.parquet")
        path = tmp_path / "d"
    cfg = CorpusConfig(source="dataset", dataset={"path": str(path)}, seq_len=16, min_tokens=1000, eval_fraction=0.2)
    stats = build_corpus(cfg, tmp_path / "out", pretrained_tokenizer=str(model_dir))
    assert sum(stats["documents"].values()) == 200
    assert sum(stats["tokens"].values()) == pytest.approx(200 * 31, abs=2 * 16)  # 30 words + separator
    with pytest.raises(ValueError, match=r"text_column is 'body' but .* has columns \['text'\]"):
        build_corpus(
            CorpusConfig(
                source="dataset", dataset={"path": str(path), "text_column": "body"}, seq_len=16, min_tokens=0
            ),
            tmp_path / "bad",
            pretrained_tokenizer=str(model_dir),
        )
