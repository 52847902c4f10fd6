"""Library-code fingerprints: what each stage's code hash covers."""

import shutil

from saepipe import codeversion


def test_closure_follows_imports():
    files = {p.name for p in codeversion.module_closure("saepipe.train")}
    assert {"loop.py", "checkpoint.py", "loader.py", "shards.py", "topk.py", "switch.py", "io.py"} <= files
    assert "frontier.py" not in files and "corpus.py" not in files


def test_fingerprint_changes_only_with_its_code(tmp_path, monkeypatch):
    pkg = tmp_path / "saepipe"
    shutil.copytree(codeversion.PACKAGE_ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(codeversion, "PACKAGE_ROOT", pkg)
    codeversion.fingerprint.cache_clear()
    train, plots = codeversion.fingerprint("saepipe.train"), codeversion.fingerprint("saepipe.plots.frontier")
    (pkg / "saes/topk.py").write_text((pkg / "saes/topk.py").read_text() + "\n# change\n")
    codeversion.fingerprint.cache_clear()
    assert codeversion.fingerprint("saepipe.train") != train
    assert codeversion.fingerprint("saepipe.plots.frontier") == plots
    codeversion.fingerprint.cache_clear()
