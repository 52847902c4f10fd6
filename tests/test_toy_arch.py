"""A new architecture is one file + one registry call: tests/toy_arch.py, registered as a plugin.

The micro sweep with the toy (plus TopK, for the figures that compare) runs through
``snakemake``: the toy trains, evaluates, is in the table with its trait columns, in every
figure that applies to a routed fixed-k SAE, and in the report. Nothing in saepipe names it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import matplotlib.figure
import matplotlib.text
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TESTS, snakemake

matplotlib.use("Agg")

TOY_SAE = "toy"  # single-k groups: the id is the group
TOY_FIGURES = (
    "frontier",
    "scaling",
    "redundancy",
    "activation_similarity",
    "expert_usage",
    "expert_load",
    "feature_geometry",
    "tsne",
)  # the figures that apply to a routed, fixed-k SAE


@pytest.fixture
def toy_registered():
    """tests/toy_arch.py imported into this process; unregistered afterwards (the registry is global)."""
    from saepipe.saes import ARCHITECTURES

    sys.path.insert(0, str(TESTS))
    try:
        import toy_arch  # noqa: F401 - registers "toymoe"

        yield
    finally:
        ARCHITECTURES.pop("toymoe", None)
        sys.modules.pop("toy_arch", None)
        sys.path.remove(str(TESTS))


def test_registry_exposes_the_toy_traits(toy_registered):
    from toy_arch import ToyMoEConfig, ToyMoESAE

    from saepipe.saes import arch_traits, build_sae, register_architecture
    from saepipe.saes.switch import SwitchSAE
    from saepipe.saes.topk import TopKConfig

    assert arch_traits("toymoe") == {
        "arch_label": "Toy MoE",
        "arch_order": 50,
        "l0_fixed": True,
        "routed": True,
        "has_omega": False,
        "has_threshold": False,
    }
    sae = build_sae({"arch": "toymoe", "d_in": 16, "width": 64, "k": 4, "n_experts": 4})
    assert isinstance(sae, ToyMoESAE) and sae.cfg.heaviside and sae.cfg.expert_count == 4
    register_architecture("toymoe", ToyMoESAE, ToyMoEConfig)  # re-import of the plugin: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("toymoe", SwitchSAE, ToyMoEConfig)
    with pytest.raises(ValueError, match="ARCH is 'topk'"):
        register_architecture("topk2", SwitchSAE, TopKConfig)
    with pytest.raises(ValueError, match=r"unknown SAE arch 'nope'; known: \[.*'toymoe'"):
        arch_traits("nope")


def test_trait_columns_agree_between_registry_and_verdicts():
    from saepipe import verdicts
    from saepipe.saes import registry

    assert verdicts.TRAIT_COLUMNS == registry.TRAIT_COLUMNS


def test_nothing_outside_saepipe_saes_tests_an_architecture_name():
    """Callers read traits: no quoted built-in arch name outside saepipe/saes, tests, configs."""
    from saepipe.saes.registry import ARCHITECTURES

    names = "|".join(sorted(a for a in ARCHITECTURES if a != "toymoe"))
    pattern = re.compile(rf'"({names})"')
    skip = ("saepipe/saes/", "tests/", "configs/", ".venv/", "config.yaml")
    found = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if (
            (path.suffix in (".py", ".smk", ".yaml") or path.name == "Snakefile")
            and path.is_file()
            and not rel.startswith(skip)
            and "/." not in f"/{rel}"
        ):
            found += [
                f"{rel}:{i}: {line.strip()}"
                for i, line in enumerate(path.read_text().splitlines(), 1)
                if pattern.search(line)
            ]
    assert not found, "\n".join(found)


def test_a_missing_plugin_names_the_module_and_the_fix():
    env_code = "import os; os.environ['SAEPIPE_PLUGINS'] = 'no_such_saepipe_plugin'; import saepipe.saes"
    proc = subprocess.run([sys.executable, "-c", env_code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "no_such_saepipe_plugin" in proc.stderr and "PYTHONPATH" in proc.stderr


def _figure_texts(monkeypatch) -> list[str]:
    """Every text artist (titles, tick labels, legends) of the figures saved from now on."""
    texts: list[str] = []
    savefig = matplotlib.figure.Figure.savefig

    def capture(fig, *args, **kwargs):
        texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    return texts


def _planned_inputs(workdir: Path, rules: tuple[str, ...]) -> dict[str, str]:
    """Rule -> the text of its job in a forced dry run (input files: what Snakemake passes it)."""
    targets = [f"results/plots/{rule.removeprefix('plot_')}.png" for rule in rules]
    proc = snakemake(workdir, "-n", "--forcerun", *rules, "--", *targets, pythonpath=(TESTS,))
    jobs = {}
    for rule in rules:
        block = re.search(rf"rule {rule}:\n(.*?)(?:\n\n|\Z)", proc.stdout, re.S)
        assert block, (rule, proc.stdout[-3000:])
        jobs[rule] = block.group(1)
    return jobs


def test_toy_architecture_runs_through_the_pipeline(toy_plugins_run, tmp_path, monkeypatch, toy_registered):
    workdir = toy_plugins_run  # conftest.toy_plugins_config: TopK and the toy, k = 4

    # trained and evaluated, with its traits in the table
    table = {r["sae_id"]: r for r in pq.read_table(workdir / "results/table.parquet").to_pylist()}
    assert set(table) == {"topk", TOY_SAE}
    toy = table[TOY_SAE]
    assert toy["arch"] == "toymoe" and toy["heaviside"] is True
    assert {
        k: toy[k]
        for k in (
            "arch_label",
            "arch_order",
            "l0_fixed",
            "routed",
            "has_omega",
            "has_threshold",
            "n_experts",
            "active_experts",
        )
    } == {
        "arch_label": "Toy MoE",
        "arch_order": 50,
        "l0_fixed": True,
        "routed": True,
        "has_omega": False,
        "has_threshold": False,
        "n_experts": 4,
        "active_experts": 1,
    }
    assert toy["l0"] <= 4 + 1e-6 and 0 < toy["fvu"] < 1.5
    assert len(toy["expert_counts"]) == 4 and sum(toy["expert_counts"]) == toy["n_tokens"]
    assert toy["intra_expert_redundancy"] is not None and toy["omega"] is None
    assert table["topk"]["routed"] is False and table["topk"]["arch_label"] == "TopK"

    # every applicable figure is built (and the omega figure, for SAEs with an omega, is not)
    plots = workdir / "results/plots"
    for figure in TOY_FIGURES:
        assert (plots / f"{figure}.png").read_bytes().startswith(b"\x89PNG"), figure
    assert not (plots / "omega.png").exists()
    # ... with the toy among the files the rules pass to the figures that read SAEs or logs
    jobs = _planned_inputs(workdir, ("plot_expert_load", "plot_feature_geometry", "plot_tsne"))
    assert f"results/saes/{TOY_SAE}/train_log.jsonl" in jobs["plot_expert_load"]
    for rule in ("plot_feature_geometry", "plot_tsne"):
        assert f"results/saes/{TOY_SAE}/sae.safetensors" in jobs[rule]
    # ... and drawn: its id, group or label is in each figure's text
    from saepipe.plots.experts import plot_expert_load, plot_expert_usage
    from saepipe.plots.frontier import plot_frontier
    from saepipe.plots.geometry import plot_feature_geometry, plot_tsne
    from saepipe.plots.redundancy import plot_activation_similarity, plot_redundancy
    from saepipe.plots.scaling import plot_scaling

    tbl, toy_dir = str(workdir / "results/table.parquet"), str(workdir / "results/saes" / TOY_SAE)
    draws = {
        "frontier": lambda out: plot_frontier(tbl, out),
        "scaling": lambda out: plot_scaling(tbl, out),
        "redundancy": lambda out: plot_redundancy(tbl, out),
        "activation_similarity": lambda out: plot_activation_similarity(tbl, out),
        "expert_usage": lambda out: plot_expert_usage(tbl, out),
        "expert_load": lambda out: plot_expert_load({TOY_SAE: f"{toy_dir}/train_log.jsonl"}, out),
        "feature_geometry": lambda out: plot_feature_geometry([toy_dir], out),
        "tsne": lambda out: plot_tsne(toy_dir, out, max_points=200),
    }
    assert set(draws) == set(TOY_FIGURES)
    for figure, draw in draws.items():
        texts = _figure_texts(monkeypatch)
        draw(str(tmp_path / f"{figure}.png"))
        monkeypatch.undo()
        assert any("toy" in t or "Toy MoE" in t for t in texts), (figure, texts[:40])

    # in the metrics page, the feature page, the verdicts and the report
    assert f"<td>{TOY_SAE}</td>" in (plots / "metrics.html").read_text()
    assert f"{TOY_SAE} (" in (plots / "features.html").read_text()
    assert (workdir / "results/verdicts.json").exists()
    report = (workdir / "report.html").read_text(errors="replace")
    for figure in TOY_FIGURES:
        assert f"{figure}.png" in report, figure
    assert "metrics.html" in report and "features.html" in report
