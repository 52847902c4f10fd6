"""The shipped configs/ validate against the schema and expand their sweeps offline, and
their headers' disk figures match the shard arithmetic."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO, snakemake

from saepipe.extract import shard_bytes
from saepipe.lm import d_model
from saepipe.sweep import expand_sweep

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
EXPECTED_SAES = {"gpt2-quick.yaml": 7, "paper-scale.yaml": 27, "paper-switch.yaml": 31}


def test_every_shipped_config_is_listed():
    assert {p.name for p in CONFIGS} == set(EXPECTED_SAES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_expands(path: Path):
    text = path.read_text()
    cfg = yaml.safe_load(text)
    jsonschema.validate(cfg, SCHEMA)
    assert cfg["model"]["source"] == "pretrained" and "lm" not in cfg
    saes = expand_sweep(cfg, d_model(cfg))
    assert len(saes) == EXPECTED_SAES[path.name]
    assert cfg["corpus"]["max_tokens"] >= cfg["extract"]["train_tokens"]
    assert cfg["extract"]["train_tokens"] % cfg["corpus"]["seq_len"] == 0
    assert cfg["extract"]["shard_tokens"] % cfg["corpus"]["seq_len"] == 0
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for item in ("Token budget:", "Disk:", "Expected runtime"):
        assert item in header, f"{path.name}: header lacks {item!r}"
    stated_gb = float(re.search(r"Disk:[^=]*= ([\d.]+) GB", header).group(1))
    actual_gb = shard_bytes(cfg["extract"]["train_tokens"], cfg["model"]["d_model"]) / 1e9
    assert stated_gb == pytest.approx(actual_gb, rel=0.02), f"{path.name}: disk says {stated_gb} GB"


def test_a_config_must_not_mix_in_config_yaml(tmp_path):
    """`--replace-workflow-config` (as the headers say): the dry run plans exactly this sweep,
    on the pretrained model (no training `lm` job input), without touching the network."""
    from conftest import copy_workflow

    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "configs").mkdir()
    (workdir / "configs" / "gpt2-quick.yaml").write_text((REPO / "configs" / "gpt2-quick.yaml").read_text())
    out = snakemake(
        workdir, "-n", "--configfile", "configs/gpt2-quick.yaml", "--replace-workflow-config", "--quiet", "rules"
    ).stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))
    assert counts["train"] == "7" and counts["lm"] == "1" and counts["extract"] == str(154 + 8)


@pytest.mark.parametrize(
    "model,error",
    [
        ({"source": "pretrained", "name_or_path": "gpt2"}, "'d_model' is a required property"),
        ({"source": "pretrained", "d_model": 768}, "'name_or_path' is a required property"),
        ({"source": "pretrained", "name_or_path": "gpt2", "d_model": 768, "dtype": "fp8"}, "'fp8' is not one of"),
        ({"source": "pretrained", "name_or_path": "gpt2", "d_model": 768, "layer": 8}, "'layer' was unexpected"),
        ({"source": "native"}, "'lm' is a required property"),  # the native model needs its `lm` section
    ],
)
def test_schema_rejects_incomplete_model_sections(model, error):
    cfg = {**yaml.safe_load((REPO / "configs" / "gpt2-quick.yaml").read_text()), "model": model}
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        jsonschema.validate(cfg, SCHEMA)


def test_default_config_still_validates_without_a_model_section():
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    assert "model" not in cfg
    jsonschema.validate(cfg, SCHEMA)
    assert d_model(cfg) == cfg["lm"]["d_model"]
