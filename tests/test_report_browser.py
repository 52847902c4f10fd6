"""The micro sweep's Snakemake report as a reader sees it: rendered by headless Chromium
(Debian's `chromium` package), not just grepped.

- the report's JavaScript runs and its landing page lists every result category;
- the verdicts on the papers' claims come first: the first category of the menu, and the
  summary table above the workflow description on the landing page, visible in a screenshot;
- every figure embedded in it decodes to a real PNG image;
- the HTML pages it embeds (metrics table, MaxAct tables) render with every SAE, the
  verdicts page with every claim;
- a screenshot of the landing page is not blank.

In CI (CI=true, root) Chromium is installed with apt-get when missing and the test must
run; elsewhere it skips when there is no Chromium.
"""

from __future__ import annotations

import base64
import html
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
# in the order of the report's menu (Snakemake 9 sorts categories by name, localeCompare)
CATEGORIES = [
    "0. Claim verdicts",
    "0. Metrics",
    "1. Sparsity-reconstruction frontier",
    "2. Compute scaling",
    "3. Feature geometry",
    "4. Experts",
    "5. Feature inspection",
]
INCONCLUSIVE_RGB = (0xA1, 0x5C, 0x00)  # saepipe.verdicts.STATUS_COLOURS["inconclusive"]
# Headless, no sandbox (root), and none of the background connections a closed network refuses.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


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
    proc = subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args, url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style|noscript)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


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


def test_verdicts_come_first(rendered):
    from saepipe.verdicts import CLAIMS

    binary, work, report = rendered
    text = visible_text(chromium(binary, work / "profile", report.as_uri(), "--dump-dom"))
    menu = [text.index(c) for c in CATEGORIES]
    assert menu == sorted(menu), "the verdicts must be the report's first result category"
    # the landing page (workflow description) opens with the verdict summary
    summary = text.index("Verdicts on the papers' claims")
    assert summary < text.index("saepipe compares sparse-autoencoder architectures")
    for spec in CLAIMS:
        assert f"{spec.number}. {spec.short}" in text, spec.id
    assert "single seed" in text and "not in sweep" in text  # the micro sweep has one seed per point


def test_embedded_verdicts_page_renders_every_claim(rendered):
    from saepipe.verdicts import CLAIMS

    binary, work, report = rendered
    page = work / "verdicts.html"
    page.write_bytes(embedded_files(report.read_text(errors="replace"))["verdicts.html"])
    text = visible_text(chromium(binary, work / "profile", page.as_uri(), "--dump-dom"))
    assert "Verdicts on the papers' claims" in text and "Student-t confidence interval" in text
    for spec in CLAIMS:
        assert spec.text in text, spec.id
    assert "switch_flop-k4" in text and "single_seed: 1 seed pair < min_seeds 2" in text


def test_every_embedded_figure_is_an_image(rendered):
    _, _, report = rendered
    files = embedded_files(report.read_text(errors="replace"))
    for figure in FIGURES:
        width, height = png_size(files[f"{figure}.png"])
        assert min(width, height) >= 300, (figure, width, height)  # a drawn figure, not a stub


@pytest.mark.parametrize(
    "page, needle", [("metrics.html", "Metrics of every SAE"), ("features.html", "Top-activating contexts")]
)
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
    # the verdict summary is on screen without scrolling: its "inconclusive" badges are drawn
    rgb = (pixels[..., :3] * 255).round()
    badge = (abs(rgb - INCONCLUSIVE_RGB) <= 12).all(axis=-1)
    assert badge.sum() > 300, f"no inconclusive verdict badge on the landing page ({badge.sum()} px)"
    print(json.dumps({"screenshot": str(shot)}))
