"""The HTML trajectory viewer rendered by a real headless browser (Debian chromium): zoom boxes drawn on the
overview at the right place, the model's text beside it. Skipped cleanly when chromium is absent."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_eval_helpers import OracleBackend, make_vqa_set, store_for

from pipeline.core.records import VQASample, read_jsonl
from pipeline.eval.viewer import load_observation_images, write_viewer
from rl.agent import AgentConfig, run_episodes

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

pytestmark = pytest.mark.browser


def _chromium(args: list[str], profile, timeout: int = 90) -> subprocess.CompletedProcess:
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_viewer_in_headless_chromium(tmp_path):
    root = make_vqa_set(tmp_path / "d", n=2, size=1024, square=48)
    samples = list(read_jsonl(root / "vqa_test.jsonl", VQASample))
    store = store_for(root)
    cfg = AgentConfig()
    trajs = run_episodes(OracleBackend(samples, store, cfg.zoom), samples, store, cfg)
    items = [(t, s, load_observation_images(t, store, cfg.zoom)) for t, s in zip(trajs, samples, strict=True)]
    page = write_viewer(tmp_path / "viewer.html", items, title="viewer test")

    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-500:]
    html = dom.stdout
    assert html.count('class="zoom-box"') == 2 and html.count('class="item ok"') == 2
    assert "zoom_in" in html and "&lt;answer&gt;" in html  # the model's turns are beside the image
    # the drawn box sits where the target is on the overview (display 448 px for a 1024 px scene)
    rect = re.search(r'class="zoom-box" data-obs="obs_1" x="([\d.]+)" y="([\d.]+)" width="([\d.]+)"', html)
    x0 = samples[0].targets[0].bbox[0] * 448 / 1024
    assert abs(float(rect.group(1)) - x0) < 30

    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1100,1300", "--hide-scrollbars", page.as_uri()],
                  tmp_path / "p2")
    assert r.returncode == 0 and shot.exists(), r.stderr[-500:]
    im = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the first box colour (#ff3b30) is painted on the page
    red = (abs(im[..., 0] - 255) < 20) & (abs(im[..., 1] - 59) < 25) & (abs(im[..., 2] - 48) < 25)
    assert red.sum() > 100
    shutil.copy(shot, tmp_path / "viewer_screenshot.png")
