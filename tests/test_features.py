"""MaxAct contexts, autointerp and the feature page, on hand-made cases with known answers.

The MaxAct case: d = M = 8, a TopK SAE (k=1) with W_enc = I, tokens from a vocabulary of
32, and activations that are the one-hot of the token id (zero for ids >= 8) scaled by a
per-row value, so feature f fires exactly on token f and its top examples are the rows
with token f and the largest values.
"""

from __future__ import annotations

import judge_stub
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from saepipe.data.shards import write_shard
from saepipe.features.autointerp import AutointerpConfig, autointerp, parse_judgement, resolve
from saepipe.features.maxact import MaxActConfig, keep_top_per_group, max_activating_examples
from saepipe.features.report import feature_report
from saepipe.saes import build_sae, config_from_dict, save_sae

D, VOCAB, SEQ, N_SEQ = 8, 32, 16, 40


def test_keep_top_per_group():
    group = torch.tensor([0, 1, 0, 0, 1, 2, 0])
    score = torch.tensor([5.0, 1.0, 7.0, 5.0, 3.0, 0.5, 1.0])
    kept = keep_top_per_group(group, score, 2).tolist()
    assert sorted(kept) == [0, 1, 2, 4, 5]  # group 0: 7 and the first 5; ties keep the earlier


def build_toy(root, exclude_positions=()):
    """Two shards of one-hot token activations, the identity TopK SAE, a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    gen = np.random.default_rng(0)
    tokens = gen.integers(0, VOCAB, size=N_SEQ * SEQ).astype(np.int32)
    values = gen.uniform(1.0, 2.0, size=len(tokens)).astype(np.float32)
    acts = np.zeros((len(tokens), D), np.float16)
    on = tokens < D
    acts[np.nonzero(on)[0], tokens[on]] = values[on]
    half = len(tokens) // 2
    meta = {
        "model": "toy",
        "hook": "h",
        "dtype": "float16",
        "d_in": D,
        "mean_norm": 1.5,
        "seq_len": SEQ,
        "exclude_positions": list(exclude_positions),
    }
    shards = []
    for i, rows in enumerate((slice(0, half), slice(half, None))):
        shards.append(str(root / f"{i:03d}.zarr"))
        write_shard(
            shards[-1],
            acts[rows],
            tokens[rows],
            np.tile(np.arange(SEQ, dtype=np.int32), N_SEQ // 2),
            {**meta, "token_count": half},
        )
    sae = build_sae(
        config_from_dict(
            {"arch": "topk", "d_in": D, "width": D, "k": 1, "act_norm_factor": 1.0, "hook": "h", "model_id": "toy"}
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    save_sae(sae, root / "sae")
    tok = Tokenizer(models.WordLevel({f" w{i}": i for i in range(VOCAB)}, unk_token=" w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    cfg = MaxActConfig(
        features=4,
        top_examples=3,
        random_examples=4,
        negative_examples=2,
        context_before=3,
        context_after=2,
        batch_size=100,
        device="cpu",
    )
    table = max_activating_examples(cfg, root / "sae", root, shards, root / "maxact.parquet")
    return {"root": root, "tokens": tokens, "values": values, "cfg": cfg, "rows": table.to_pylist()}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy(tmp_path_factory.mktemp("maxact"))


def test_maxact_known_answer(toy):
    rows, tokens, values, cfg = toy["rows"], toy["tokens"], toy["values"], toy["cfg"]
    features = sorted({r["feature"] for r in rows})
    assert len(features) == 4 and set(features) <= set(range(D))  # only latents that fire
    for f in features:
        on_f = np.nonzero(tokens == f)[0]
        expected = on_f[np.argsort(-values[on_f], kind="stable")][: cfg.top_examples]
        top = sorted((r for r in rows if r["feature"] == f and r["kind"] == "top"), key=lambda r: r["rank"])
        assert [r["row"] for r in top] == expected.tolist()
        for r in top:
            assert r["activation"] == pytest.approx(float(np.float16(values[r["row"]])), rel=1e-3)
        rand = [r for r in rows if r["feature"] == f and r["kind"] == "random"]
        assert len(rand) == cfg.random_examples and all(tokens[r["row"]] == f for r in rand)
        assert rows[[r["feature"] for r in rows].index(f)]["frequency"] == pytest.approx(len(on_f) / len(tokens))
        negatives = [r for r in rows if r["feature"] == f and r["kind"] == "negative"]
        assert len(negatives) == cfg.negative_examples
        for r in negatives:
            assert f not in r["token_ids"] and max(r["token_acts"]) == 0
    for r in rows:
        start = r["row"] - r["marked"]
        assert r["token_ids"] == tokens[start : start + len(r["token_ids"])].tolist()
        assert r["marked"] <= cfg.context_before and len(r["token_ids"]) - r["marked"] - 1 <= cfg.context_after
        assert start // SEQ == r["row"] // SEQ  # the window never crosses a sequence boundary
        # the feature's activation on each context token: exactly where the token is f
        assert [a > 0 for a in r["token_acts"]] == [t == r["feature"] for t in r["token_ids"]]
        assert r["token_acts"][r["marked"]] == pytest.approx(r["activation"])
        assert r["tokens"] == [f" w{t}" for t in r["token_ids"]]
        assert f"« w{r['token_ids'][r['marked']]}»" in r["text"]


def test_maxact_skips_excluded_positions(tmp_path):
    toy = build_toy(tmp_path, exclude_positions=[0, 1])
    tokens, rows = toy["tokens"], toy["rows"]
    kept = np.arange(len(tokens)) % SEQ >= 2
    for r in rows:
        if r["kind"] != "negative":
            assert r["row"] % SEQ >= 2  # an excluded position is never an example
            assert r["frequency"] == pytest.approx(np.sum((tokens == r["feature"]) & kept) / kept.sum())


def test_feature_page(toy, tmp_path):
    feature_report([str(toy["root"] / "maxact.parquet")], tmp_path / "f.html")
    page = (tmp_path / "f.html").read_text()
    assert page.count("<tr>") == 1 + 4  # header + one row per sampled feature
    assert 'class="tok mark"' in page and "<details>" in page


@pytest.fixture()
def judge():
    server = judge_stub.start()
    yield server
    server.shutdown()


def _run_autointerp(toy, tmp_path, url, model, **kw):
    cfg = AutointerpConfig(enabled=True, base_url=url, model=model, features=3, retries=1, timeout_s=10, **kw)
    summary = autointerp(cfg, toy["root"] / "maxact.parquet", tmp_path / "ai.parquet", tmp_path / "ai.json")
    return summary, pq.read_table(tmp_path / "ai.parquet").to_pylist()


def test_autointerp_perfect_judge_scores_one(toy, tmp_path, judge, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    summary, verdicts = _run_autointerp(toy, tmp_path, judge.url, "perfect")
    assert summary["autointerp_accuracy"] == 1.0 and summary["autointerp_features"] == 3
    for v in verdicts:  # the explainer saw the feature's token marked: f fires on " w{f}"
        assert v["explanation"] == f'Fires on the token " w{v["feature"]}".'
        assert v["n_examples"] == 4 + 2
    assert len(judge.requests) == 2 * 3 and judge.requests[0]["path"] == "/v1/chat/completions"
    assert judge.requests[0]["auth"] == "Bearer sk-test"
    detect = judge.requests[1]["body"]["messages"][1]["content"]
    assert "<<" not in detect and "«" not in detect  # held-out excerpts are shown unmarked


def test_autointerp_figure_is_registered_and_built_only_with_the_stage(toy, tmp_path, judge):
    """The autointerp figure is a registry figure (input kind "autointerp": the verdict
    parquets), listed under feature inspection, and planned only when the stage is on."""
    import pyarrow as pa

    from saepipe.plots.registry import FIGURES, figures_for

    fig = FIGURES["autointerp"]
    assert fig.inputs == ("table", "autointerp") and fig.category == "5. Feature inspection"
    assert fig.caption == "report/autointerp.rst" and fig.output == "results/plots/autointerp.png"
    rows = [{"sae_id": "a", "group": "a", "arch": "topk", "k": 4}]
    assert "autointerp" not in [f.name for f in figures_for(rows)]
    assert [f.name for f in figures_for(rows, autointerp=True)][-1] == "autointerp"

    _run_autointerp(toy, tmp_path, judge.url, "perfect")
    sae_id = pq.read_table(tmp_path / "ai.parquet").column("sae_id")[0].as_py()
    table = tmp_path / "table.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"sae_id": sae_id, "group": "g", "k": 1, "autointerp_model": "perfect"}]), table
    )
    out = tmp_path / "autointerp.png"
    fig.draw({"table": [str(table)], "autointerp": [str(tmp_path / "ai.parquet")]}, str(out))
    assert out.read_bytes().startswith(b"\x89PNG")


def test_autointerp_chance_and_unparsable(toy, tmp_path, judge):
    summary, _ = _run_autointerp(toy, tmp_path, judge.url, "never")
    assert summary["autointerp_accuracy"] == pytest.approx(2 / 6)  # only the 2 negatives right
    assert summary["autointerp_balanced_accuracy"] == pytest.approx(0.5)
    summary, verdicts = _run_autointerp(toy, tmp_path, judge.url, "prose")
    assert summary["autointerp_accuracy"] is None and summary["autointerp_unparsed"] == 3
    assert not any(v["parsed"] for v in verdicts)


def test_autointerp_retries_then_reports_the_endpoint(toy, tmp_path, judge):
    summary, _ = _run_autointerp(toy, tmp_path, judge.url, "flaky")
    assert summary["autointerp_accuracy"] == 1.0 and len(judge.requests) == 1 + 6
    dead = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    with pytest.raises(RuntimeError, match="127.0.0.1:9/v1/chat/completions"):
        _run_autointerp(toy, tmp_path, dead, "perfect")


def test_parse_judgement():
    assert parse_judgement("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_judgement("[1, 0] then [0, 0, 1]", 3) == [0, 0, 1]
    assert parse_judgement("[1, 2, 0]", 3) is None and parse_judgement("yes", 1) is None


def test_endpoint_from_environment_and_missing_endpoint(monkeypatch):
    monkeypatch.setenv("SAEPIPE_AUTOINTERP_BASE_URL", "http://localhost:1234/v1")
    monkeypatch.setenv("SAEPIPE_AUTOINTERP_MODEL", "judge-7b")
    cfg = resolve({"enabled": True})
    assert (cfg.base_url, cfg.model) == ("http://localhost:1234/v1", "judge-7b")
    monkeypatch.delenv("SAEPIPE_AUTOINTERP_MODEL")
    with pytest.raises(ValueError, match="autointerp.model"):
        resolve({"enabled": True})
    assert resolve({"enabled": False}).enabled is False  # disabled: nothing needed
