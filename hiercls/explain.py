"""Grad-CAM for every decision on a predicted path through the tree, and a panel to look at.

A hierarchical prediction is a chain of decisions ("root: Leukemia", "Leukemia: Acute",
"Acute: AML"). :func:`gradcam_per_level` explains each of them separately: for every
internal node on the path it differentiates the score of the chosen child with respect
to the activations read at the backbone's ``gradcam_layer`` (a CNN stage's output; for a
token model, the tokens entering its last transformer block, see :class:`_Capture`) and
returns one heatmap per decision (Selvaraju et al., Grad-CAM: ``ReLU(sum_c alpha_c A_c)``,
``alpha_c`` the spatial mean of the gradient of channel ``c``). What "the score of the
chosen child" is depends on the strategy:

* ``joint``: the logit of the child in that node's head; all heads share one backbone;
* ``per_node``: the logit of the child in that node's own model;
* ``per_level``: the logit of the child in the model of the child's depth;
* ``flat``: the log of the summed leaf probabilities under the child, up to a constant
  (``logsumexp`` of the child's leaf logits), which for a leaf is its logit.

:func:`render_panel` draws the input image next to one overlay per decision.
See docs/explain.md for how to read the pictures and what they cannot tell.
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hiercls.errors import ConfigError, DataError
from hiercls.taxonomy import Taxonomy

if TYPE_CHECKING:
    from hiercls.strategies.base import HierarchicalClassifier

__all__ = ["LevelCam", "gradcam_per_level", "activation_to_cam", "render_panel", "decision_path"]


@dataclass
class LevelCam:
    """The Grad-CAM of one decision on the explained path.

    ``decision`` is the internal node deciding, ``child`` the child chosen, ``probability``
    P(child | decision) for the image, ``heatmap`` a float32 ``[H, W]`` map in [0, 1] at the
    input's size (1 = the strongest evidence for ``child`` in this image, 0 = none),
    ``depth`` the decision node's depth (root 0) and ``unit`` the training unit whose
    model produced the score (e.g. ``joint``, ``node:Leukemia``, ``level:2``, ``flat``).
    ``cam_max`` is the largest value of the map before it was divided by its maximum
    (``ReLU(sum_c alpha_c A_c)`` at the input's size, in units of score times activation):
    0 means no positive evidence anywhere; compare it only between decisions of one model.
    """

    decision: str
    child: str
    probability: float
    heatmap: np.ndarray
    depth: int
    unit: str
    cam_max: float = 0.0

    def peak(self) -> tuple[int, int] | None:
        """``(row, column)`` of the heatmap's maximum in input pixels (first one), or ``None`` when all zero."""
        heat = np.asarray(self.heatmap)
        if heat.size == 0 or not float(heat.max()) > 0:
            return None
        row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
        return int(row), int(col)

    def title(self, taxonomy: Taxonomy | None = None) -> str:
        """``"root: Leukemia 0.93"`` (display names when a taxonomy is given)."""
        name = taxonomy.display_name if taxonomy is not None else str
        return f"{name(self.decision)}: {name(self.child)} {self.probability:.2f}"


# -- the path to explain -----------------------------------------------------------------


def decision_path(taxonomy: Taxonomy, conditional: np.ndarray, target: str | None = None) -> list[tuple[str, str]]:
    """``(decision node, chosen child)`` pairs from the root down.

    Without ``target`` the path is the greedy one (the most probable child at each node,
    ``conditional`` being one image's P(node | parent) row); with ``target`` it is the path
    to that node (e.g. the true label). Nodes with a single child make no decision and
    are left out.
    """
    if target is not None:
        node = taxonomy.resolve(target)
        steps = taxonomy.path(node)
        pairs = list(zip(steps[:-1], steps[1:]))
    else:
        pairs = []
        node = taxonomy.root
        while not taxonomy.is_leaf(node):
            children = taxonomy.children(node)
            best = children[int(np.argmax(conditional[taxonomy.children_indices(node)]))]
            pairs.append((node, best))
            node = best
    return [(parent, child) for parent, child in pairs if len(taxonomy.children(parent)) >= 2]


# -- Grad-CAM from activations and gradients --------------------------------------------


def activation_to_cam(
    activation: Tensor,
    gradient: Tensor,
    size: tuple[int, int],
    *,
    num_prefix_tokens: int = 0,
    channels: Sequence[int] = (),
    channels_last: bool | None = None,
    grid_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """One image's Grad-CAM ``float32 [H, W]`` in [0, 1] from a layer's activation and its gradient.

    ``activation`` / ``gradient`` are ``[1, C, h, w]`` maps, ``[1, h, w, C]`` channels-last
    maps (Swin-style stages) or ``[1, T, C]`` tokens of a ViT (``num_prefix_tokens`` class /
    register tokens first, then a patch grid of ``grid_size`` or, when not given, the
    factorisation of the patch count closest to the image's aspect ratio). For a 4-D map
    the channel axis is the one whose size is in ``channels`` (the layer's known widths);
    when both or neither match, ``channels_last`` decides (default: channels first).
    The map is upsampled bilinearly to ``size`` and divided by its maximum, so 0 keeps
    meaning "no positive evidence"; a map without any positive evidence stays all zero.
    """
    cam = _raw_cam(
        activation,
        gradient,
        size,
        num_prefix_tokens=num_prefix_tokens,
        channels=channels,
        channels_last=channels_last,
        grid_size=grid_size,
    )
    return _normalised(cam)[0]


def _raw_cam(
    activation: Tensor,
    gradient: Tensor,
    size: tuple[int, int],
    *,
    num_prefix_tokens: int,
    channels: Sequence[int],
    channels_last: bool | None,
    grid_size: tuple[int, int] | None,
) -> Tensor:
    """``ReLU(sum_c alpha_c A_c)`` upsampled to ``size``, not normalised (``[H, W]``, finite, >= 0)."""
    a = activation.detach().float()
    g = gradient.detach().float()
    if a.shape != g.shape:
        raise ValueError(f"activation {tuple(a.shape)} and gradient {tuple(g.shape)} differ in shape")
    if a.ndim == 3:
        a, g = _tokens_to_map(a, num_prefix_tokens, grid_size, size), _tokens_to_map(g, num_prefix_tokens, grid_size, size)
    elif a.ndim == 4:
        if _is_channels_last(tuple(a.shape), set(channels), channels_last):
            a, g = a.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    else:
        raise ValueError(
            f"Grad-CAM needs maps [B, C, h, w], [B, h, w, C] or tokens [B, T, C]; the layer gave {tuple(a.shape)}"
        )
    weights = g.mean(dim=(2, 3), keepdim=True)  # alpha_c: spatial mean of the gradient
    cam = torch.relu((weights * a).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[0, 0].clamp_(min=0)
    return torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0)


def _normalised(cam: Tensor) -> tuple[np.ndarray, float]:
    """The map divided by its maximum (all zero stays zero) as ``float32`` numpy, and that maximum."""
    peak = float(cam.max())
    if peak > 0:
        cam = cam / peak
    return cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32), max(peak, 0.0)


def _is_channels_last(shape: tuple[int, ...], channels: set[int], declared: bool | None) -> bool:
    first, last = shape[1] in channels, shape[-1] in channels
    if first != last:
        return last
    return bool(declared)


def _tokens_to_map(
    tokens: Tensor, num_prefix_tokens: int, grid_size: tuple[int, int] | None, size: tuple[int, int]
) -> Tensor:
    """``[B, T, C]`` tokens -> ``[B, C, h, w]`` map of the patch tokens."""
    patches = tokens[:, num_prefix_tokens:, :]
    count = patches.shape[1]
    if grid_size is None or grid_size[0] * grid_size[1] != count:
        grid_size = _grid_for(count, size)
    h, w = grid_size
    return patches.reshape(patches.shape[0], h, w, patches.shape[2]).permute(0, 3, 1, 2)


def _grid_for(count: int, size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` with ``h * w == count`` whose aspect ratio is closest to the image's."""
    if count < 1:
        raise ValueError("the Grad-CAM layer produced no patch tokens after the prefix tokens")
    aspect = size[0] / max(size[1], 1)
    pairs = [(h, count // h) for h in range(1, count + 1) if count % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(aspect)))


# -- hooking a backbone -------------------------------------------------------------------


def _unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind ``torch.compile`` / DataParallel wrappers (their hooks would not fire)."""
    for _ in range(4):
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "module", None) if type(module).__name__.endswith("DataParallel") else None
        if not isinstance(inner, nn.Module):
            return module
        module = inner
    return module


def _layer_channels(backbone: nn.Module, layer: nn.Module) -> tuple[int, ...]:
    """Widths the Grad-CAM layer's output may have: its last weighted sub-module's, and ``num_features``."""
    widths = []
    for module in reversed(list(layer.modules())):
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.ndim >= 1:
            widths.append(int(weight.shape[0]))
            break
    widths.append(int(getattr(backbone, "num_features", 0) or 0))
    return tuple(w for w in widths if w > 0)


class _Capture:
    """Forward hooks keeping the tensor Grad-CAM reads from ``layer`` in the last forward pass.

    For a map layer (a CNN stage) that is the layer's output. For a token model the layer is
    its last transformer block, and the tensor is the tokens *entering* the block's attention:
    the output of the block's leading normalisation when it is fed the block's own input
    (pre-norm blocks: timm's ``norm1``, torchvision's ``ln_1``), else the block's input. The
    block's output would be useless when the head reads only the prefix tokens (class or
    distillation token): the patch tokens leaving the last block reach nothing, so their
    gradient is exactly zero. Entering the block, they still reach the class token through
    its attention.
    """

    def __init__(self, layer: nn.Module, tokens: bool):
        self.tokens = tokens
        self._output: Tensor | None = None
        self._block_input: Tensor | None = None
        self._norm_io: tuple[Any, Tensor | None] = (None, None)
        if tokens:
            self.handles = [layer.register_forward_pre_hook(self._keep_block_input, with_kwargs=True)]
            norm = _leading_norm(layer)
            if norm is not None:
                self.handles.append(norm.register_forward_hook(self._keep_norm))
        else:
            self.handles = [layer.register_forward_hook(self._keep_output)]

    def _keep_output(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        self._output = _first_tensor(output)

    def _keep_block_input(self, _module: nn.Module, inputs: Any, kwargs: dict[str, Any]) -> None:
        self._block_input = _first_tensor(inputs) if inputs else _first_tensor(list(kwargs.values()))

    def _keep_norm(self, _module: nn.Module, inputs: Any, output: Any) -> None:
        self._norm_io = (_first_tensor(inputs), _first_tensor(output))

    @property
    def activation(self) -> Tensor | None:
        if not self.tokens:
            return self._output
        norm_input, norm_output = self._norm_io
        if norm_output is not None and norm_input is not None and norm_input is self._block_input:
            return norm_output
        return self._block_input

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_tensor(value: Any) -> Tensor | None:
    if isinstance(value, (tuple, list)):
        value = next((v for v in value if isinstance(v, Tensor)), None)
    return value if isinstance(value, Tensor) else None


def _leading_norm(block: nn.Module) -> nn.Module | None:
    """The block's first sub-module when it is a normalisation layer (``norm1``, ``ln_1``), else ``None``."""
    first = next(iter(block.children()), None)
    if first is None or next(iter(first.children()), None) is not None:
        return None
    return first if "norm" in type(first).__name__.lower() else None


def _patch_grid(backbone: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid of a token model for an input of ``size``, when the backbone says it.

    timm: ``patch_embed.grid_size`` (fixed-size models) or the input size divided by
    ``patch_embed.patch_size`` (``dynamic_img_size``); torchvision: the input size divided
    by ``patch_size``. ``None`` leaves the grid to the token count.
    """
    embed = getattr(backbone, "patch_embed", None)
    patch = getattr(embed, "patch_size", None) if embed is not None else getattr(backbone, "patch_size", None)
    grid = getattr(embed, "grid_size", None)
    if embed is not None and not getattr(embed, "dynamic_img_size", False) and _pair(grid) is not None:
        return _pair(grid)
    patch = _pair(patch)
    if patch is None or min(patch) < 1:
        return _pair(grid)
    rounding = math.ceil if getattr(embed, "dynamic_img_pad", False) else math.floor
    return rounding(size[0] / patch[0]), rounding(size[1] / patch[1])


def _pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


class _BackboneCam:
    """Grad-CAM of scores computed from one backbone's ``gradcam_layer``."""

    def __init__(self, backbone: nn.Module, size: tuple[int, int], what: str):
        layer = getattr(backbone, "gradcam_layer", None)
        if not isinstance(layer, nn.Module):
            raise ConfigError(
                f"{what}: backbone {type(backbone).__name__} has no Grad-CAM layer (its `gradcam_layer` is "
                f"{layer!r}); a backbone plugin must set it with set_backbone_attributes(..., gradcam_layer=...)"
            )
        self.layer = layer
        self.size = size
        self.tokens = bool(getattr(backbone, "is_token_model", False))
        self.prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
        self.channels = _layer_channels(backbone, layer)
        self.channels_last = str(getattr(backbone, "output_fmt", "")).upper() == "NHWC"
        self.grid = _patch_grid(backbone, size) if self.tokens else None

    def run(self, forward: Callable[[], Any]) -> tuple[Any, Tensor]:
        """Call ``forward`` with the layer hooked; the outputs and the captured activation."""
        capture = _Capture(self.layer, self.tokens)
        try:
            outputs = forward()
        finally:
            capture.remove()
        activation = capture.activation
        if activation is None or not activation.requires_grad:
            raise ConfigError(
                f"the Grad-CAM layer {type(self.layer).__name__} produced no differentiable tensor "
                f"{'input' if self.tokens else 'output'}; the backbone's `gradcam_layer` must be a module on the "
                "path from the image to the features (for a token model: its last transformer block)"
            )
        return outputs, activation

    def cam(self, score: Tensor, activation: Tensor) -> tuple[np.ndarray, float]:
        """The normalised heatmap and the map's maximum before normalising."""
        (gradient,) = torch.autograd.grad(score, activation, retain_graph=True)
        if activation.ndim == 3 and not bool(gradient[:, self.prefix :].any()):
            warnings.warn(
                f"no gradient reaches the patch tokens at the Grad-CAM layer {type(self.layer).__name__}: the "
                "features read only the prefix tokens after it, so every heatmap is empty; a token model's "
                "`gradcam_layer` should be its last transformer block",
                UserWarning,
                stacklevel=3,
            )
        raw = _raw_cam(
            activation,
            gradient,
            self.size,
            num_prefix_tokens=self.prefix,
            channels=self.channels,
            channels_last=self.channels_last,
            grid_size=self.grid,
        )
        return _normalised(raw)


# -- Grad-CAM per level -------------------------------------------------------------------


def _tempered_conditionals(taxonomy: Any, conditional: np.ndarray, temperatures: dict[str, float]) -> np.ndarray:
    """One image's node conditionals with a run's calibration temperatures applied."""
    from hiercls.calibration import apply_temperatures
    from hiercls.probabilities import NodeProbabilities

    probs = NodeProbabilities.from_conditionals(taxonomy, conditional[None])
    return apply_temperatures(probs, temperatures).conditional[0]


def run_temperatures(loaded: Any) -> dict[str, float] | None:
    """The calibration temperatures of a loaded run (``inference.load_run``), None when it has none."""
    return dict(loaded.calibration["temperatures"]) if getattr(loaded, "calibration", None) else None



def gradcam_per_level(
    model: HierarchicalClassifier,
    image: Tensor,
    *,
    target: str | None = None,
    temperatures: dict[str, float] | None = None,
) -> list[LevelCam]:
    """One Grad-CAM per decision on the predicted path (or the path to ``target``).

    ``model`` is a ``HierarchicalClassifier`` (any strategy); ``image`` one normalised image
    ``[1, 3, H, W]`` (the evaluation transform; it is moved to the model's device).
    The model runs in eval mode in float32; the parameters' ``requires_grad``, the
    model's training mode and its hooks are as before when this returns, and no
    parameter gradient is accumulated. Heatmaps are ``float32 [H, W]`` in [0, 1].
    ``temperatures`` (a run's ``calibration.json``, see ``hiercls.calibration``) temper the
    probabilities reported on the path; the path itself does not change with them.
    """
    from hiercls.strategies.base import HierarchicalClassifier

    if not isinstance(model, HierarchicalClassifier):
        raise TypeError(f"gradcam_per_level needs a HierarchicalClassifier, got {type(model).__name__}")
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be one normalised image [1, 3, H, W], got {shape}")
    taxonomy = model.taxonomy
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else image.device
    x = image.detach().to(device=device, dtype=torch.float32)
    size = (int(x.shape[2]), int(x.shape[3]))

    was_training = model.training
    grad_states = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p, _ in grad_states:
                p.requires_grad_(False)
            with torch.no_grad():
                conditional = model.node_conditionals(x)[0].double().cpu().numpy()
            if temperatures:
                conditional = _tempered_conditionals(taxonomy, conditional, temperatures)
            path = decision_path(taxonomy, conditional, target)
            if not path:
                return []
            x = x.clone().requires_grad_(True)  # activations need a graph even with frozen weights
            heatmaps = _gradcam_of(model.strategy)(model, x, path, size)
    finally:
        for p, state in grad_states:
            p.requires_grad_(state)
        model.train(was_training)
    return [
        LevelCam(
            decision=node,
            child=child,
            probability=float(conditional[taxonomy.index[child]]),
            heatmap=heatmap,
            depth=taxonomy.depth(node),
            unit=unit,
            cam_max=cam_max,
        )
        for (node, child), (unit, (heatmap, cam_max)) in zip(path, heatmaps)
    ]


_Path = list[tuple[str, str]]
_Heatmaps = list[tuple[str, tuple[np.ndarray, float]]]  # (unit, (heatmap, raw maximum))


def _joint(model: nn.Module, x: Tensor, path: _Path, size: tuple[int, int]) -> _Heatmaps:
    unit = model.training_units()[0]
    network = _unwrap(unit.module)
    hooked = _BackboneCam(network.backbone, size, "joint model")
    outputs, activation = hooked.run(lambda: network(x))
    taxonomy = model.taxonomy
    return [
        (unit.name, hooked.cam(outputs[node][0, taxonomy.children(node).index(child)], activation))
        for node, child in path
    ]


def _per_node(model: nn.Module, x: Tensor, path: _Path, size: tuple[int, int]) -> _Heatmaps:
    units = {getattr(u, "node", None): u for u in model.training_units()}
    taxonomy = model.taxonomy
    out = []
    for node, child in path:
        unit = units[node]
        network = _unwrap(unit.module)
        hooked = _BackboneCam(network.backbone, size, f"model of node '{node}'")
        logits, activation = hooked.run(lambda: network(x))
        out.append((unit.name, hooked.cam(logits[0, taxonomy.children(node).index(child)], activation)))
    return out


def _per_level(model: nn.Module, x: Tensor, path: _Path, size: tuple[int, int]) -> _Heatmaps:
    taxonomy = model.taxonomy
    out = []
    for node, child in path:
        column = taxonomy.index[child]
        unit = next(u for u in model.training_units() if column in u.columns)
        network = _unwrap(unit.module)
        hooked = _BackboneCam(network.backbone, size, f"model of level {taxonomy.depth(child)}")
        logits, activation = hooked.run(lambda: network(x))
        out.append((unit.name, hooked.cam(logits[0, list(unit.columns).index(column)], activation)))
    return out


def _flat(model: nn.Module, x: Tensor, path: _Path, size: tuple[int, int]) -> _Heatmaps:
    unit = model.training_units()[0]
    network = _unwrap(unit.module)
    hooked = _BackboneCam(network.backbone, size, "flat model")
    logits, activation = hooked.run(lambda: network(x))
    taxonomy = model.taxonomy
    position = {leaf: j for j, leaf in enumerate(taxonomy.leaves)}
    out = []
    for _node, child in path:
        columns = torch.tensor([position[leaf] for leaf in taxonomy.leaves_under(child)], device=logits.device)
        # log of the summed (unnormalised) leaf probabilities under ``child``: for a leaf, its logit
        score = torch.logsumexp(logits[0].float().index_select(0, columns), dim=0)
        out.append((unit.name, hooked.cam(score, activation)))
    return out


_BUILTIN_GRADCAM: dict[str, Callable[[nn.Module, Tensor, _Path, tuple[int, int]], _Heatmaps]] = {
    "joint": _joint,
    "per_node": _per_node,
    "per_level": _per_level,
    "flat": _flat,
}


def _gradcam_of(strategy: str) -> Callable[[nn.Module, Tensor, _Path, tuple[int, int]], _Heatmaps]:
    """How to explain a strategy's model: the registered strategy's own ``gradcam`` when its
    plugin gives one, else the built-in of that name."""
    from hiercls.plugins import find_strategy

    registration = find_strategy(strategy)
    explain = getattr(registration.factory, "gradcam", None) or _BUILTIN_GRADCAM.get(strategy)
    if explain is None:
        raise ConfigError(
            f"Grad-CAM does not know strategy '{strategy}' (plugin {registration.plugin}): its plugin gives no "
            f"`gradcam` function; the built-in ones are {', '.join(_BUILTIN_GRADCAM)}"
        )
    return explain


# -- the picture -------------------------------------------------------------------------


def render_panel(
    image_rgb: np.ndarray,
    cams: Sequence[LevelCam],
    path: str | Path,
    taxonomy: Taxonomy | None = None,
    *,
    title: str | None = None,
    alpha: float = 0.45,
    colormap: str = "jet",
    overwrite: bool = False,
) -> Path:
    """Write a PNG: the input image, then one Grad-CAM overlay per decision, titled with it.

    ``image_rgb`` is the ``uint8 [H, W, 3]`` image the model saw (heatmaps of another
    size are resized to it). Titles read ``"root: Leukemia 0.93"`` (display names when
    ``taxonomy`` is given); one colour bar explains the scale. An existing file is
    replaced only with ``overwrite=True``; the file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_rgb must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: file exists; remove it, choose another folder or pass overwrite (--overwrite)")
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path}: a Grad-CAM panel is a PNG; give a path ending in .png")
    height, width = image.shape[:2]
    panels = 1 + len(cams)
    figure = Figure(figsize=(3.0 * panels + 0.6, 3.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(image, interpolation="bilinear")
    axes[0].set_title("input", fontsize=10)
    for axis, cam in zip(axes[1:], cams):
        heat = _fit_heatmap(cam.heatmap, (height, width))
        axis.imshow(image, interpolation="bilinear")
        axis.imshow(heat, cmap=colormap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear")
        label = textwrap.fill(cam.title(taxonomy), width=30)
        if not heat.any():
            label += "\n(no positive evidence)"
        axis.set_title(label, fontsize=10)
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=11)
    if cams:  # an opaque scale, not the see-through overlay colours
        scale = ScalarMappable(norm=Normalize(vmin=0.0, vmax=1.0), cmap=colormap)
        bar = figure.colorbar(scale, ax=list(axes), fraction=0.025, pad=0.02)
        bar.set_label("Grad-CAM (evidence for the chosen child)", fontsize=8)
        bar.set_ticks([0.0, 0.5, 1.0])
    _save_atomically(figure, path)
    return path


def _fit_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32)).clip(0.0, 1.0)
    if heat.shape == size:
        return heat
    tensor = torch.from_numpy(heat)[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()


def _save_atomically(figure: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", bbox_inches="tight")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def panels_for_images(
    loaded: Any, paths: Sequence[str | Path], *, titles: dict[str, str] | None = None, device: str = "auto"
) -> dict[str, bytes]:
    """Grad-CAM panels (PNG bytes) of ``paths`` on the predicted path of a loaded run (``inference.load_run``).

    Unreadable images are left out (a report shows its placeholder for them). ``titles`` maps a
    path to the start of its panel's title; the predicted path is appended.
    """
    from hiercls.augment import normalize
    from hiercls.data.cache import decode_resized
    from hiercls.inference import normalization_stats
    from hiercls.runtime import resolve_device

    chosen = resolve_device(device)
    model = loaded.model.to(chosen)
    mean, std = normalization_stats(model)
    size = int(loaded.config.img_size)
    panels: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="hiercls-panels-") as folder:
        for i, path in enumerate(paths):
            try:
                pixels = decode_resized(Path(path), size)
            except DataError:
                continue
            batch = normalize(torch.from_numpy(pixels.copy())[None].to(chosen), mean, std)
            cams = gradcam_per_level(model, batch, temperatures=run_temperatures(loaded))
            route = " > ".join(cam.child for cam in cams) or loaded.taxonomy.root
            start = (titles or {}).get(str(path), Path(path).name)
            target = Path(folder) / f"{i}.png"
            render_panel(pixels, cams, target, loaded.taxonomy, title=f"{start}: {route}")
            panels[str(path)] = target.read_bytes()
    return panels
