"""Logs for people who pipe them (``hiercls.console``), and the running loss on the terminal bar.

Redirected to a file, ``hiercls fit``, ``predict`` and ``cv`` write no blank lines, break no line
at 80 columns (a long run folder stays on one line) and print a progress line during an epoch
every ``HIERCLS_LOG_INTERVAL`` seconds (30 by default; tiny here so the test does not wait).
"""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from hiercls import console as hconsole
from hiercls import engine
from hiercls.config import FitConfig
from hiercls.console import EpochProgress, bars_enabled, is_log, log_interval, make_console

from conftest import TINY_TREE_YAML, write_image

REPO = Path(__file__).resolve().parents[1]
LEAVES = ("cat", "dog", "tree", "flower")
PROGRESS_LINE = re.compile(r"^epoch (\d+)/(\d+) (\S+): step (\d+)/(\d+), ([\d.]+) img/s, loss ([\d.]+), \d+ s$")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny tree, 40 tiny images (10 per leaf) and a long folder name for the run."""
    root = tmp_path_factory.mktemp("logs")
    (root / "tiny.yaml").write_text(TINY_TREE_YAML, encoding="utf-8")
    for li, leaf in enumerate(LEAVES):
        for k in range(10):
            write_image(root / "data" / leaf / f"{leaf}_{k}.jpg", size=(20, 20), seed=100 * li + k)
    return root


def run_cli(args: list[str], cwd: Path, log: Path, **env_changes: str) -> str:
    """Run ``hiercls ARGS`` with stdout and stderr redirected to ``log``; the log's text."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               HIERCLS_CACHE=str(cwd / "cache"), **env_changes)
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "hiercls", *args], cwd=cwd, env=env, stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=600)
    text = log.read_text(encoding="utf-8")
    assert proc.returncode == 0, text
    return text


def assert_clean_log(text: str) -> None:
    lines = text.splitlines()
    assert lines, "empty log"
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    assert not blank, f"blank lines {blank} in the log:\n{text}"
    assert "\x1b[" not in text, "terminal escape codes in a log"


def fit_args(project: Path, out: Path, *extra: str) -> list[str]:
    return ["fit", "--taxonomy", str(project / "tiny.yaml"), "--data", str(project / "data"), "--out", str(out),
            "--backbone", "test_resnet", "--img-size", "16", "--epochs", "2", "--batch-size", "4",
            "--device", "cpu", "--overwrite", *extra]


LONG_RUN = "runs/" + "a-run-folder-name-long-enough-to-pass-eighty-columns/" * 2 + "run"


@pytest.fixture(scope="module")
def fit_log(project: Path) -> tuple[Path, str]:
    """``hiercls fit > log 2>&1`` with a progress line after every step (interval 1 ms)."""
    out = project / LONG_RUN
    return out, run_cli(fit_args(project, out), project, project / "fit.log", HIERCLS_LOG_INTERVAL="0.001")


def test_fit_log_has_no_blank_or_broken_lines(fit_log) -> None:
    out, text = fit_log
    assert_clean_log(text)
    assert len(str(out)) > 100
    lines = text.splitlines()
    # the header's title and the final line name the long run folder on one line each
    assert any(line.strip() == f"hiercls fit -> {out}" for line in lines), text
    assert lines[-1].startswith("done: ") and lines[-1].endswith(f"run folder {out}"), text
    epoch_lines = [line for line in lines if re.match(r"^epoch \d+: train ", line)]
    assert len(epoch_lines) == 2 and all("val acc" in line and "img/s" in line for line in epoch_lines), text
    assert any(line.startswith(" strategy ") and line.rstrip().endswith("img])") for line in lines), text


def test_fit_log_has_progress_lines_during_each_epoch(fit_log) -> None:
    _, text = fit_log
    found = [PROGRESS_LINE.match(line) for line in text.splitlines()]
    found = [m for m in found if m]
    assert {int(m.group(1)) for m in found} == {1, 2}, text
    for m in found:
        step, total = int(m.group(4)), int(m.group(5))
        assert m.group(2) == "2" and m.group(3) == "joint"
        assert 1 <= step < total  # the last step is followed by the epoch's own line
        assert math.isfinite(float(m.group(7))) and float(m.group(6)) > 0
    # every step but the last of each epoch (steps of 4 of the 32 training images: 8 per epoch)
    assert len(found) == 2 * (int(found[0].group(5)) - 1), text


def test_no_progress_lines_with_no_progress_or_a_long_interval(project: Path) -> None:
    out = project / "runs" / "quiet"
    for extra, env in (((), {}), (("--no-progress",), {"HIERCLS_LOG_INTERVAL": "0.001"})):
        text = run_cli(fit_args(project, out, *extra, "--epochs", "1"), project, project / "quiet.log", **env)
        assert_clean_log(text)
        assert not any(PROGRESS_LINE.match(line) for line in text.splitlines()), text


def test_predict_log_is_clean(project: Path, fit_log) -> None:
    run, _ = fit_log
    text = run_cli(["predict", "--run", str(run), "--data", str(project / "data"), "--out", str(project / "p.csv"),
                    "--overwrite", "--device", "cpu"], project, project / "predict.log")
    assert_clean_log(text)
    assert re.search(r"^wrote 40 predictions to \S+p\.csv \(exact-match accuracy", text, re.M), text


def test_audit_log_is_clean(project: Path) -> None:
    text = run_cli(["audit", "--taxonomy", str(project / "tiny.yaml"), "--data", str(project / "data"),
                    "--min-size", "0"], project, project / "audit.log")
    assert_clean_log(text)
    assert text.startswith("Audit of "), text


def test_calibrate_and_explain_logs_are_clean(project: Path, fit_log, tmp_path: Path) -> None:
    run, _ = fit_log
    calibrate = run_cli(["calibrate", "--run", str(run), "--device", "cpu"], project, tmp_path / "calibrate.log")
    assert_clean_log(calibrate)
    assert "calibration.json" in calibrate
    images = [str(project / "data" / "cat" / f"cat_{k}.jpg") for k in (0, 1)]
    explain = run_cli(["explain", "--run", str(run), "--images", *images, "--out", str(tmp_path / "cams"),
                       "--device", "cpu"], project, tmp_path / "explain.log")
    assert_clean_log(explain)
    assert len(list((tmp_path / "cams").glob("*_gradcam.png"))) == 2


def test_predict_and_decoding_print_progress_lines_in_a_log(project: Path, fit_log, tmp_path: Path) -> None:
    run, _ = fit_log
    text = run_cli(["predict", "--run", str(run), "--data", str(project / "data"), "--out", str(tmp_path / "p.csv"),
                    "--device", "cpu", "--batch-size", "4"], tmp_path, tmp_path / "predict.log",
                   HIERCLS_LOG_INTERVAL="0.000001")  # cwd tmp_path: a fresh image cache, so decoding shows
    assert_clean_log(text)
    predicting = re.findall(r"^predicting: (\d+)/40, [\d.]+/s, \d+ s$", text, re.M)
    assert predicting and all(0 < int(done) < 40 for done in predicting), text
    assert re.search(r"^decoding 40 images at 16px: \d+/40, [\d.]+/s, \d+ s$", text, re.M), text
    (tmp_path / "again").mkdir()
    quiet = run_cli(["predict", "--run", str(run), "--data", str(project / "data"), "--out", str(tmp_path / "q.csv"),
                     "--device", "cpu", "--batch-size", "4", "--no-progress"], tmp_path / "again",
                    tmp_path / "quiet.log", HIERCLS_LOG_INTERVAL="0.000001")
    assert not re.search(r"^(predicting|decoding)", quiet, re.M), quiet


def test_cv_log_is_clean_and_its_rules_stay_short(project: Path) -> None:
    config = project / "cv.yaml"
    config.write_text(yaml.safe_dump({
        "taxonomy": "tiny.yaml", "data": "data", "out": LONG_RUN + "-cv", "folds": 2, "seed": 0,
        "strategies": ["joint"], "backbones": ["test_resnet"],
        "fit": {"img_size": 16, "epochs": 1, "batch_size": 4, "device": "cpu"},
    }), encoding="utf-8")
    text = run_cli(["cv", "--config", str(config)], project, project / "cv.log", HIERCLS_LOG_INTERVAL="0.001")
    assert_clean_log(text)
    lines = text.splitlines()
    rules = [line for line in lines if line.startswith("cell ") and line.endswith("─" * 10)]
    assert [line.split(" (")[0] for line in rules] == [f"cell {k + 1}/2: joint x test_resnet, fold {k}" for k in (0, 1)]
    assert all(len(line) == hconsole.LOG_RULE_WIDTH for line in rules), text  # not the log's width
    assert sum(bool(PROGRESS_LINE.match(line)) for line in lines) >= 2, text
    assert any(line.startswith("finished joint x test_resnet, fold 1") for line in lines), text


def test_a_bad_log_interval_is_refused_in_one_line(project: Path, capsys) -> None:
    from hiercls.cli import main

    os.environ[hconsole.LOG_INTERVAL_ENV] = "soon"
    try:
        assert main(fit_args(project, project / "runs" / "never")) == 2
    finally:
        del os.environ[hconsole.LOG_INTERVAL_ENV]
    err = capsys.readouterr().err
    assert "HIERCLS_LOG_INTERVAL='soon'" in err and "Traceback" not in err and err.count("\n") == 1
    assert not (project / "runs" / "never").exists()


# -- in-process: the console module itself ----------------------------------------------------


def test_log_interval_reads_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(hconsole.LOG_INTERVAL_ENV, raising=False)
    assert log_interval() == hconsole.DEFAULT_LOG_INTERVAL_S == 30
    monkeypatch.setenv(hconsole.LOG_INTERVAL_ENV, "2.5")
    assert log_interval() == 2.5
    monkeypatch.setenv(hconsole.LOG_INTERVAL_ENV, "0")
    assert log_interval() == math.inf
    for bad in ("-1", "nan", "inf", "x"):
        monkeypatch.setenv(hconsole.LOG_INTERVAL_ENV, bad)
        with pytest.raises(hconsole.ConfigError, match="HIERCLS_LOG_INTERVAL"):
            log_interval()


def test_a_line_every_interval_in_a_log(monkeypatch) -> None:
    """With the default 30 s: one line per 30 s of an epoch, none for its last step."""
    monkeypatch.delenv(hconsole.LOG_INTERVAL_ENV, raising=False)
    buffer = io.StringIO()
    log = Console(file=buffer, width=80)
    assert is_log(log) and not bars_enabled(log)
    now = [0.0]
    shown = EpochProgress(log, "epoch 1/3 joint", total=12, clock=lambda: now[0])
    shown.start()
    reads = []
    for step in range(12):
        now[0] += 10.0  # 10 s per step of 32 images
        shown.step(32, lambda step=step: reads.append(step) or 1.5)
    shown.stop()
    lines = buffer.getvalue().splitlines()
    assert lines == [f"epoch 1/3 joint: step {k}/12, 3.2 img/s, loss 1.5000, {10 * k} s" for k in (3, 6, 9)]
    assert reads == [2, 5, 8]  # the loss is read (a device sync) only when a line is printed


def test_the_terminal_bar_shows_the_running_loss_from_the_first_step() -> None:
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=200)
    assert not is_log(terminal) and bars_enabled(terminal) and not bars_enabled(terminal, wanted=False)
    shown = EpochProgress(terminal, "epoch 1/3 joint", total=100)
    shown.start()
    shown.step(32, lambda: 2.3456)
    shown.bar.refresh()
    shown.stop()
    assert "loss 2.3456" in buffer.getvalue()


def test_fit_shows_the_trainers_running_loss_on_the_bar_before_any_check(project: Path, monkeypatch) -> None:
    """Through the engine: the bar gets a finite loss after step 1, long before the first check."""
    calls: list[tuple[int, float]] = []

    class Recording(EpochProgress):
        def show_loss(self, loss, now=None):
            calls.append((self.done, loss))
            super().show_loss(loss, now)

    monkeypatch.setattr(engine, "EpochProgress", Recording)
    monkeypatch.setattr(hconsole, "BAR_LOSS_SECONDS", 1e9)  # only the early steps and the checks, however slow
    config = FitConfig(taxonomy=project / "tiny.yaml", data=project / "data", out=project / "runs" / "bar",
                       backbone="test_resnet", img_size=16, epochs=1, batch_size=4, device="cpu",
                       cache_dir=project / "cache")
    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    engine.fit(config, terminal, overwrite=True)
    assert calls[0][0] == 1 and math.isfinite(calls[0][1]) and calls[0][1] > 0, calls
    # 32 training images in steps of 4: the early readings, then the trainer's check at the last step
    assert [done for done, _ in calls] == [1, 2, 4, 8, 8]


def test_make_console_never_wraps_in_a_log(capsys) -> None:
    console = make_console(stderr=False)  # pytest captures stdout: a log
    assert is_log(console) and console.width >= 1000
    console.print("word " * 60)
    console.rule("a title")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("word " * 60).rstrip() or out[0] == "word " * 60
    assert len(out[1]) == hconsole.LOG_RULE_WIDTH and "a title" in out[1]
