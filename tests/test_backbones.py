"""Backbones: timm models as pooled-feature extractors, Grad-CAM attributes, local weights only."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from hiercls.errors import ConfigError
from hiercls.models import create_backbone, find_gradcam_layer
from hiercls.models.backbone import load_backbone_weights, read_weights_file


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
