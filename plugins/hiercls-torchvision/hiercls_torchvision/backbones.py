"""Build a torchvision classification model as a pooled-feature backbone."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from hiercls.errors import ConfigError
from hiercls.models.backbone import (
    find_gradcam_layer,
    load_backbone_weights,
    read_weights_file,
    rejected_options,
    set_backbone_attributes,
)

PREFIX = "tv/"
# The torchvision models compared in Hamdi et al. (Table 1) and their close relatives.
PAPER_MODELS = ("resnet18", "resnet50", "googlenet", "densenet121", "convnext_tiny", "vit_b_16")

# Models with auxiliary classifiers: a backbone needs only the main path.
_NO_AUX = {"googlenet": {"aux_logits": False, "init_weights": True}, "inception_v3": {"aux_logits": False, "init_weights": True}}

# torchvision's ImageNet GoogLeNet was trained on inputs scaled to [-1, 1]; built with those
# weights it sets transform_input=True, which maps ImageNet-normalised inputs (what hiercls
# feeds) back to that scale, channel by channel: x * std / 0.5 + (mean - 0.5) / 0.5.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class GoogLeNetBackbone(torchvision.models.GoogLeNet):
    """torchvision's GoogLeNet whose input transform travels with its weights.

    ``transform_input`` is a plain attribute in torchvision, so a run rebuilt from its own
    checkpoint (without the ImageNet file) would forget it and feed the network other inputs
    than it was trained on. Here the transform is two buffers, ``input_scale`` and
    ``input_shift`` (identity when off), saved in every checkpoint. A checkpoint from before
    they existed loads as the identity, which is how it was trained.
    """

    def __init__(self, transform_input: bool = False, **kwargs: Any) -> None:
        super().__init__(transform_input=False, **kwargs)
        if transform_input:
            scale = [s / 0.5 for s in _IMAGENET_STD]
            shift = [(m - 0.5) / 0.5 for m in _IMAGENET_MEAN]
        else:
            scale, shift = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
        self.register_buffer("input_scale", torch.tensor(scale).view(1, 3, 1, 1))
        self.register_buffer("input_shift", torch.tensor(shift).view(1, 3, 1, 1))

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.input_scale + self.input_shift

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        for name in ("input_scale", "input_shift"):  # older checkpoints: no transform, as trained
            identity = torch.ones(1, 3, 1, 1) if name == "input_scale" else torch.zeros(1, 3, 1, 1)
            state_dict.setdefault(prefix + name, identity)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


EXPORT_HINT = (
    "hiercls never downloads weights: on a machine with internet run "
    "`python -c \"import torch, torchvision; torch.save(torchvision.models.get_model('{arch}', "
    "weights='DEFAULT').state_dict(), '{arch}.pth')\"` and pass the copied file"
)


def available_models() -> list[str]:
    """torchvision's classification model names."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def create_torchvision_backbone(name: str, pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """``tv/<arch>`` -> torchvision model without classifier; ``pretrained`` a local state dict file.

    ``kwargs`` go to the torchvision builder (e.g. ``image_size=224`` for ViTs, whose input
    size is fixed when the model is built: ``tv/vit_b_16`` expects 224 x 224 images unless
    ``image_size`` says otherwise, and it must be a multiple of the patch size).
    """
    arch = name[len(PREFIX):] if name.startswith(PREFIX) else name
    models = available_models()
    if arch not in models:
        close = difflib.get_close_matches(arch, models, n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(PREFIX + c for c in close)}." if close else ""
        raise ConfigError(
            f"unknown backbone '{name}': torchvision has no classification model '{arch}'.{hint} "
            f"Available: {PREFIX}<one of torchvision.models.list_models(module=torchvision.models)>"
        )
    options = {**_NO_AUX.get(arch, {}), **kwargs}
    if "weights" in options or "num_classes" in options:
        raise ConfigError(f"backbone '{name}': options weights / num_classes are set by hiercls; use `pretrained: PATH`")
    if arch == "googlenet":  # as torchvision does when it loads the ImageNet weights
        options.setdefault("transform_input", pretrained is not None)
    try:
        if arch == "googlenet":
            model = GoogLeNetBackbone(**options)
        else:
            model = torchvision.models.get_model(arch, weights=None, **options)
    except TypeError as exc:
        rejected = ", ".join(rejected_options(exc, kwargs))
        raise ConfigError(f"backbone '{name}' does not accept option(s) {rejected} ({exc})") from None
    except ValueError as exc:  # torchvision validates e.g. ViT image_size against the patch size
        raise ConfigError(f"backbone '{name}': {exc}") from None
    removed, num_features = _remove_classifier(model, name)
    if pretrained is not None:
        path = _weights_path(pretrained, arch)
        state = read_weights_file(path, name)
        if isinstance(model, GoogLeNetBackbone):  # a torchvision file has no transform buffers: keep ours
            state = {**state, "input_scale": model.input_scale, "input_shift": model.input_shift}
        load_backbone_weights(model, state, str(path), name, skip_prefixes=(removed + ".",))
    layer, is_token, prefix_tokens = _gradcam_target(model, arch)
    return set_backbone_attributes(
        model, num_features=num_features, gradcam_layer=layer, is_token_model=is_token, num_prefix_tokens=prefix_tokens
    )


def _weights_path(pretrained: Any, arch: str) -> Path:
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, Path)):
        raise ConfigError(f"pretrained for 'tv/{arch}' must be a local file path, got {pretrained!r}; "
                          + EXPORT_HINT.format(arch=arch))
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} does not exist; " + EXPORT_HINT.format(arch=arch))
    return path


def _remove_classifier(model: nn.Module, name: str) -> tuple[str, int]:
    """Replace the final ``Linear`` of the classifier by ``Identity``; (its qualified name, in_features)."""
    for attribute in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return attribute, head.in_features
        if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
            last = len(head) - 1
            in_features = head[last].in_features
            key = list(head._modules)[last]
            head._modules[key] = nn.Identity()
            return f"{attribute}.{key}", in_features
    raise ConfigError(
        f"backbone '{name}': its classifier does not end in a linear layer, so hiercls cannot take "
        "pooled features from it; choose another model"
    )


def _gradcam_target(model: nn.Module, arch: str) -> tuple[nn.Module | None, bool, int]:
    """(Grad-CAM layer, token model?, prefix tokens) for torchvision's families."""
    if arch.startswith("vit_"):
        return model.encoder.layers[-1], True, 1
    if arch.startswith("swin"):  # its stages work channels-last; `permute` gives [B, C, H, W]
        return model.permute, False, 0
    for attribute in ("layer4", "inception5b", "Mixed_7c", "trunk_output", "conv5", "features", "layers"):
        layer = getattr(model, attribute, None)
        if isinstance(layer, nn.Module):
            return layer, False, 0
    return find_gradcam_layer(model, (3, 224, 224)), False, 0
