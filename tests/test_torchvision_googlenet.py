"""tv/googlenet takes its inputs the way its ImageNet weights expect (torchvision's transform_input)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("hiercls_torchvision") is None,
    reason="hiercls-torchvision is not installed: pip install -e plugins/hiercls-torchvision",
)


def _imagenet_like_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A GoogLeNet state dict shaped like torchvision's ImageNet one (1000 classes, aux heads)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.GoogLeNet(num_classes=1000, aux_logits=True, init_weights=True)
    # calibrate the batch-norm statistics, so eval-mode features are of order 1 (not 1e-12) and a
    # wrong input transform shows far above the comparison tolerance
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    return model.state_dict()


def _torchvision_imagenet_googlenet(state: dict[str, torch.Tensor], monkeypatch) -> nn.Module:
    """torchvision's own builder with ImageNet weights, the weights served locally instead of downloaded."""
    from torchvision.models import GoogLeNet_Weights, googlenet

    monkeypatch.setattr(GoogLeNet_Weights, "get_state_dict", lambda self, *args, **kwargs: state, raising=False)
    model = googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1)
    model.fc = nn.Identity()
    return model.eval()


def _exported_file(state: dict[str, torch.Tensor], tmp_path) -> str:
    """The file the plugin's export hint makes: torchvision drops the untrained aux heads."""
    path = tmp_path / "googlenet.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}, path)
    return str(path)


def test_pretrained_googlenet_matches_torchvisions_imagenet_model(tmp_path, monkeypatch):
    from hiercls.models import create_backbone

    state = _imagenet_like_state()
    reference = _torchvision_imagenet_googlenet(state, monkeypatch)
    assert reference.transform_input is True  # what torchvision does with ImageNet weights
    ours = create_backbone("tv/googlenet", pretrained=_exported_file(state, tmp_path)).eval()
    images = torch.randn(2, 3, 64, 64)  # ImageNet-normalised, as hiercls feeds them
    with torch.no_grad():
        expected, got = reference(images), ours(images)
        reference.transform_input = False
        untransformed = reference(images)
    assert got.abs().mean() > 0.01  # features of a meaningful size
    torch.testing.assert_close(got, expected)
    assert (got - untransformed).abs().max() > 0.1 * got.abs().max()  # the transform matters


def test_the_transform_survives_a_checkpoint_reload_and_random_init_has_none(tmp_path):
    import torchvision

    from hiercls.models import create_backbone

    state = _imagenet_like_state(seed=1)
    trained = create_backbone("tv/googlenet", pretrained=_exported_file(state, tmp_path)).eval()
    rebuilt = create_backbone("tv/googlenet").eval()  # how a run is rebuilt before its checkpoint loads
    assert torch.equal(rebuilt.input_scale, torch.ones(1, 3, 1, 1))
    rebuilt.load_state_dict(trained.state_dict(), strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), trained(images))
        # random init: torchvision's default, no transform
        plain = torchvision.models.GoogLeNet(aux_logits=False, init_weights=False, transform_input=False)
        plain.fc = nn.Identity()
        plain.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("input_")})
        fresh = create_backbone("tv/googlenet").eval()
        fresh.load_state_dict(plain.state_dict(), strict=True)  # a checkpoint from before the buffers
        assert torch.equal(fresh.input_shift, torch.zeros(1, 3, 1, 1))
        torch.testing.assert_close(fresh(images), plain.eval()(images))


def test_transform_input_can_be_set_explicitly(tmp_path):
    from hiercls.models import create_backbone

    path = _exported_file(_imagenet_like_state(), tmp_path)
    assert torch.equal(create_backbone("tv/googlenet", pretrained=path, transform_input=False).input_scale,
                       torch.ones(1, 3, 1, 1))
    assert not torch.equal(create_backbone("tv/googlenet", transform_input=True).input_scale, torch.ones(1, 3, 1, 1))
