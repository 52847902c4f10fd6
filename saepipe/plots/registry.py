"""The report's figures as a table: one :class:`Figure` per figure, from which the Snakefile
builds its targets and rules/report.smk one ``plot_<name>`` rule each.

No matplotlib here (the Snakefile imports this module at parse time): a figure names its
drawing function by dotted path, imported by the job (``workflow_scripts/plot.py``).

A figure from outside saepipe is one module that calls :func:`register_figure`, named in the
config's ``plugins`` (the same mechanism as architectures, ``saepipe.saes.load_plugins``);
tests/toy_figure.py is an example. A drawing function is called as
``function(*inputs, out_png)``, one argument per entry of ``Figure.inputs``, in order:

``"table"``
    path of results/table.parquet (str).
``"logs:<trait>"``
    {sae_id: path of its train_log.jsonl} for the sweep's SAEs whose architecture has the
    boolean trait ``<trait>`` (``saepipe.saes.TRAIT_COLUMNS``, e.g. ``logs:routed``).
``"saes"``
    directories of the SAEs the feature-geometry figures show (``availability.geometry_ids``),
    list of str; the rule depends on their sae.safetensors.
``"sae"``
    the first of those directories (str).
``"autointerp"``
    paths of the autointerp verdicts, results/saes/<sae>/autointerp.parquet, of the SAEs
    whose features are inspected (the first seed of every sweep point; ``INSPECTED`` in the
    Snakefile), list of str. Written by the optional autointerp stage.

An input of an optional stage (``OPTIONAL_INPUTS``) exists only when that stage is on, so a
figure that asks for one is built only then: :func:`figures_for` leaves it out otherwise,
whatever its ``applies`` says.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from saepipe.plots.availability import geometry_ids, moe_ids, omega_ids, scaling_ks

PLOTS = "results/plots"
INPUT_KINDS = ("table", "logs:<trait>", "saes", "sae", "autointerp")
"""The inputs a figure can ask for (module docstring)."""
OPTIONAL_INPUTS = ("autointerp",)
"""Input kinds written by an optional stage (its config section's ``enabled``): a figure
with one is built only when the stage is on (:func:`figures_for`)."""


def always(rows: list[dict]) -> bool:
    """Every sweep has the figure."""
    return True


@dataclass(frozen=True)
class Figure:
    """One figure of the report: results/plots/<name>.png, drawn by the job of rule plot_<name>.

    ``function``: dotted path ``package.module.function`` of the drawing function.
    ``inputs``: what it is called with (``INPUT_KINDS``, module docstring), in argument order.
    ``applies(rows)``: whether a sweep has the figure; rows as ``availability.sweep_rows``
    (the sweep's points with their architecture traits). Read traits, never arch names.
    ``caption``: the .rst file of the report's caption, relative to the workflow directory
    (the Snakefile's) or absolute. ``category``: the report's category it is listed under.
    """

    name: str
    function: str
    inputs: tuple[str, ...]
    caption: str
    category: str
    applies: Callable[[list[dict]], bool] = always

    @property
    def output(self) -> str:
        """The figure's file."""
        return f"{PLOTS}/{self.name}.png"

    @property
    def module(self) -> str:
        """The module of the drawing function (its code is the rule's ``code`` param)."""
        return self.function.rpartition(".")[0]

    @property
    def logs_trait(self) -> str | None:
        """The trait of a ``logs:<trait>`` input (None without one)."""
        return next((i.partition(":")[2] for i in self.inputs if i.startswith("logs:")), None)

    def caption_path(self, workflow_dir: str | os.PathLike) -> str:
        """Absolute path of the caption file; a missing one is an error that names it."""
        path = Path(workflow_dir, self.caption)
        if not path.is_file():
            raise FileNotFoundError(
                f"figure {self.name!r}: caption file {path} does not exist; write it, or "
                f"pass register_figure(caption=...) an existing .rst (relative to the "
                f"workflow directory, or absolute)"
            )
        return str(path)

    def code(self) -> str:
        """Fingerprint of the drawing function's code: ``saepipe.codeversion.fingerprint`` for a
        saepipe module (its saepipe imports included); the module file's hash for a plugin."""
        from saepipe.codeversion import PACKAGE, fingerprint

        if self.module.split(".")[0] == PACKAGE:
            return fingerprint(self.module)
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.origin or not os.path.isfile(spec.origin):
            raise ModuleNotFoundError(
                f"figure {self.name!r}: module {self.module!r} of {self.function!r} "
                f"not found; is its directory on PYTHONPATH?"
            )
        return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:16]

    def draw(self, inputs: Mapping[str, list[str]], out_png: str) -> None:
        """Call the drawing function with the rule's named input files (``rule_inputs``)."""
        args: list[str | list[str] | dict[str, str]] = []
        for kind in self.inputs:
            if kind == "table":
                args.append(str(inputs["table"][0]))
            elif kind.startswith("logs:"):
                args.append({Path(p).parent.name: str(p) for p in inputs["logs"]})
            elif kind == "saes":
                args.append([str(Path(p).parent) for p in inputs["saes"]])
            elif kind == "autointerp":
                args.append([str(p) for p in inputs["autointerp"]])
            else:  # "sae"
                args.append(str(Path(inputs["sae"][0]).parent))
        module, _, func = self.function.rpartition(".")
        getattr(importlib.import_module(module), func)(*args, out_png)


FIGURES: dict[str, Figure] = {}
"""Registered figures, by name, in registration order (the order of the report's rules)."""


def _check_input(name: str, kind: str) -> None:
    from saepipe.saes.registry import TRAIT_COLUMNS

    if kind in ("table", "saes", "sae", *OPTIONAL_INPUTS):
        return
    if kind.startswith("logs:"):
        trait = kind.partition(":")[2]
        if trait in TRAIT_COLUMNS:
            return
        raise ValueError(f"figure {name!r}: input {kind!r} names no trait; traits: {list(TRAIT_COLUMNS)}")
    raise ValueError(f"figure {name!r}: unknown input {kind!r}; inputs: {list(INPUT_KINDS)}")


def _key(fig: Figure) -> tuple:
    """What makes two registrations the same figure (``applies`` by where it is defined: a
    module imported again defines a new function object)."""
    applies = (getattr(fig.applies, "__module__", None), getattr(fig.applies, "__qualname__", repr(fig.applies)))
    return fig.name, fig.function, fig.inputs, fig.caption, fig.category, applies


def register_figure(
    name: str,
    function: str,
    inputs: tuple[str, ...] | list[str],
    caption: str,
    category: str,
    applies: Callable[[list[dict]], bool] = always,
) -> Figure:
    """Add a figure to the report (see :class:`Figure`); returns it.

    Registering the same figure again (a plugin imported twice) is a no-op; another figure
    under a taken name is an error.
    """
    if not name.isidentifier():
        raise ValueError(f"figure name {name!r} must be an identifier (it names rule plot_{name})")
    if function.count(".") < 1 or not all(p.isidentifier() for p in function.split(".")):
        raise ValueError(f"figure {name!r}: function {function!r} must be a dotted path 'module.function'")
    inputs = tuple(inputs)
    for kind in inputs:
        _check_input(name, kind)
    if sum(k.startswith("logs:") for k in inputs) > 1 or len(set(inputs)) != len(inputs):
        raise ValueError(f"figure {name!r}: each input at most once, one logs:<trait> at most; got {inputs}")
    fig = Figure(name, function, inputs, caption, category, applies)
    old = FIGURES.get(name)
    if old is not None and _key(old) != _key(fig):
        raise ValueError(f"figure {name!r} is already registered (drawn by {old.function}); pick another name")
    FIGURES[name] = fig
    return fig


def figures_for(rows: list[dict], *, autointerp: bool = False) -> list[Figure]:
    """The registered figures a sweep has (``applies``), in registration order.

    A figure with an input of an optional stage (``OPTIONAL_INPUTS``) only when that stage is
    on: `autointerp` is the config's ``autointerp.enabled``.
    """
    stages_on = {"autointerp": autointerp}
    off = {kind for kind in OPTIONAL_INPUTS if not stages_on[kind]}
    return [fig for fig in FIGURES.values() if not off.intersection(fig.inputs) and fig.applies(rows)]


def figure(name: str) -> Figure:
    """The registered figure ``name``; an unknown name is an error that lists the known ones."""
    try:
        return FIGURES[name]
    except KeyError:
        raise KeyError(
            f"no figure {name!r} registered; registered: {list(FIGURES)} (a plugin figure's module "
            f"must be in the config's `plugins`)"
        ) from None


# --- the built-in figures -----------------------------------------------------------------


def _has_scaling(rows: list[dict]) -> bool:
    return bool(scaling_ks(rows))


def _has_moe(rows: list[dict]) -> bool:
    return bool(moe_ids(rows))


def _has_omega(rows: list[dict]) -> bool:
    return bool(omega_ids(rows))


def _has_geometry(rows: list[dict]) -> bool:
    return bool(geometry_ids(rows))


_FRONTIER = "1. Sparsity-reconstruction frontier"
_SCALING = "2. Compute scaling"
_GEOMETRY = "3. Feature geometry"
_EXPERTS = "4. Experts"
_FEATURES = "5. Feature inspection"

for _name, _function, _inputs, _category, _applies in (
    ("frontier", "saepipe.plots.frontier.plot_frontier", ("table",), _FRONTIER, always),
    ("scaling", "saepipe.plots.scaling.plot_scaling", ("table",), _SCALING, _has_scaling),
    ("redundancy", "saepipe.plots.redundancy.plot_redundancy", ("table",), _GEOMETRY, always),
    ("activation_similarity", "saepipe.plots.redundancy.plot_activation_similarity", ("table",), _GEOMETRY, always),
    ("expert_usage", "saepipe.plots.experts.plot_expert_usage", ("table",), _EXPERTS, _has_moe),
    ("expert_load", "saepipe.plots.experts.plot_expert_load", ("logs:routed",), _EXPERTS, _has_moe),
    ("omega", "saepipe.plots.omega.plot_omega", ("table", "logs:has_omega"), _EXPERTS, _has_omega),
    ("feature_geometry", "saepipe.plots.geometry.plot_feature_geometry", ("saes",), _GEOMETRY, _has_geometry),
    ("tsne", "saepipe.plots.geometry.plot_tsne", ("sae",), _GEOMETRY, _has_geometry),
    ("autointerp", "saepipe.plots.autointerp.plot_autointerp", ("table", "autointerp"), _FEATURES, always),
):
    register_figure(_name, _function, _inputs, f"report/{_name}.rst", _category, _applies)
