"""Wrong option values give one clear line: `--device` on every command, backbone options by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from hiercls.cli import main
from hiercls.errors import ConfigError
from hiercls.models.backbone import create_backbone, rejected_options
from hiercls.runtime import resolve_device

from conftest import write_smears  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
LABELS = ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML", "Acute")


@pytest.mark.parametrize("name", ["gpu", "cudax", "cuda:abc", "cuda:", "meta", "CPU", ""])
def test_resolve_device_refuses_names_fit_refuses(name):
    with pytest.raises(ConfigError, match=f"'{name}' is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_resolve_device_keeps_valid_names():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("device")
    smears = write_smears(root / "data", LABELS, per_label=3, seed=1)
    run = root / "run"
    code = main([
        "fit", "--taxonomy", str(LEUKEMIA), "--data", str(smears), "--out", str(run), "--backbone", "test_resnet",
        "--img-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
        "--group-regex", r"^(slide\d)_", "--val-fraction", "0.34", "--cache-dir", str(root / "cache"),
        "--no-progress",
    ])
    assert code == 0
    return run, smears


@pytest.mark.parametrize("command", ["predict", "evaluate", "calibrate", "explain"])
def test_every_command_refuses_a_wrong_device_in_one_line(command, tiny_run, tmp_path, capsys):
    run, smears = tiny_run
    extra = {
        "predict": ["--data", str(smears), "--out", str(tmp_path / "p.csv")],
        "evaluate": ["--split", "val", "--out", str(tmp_path / "ev")],
        "calibrate": [],
        "explain": ["--images", str(next(smears.rglob("*.jpg"))), "--out", str(tmp_path / "ex")],
    }[command]
    capsys.readouterr()
    code = main([command, "--run", str(run), *extra, "--device", "gpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'gpu' is not a device; use auto, cpu, cuda or cuda:N" in err
    assert "Traceback" not in err
    assert not (run / "calibration.json").exists()  # refused before anything was written


def test_timm_backbone_error_names_only_the_rejected_option():
    with pytest.raises(ConfigError, match="does not accept option") as info:
        create_backbone("test_resnet", drop_rate=0.1, foo_bar=3)
    blamed = str(info.value).split(" (")[0]  # the TypeError follows in brackets
    assert "foo_bar" in blamed and "drop_rate" not in blamed
    create_backbone("test_resnet", drop_rate=0.1)  # the valid option alone builds


def test_torchvision_backbone_error_names_only_the_rejected_option():
    with pytest.raises(ConfigError, match="does not accept option") as info:
        create_backbone("tv/resnet18", zero_init_residual=True, foo_bar=3)
    blamed = str(info.value).split(" (")[0]  # the TypeError follows in brackets
    assert "foo_bar" in blamed and "zero_init_residual" not in blamed


def test_rejected_options_falls_back_to_all_when_the_name_is_not_the_users():
    given = {"b": 1, "a": 2}
    assert rejected_options(TypeError("f() got an unexpected keyword argument 'a'"), given) == ["a"]
    # a factory that passed on a keyword of its own: no given option can be ruled out
    assert rejected_options(TypeError("f() got an unexpected keyword argument 'z'"), given) == ["a", "b"]
