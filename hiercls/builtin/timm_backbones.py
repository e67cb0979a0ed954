"""timm as the default backbone provider: any ``timm.list_models()`` name is a backbone.

Registered for the empty prefix, so it serves every name no other plugin claims (a
longer prefix such as ``tv/`` wins), and for ``timm/`` to name timm explicitly
(``timm/convnext_tiny``). Models are built with ``num_classes=0`` so ``forward`` returns
pooled features. Weights only ever come from a local file.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hiercls.errors import ConfigError
from hiercls.hookspecs import hookimpl
from hiercls.models.backbone import (
    find_gradcam_layer,
    load_backbone_weights,
    read_weights_file,
    rejected_options,
    set_backbone_attributes,
    weights_file,
)

logger = logging.getLogger("hiercls")

# Options hiercls decides itself; a user passing them would silently change the contract.
_RESERVED = ("pretrained", "num_classes", "pretrained_cfg", "pretrained_cfg_overlay", "features_only")


@hookimpl
def register_backbones(register: Callable[..., None]) -> None:
    register("", create_timm_backbone, prefix=True)
    register("timm/", create_timm_backbone, prefix=True)


def create_timm_backbone(
    name: str, pretrained: str | Path | None = None, img_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """A timm model without classifier (pooled features), optionally with local weights.

    ``img_size`` (the run's image size) goes to the models that take it (ViT, DeiT, Swin, EVA,
    LeViT, MaxViT, ...), so their position embeddings and attention windows fit the images;
    weights made at another size are resampled by timm. Models that take any size (CNNs) are
    built without it, and so are models asked for ``dynamic_img_size``.
    """
    model_name = name[len("timm/"):] if name.startswith("timm/") else name
    _check_name(model_name)
    reserved = [k for k in _RESERVED if k in kwargs]
    if reserved:
        raise ConfigError(
            f"backbone option(s) {', '.join(reserved)} are set by hiercls; remove them "
            "(use `pretrained: PATH` for weights)"
        )
    if pretrained is None:
        model = _create(model_name, kwargs, img_size)
    else:
        model = _create_with_weights(model_name, weights_file(pretrained, model_name), kwargs, img_size)
    layer, is_token, prefix_tokens = _gradcam_target(model, img_size)
    width = getattr(model, "head_hidden_size", None) or model.num_features
    return set_backbone_attributes(
        model,
        num_features=int(width),
        gradcam_layer=layer,
        is_token_model=is_token,
        num_prefix_tokens=prefix_tokens,
    )


def _check_name(model_name: str) -> None:
    import timm

    if ":" in model_name:
        raise ConfigError(
            f"backbone '{model_name}' names a remote source; hiercls does not download models. "
            "Use a timm architecture name (e.g. convnext_tiny) and `pretrained: PATH` for local weights"
        )
    if timm.is_model(model_name):
        return
    close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Closest timm names: {', '.join(close)}." if close else ""
    tv_hint = ""
    try:
        import torchvision

        if model_name in torchvision.models.list_models(module=torchvision.models):
            tv_hint = f" torchvision has it: install plugins/hiercls-torchvision and use 'tv/{model_name}'."
    except Exception:  # torchvision missing or too old: no hint
        pass
    raise ConfigError(
        f"unknown backbone '{model_name}': timm has no such model.{hint}{tv_hint} "
        "List names with `hiercls plugins --list-timm '*pattern*'`."
    )


def _create(model_name: str, kwargs: dict[str, Any], img_size: int | None = None, **extra: Any) -> nn.Module:
    import timm

    sized = {"img_size": img_size} if img_size is not None and not kwargs.get("dynamic_img_size") else {}
    try:
        try:
            return timm.create_model(model_name, num_classes=0, **extra, **sized, **kwargs)
        except TypeError as exc:
            if not (sized and "'img_size'" in str(exc)):
                raise
        return timm.create_model(model_name, num_classes=0, **extra, **kwargs)  # takes any size
    except TypeError as exc:
        if "unexpected keyword" in str(exc) and kwargs:
            raise ConfigError(
                f"timm model '{model_name}' does not accept option(s) {', '.join(rejected_options(exc, kwargs))} ({exc})"
            ) from None
        raise


def _create_with_weights(model_name: str, path: Path, kwargs: dict[str, Any], img_size: int | None) -> nn.Module:
    """Load through timm's own loader (it adapts e.g. position embeddings), else as a state dict."""
    state = read_weights_file(path, model_name)
    try:
        model = _create(model_name, kwargs, img_size, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    except ConfigError:
        raise
    except Exception as exc:  # timm's loader refused the file: fall back to a plain state-dict load
        logger.info("timm could not load %s (%s); loading it as a state dict", path, exc)
    else:
        if _loaded_from(model, state):
            logger.info("%s: weights loaded by timm into '%s'", path, model_name)
            return model
    model = _create(model_name, kwargs, img_size)
    state = _resize_to_model(model, state)
    load_backbone_weights(model, state, str(path), model_name, skip_prefixes=_classifier_prefixes(model))
    return model


def _resize_to_model(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resample size-dependent tables of weights made at another image size, with timm's helpers.

    timm's loader already does this for the models whose checkpoint filter knows how (ViT,
    Swin, EVA, ...); this covers the rest on the state-dict path: absolute position embeddings
    ``[1, prefix + H*W, C]`` and LeViT's attention biases ``[heads, H*W]``.
    """
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table_levit

    own = model.state_dict()
    resized = dict(state)
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape or value.ndim != target.ndim:
            continue
        try:
            if key.endswith("pos_embed") and value.ndim == 3 and value.shape[-1] == target.shape[-1]:
                prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0) or 0)
                side = _square_side(target.shape[1] - prefix)
                if side and _square_side(value.shape[1] - prefix):
                    resized[key] = resample_abs_pos_embed(value, [side, side], num_prefix_tokens=prefix)
            elif key.endswith("attention_biases") and value.ndim == 2 and value.shape[0] == target.shape[0]:
                if _square_side(value.shape[1]) and _square_side(target.shape[1]):
                    table = resize_rel_pos_bias_table_levit(value.T, (target.shape[1], target.shape[0]))
                    resized[key] = table.T.contiguous()
        except Exception as exc:  # leave it to load_backbone_weights, which reports it as mismatched
            logger.debug("could not resample %s: %s", key, exc)
    return resized


def _square_side(count: int) -> int:
    side = int(round(count ** 0.5))
    return side if side > 0 and side * side == count else 0


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


def _loaded_from(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True when some of the model's tensors now equal tensors of the file.

    Compared by name first; when timm's checkpoint filter renamed keys, by value among
    tensors of the same shape.
    """
    # constant tensors (zero biases, unit norm weights) prove nothing: skip them
    own = {
        k: v for k, v in model.state_dict().items()
        if v.is_floating_point() and v.numel() > 1 and bool(v.min() != v.max())
    }
    for key, value in own.items():
        other = state.get(key)
        if other is not None and other.shape == value.shape and torch.equal(other.to(value.dtype), value):
            return True
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for value in state.values():
        by_shape.setdefault(tuple(value.shape), []).append(value)
    for value in list(own.values())[:50]:
        if any(torch.equal(o.to(value.dtype), value) for o in by_shape.get(tuple(value.shape), ())):
            return True
    return False


def _gradcam_target(model: nn.Module, img_size: int | None = None) -> tuple[nn.Module | None, bool, int]:
    """(Grad-CAM layer, token model?, prefix tokens) for the usual timm families."""
    kind = type(model).__name__.lower()
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and \
            hasattr(model, "num_prefix_tokens"):
        return blocks[-1], True, int(model.num_prefix_tokens)
    if isinstance(getattr(model, "layer4", None), nn.Module):
        return model.layer4, False, 0
    if "densenet" in kind and isinstance(getattr(model, "features", None), nn.Module):
        return model.features, False, 0
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages):
        return stages[-1], False, 0
    info = getattr(model, "feature_info", None)
    if info:
        try:
            return model.get_submodule(info[-1]["module"]), False, 0
        except (AttributeError, KeyError, TypeError):
            pass
    return find_gradcam_layer(model, (3, img_size, img_size) if img_size else None), False, 0


__all__ = ["create_timm_backbone", "register_backbones"]
