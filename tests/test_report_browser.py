"""The micro sweep's Snakemake report as a reader sees it: rendered by headless Chromium
(Debian's `chromium` package), not just grepped.

- the report's JavaScript runs and its landing page lists every result category;
- every figure embedded in it decodes to a real PNG image;
- the two HTML pages it embeds (metrics table, MaxAct tables) render with every SAE;
- a screenshot of the landing page is not blank.

In CI (CI=true, root) Chromium is installed with apt-get when missing and the test must
run; elsewhere it skips when there is no Chromium.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

from conftest import MICRO_SAES, snakemake
from test_pipeline import FIGURES

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() == "true"
CATEGORIES = ["0. Metrics", "1. Sparsity-reconstruction frontier", "2. Compute scaling",
              "3. Feature geometry", "4. Experts", "5. Feature inspection"]
# Headless, no sandbox (root), and none of the background connections a closed network refuses.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if not IN_CI:
        pytest.skip("no Chromium (Debian: apt-get install chromium) to render the report")
    if os.geteuid() != 0:
        pytest.fail("CI=true: the report must be rendered, but Chromium is missing and this is not root")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)
    return shutil.which("chromium")


def chromium(binary: str, profile: Path, url: str, *args: str) -> str:
    """Run headless Chromium on `url` (JavaScript runs for up to 10 s of virtual time)."""
    proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                           *args, url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style|noscript)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def embedded_files(report_html: str) -> dict[str, bytes]:
    """filename -> bytes of every result the report embeds (as base64 data URIs)."""
    found = re.findall(r'"data_uri": "data:[^;"]+;charset=utf8;filename=([^;"]+);base64,([^"]+)"', report_html)
    return {name: base64.b64decode(data) for name, data in found}


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.fixture(scope="module")
def rendered(micro_run, tmp_path_factory):
    binary = chromium_binary()
    work = tmp_path_factory.mktemp("report")
    shutil.copytree(micro_run, work / "wf", symlinks=True)
    snakemake(work / "wf", "--report", "report.html")
    return binary, work, work / "wf/report.html"


def test_report_renders_every_category(rendered):
    binary, work, report = rendered
    text = visible_text(chromium(binary, work / "profile", report.as_uri(), "--dump-dom"))
    assert "saepipe compares sparse-autoencoder architectures" in text  # workflow description
    assert "hook blocks.1.hook_resid_pre" in text  # its Jinja template was filled in
    missing = [c for c in CATEGORIES if c not in text]
    assert not missing, f"categories not rendered: {missing}\n{text[:2000]}"


def test_every_embedded_figure_is_an_image(rendered):
    _, _, report = rendered
    files = embedded_files(report.read_text(errors="replace"))
    for figure in FIGURES:
        width, height = png_size(files[f"{figure}.png"])
        assert min(width, height) >= 300, (figure, width, height)  # a drawn figure, not a stub


@pytest.mark.parametrize("page, needle", [("metrics.html", "Metrics of every SAE"),
                                          ("features.html", "Top-activating contexts")])
def test_embedded_pages_render_every_sae(rendered, page, needle):
    binary, work, report = rendered
    html = work / page
    html.write_bytes(embedded_files(report.read_text(errors="replace"))[page])
    text = visible_text(chromium(binary, work / "profile", html.as_uri(), "--dump-dom"))
    assert needle in text
    assert all(sid in text for sid in MICRO_SAES), [sid for sid in MICRO_SAES if sid not in text]


def test_landing_page_screenshot_is_not_blank(rendered):
    binary, work, report = rendered
    shot = work / "landing.png"
    chromium(binary, work / "profile", report.as_uri(), f"--screenshot={shot}", "--window-size=1400,900")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1400)
    assert pixels.std() > 0.05  # text, menu and DAG drawn, not a blank or error page
    print(json.dumps({"screenshot": str(shot)}))
