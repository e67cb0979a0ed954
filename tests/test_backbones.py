"""Backbones: timm models as pooled-feature extractors, Grad-CAM attributes, local weights only."""

from __future__ import annotations

import re

import pytest
import timm
import torch
from torch import nn

from hiercls.errors import ConfigError
from hiercls.hookspecs import hookimpl
from hiercls.models import create_backbone, find_gradcam_layer
from hiercls.models.backbone import load_backbone_weights, read_weights_file
from hiercls.plugins import get_plugin_manager


def test_resnet18_gives_pooled_features_and_gradcam_stage():
    backbone = create_backbone("resnet18")
    features = backbone(torch.randn(2, 3, 32, 32))
    assert backbone.num_features == 512
    assert features.shape == (2, 512)
    assert backbone.gradcam_layer is backbone.layer4
    assert backbone.is_token_model is False and backbone.num_prefix_tokens == 0
    # the Grad-CAM pointer must not register the stage twice
    assert not any(k.startswith("gradcam_layer") for k in backbone.state_dict())
    assert len(list(backbone.parameters())) == len(list(timm.create_model("resnet18", num_classes=0).parameters()))


def test_timm_prefix_names_timm_explicitly():
    backbone = create_backbone("timm/resnet18")
    assert backbone.num_features == 512 and type(backbone).__name__ == "ResNet"


def test_tiny_vit_is_a_token_model_at_32px():
    backbone = create_backbone("vit_tiny_patch16_224", img_size=32)
    features = backbone(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, backbone.num_features) == (2, 192)
    assert backbone.is_token_model is True
    assert backbone.num_prefix_tokens == 1
    assert backbone.gradcam_layer is backbone.blocks[-1]
    seen = []
    handle = backbone.gradcam_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    backbone(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert seen == [torch.Size([1, 1 + 4, 192])]  # class token + 2 x 2 patches


def test_gradcam_layer_fallback_is_last_spatial_stage():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.last = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return self.pool(self.last(self.stem(x))).flatten(1)

    model = Tiny()
    assert find_gradcam_layer(model, (3, 16, 16)) is model.last


def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(ConfigError, match="unknown backbone 'resnet181'.*resnet18"):
        create_backbone("resnet181")


def test_torchvision_only_name_points_to_the_plugin():
    with pytest.raises(ConfigError, match="tv/googlenet"):
        create_backbone("googlenet")


def test_remote_names_and_bad_options_are_refused():
    with pytest.raises(ConfigError, match="does not download"):
        create_backbone("hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(ConfigError, match="does not accept option"):
        create_backbone("resnet18", not_an_option=3)
    with pytest.raises(ConfigError, match="set by hiercls"):
        create_backbone("resnet18", num_classes=10)


def test_pretrained_weights_are_loaded_from_a_local_file(tmp_path):
    source = timm.create_model("resnet18")  # random init, with its 1000-class classifier
    for p in source.parameters():
        p.data.normal_()  # make sure the values differ from any fresh initialisation
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = create_backbone("resnet18", pretrained=path)
    assert torch.equal(backbone.conv1.weight, source.conv1.weight)
    assert torch.equal(backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    fresh = create_backbone("resnet18")
    assert not torch.equal(fresh.conv1.weight, source.conv1.weight)


def test_state_dict_fallback_counts_and_unwraps(tmp_path):
    source = timm.create_model("resnet18", num_classes=0)
    partial = {f"module.{k}": v for k, v in source.state_dict().items() if k.startswith("layer1.")}
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": partial}, path)
    state = read_weights_file(path, "resnet18")
    assert set(state) == {k.removeprefix("module.") for k in partial}
    target = timm.create_model("resnet18", num_classes=0)
    with pytest.warns(UserWarning, match="missing"):
        report = load_backbone_weights(target, state, str(path), "resnet18")
    assert report.loaded == len(partial)
    assert len(report.missing) == len(target.state_dict()) - len(partial)
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_safetensors_file_is_read(tmp_path):
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "r18.safetensors"
    save_file(source.state_dict(), str(path))
    backbone = create_backbone("resnet18", pretrained=str(path))
    assert torch.equal(backbone.layer2[0].conv1.weight, source.layer2[0].conv1.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", img_size=32)
    path = tmp_path / "vit.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ConfigError, match="none of its .* tensors fit backbone 'resnet18'"):
        create_backbone("resnet18", pretrained=path)


def test_missing_weights_file_explains_no_download(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=r"nope\.pth does not exist.*never downloads"):
        create_backbone("resnet18", pretrained=missing)
    with pytest.raises(ConfigError, match="local weights file"):
        create_backbone("resnet18", pretrained=True)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not weights")
    with pytest.raises(ConfigError, match="cannot read weights"):
        create_backbone("resnet18", pretrained=garbage)


# -- the dry forward: a plugin backbone is checked before training -------------------------


class FakeBackbone(nn.Module):
    """A pooled-feature extractor whose forward output can be broken on purpose."""

    def __init__(self, output: str = "good", only_size: int | None = None, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.num_features = width
        self.output = output
        self.only_size = only_size
        self.calls = 0
        object.__setattr__(self, "gradcam_layer", self.conv)  # no Grad-CAM search: count only the check

    def forward(self, x):
        self.calls += 1
        if self.only_size is not None and x.shape[-1] != self.only_size:
            raise AssertionError(f"Input height ({x.shape[-1]}) doesn't match model ({self.only_size}).")
        maps = self.conv(x)
        pooled = maps.mean(dim=(2, 3))
        return {
            "good": pooled,
            "one_row": pooled.mean(0, keepdim=True),  # one row for the whole batch
            "same_rows": pooled.mean(0, keepdim=True).expand_as(pooled),
            "ints": pooled.long(),
            "maps": maps,  # not pooled
            "narrow": pooled[:, :5],
            "nan": pooled * float("nan"),
            "tuple": (pooled,),
        }[self.output]


def _fake_factory(name, pretrained=None, **kwargs):
    kind = name.removeprefix("fake/")
    if kind == "raises":
        raise RuntimeError("cannot reach the weights server\nsecond line of detail")
    if kind == "fixed64":
        return FakeBackbone(only_size=64)
    if kind == "crash":
        return FakeBackbone(only_size=-1)
    return FakeBackbone(kind)


def _sized_factory(name, pretrained=None, img_size=224, **kwargs):
    return FakeBackbone(only_size=img_size)


class FakePlugin:
    @staticmethod
    @hookimpl
    def register_backbones(register):
        register("fake/", _fake_factory, prefix=True)
        register("sized/", _sized_factory, prefix=True)


@pytest.fixture
def fake_plugin():
    pm = get_plugin_manager()
    pm.register(FakePlugin, name="fake-backbones")
    yield
    pm.unregister(FakePlugin)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("one_row", r"shape \[1, 8\] \(one row for the whole batch instead of one per image\)"),
        ("same_rows", "the same features for two different images"),
        ("ints", r"a torch\.int64 tensor of shape \[2, 8\], not floats"),
        ("maps", r"a rank-4 tensor of shape \[2, 8, 32, 32\]"),
        ("narrow", r"shape \[2, 5\] \(its num_features says 8\)"),
        ("nan", "NaN or infinite features"),
        ("tuple", "a tuple, not a tensor"),
    ],
)
def test_a_plugin_backbone_with_a_wrong_output_is_refused_naming_the_plugin(fake_plugin, kind, message):
    with pytest.raises(ConfigError) as info:
        create_backbone(f"fake/{kind}", run_img_size=32)
    text = str(info.value)
    assert text.startswith(f"backbone 'fake/{kind}' from plugin fake-backbones: on 2 images of 32 px its forward returned")
    assert re.search(message, text), text
    assert "expected a float tensor of shape [2, 8]" in text and "\n" not in text


def test_a_factory_that_raises_names_the_plugin_and_the_first_line(fake_plugin):
    for size in (32, None):
        with pytest.raises(ConfigError) as info:
            create_backbone("fake/raises", run_img_size=size)
        assert str(info.value).startswith(
            "backbone 'fake/raises' from plugin fake-backbones is broken: its factory raised "
            "(RuntimeError: cannot reach the weights server)."
        )
        assert "second line" not in str(info.value)


def test_a_forward_that_raises_at_every_size_is_the_plugins_fault(fake_plugin):
    with pytest.raises(ConfigError, match=(
        r"^backbone 'fake/crash' from plugin fake-backbones is broken: a forward of 2 images of 32 px raised "
        r"\(AssertionError: Input height \(32\) doesn't match model \(-1\)\.\)"
    )):
        create_backbone("fake/crash", run_img_size=32)


def test_a_fixed_size_plugin_backbone_names_a_size_that_works(fake_plugin):
    with pytest.raises(ConfigError, match=(
        r"^backbone 'fake/fixed64' \(plugin fake-backbones\) cannot take 48 px images \(AssertionError: .*\); "
        r"it runs at e\.g\. 64 px: set img_size \(--img-size\) accordingly \(or the plugin's own size option"
    )):
        create_backbone("fake/fixed64", run_img_size=48)
    assert create_backbone("fake/fixed64", run_img_size=64).num_features == 8


def test_a_factory_declaring_img_size_is_built_for_the_run_size(fake_plugin):
    assert create_backbone("sized/any", run_img_size=48).only_size == 48
    assert create_backbone("sized/any", run_img_size=48, img_size=48).only_size == 48  # user's own option wins
    assert create_backbone("sized/any").only_size == 224  # no run size: the factory's default
    with pytest.raises(ConfigError, match=(
        r"^backbone 'sized/any' is built for 96 px images by its backbone option img_size=96, "
        r"but the images are 48 px \(AssertionError: .*\): remove img_size from the backbone options$"
    )):
        create_backbone("sized/any", run_img_size=48, img_size=96)


def test_a_good_backbone_is_checked_once_and_leaves_the_random_state_alone(fake_plugin):
    first = create_backbone("fake/good", run_img_size=24)
    assert first.calls == 1 and first.training  # checked in eval mode, training mode restored
    assert create_backbone("fake/good", run_img_size=24).calls == 0  # same backbone and size: not again
    assert create_backbone("fake/good", run_img_size=20).calls == 1
    torch.manual_seed(5)
    create_backbone("fake/good", run_img_size=16)
    after_check = torch.rand(3)
    torch.manual_seed(5)
    FakeBackbone()
    assert torch.equal(torch.rand(3), after_check)


def test_a_broken_plugin_stops_a_strategy_build_before_training(fake_plugin):
    from hiercls.strategies import build_strategy
    from hiercls.taxonomy import Taxonomy

    taxonomy = Taxonomy.from_nested({"a": {}, "b": {}})
    with pytest.raises(ConfigError, match="one row for the whole batch"):
        build_strategy("flat", taxonomy, backbone="fake/one_row", image_size=32)
