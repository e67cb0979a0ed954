"""FitConfig: YAML + command-line precedence, path resolution, error messages, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hiercls.config import FitConfig, load_config
from hiercls.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"taxonomy": "t.yaml", "data": "d", "out": "o"}


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def test_defaults_and_overrides_only_from_given_options():
    config = load_config(None, {**REQUIRED, "lr": None, "epochs": 3})
    assert config.epochs == 3
    assert config.lr == FitConfig.model_fields["lr"].default  # None means "not given"
    assert config.strategy == "joint" and config.effective_val_fraction == 0.2
    assert config.augment.hflip and config.augment.rot90


def test_command_line_wins_over_file_and_file_wins_over_defaults(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**REQUIRED, "lr": 0.01, "epochs": 5, "augment": {"vflip": False}})
    config = load_config(path, {"epochs": 2, "augment": {"color_jitter": 0.0}})
    assert config.epochs == 2  # command line
    assert config.lr == 0.01  # file
    assert config.batch_size == 32  # default
    assert config.augment.vflip is False and config.augment.color_jitter == 0.0  # merged sections


def test_paths_in_a_file_are_relative_to_the_file(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write_yaml(sub / "c.yaml", {"taxonomy": "../tree.yaml", "data": "data", "out": "/abs/run"})
    config = load_config(path, {})
    assert config.taxonomy == (tmp_path / "tree.yaml").resolve()
    assert config.data == (sub / "data").resolve()
    assert config.out == Path("/abs/run")


def test_fold_on_command_line_replaces_val_fraction_of_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**REQUIRED, "val_fraction": 0.3})
    config = load_config(path, {"fold": 1, "folds": 4})
    assert (config.fold, config.folds, config.val_fraction) == (1, 4, None)


def test_unknown_option_in_file_names_file_option_and_valid_ones(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {**REQUIRED, "learning_rate": 0.1})
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    message = str(info.value)
    assert str(path) in message and "learning_rate" in message and "lr" in message


def test_bad_choice_on_command_line_names_flag_and_choices():
    with pytest.raises(ConfigError) as info:
        load_config(None, {**REQUIRED, "strategy": "tree"})
    message = str(info.value)
    assert "--strategy" in message and "per_node" in message and "'tree'" in message


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"fold": 5, "folds": 5}, "fold must be in [0, 5)"),
        ({"fold": 0}, "fold and folds go together"),
        ({"fold": 0, "folds": 3, "val_fraction": 0.2}, "not both"),
        ({"device": "gpu"}, "use auto, cpu, cuda or cuda:N"),
        ({"group_regex": "("}, "invalid regular expression"),
        ({"augment": {"crop_scale": [0.5, 1.5]}}, "at most 1.0"),
        ({"batch_size": 0}, "--batch-size"),
    ],
)
def test_invalid_values_are_config_errors(extra, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, {**REQUIRED, **extra})
    assert fragment in str(info.value)


def test_missing_required_option_says_how_to_give_it():
    with pytest.raises(ConfigError) as info:
        load_config(None, {"data": "d", "out": "o"})
    assert "--taxonomy" in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", "taxonomy: t.yaml\nlr: [1, 2\nepochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert f"{path}:" in str(info.value) and "YAML" in str(info.value)


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n"), {})


def test_to_yaml_round_trips(tmp_path):
    config = load_config(None, {**REQUIRED, "fold": 2, "folds": 3, "exclude": ["Reactive"], "lr": 1e-5})
    path = tmp_path / "saved.yaml"
    config.to_yaml(path)
    again = load_config(path, {})
    assert again.model_dump() == config.model_copy(update={
        k: (path.parent / getattr(config, k)).resolve() for k in ("taxonomy", "data", "out")
    }).model_dump()


# The six paper configs (the cv*.yaml grids next to them are `hiercls cv` files, not fit configs).
EXAMPLES = sorted(p for p in (REPO / "examples" / "leukemia").glob("*.yaml") if not p.stem.startswith("cv"))


def test_six_paper_configs_are_shipped():
    names = {p.stem for p in EXAMPLES}
    assert {f"{b}_{s}" for b in ("vit_s16", "convnext_t") for s in ("flat", "per_node", "joint")} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_configs_load(path, tmp_path):
    config = load_config(path, {"data": str(tmp_path), "out": str(tmp_path / "run")})
    assert config.taxonomy.is_file(), "the taxonomy path must resolve relative to the config file"
    assert config.img_size == 384 and config.epochs == 80 and config.lr == 1e-6
    assert config.optimizer == "adamw" and config.loss == "focal"
    assert config.backbone in ("vit_small_patch16_384", "convnext_tiny")
    assert config.strategy == path.stem.split("_", 2)[-1]


def test_deterministic_is_an_option_and_off_by_default():
    assert load_config(None, dict(REQUIRED)).deterministic is False
    assert load_config(None, {**REQUIRED, "deterministic": True}).deterministic is True
    with pytest.raises(ConfigError, match="deterministic"):
        load_config(None, {**REQUIRED, "deterministic": "sometimes"})
