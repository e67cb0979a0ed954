"""Backbones: a model name becomes a feature extractor with one uniform surface.

Whatever plugin builds it (timm by default, ``tv/...`` from hiercls-torchvision, ...),
the module returned by :func:`create_backbone` maps images ``[B, 3, H, W]`` to pooled
features ``[B, num_features]`` and carries what Grad-CAM needs:

- ``num_features`` (int): width of the pooled feature vector;
- ``gradcam_layer`` (``nn.Module`` or ``None``): the module whose activations Grad-CAM
  hooks (last convolutional stage of a CNN, last transformer block of a ViT);
- ``is_token_model`` (bool): the activations of ``gradcam_layer`` are tokens ``[B, T, C]``
  rather than maps ``[B, C, H, W]``;
- ``num_prefix_tokens`` (int): class / register tokens in front of the patch tokens.

The helpers :func:`read_weights_file` and :func:`load_backbone_weights` load a local
weights file with the same checks for every plugin: hiercls never downloads weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercls.errors import ConfigError, HierclsError

__all__ = [
    "WeightsReport",
    "create_backbone",
    "find_gradcam_layer",
    "load_backbone_weights",
    "read_weights_file",
    "set_backbone_attributes",
    "weights_file",
]

logger = logging.getLogger("hiercls")

# Where a weights file for a model name can come from, for error messages.
EXPORT_HINT = (
    "hiercls never downloads weights: on a machine with internet run e.g. "
    "`python -c \"import timm, torch; torch.save(timm.create_model('{name}', pretrained=True).state_dict(), "
    "'{name}.pth')\"` (or save it with safetensors) and pass the copied file"
)


def create_backbone(name: str, pretrained: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build the feature extractor called ``name`` through the plugin that serves that name.

    ``pretrained`` is ``None`` (random initialisation) or the path of a local weights file;
    ``kwargs`` go to the plugin's factory (for timm e.g. ``img_size=224``, ``drop_path_rate=0.1``).
    The result always has ``num_features``, ``gradcam_layer``, ``is_token_model`` and
    ``num_prefix_tokens`` (see the module docstring).
    """
    from hiercls.plugins import find_backbone

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"backbone name must be a non-empty string, got {name!r}")
    registration = find_backbone(name)
    try:
        model = registration.factory(name, pretrained=pretrained, **kwargs)
    except HierclsError:
        raise
    except TypeError as exc:
        if kwargs and "unexpected keyword" in str(exc):
            raise ConfigError(
                f"backbone '{name}' (plugin {registration.plugin}) does not accept option(s) "
                f"{', '.join(sorted(kwargs))}: {exc}. Remove them from the backbone options."
            ) from None
        raise
    return _complete_attributes(model, name, registration.plugin)


def _complete_attributes(model: nn.Module, name: str, plugin: str) -> nn.Module:
    """Check the factory's contract and fill in the Grad-CAM attributes a plugin left out."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"plugin {plugin} built {type(model).__name__} for backbone '{name}', not a torch module")
    num_features = getattr(model, "num_features", None)
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
        raise ConfigError(
            f"backbone '{name}' from plugin {plugin} has no positive integer `num_features` "
            f"(got {num_features!r}); the plugin must set it"
        )
    if not hasattr(model, "gradcam_layer"):
        layer = getattr(model, "feature_layer", None)  # older spelling accepted from plugins
        if not isinstance(layer, nn.Module):
            layer = find_gradcam_layer(model)
        _set_plain(model, "gradcam_layer", layer)
    if not hasattr(model, "is_token_model"):
        _set_plain(model, "is_token_model", bool(getattr(model, "is_vit", False)))
    _set_plain(model, "num_prefix_tokens", int(getattr(model, "num_prefix_tokens", 0) or 0))
    return model


def _set_plain(model: nn.Module, attribute: str, value: Any) -> None:
    """Set an attribute without registering it as a sub-module.

    ``gradcam_layer`` points at a module already inside ``model``; registering it a second
    time would duplicate its weights in ``state_dict`` and in ``parameters()``.
    """
    object.__setattr__(model, attribute, value)


def set_backbone_attributes(
    model: nn.Module,
    *,
    num_features: int,
    gradcam_layer: nn.Module | None,
    is_token_model: bool = False,
    num_prefix_tokens: int = 0,
) -> nn.Module:
    """Attach the uniform backbone attributes to ``model`` (for plugin factories) and return it."""
    _set_plain(model, "num_features", int(num_features))
    _set_plain(model, "gradcam_layer", gradcam_layer)
    _set_plain(model, "is_token_model", bool(is_token_model))
    _set_plain(model, "num_prefix_tokens", int(num_prefix_tokens))
    return model


_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Identity)


@torch.no_grad()
def find_gradcam_layer(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> nn.Module | None:
    """The last module with a spatial 4-D output in a dry forward pass, or ``None``.

    Used when nothing better is known about an architecture: a forward pass of one small
    random image records which modules produce ``[B, C, H, W]`` maps with ``H * W > 1``;
    the last one to finish (an outer stage finishes after its inner blocks) is the last
    convolutional stage. Pooling layers are skipped.
    """
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        input_size = tuple(cfg.get("input_size", (3, 224, 224)))  # type: ignore[assignment]
    found: list[nn.Module] = []

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            if not isinstance(module, _POOLING) and module is not model:
                found.append(module)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.randn(1, *input_size, device=device))
    except Exception as exc:  # an architecture that cannot run a plain image: no Grad-CAM layer
        logger.debug("dry forward for Grad-CAM layer failed: %s", exc)
        return None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------
# Local weights files


@dataclass(frozen=True)
class WeightsReport:
    """What loading a weights file did: tensors loaded, left random, and unused."""

    source: str
    loaded: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {self.loaded} tensors; {len(self.missing)} missing (left randomly "
            f"initialised), {len(self.unexpected)} unexpected and {len(self.mismatched)} with another shape (ignored)"
        )


def weights_file(pretrained: Any, backbone_name: str) -> Path:
    """Validate ``pretrained`` as the path of an existing local weights file."""
    if isinstance(pretrained, bool) or not isinstance(pretrained, (str, Path)) or not str(pretrained).strip():
        raise ConfigError(
            f"pretrained for backbone '{backbone_name}' must be the path of a local weights file, "
            f"got {pretrained!r}; " + EXPORT_HINT.format(name=_bare(backbone_name))
        )
    path = Path(pretrained).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"pretrained weights file {path} {what}; " + EXPORT_HINT.format(name=_bare(backbone_name))
        )
    return path


def _bare(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def read_weights_file(path: str | Path, backbone_name: str = "") -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file (never executes pickled code).

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are
    unwrapped and a ``module.`` prefix (DistributedDataParallel) is removed.
    """
    path = weights_file(path, backbone_name or Path(path).stem)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"{path}: cannot read weights ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "expected a safetensors file or a torch state dict saved with torch.save(model.state_dict(), ...)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: holds a {type(data).__name__}, not a state dict of named tensors")
    state = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConfigError(f"{path}: contains no tensors; is it a weights file?")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_backbone_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    backbone_name: str,
    skip_prefixes: Iterable[str] = (),
) -> WeightsReport:
    """Copy matching tensors of ``state_dict`` into ``model`` (non-strict) and report counts.

    Keys under ``skip_prefixes`` (the removed classifier) are dropped first. Tensors whose
    name is unknown or whose shape differs are ignored and counted; when nothing matches,
    the file belongs to another architecture and ``ConfigError`` says so. A warning is
    issued when some of the model's tensors stay randomly initialised.
    """
    prefixes = tuple(skip_prefixes)
    incoming = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
    own = model.state_dict()
    matched = {k: v for k, v in incoming.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    mismatched = tuple(k for k in incoming if k in own and k not in matched)
    unexpected = tuple(k for k in incoming if k not in own)
    missing = tuple(k for k in own if k not in matched)
    if not matched:
        theirs = ", ".join(list(incoming)[:3]) or "none"
        ours = ", ".join(list(own)[:3])
        raise ConfigError(
            f"{source}: none of its {len(incoming)} tensors fit backbone '{backbone_name}' "
            f"(file has e.g. {theirs}; the model expects e.g. {ours}); use a weights file of this architecture"
        )
    model.load_state_dict(matched, strict=False)
    report = WeightsReport(source, len(matched), missing, unexpected, mismatched)
    _announce(report)
    return report


def _announce(report: WeightsReport) -> None:
    logger.info(report.summary())
    if report.missing or report.mismatched:
        warnings.warn(report.summary(), UserWarning, stacklevel=3)
