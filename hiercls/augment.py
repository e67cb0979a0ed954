"""Batch augmentation on the device: uint8 NHWC batches in, normalised float NCHW out.

Images are decoded once into a uint8 cache; augmenting whole batches on the GPU (one
affine grid for crop + flips + 90° rotations, then colour jitter) keeps the accelerator
fed without CPU worker processes. Random parameters are drawn on the CPU from a
``torch.Generator``, so a seed gives the same augmentations on any device; they reach the
device with non-blocking copies, and the normalisation constants are cached per device, so
an augmented batch never makes the host wait for the GPU.

Under data parallelism each process augments only its share of a global batch:
``augment(shard, generator, rows=..., global_size=B)`` draws the parameters of the whole
batch and applies those of ``rows``, so N processes together produce exactly what one
process produces for the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hiercls.config import AugmentConfig

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BatchAugment", "normalize", "to_float_nchw"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GRAY = (0.299, 0.587, 0.114)


def _check_batch(batch: torch.Tensor) -> None:
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 batch [B, H, W, 3], got {tuple(batch.shape)} {batch.dtype}")


def to_float_nchw(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]`` in [0, 1]."""
    _check_batch(batch)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(
    batch: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    channels_last: bool = False,
) -> torch.Tensor:
    """The evaluation transform: uint8 NHWC -> normalised float NCHW (no randomness)."""
    x = to_float_nchw(batch)
    return _standardize(x, mean, std, channels_last)


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` as a ``[1, C, 1, 1]`` tensor on ``device``, copied there once."""
    key = (tuple(values), device, dtype)
    tensor = _CONSTANTS.get(key)
    if tensor is None:
        with torch.inference_mode(False):
            tensor = torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)
        _CONSTANTS[key] = tensor
    return tensor


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor of random parameters as float32 on ``device``, without a sync.

    The copy starts from pinned memory: from pageable memory CUDA may wait for the stream.
    """
    t = t.float()
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _standardize(x: torch.Tensor, mean, std, channels_last: bool) -> torch.Tensor:
    mean, std = _constant(tuple(mean), x.device, x.dtype), _constant(tuple(std), x.device, x.dtype)
    return _standardize_with(x, mean, std, channels_last)


def _standardize_with(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``(x - mean) / std`` with ``[1, C, 1, 1]`` tensors, in the memory format the model takes."""
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


class BatchAugment:
    """Training transform: random resized crop, flips, rot90 and colour jitter, vectorised.

    ``augment(batch_uint8_nhwc, generator) -> float [B, 3, H, W]`` normalised with ``mean`` /
    ``std`` (the backbone's pretrained statistics). Output size equals input size.
    """

    def __init__(
        self,
        config: AugmentConfig | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        channels_last: bool = False,
        compile_batch_size: int | None = None,
    ):
        """``compile_batch_size``: batches of this many images run through ``torch.compile``
        (one static graph); batches of other sizes, and all batches when it is None, run eagerly."""
        self.config = config or AugmentConfig()
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.channels_last = channels_last
        # Compiled, the ~20 elementwise passes over the batch (resampling, jitter,
        # normalisation) fuse into a few kernels. Only the training batch size is compiled: a
        # per_node unit smaller than one batch has a size of its own, different in every fold.
        self.compile_batch_size = compile_batch_size
        self._compiled = torch.compile(self._apply, dynamic=False) if compile_batch_size else None

    def __call__(
        self,
        batch: torch.Tensor,
        generator: torch.Generator | None = None,
        rows: torch.Tensor | None = None,
        global_size: int | None = None,
    ) -> torch.Tensor:
        """Augment ``batch``; with ``rows`` it is those rows of a batch of ``global_size`` images."""
        _check_batch(batch)
        b, h, w, _ = batch.shape
        drawn = b if rows is None else int(global_size)
        theta = self._affine(drawn, square=(h == w), generator=generator)
        jitter = self._jitter_factors(drawn, generator) if self.config.color_jitter > 0 else None
        if rows is not None:
            theta = theta[rows]
            jitter = None if jitter is None else jitter[:, rows]
        device = batch.device
        transform = self._compiled if b == self.compile_batch_size else self._apply
        return transform(
            batch,
            None if self._is_identity(square=(h == w)) else _to_device(theta, device),
            None if jitter is None else _to_device(jitter, device),
            _constant(self.mean, device),
            _constant(self.std, device),
            _constant(_GRAY, device),
        )

    def _apply(
        self,
        batch: torch.Tensor,
        theta: torch.Tensor | None,
        jitter: torch.Tensor | None,
        mean: torch.Tensor,
        std: torch.Tensor,
        gray_weights: torch.Tensor,
    ) -> torch.Tensor:
        """The device part: uint8 NHWC -> resampled, jittered, normalised float NCHW."""
        x = to_float_nchw(batch)
        if theta is not None:
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if jitter is not None:
            x = _jitter(x, jitter, gray_weights)
        return _standardize_with(x, mean, std, self.channels_last)

    # -- geometry ------------------------------------------------------------------------

    def _is_identity(self, square: bool) -> bool:
        """Whether the configuration allows no geometric change at all (then no resampling).

        Decided from the configuration, not from the drawn parameters: every batch then runs
        the same kernels, and nothing waits on a comparison of tensors.
        """
        cfg = self.config
        return (
            tuple(cfg.crop_scale) == (1.0, 1.0)
            and tuple(cfg.crop_ratio) == (1.0, 1.0)
            and not cfg.hflip
            and not cfg.vflip
            and not (cfg.rot90 and square)
        )

    def _affine(self, b: int, square: bool, generator: torch.Generator | None) -> torch.Tensor:
        """``[B, 2, 3]`` output->input maps: crop scale/offset composed with flips and rot90."""
        cfg = self.config

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(*shape, generator=generator)

        # Random resized crop: area fraction and aspect ratio (log-uniform), centre offset.
        log_r = torch.tensor([math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])])
        area = cfg.crop_scale[0] + (cfg.crop_scale[1] - cfg.crop_scale[0]) * rand(b)
        ratio = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * rand(b))
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (2 * rand(b) - 1) * (1 - sx)
        ty = (2 * rand(b) - 1) * (1 - sy)
        linear = torch.zeros(b, 2, 2)
        linear[:, 0, 0] = sx
        linear[:, 1, 1] = sy

        # Orientation: rot90 (square images only) then flips, as exact 2x2 integer maps.
        k = torch.randint(0, 4, (b,), generator=generator) if cfg.rot90 and square else torch.zeros(b, dtype=torch.long)
        angle = k.float() * (math.pi / 2)
        cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
        rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        fx = torch.where(rand(b) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(b)
        fy = torch.where(rand(b) < 0.5, -1.0, 1.0) if cfg.vflip else torch.ones(b)
        flip = torch.diag_embed(torch.stack([fx, fy], -1))
        theta = torch.zeros(b, 2, 3)
        theta[:, :, :2] = linear @ rot @ flip
        theta[:, 0, 2] = tx
        theta[:, 1, 2] = ty
        return theta

    # -- colour --------------------------------------------------------------------------

    def _jitter_factors(self, b: int, generator: torch.Generator | None) -> torch.Tensor:
        """``[3, B]`` brightness, contrast and saturation factors in [1 - s, 1 + s]."""
        s = self.config.color_jitter
        return torch.stack([1 + s * (2 * torch.rand(b, generator=generator) - 1) for _ in range(3)])


def _jitter(x: torch.Tensor, factors: torch.Tensor, gray_weights: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation per image (``factors`` ``[3, B]``), clamped to [0, 1]."""
    b = x.shape[0]
    brightness, contrast, saturation = (f.view(b, 1, 1, 1) for f in factors)
    x = x * brightness
    gray = (x * gray_weights).sum(1, keepdim=True)
    x = (x - gray.mean((2, 3), keepdim=True)) * contrast + gray.mean((2, 3), keepdim=True)
    gray = (x * gray_weights).sum(1, keepdim=True)
    x = (x - gray) * saturation + gray
    return x.clamp_(0.0, 1.0)
