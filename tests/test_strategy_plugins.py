"""Strategies and aggregators come from the plugin registry, like backbones and losses."""

from __future__ import annotations

from pathlib import Path

import pytest

from hiercls.cli import main
from hiercls.errors import ConfigError
from hiercls.hookspecs import hookimpl
from hiercls.plugins import get_plugin_manager, strategy_names
from hiercls.strategies import flat

from conftest import write_smears

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"


class LeafSoftmax:
    """A plugin strategy: the flat softmax under another name, with an option of its own."""

    DEFAULT_OPTIONS = {**flat.DEFAULT_OPTIONS, "note": "plugin"}

    @staticmethod
    def build(taxonomy, backbone_factory, loss_factory, node_counts, options):
        options = {k: v for k, v in options.items() if k != "note"}
        return flat.build(taxonomy, backbone_factory, loss_factory, node_counts, options)


class StrategyPlugin:
    @staticmethod
    @hookimpl
    def register_strategies(register):
        register("leaf_softmax", LeafSoftmax)


@pytest.fixture
def strategy_plugin():
    pm = get_plugin_manager()
    pm.register(StrategyPlugin, name="leaf-softmax-test-plugin")
    yield
    pm.unregister(StrategyPlugin)


def test_builtin_strategies_come_from_the_registry():
    assert strategy_names()[:4] == ("flat", "per_node", "per_level", "joint")


def test_a_plugin_strategy_is_listed_and_trains_with_fit(strategy_plugin, tmp_path, capsys):
    assert main(["plugins", "--strategies"]) == 0
    listed = capsys.readouterr().out
    assert "leaf_softmax" in listed and "leaf-softmax-test-plugin" in listed and "note='plugin'" in listed

    data = write_smears(tmp_path / "data", ("Normal", "Reactive", "ALL", "AML", "CLL", "CML"), per_label=3, seed=1)
    run = tmp_path / "run"
    assert main(["fit", "--taxonomy", str(LEUKEMIA), "--data", str(data), "--out", str(run),
                 "--strategy", "leaf_softmax", "--backbone", "test_resnet", "--img-size", "16", "--epochs", "1",
                 "--batch-size", "6", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
                 "--allow-incomplete-tree", "--no-progress"]) == 0
    assert (run / "checkpoints" / "last.safetensors").is_file()
    assert main(["predict", "--run", str(run), "--checkpoint", "last", "--data", str(data / "ALL"),
                 "--out", str(tmp_path / "p.csv"), "--device", "cpu", "--no-progress"]) == 0


def test_an_unknown_strategy_names_the_registered_ones(tmp_path):
    from hiercls.config import load_config

    with pytest.raises(ConfigError, match="unknown strategy 'jiont' \\(did you mean joint\\?\\).*available: flat"):
        load_config(None, {"taxonomy": str(LEUKEMIA), "data": str(tmp_path), "out": str(tmp_path / "r"),
                           "strategy": "jiont"})
