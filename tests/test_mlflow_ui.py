"""The MLflow UI shows a medidiff run: its name, a metric and a logged image; its dataset input,
description and logged model (on a nested train run and on its parent), rendered by headless
Chromium from a real `mlflow server` on loopback.

The UI is a React app, so pages are read from the DOM Chromium renders, not from the HTML the
server sends. A run's Overview tab (/#/experiments/ID/runs/RUN) lists its name and metrics with
their latest values but no images. Logged images show in two places: the "Model metrics" tab's
image grid card and the Artifacts tab. The image grid fills in lazily (a chart card renders when
it scrolls into view), and under headless Chromium's virtual time it is sometimes still a
spinner, so the test opens the Artifacts tab at the image itself
(/#/experiments/ID/runs/RUN/artifacts/images/KEY+step+...png), which renders it every time. A
screenshot of that page is kept under the pytest tmp dir.
"""

from __future__ import annotations

import html
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from medidiff.tracking import Tracker

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run "
           "installs it)")


def _render(tmp_path: Path, url: str, *action: str) -> subprocess.CompletedProcess:
    """Load `url` in a fresh headless Chromium, let the app settle, then run `action`."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    profile.mkdir()
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--window-size=1400,1000", "--virtual-time-budget=20000", *action, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def _dom(tmp_path: Path, url: str, expected: str) -> str:
    """The rendered DOM; tried twice, as a loaded machine may answer after the time budget."""
    dom = ""
    for _ in range(2):
        dom = _render(tmp_path, url, "--dump-dom").stdout
        if expected in dom:
            break
    return dom


def _text(dom: str) -> str:
    """The visible text of a DOM, one space between elements."""
    body = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def test_run_pages_show_its_name_metric_and_image(mlflow_server, tmp_path):
    url, _, _ = mlflow_server
    tracker = Tracker(experiment="ui-check", uri=url)
    with tracker.run("ui-check-run", tags={"stage": "train"}) as run_id:
        tracker.log_params({"lr": 0.001})
        for step in range(3):
            tracker.log_metrics({"val_dice": 0.25 * (step + 1)}, step=step)
        image = np.zeros((64, 64, 3), np.uint8)
        image[:, :32, 0] = 255  # left half pure red: 2048 pixels to find in the screenshot
        tracker.log_image(image, key="samples", step=2)
        page = tracker.run_url()
    assert page.startswith(f"{url}/#/experiments/") and page.endswith(f"/runs/{run_id}")

    overview = _text(_dom(tmp_path, page, "val_dice"))
    assert "ui-check-run" in overview
    assert re.search(r"val_dice 0\.75\b", overview), overview[:3000]

    listed = MlflowClient(tracking_uri=url).list_artifacts(run_id, "images")
    png = next(f.path for f in listed if f.path.startswith("images/samples+step+2+")
               and f.path.endswith(".png"))
    artifact_page = f"{page}/artifacts/{png}"
    dom = _dom(tmp_path, artifact_page, f'alt="{png}"')
    assert "ui-check-run" in _text(dom)
    shown = re.search(rf'<img[^>]*\balt="{re.escape(png)}"[^>]*\bsrc="blob:', dom)
    assert shown, f"the image is not on {artifact_page}"

    screenshot = tmp_path / "mlflow-run-artifact.png"  # kept with the test's tmp dir
    _render(tmp_path, artifact_page, f"--screenshot={screenshot}")
    assert _red_pixels(screenshot) >= 1000, f"the logged image is not visible in {screenshot}"


def _dom_showing(tmp_path: Path, url: str, *expected: str) -> str:
    """The rendered DOM once its text holds every `expected` string (three tries: datasets and
    logged models arrive by separate requests, which a loaded machine may answer late)."""
    dom = ""
    for _ in range(3):
        dom = _render(tmp_path, url, "--dump-dom").stdout
        if all(text in _text(dom) for text in expected):
            break
    return dom


def test_run_pages_show_the_dataset_description_and_logged_model(mlflow_server, tmp_path):
    """What `medidiff demo` logs: a parent run, a nested train run with its data set and model
    folder, and the parent linking the same logged model."""
    url, _, _ = mlflow_server
    data = tmp_path / "data"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.yaml").write_text("task: anomaly\n")
    (model_dir / "model_card.md").write_text("# medidiff model: anomaly\n")
    digest = "0123456789abcdef"  # what medidiff.data.datasets.fingerprint returns: 16 hex
    tracker = Tracker(experiment="ui-datasets", uri=url)
    with tracker.run("ui-demo") as parent:
        with tracker.run("ui-train", nested=True) as train:
            tracker.log_dataset("data", digest, data, "training")
            model_id = tracker.log_model_folder(model_dir, name="ui-check-model")
            tracker.set_description("trained 3 steps in 1 s, final loss 0.5000")
            train_page = tracker.run_url()
        tracker.link_model(model_id)
        parent_page = tracker.run_url()
    assert model_id and train_page.endswith(train) and parent_page.endswith(parent)

    shown = ("ui-train", f"data ({digest})", "training", "Logged models (1)", "ui-check-model",
             "trained 3 steps in 1 s, final loss 0.5000")
    dom = _dom_showing(tmp_path, train_page, *shown)
    text = _text(dom)
    missing = [item for item in shown if item not in text]
    assert not missing, f"{missing} not on {train_page}: {text[:3000]}"
    assert f"/models/{model_id}" in dom, "the logged model does not link to its page"

    shown = ("ui-demo", "Logged models (1)", "ui-check-model")
    dom = _dom_showing(tmp_path, parent_page, *shown)
    text = _text(dom)
    missing = [item for item in shown if item not in text]
    assert not missing, f"{missing} not on the parent run's page {parent_page}: {text[:3000]}"
    assert f"/models/{model_id}" in dom


def _red_pixels(png: Path) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((pixels[..., 0] > 220) & (pixels[..., 1] < 40) & (pixels[..., 2] < 40)).sum())
