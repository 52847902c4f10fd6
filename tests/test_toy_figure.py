"""A new figure is one module + one registry call: tests/toy_figure.py, registered as a plugin.

The micro sweep of conftest.toy_plugins_config (TopK and the toy architecture, one training shard,
``plugins: [toy_arch, toy_figure]``) runs through
``snakemake``: rule plot_toy_l0 is generated from the registry, draws results/plots/toy_l0.png
and the report lists it under its category with its caption. A sweep the toy figure does not
apply to (no fixed-L0 SAE) does not plan it. Nothing in the workflow names it.
"""

from __future__ import annotations

import base64
import importlib
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, TESTS, copy_workflow, micro_config, snakemake

BUILT_IN = (
    "frontier",
    "scaling",
    "redundancy",
    "activation_similarity",
    "expert_usage",
    "expert_load",
    "omega",
    "feature_geometry",
    "tsne",
    "autointerp",
)


@pytest.fixture
def toy_registered():
    """tests/toy_figure.py imported into this process; unregistered afterwards (the registry is global)."""
    from saepipe.plots.registry import FIGURES

    sys.path.insert(0, str(TESTS))
    try:
        import toy_figure  # noqa: F401 - registers "toy_l0"

        yield FIGURES["toy_l0"]
    finally:
        FIGURES.pop("toy_l0", None)
        sys.modules.pop("toy_figure", None)
        sys.path.remove(str(TESTS))


def test_built_in_figures_are_registered_with_their_captions():
    from saepipe.plots.registry import FIGURES

    assert tuple(FIGURES) == BUILT_IN
    for fig in FIGURES.values():
        assert fig.output == f"results/plots/{fig.name}.png"
        assert Path(fig.caption_path(REPO)) == REPO / "report" / f"{fig.name}.rst"
    assert FIGURES["omega"].inputs == ("table", "logs:has_omega") and FIGURES["omega"].logs_trait == "has_omega"
    assert FIGURES["expert_load"].logs_trait == "routed" and FIGURES["frontier"].logs_trait is None


def test_applies_reads_traits():
    from saepipe.plots.registry import figures_for

    topk = {"sae_id": "a", "group": "a", "arch": "topk", "k": 4}
    assert [f.name for f in figures_for([topk])] == ["frontier", "redundancy", "activation_similarity"]
    routed = {
        "sae_id": "b",
        "group": "b",
        "arch": "switch",
        "k": 8,
        "n_experts": 4,
        "routed": True,
        "l0_fixed": True,
        "has_omega": False,
    }
    assert [f.name for f in figures_for([topk], autointerp=True)] == [
        "frontier",
        "redundancy",
        "activation_similarity",
        "autointerp",
    ]
    names = [f.name for f in figures_for([topk, {**topk, "sae_id": "c", "group": "c"}, routed])]
    assert names == [
        "frontier",
        "scaling",
        "redundancy",
        "activation_similarity",
        "expert_usage",
        "expert_load",
        "feature_geometry",
        "tsne",
    ]


def test_register_figure_rejects_what_it_cannot_build(toy_registered):
    from saepipe.plots.registry import FIGURES, Figure, figure, register_figure

    with pytest.raises(ValueError, match=r"unknown input 'weights'; inputs: \['table', 'logs:<trait>'"):
        register_figure("bad", "m.f", ["weights"], "c.rst", "x")
    with pytest.raises(ValueError, match="'logs:fast' names no trait"):
        register_figure("bad", "m.f", ["logs:fast"], "c.rst", "x")
    with pytest.raises(ValueError, match="must be a dotted path"):
        register_figure("bad", "plot_bad", ["table"], "c.rst", "x")
    with pytest.raises(ValueError, match="'toy_l0' is already registered"):
        register_figure("toy_l0", "m.f", ["table"], "c.rst", "x")
    importlib.reload(sys.modules["toy_figure"])  # imported again (new function objects): no-op
    assert FIGURES["toy_l0"].function == "toy_figure.plot_toy_l0"
    with pytest.raises(KeyError, match=r"no figure 'nope' registered; registered: \[.*'toy_l0'"):
        figure("nope")
    with pytest.raises(FileNotFoundError, match="caption file .*missing.rst does not exist"):
        Figure("no_caption", "m.f", ("table",), "missing.rst", "x").caption_path(REPO)
    assert "bad" not in FIGURES and "no_caption" not in FIGURES


def test_the_toy_draws_from_its_inputs(toy_registered, tmp_path):
    table = tmp_path / "table.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"sae_id": "topk", "group": "topk", "arch": "topk", "k": 4, "l0": 3.9, "l0_fixed": True},
                {"sae_id": "relu", "group": "relu", "arch": "relu", "k": 16, "l0": 30.0, "l0_fixed": False},
            ]
        ),
        table,
    )
    assert toy_registered.applies([{"arch": "topk", "l0_fixed": True}])
    assert not toy_registered.applies([{"arch": "relu", "l0_fixed": False}])
    assert len(toy_registered.code()) == 16  # the plugin module's hash
    out = tmp_path / "toy.png"
    toy_registered.draw({"table": [str(table)]}, str(out))
    assert out.read_bytes().startswith(b"\x89PNG")


def test_the_workflow_names_no_figure():
    """Rules and scripts come from the registry: no plot rule or figure name written out."""
    smk = (REPO / "rules/report.smk").read_text()
    assert "rule plot_" not in smk and "name:" in smk
    plot_scripts = sorted(p.name for p in (REPO / "workflow_scripts").glob("plot*.py"))
    assert plot_scripts == ["plot.py"]
    # "autointerp" is also the stage's name, its config section and the figure's input kind
    pattern = re.compile(rf'"({"|".join(n for n in BUILT_IN if n != "autointerp")})"')
    for path in (REPO / "Snakefile", REPO / "workflow_scripts/plot.py", *sorted((REPO / "rules").glob("*.smk"))):
        assert not pattern.search(path.read_text()), path


def _toy_config(sweep: dict) -> dict:
    """The micro config with one training shard, the toy figure as a plugin, and `sweep`."""
    cfg = micro_config()
    cfg["plugins"] = ["toy_figure"]
    cfg["corpus"].update(min_tokens=30_000)
    cfg["extract"].update(train_tokens=8_192)
    cfg["train"].update(tokens=8_192)
    cfg["sweep"] = sweep
    return cfg


def test_toy_figure_runs_through_the_pipeline(toy_plugins_run, tmp_path):
    workdir = toy_plugins_run  # conftest.toy_plugins_config: TopK and the toy architecture

    png = workdir / "results/plots/toy_l0.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert (workdir / "results/logs/plot_toy_l0.log").exists()
    assert "Nothing to be done" in snakemake(workdir, "-n", pythonpath=(TESTS,)).stdout  # its code param is stable

    report = (workdir / "report.html").read_text(errors="replace")
    embedded = dict(re.findall(r'filename=([^;"]+);base64,([^"]+)"', report))
    assert base64.b64decode(embedded["toy_l0.png"]) == png.read_bytes()
    assert "6. Toy" in report
    assert "measured L0 of every fixed-L0 SAE" in report  # its caption

    # a sweep without a fixed-L0 SAE: the figure does not apply, its rule is not planned
    relu = {"relu": {"arch": "relu", "width": 128, "k": 16, "l1_coeff": 3.0}}
    dry = copy_workflow(tmp_path / "dry", _toy_config(relu))
    plan = snakemake(dry, "-n", pythonpath=(TESTS,)).stdout
    assert "rule plot_frontier:" in plan and "toy_l0" not in plan
    proc = snakemake(dry, "-n", "results/plots/toy_l0.png", check=False, pythonpath=(TESTS,))
    assert proc.returncode != 0 and "toy_l0.png" in proc.stdout + proc.stderr
