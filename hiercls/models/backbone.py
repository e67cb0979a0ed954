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

import inspect
import logging
import re
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
    "rejected_options",
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


def create_backbone(
    name: str, pretrained: str | Path | None = None, *, run_img_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """Build the feature extractor called ``name`` through the plugin that serves that name.

    ``pretrained`` is ``None`` (random initialisation) or the path of a local weights file;
    ``kwargs`` go to the plugin's factory (for timm e.g. ``img_size=224``, ``drop_path_rate=0.1``).
    The result always has ``num_features``, ``gradcam_layer``, ``is_token_model`` and
    ``num_prefix_tokens`` (see the module docstring).

    ``run_img_size`` is the side of the images the backbone will see (a run's ``img_size``).
    A factory that declares an ``img_size`` parameter receives it (unless ``kwargs`` sets
    ``img_size``), so fixed-size models such as ViTs are built for it. The backbone is then
    checked once with a dry forward of two images at that size: a factory or forward that
    fails, or an output that is not ``[2, num_features]`` floats, raises ``ConfigError``
    naming the backbone, the plugin and, when the size is the problem, sizes that work.
    """
    from hiercls.plugins import find_backbone

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"backbone name must be a non-empty string, got {name!r}")
    if run_img_size is not None and (
        isinstance(run_img_size, bool) or not isinstance(run_img_size, int) or run_img_size < 1
    ):
        raise ConfigError(f"image size for backbone '{name}' must be a positive integer, got {run_img_size!r}")
    registration = find_backbone(name)
    options = _factory_options(registration.factory, kwargs, run_img_size)
    try:
        model = _build(registration, name, pretrained, options, kwargs)
        model = _complete_attributes(model, name, registration.plugin, run_img_size)
        if run_img_size is not None:
            _check_once(model, registration, name, pretrained, options, run_img_size)
    except _DryRunFailure as failure:
        raise _size_or_plugin_error(failure, registration, name, kwargs, options, run_img_size) from None
    return model


def _factory_options(factory: Any, kwargs: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """The factory's keyword arguments: the user's options plus ``img_size`` where it is declared."""
    options = dict(kwargs)
    if image_size is not None and "img_size" not in options and _declares(factory, "img_size"):
        options["img_size"] = image_size
    return options


def _declares(factory: Any, parameter: str) -> bool:
    """True when ``factory`` names ``parameter`` in its signature (a ``**kwargs`` does not count)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    found = params.get(parameter)
    return found is not None and found.kind in (found.POSITIONAL_OR_KEYWORD, found.KEYWORD_ONLY)


class _DryRunFailure(Exception):
    """The factory or the dry forward raised (a plugin bug, or a size the model cannot take)."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(stage)
        self.stage = stage
        self.reason = _first_line(exc)
        self.model: nn.Module | None = None


def rejected_options(exc: TypeError, given: dict[str, Any]) -> list[str]:
    """The options of ``given`` that a constructor's "unexpected keyword argument" TypeError names.

    Python names the first rejected keyword only; when it is not one of ``given`` (a factory
    passed it on), every given option is returned, as none can be ruled out.
    """
    named = re.findall(r"unexpected keyword argument '([^']+)'", str(exc))
    return [name for name in named if name in given] or sorted(given)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _build(
    registration: Any, name: str, pretrained: str | Path | None, options: dict[str, Any], kwargs: dict[str, Any]
) -> nn.Module:
    """Call the plugin's factory; a failure other than a user mistake becomes ``_DryRunFailure``."""
    try:
        return registration.factory(name, pretrained=pretrained, **options)
    except HierclsError:
        raise
    except TypeError as exc:
        if kwargs and "unexpected keyword" in str(exc):
            raise ConfigError(
                f"backbone '{name}' (plugin {registration.plugin}) does not accept option(s) "
                f"{', '.join(rejected_options(exc, kwargs))}: {exc}. Remove them from the backbone options."
            ) from None
        raise _DryRunFailure("its factory raised", exc) from None
    except Exception as exc:
        raise _DryRunFailure("its factory raised", exc) from None


def _complete_attributes(model: nn.Module, name: str, plugin: str, image_size: int | None = None) -> nn.Module:
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
        layer = find_gradcam_layer(model, (3, image_size, image_size) if image_size else None)
        _set_plain(model, "gradcam_layer", layer)
    if not hasattr(model, "is_token_model"):
        _set_plain(model, "is_token_model", False)
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


# ---------------------------------------------------------------------------------------
# The dry forward: a new backbone must map two images to [2, num_features] floats

# (factory, name, weights, image size, options) of backbones that passed: checked once per process
_CHECKED: set[tuple[Any, ...]] = set()
_NOT_FINITE = "NaN or infinite features"


def _check_once(
    model: nn.Module, registration: Any, name: str, pretrained: Any, options: dict[str, Any], image_size: int
) -> None:
    key = (registration.factory, name, str(pretrained), image_size, repr(sorted(options.items())))
    if key in _CHECKED:
        return
    problem = _dry_forward(model, image_size)
    if problem == _NOT_FINITE and pretrained is not None:
        raise ConfigError(
            f"backbone '{name}' with the weights of {pretrained} gives {problem} on 2 images of {image_size} px; "
            "is the weights file damaged, or made for another model?"
        )
    if problem:
        raise ConfigError(
            f"backbone '{name}' from plugin {registration.plugin}: on 2 images of {image_size} px its forward "
            f"returned {problem}; expected a float tensor of shape [2, {model.num_features}] (one row of pooled "
            "features per image, num_features wide). The plugin's factory must be fixed; report it to its authors"
        )
    _CHECKED.add(key)


@torch.no_grad()
def _dry_forward(model: nn.Module, image_size: int) -> str | None:
    """What is wrong with the model's output on two different images (``None``: nothing).

    Runs in eval mode without gradients; the images come from a private generator, so the
    check leaves the global random state (and with it a seeded run) untouched. A forward that
    raises becomes ``_DryRunFailure`` carrying the model, so sizes that work can be probed.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, image_size, image_size, generator=generator).to(device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        output = model(images)
    except Exception as exc:
        failure = _DryRunFailure(f"a forward of 2 images of {image_size} px raised", exc)
        failure.model = model
        raise failure from None
    finally:
        model.train(was_training)
    return _output_problem(output, int(model.num_features))


def _output_problem(output: Any, num_features: int) -> str | None:
    if not isinstance(output, torch.Tensor):
        return f"a {type(output).__name__}, not a tensor"
    shape = f"[{', '.join(str(d) for d in output.shape)}]"
    if not output.is_floating_point():
        return f"a {output.dtype} tensor of shape {shape}, not floats"
    if output.ndim != 2:
        return f"a rank-{output.ndim} tensor of shape {shape}" + (" (features not pooled?)" if output.ndim > 2 else "")
    if tuple(output.shape) != (2, num_features):
        hint = " (one row for the whole batch instead of one per image)" if output.shape[0] == 1 else ""
        if output.shape[0] == 2:
            hint = f" (its num_features says {num_features})"
        return f"shape {shape}{hint}"
    if not bool(torch.isfinite(output).all()):
        return _NOT_FINITE
    if torch.equal(output[0], output[1]):
        return "the same features for two different images (does it mix the batch?)"
    return None


def _size_or_plugin_error(
    failure: _DryRunFailure, registration: Any, name: str, kwargs: dict[str, Any],
    options: dict[str, Any], image_size: int | None,
) -> ConfigError:
    """One clear line: the sizes the model takes when the size is the problem, else the plugin at fault."""
    plugin = registration.plugin
    sized = "img_size" in options  # the factory builds the model for a given size
    own = kwargs.get("img_size")
    if image_size is not None and own is not None and own != image_size and \
            _runs_at(registration, name, options, image_size, None):
        return ConfigError(
            f"backbone '{name}' is built for {own} px images by its backbone option img_size={own}, but the "
            f"images are {image_size} px ({failure.reason}): remove img_size from the backbone options"
        )
    if image_size is not None and (failure.model is not None or sized):
        works = _sizes_that_work(registration, name, options, image_size, failure.model)
        if works:
            other = "" if sized else " (or the plugin's own size option in backbone_kwargs, if it has one)"
            return ConfigError(
                f"backbone '{name}' (plugin {plugin}) cannot take {image_size} px images ({failure.reason}); "
                f"{works}: set img_size (--img-size) accordingly{other}."
            )
    return ConfigError(
        f"backbone '{name}' from plugin {plugin} is broken: {failure.stage} ({failure.reason}). "
        "Check its backbone options, else report it to the plugin's authors"
    )


def _sizes_that_work(
    registration: Any, name: str, options: dict[str, Any], image_size: int, model: nn.Module | None
) -> str:
    """Try the neighbouring multiples of the model's stride, then its default size; describe what ran."""
    step = _size_step(model)
    lower, upper = (image_size - 1) // step * step, (image_size // step + 1) * step
    tried = [s for s in (lower, upper) if s >= step]
    ran = [s for s in tried if _runs_at(registration, name, options, s, model)]
    if len(ran) == 2:
        return f"it runs at e.g. {lower} or {upper} px (multiples of {step})"
    if ran:
        return f"it runs at e.g. {ran[0]} px"
    default = _default_size(model)
    if default not in (image_size, *tried) and _runs_at(registration, name, options, default, model):
        return f"it runs at {default} px (its default size) but not at {' or '.join(map(str, tried))} px"
    return ""


def _runs_at(registration: Any, name: str, options: dict[str, Any], size: int, model: nn.Module | None) -> bool:
    """True when the backbone (rebuilt for ``size`` when its factory takes a size) gives good features."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "img_size" in options:
                model = registration.factory(name, pretrained=None, **{**options, "img_size": size})
            return model is not None and _dry_forward(model, size) is None
    except Exception:  # any failure means: not this size
        return False


def _size_step(model: nn.Module | None) -> int:
    """The model's total stride (timm's ``feature_info`` reductions, or its patch size); 32 if unknown."""
    steps = []
    try:
        steps += [int(info["reduction"]) for info in getattr(model, "feature_info", None) or ()]
    except (KeyError, TypeError, ValueError):
        pass
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(patch, (tuple, list)) and patch:
        steps.append(int(patch[0]))
    elif isinstance(patch, int):
        steps.append(patch)
    return max([s for s in steps if s > 0] or [32])


def _default_size(model: nn.Module | None) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if isinstance(size, (tuple, list)) and size else 224
