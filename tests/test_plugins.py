"""Plugin discovery: built-ins, prefixes, entry-point packages under plugins/, the `plugins` command."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from torch import nn

from hiercls.cli import main
from hiercls.errors import ConfigError
from hiercls.hookspecs import hookimpl
from hiercls.models import create_backbone
from hiercls.plugins import find_backbone, find_loss, get_plugin_manager, plugin_infos


def installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_torchvision_plugin = pytest.mark.skipif(
    not installed("hiercls-torchvision"),
    reason="hiercls-torchvision is not installed: pip install -e plugins/hiercls-torchvision",
)
needs_hxe_plugin = pytest.mark.skipif(
    not installed("hiercls-hxe"), reason="hiercls-hxe is not installed: pip install -e plugins/hiercls-hxe"
)


class TinyNet(nn.Module):
    """A plugin backbone that sets only num_features: create_backbone fills in the rest."""

    num_features = 8

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


class TinyPlugin:
    @staticmethod
    @hookimpl
    def register_backbones(register):
        register("tiny/", lambda name, pretrained=None, **kw: TinyNet(), prefix=True)
        register("tiny/exact", lambda name, pretrained=None, **kw: TinyNet())


class BrokenPlugin:
    @staticmethod
    @hookimpl
    def register_losses(register):
        raise RuntimeError("boom")


@pytest.fixture
def extra_plugin():
    pm = get_plugin_manager()
    added = []

    def add(plugin, name):
        pm.register(plugin, name=name)
        added.append(plugin)

    yield add
    for plugin in added:
        pm.unregister(plugin)


def test_builtins_serve_timm_names_and_losses():
    assert find_backbone("resnet18").plugin == "hiercls.builtin.timm_backbones"
    assert find_backbone("timm/convnext_tiny").name == "timm/"
    assert {find_loss(n).plugin for n in ("ce", "weighted_ce", "focal")} == {"hiercls.builtin.losses"}
    names = {info.name for info in plugin_infos()}
    assert {"hiercls.builtin.timm_backbones", "hiercls.builtin.losses"} <= names


def test_longest_prefix_and_exact_names_win(extra_plugin):
    extra_plugin(TinyPlugin, "tiny-test-plugin")
    assert find_backbone("tiny/anything").name == "tiny/"
    assert find_backbone("tiny/exact").prefix is False
    assert find_backbone("resnet18").name == ""  # timm's empty prefix still serves the rest
    backbone = create_backbone("tiny/anything")
    assert backbone(torch.randn(2, 3, 8, 8)).shape == (2, 8)
    assert backbone.gradcam_layer is backbone.body  # found by a dry forward pass
    assert backbone.is_token_model is False


def test_a_failing_plugin_is_skipped_with_a_warning(extra_plugin):
    extra_plugin(BrokenPlugin, "broken-test-plugin")
    with pytest.warns(RuntimeWarning, match="broken-test-plugin.*boom"):
        assert find_loss("ce").plugin == "hiercls.builtin.losses"


def test_unknown_loss_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown loss 'dice'.*available: .*ce"):
        find_loss("dice")


@needs_torchvision_plugin
def test_torchvision_plugin_is_discovered_through_its_entry_point():
    registration = find_backbone("tv/googlenet")
    assert registration.plugin == "torchvision"
    assert registration.factory.__module__.startswith("hiercls_torchvision")
    assert find_backbone("tv/wide_resnet50_2").name == "tv/"  # any torchvision name via the prefix
    info = next(i for i in plugin_infos() if i.name == "torchvision")
    assert info.distribution == "hiercls-torchvision" and info.version and "register_backbones" in info.hooks


@needs_torchvision_plugin
@pytest.mark.parametrize("name, width", [("tv/googlenet", 1024), ("tv/densenet121", 1024)])
def test_torchvision_backbones_give_pooled_features_at_64px(name, width):
    backbone = create_backbone(name).eval()
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    assert backbone.num_features == width and features.shape == (2, width)
    expected_layer = backbone.inception5b if "googlenet" in name else backbone.features
    assert backbone.gradcam_layer is expected_layer and not backbone.is_token_model


@needs_torchvision_plugin
def test_torchvision_vit_is_a_token_model_and_weights_load(tmp_path):
    import torchvision

    vit = create_backbone("tv/vit_b_16", image_size=32)  # torchvision ViTs fix their input size
    with torch.no_grad():
        assert vit.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 768)
    assert vit.is_token_model and vit.num_prefix_tokens == 1 and vit.gradcam_layer is vit.encoder.layers[-1]

    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("tv/resnet18", pretrained=path)
    assert torch.equal(backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone("tv/resnet18", pretrained=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="tv/googlenet"):
        create_backbone("tv/googlenett")


@needs_hxe_plugin
def test_hxe_plugin_is_discovered_through_its_entry_point():
    assert find_loss("hxe").plugin == "hxe"
    assert find_loss("soft_labels").factory.__module__.startswith("hiercls_hxe")


def test_plugins_command_lists_providers_and_losses(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for expected in ("hiercls.builtin.timm_backbones", "any timm model name", "weighted_ce", "gamma=2.0"):
        assert expected in out
    assert main(["plugins", "--losses"]) == 0
    out = capsys.readouterr().out
    assert "focal" in out and "Backbone providers" not in out


def test_plugins_command_lists_timm_names(capsys):
    assert main(["plugins", "--list-timm", "resnet1*"]) == 0
    names = capsys.readouterr().out.split()
    assert "resnet18" in names and all(n.startswith("resnet1") for n in names)
    assert main(["plugins", "--list-timm", "no_such_model_*"]) == 2
    assert "no timm model matches" in capsys.readouterr().err
