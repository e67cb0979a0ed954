"""report.html opened in a real browser: headless Chromium (Debian's ``chromium`` package).

The page must render without a console error, ask for nothing but itself and its inline
``data:`` pictures, and look like something (a screenshot that is not blank). Chromium is
driven over the DevTools pipe by ``benchmarks/report_screenshots.py``; without Chromium the
tests skip and say how to install it (``.ci/run`` installs it).
"""

from __future__ import annotations

import importlib.util
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "report_screenshots.py"


def load_script():
    spec = importlib.util.spec_from_file_location("report_screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


shots = load_script()
pytestmark = pytest.mark.skipif(
    shots.find_chromium() is None,
    reason="Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
)


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.int16)


def _not_blank(png: bytes) -> None:
    pixels = _pixels(png)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert colours > 50, f"the screenshot has {colours} colours: blank?"
    assert pixels.std() > 20


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from test_report_html import make_evaluation

    from hiercls.report import write_reports

    tmp = tmp_path_factory.mktemp("browser")
    evaluation = make_evaluation(tmp)
    panels = {evaluation.predictions.paths[3]: (REPO / "docs" / "explain-cnn.png").read_bytes()}
    return write_reports(evaluation, tmp / "out", title="Report <b>in a browser</b>", explain_panels=panels)


def test_report_renders_in_chromium_without_errors_or_requests(report):
    page = report["report.html"]
    visit = shots.open_page(page, shots={"top": None, "errors": "errors"})
    assert visit.errors == []
    assert visit.requests and visit.requests[0] == page.resolve().as_uri()
    assert visit.foreign_requests(page.resolve().as_uri()) == []
    _not_blank(visit.screenshots["top"])
    _not_blank(visit.screenshots["errors"])
    # The top shows the header band (dark blue) and white section cards.
    top = _pixels(visit.screenshots["top"])
    assert (np.abs(top[20, 20] - np.array([0x1F, 0x3B, 0x5A])) < 8).all()


def test_the_browser_check_sees_a_request_and_a_console_error(tmp_path):
    """The check can fail: a page that loads a remote picture and runs a failing script is caught."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="http://192.0.2.1/x.png">'
                    "<script>console.error('broken')</script></body></html>", encoding="utf-8")
    visit = shots.open_page(page)
    assert "http://192.0.2.1/x.png" in visit.foreign_requests(page.resolve().as_uri())
    assert any("broken" in e for e in visit.errors)


def test_screenshot_script_writes_both_pictures(report, tmp_path, capsys):
    assert shots.main([str(report["report.html"]), "--out", str(tmp_path)]) == 0
    for name in ("report-top.png", "report-errors.png"):
        _not_blank((tmp_path / name).read_bytes())
    assert "0 other" in capsys.readouterr().out
