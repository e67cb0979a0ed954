"""Loading a trained run and predicting node probabilities for a table of images.

``load_run`` rebuilds the model from the run's saved config and taxonomy and loads a
checkpoint, refusing one that belongs to another tree, backbone or strategy.
``predict_table`` decodes the images once (through the image cache), runs the model in
batches and returns ``NodeProbabilities``, the object every downstream step takes. A run's
``calibration.json`` (``hiercls calibrate``) is read by ``load_run`` and its per-node
temperatures applied to the predictions (``calibrated=False``: the raw probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console

from hiercls.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from hiercls.checkpoint import load_weights, read_metadata, weights_checkpoint_id
from hiercls.config import FitConfig
from hiercls.console import TaskProgress
from hiercls.errors import CheckpointError, ConfigError, HierclsError
from hiercls.io import RUN_FILE_BYTES, load_yaml, read_user_text
from hiercls.plugins import check_run_provenance
from hiercls.probabilities import NodeProbabilities
from hiercls.run import START_AGAIN, RunPaths
from hiercls.runtime import autocast_context, configure_backends, resolve_device, use_channels_last
from hiercls.taxonomy import Taxonomy

__all__ = [
    "LoadedRun",
    "load_run",
    "predict_table",
    "predict_images",
    "predict_conditionals",
    "decode",
    "normalization_stats",
    "build_model",
    "read_run_split",
    "run_image_warnings",
]

# split.json lists two paths per image; a bigger file is not one hiercls wrote.
MAX_SPLIT_BYTES = 512 * 1024 * 1024


def normalization_stats(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean / std from the backbone's pretrained config (timm), else ImageNet's."""
    for module in model.modules():
        cfg = getattr(module, "pretrained_cfg", None)
        if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
            mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
            if len(mean) == 3 and len(std) == 3:
                return mean, std
    return IMAGENET_MEAN, IMAGENET_STD


def predict_conditionals(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    channels_last: bool = False,
    progress: bool = True,
    description: str = "predicting",
    console: Console | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    fixed_batch: bool = False,
) -> np.ndarray:
    """P(node | parent) ``[N, num_nodes]`` (float64) for uint8 NHWC ``images``, in eval mode.

    On CUDA the next batch is copied from pinned host memory on a side stream while the
    current one is computed, and the results stay on the GPU until the end: the host never
    waits for the GPU between batches. ``forward`` replaces ``model.node_conditionals``
    (e.g. a compiled version of it); with ``fixed_batch`` only full batches go through it and a
    smaller last batch runs eagerly, so a compiled ``forward`` sees one shape (one compilation,
    and no padded images computed for nothing).
    """
    mean, std = normalization_stats(model)
    eager = model.node_conditionals
    forward = forward or eager
    n = len(images)
    was_training = model.training
    model.eval()
    bar = TaskProgress(console, enabled=progress)  # a bar in a terminal, a line now and then in a log
    try:
        with bar, torch.inference_mode():
            out = torch.empty((n, model.taxonomy.num_nodes), dtype=torch.float32, device=device)
            task = bar.add_task(description, total=n)
            for start, batch in _device_batches(images, batch_size, device):
                size = len(batch)
                x = normalize(batch, mean, std, channels_last)
                with autocast_context(device, precision):
                    cond = eager(x) if fixed_batch and size < batch_size else forward(x)
                out[start : start + size] = cond.float()
                bar.advance(task, size)
            result = out.cpu().numpy().astype(np.float64)
    finally:
        model.train(was_training)
    return result


def _device_batches(
    images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, uint8 batch on device)`` for consecutive batches of ``images``.

    Images already on ``device`` are sliced in place. On CUDA, host images go through two
    pinned buffers and a copy stream, so copying batch k+1 overlaps computing batch k.
    """
    n = len(images)
    if isinstance(images, torch.Tensor) and images.device.type == device.type and images.device.type != "cpu":
        for start in range(0, n, batch_size):
            yield start, images[start : start + batch_size]
        return
    if device.type != "cuda":
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.array(chunk))
            yield start, batch.to(device)
        return
    stream = torch.cuda.Stream(device)
    shape = (min(batch_size, n), *images.shape[1:])
    pinned = [torch.empty(shape, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]

    def stage(k: int, start: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        if copied[k] is not None:
            copied[k].synchronize()  # the copy of two batches ago has left this buffer
        chunk = images[start : start + batch_size]
        host = pinned[k][: len(chunk)]
        if isinstance(chunk, torch.Tensor):
            host.copy_(chunk)
        else:
            host.numpy()[...] = chunk  # one copy, straight from the (memory-mapped) cache
        with torch.cuda.stream(stream):
            on_device = host.to(device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        copied[k] = event
        return on_device, event

    starts = list(range(0, n, batch_size))
    pending = stage(0, 0) if starts else None
    for i, start in enumerate(starts):
        batch, event = pending
        if i + 1 < len(starts):
            pending = stage((i + 1) % 2, starts[i + 1])
        torch.cuda.current_stream(device).wait_event(event)
        batch.record_stream(torch.cuda.current_stream(device))
        yield start, batch


# -- loading a run -----------------------------------------------------------------------


@dataclass
class LoadedRun:
    """A trained model with the taxonomy and config it was trained with."""

    taxonomy: Taxonomy
    config: FitConfig
    model: torch.nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    # RUN/calibration.json when it was fitted on this checkpoint: predictions apply its temperatures
    calibration: dict[str, Any] | None = None


def build_model(config: FitConfig, taxonomy: Taxonomy, class_counts: np.ndarray | None, pretrained: bool = True):
    """The strategy's model for ``config`` (``pretrained=False`` skips loading local weights)."""
    from hiercls.strategies import build_strategy

    return build_strategy(
        config.strategy,
        taxonomy,
        backbone=config.backbone,
        pretrained=str(config.pretrained) if (pretrained and config.pretrained) else None,
        backbone_kwargs=dict(config.backbone_kwargs),
        image_size=int(config.img_size),
        loss=config.loss,
        loss_options=dict(config.loss_options),
        class_counts=class_counts,
        options=dict(config.strategy_options),
    )


def _read_run_config(paths: RunPaths) -> FitConfig:
    if not paths.config.exists():
        raise CheckpointError(f"{paths.root}: not a hiercls run (no config.yaml); give the --out folder of `hiercls fit`")
    try:
        data = load_yaml(read_user_text(paths.config, "run config", CheckpointError, max_bytes=RUN_FILE_BYTES))
        return FitConfig.model_validate(data)
    except HierclsError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{paths.config}: cannot read the run's config ({str(exc).splitlines()[0]})") from None


def load_run(run_dir: str | Path, which: str = "best", calibrated: bool = True) -> LoadedRun:
    """Rebuild and load the ``best`` or ``last`` checkpoint of a run directory.

    With ``calibrated`` the run's ``calibration.json`` is read (and refused when damaged) and,
    when it was fitted on this checkpoint, kept in ``LoadedRun.calibration`` for the predictions.
    """
    if which not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be 'best' or 'last', got '{which}'")
    paths = RunPaths(Path(run_dir).expanduser().resolve())
    if not paths.root.is_dir():
        raise CheckpointError(f"{paths.root}: run folder not found")
    config = _read_run_config(paths)
    meta_path = paths.metadata(which)
    if not meta_path.is_file():
        other = "last" if which == "best" else "best"
        hint = f"; try --checkpoint {other}" if paths.metadata(other).is_file() else (
            f"; the run has not finished an epoch yet: {START_AGAIN.format(root=paths.root)}"
        )
        raise CheckpointError(f"{paths.root}: no finished '{which}' checkpoint{hint}")
    metadata = read_metadata(meta_path)
    try:
        taxonomy = Taxonomy.from_dict(metadata["taxonomy"], source=str(meta_path))
    except KeyError:
        raise CheckpointError(f"{meta_path}: checkpoint metadata has no taxonomy; it was not written by hiercls") from None
    if taxonomy.fingerprint != metadata.get("taxonomy_fingerprint"):
        raise CheckpointError(
            f"{meta_path}: taxonomy fingerprint {metadata.get('taxonomy_fingerprint')} does not match the "
            f"stored tree ({taxonomy.fingerprint}); the checkpoint metadata was edited or is corrupt"
        )
    if paths.taxonomy.is_file():
        try:
            text = read_user_text(paths.taxonomy, "run taxonomy", CheckpointError, max_bytes=RUN_FILE_BYTES)
            run_tax = Taxonomy.from_dict(load_yaml(text))
        except (HierclsError, yaml.YAMLError, ValueError):
            run_tax = None
        if run_tax is not None and run_tax.fingerprint != taxonomy.fingerprint:
            raise CheckpointError(
                f"{meta_path}: checkpoint was trained on another tree than {paths.taxonomy} "
                f"(fingerprint {taxonomy.fingerprint} vs {run_tax.fingerprint}); was it copied from another run?"
            )
    for key in ("strategy", "backbone"):
        if metadata.get(key) != getattr(config, key):
            raise CheckpointError(
                f"{meta_path}: checkpoint {key} '{metadata.get(key)}' disagrees with the run's config.yaml "
                f"('{getattr(config, key)}'); was the config edited or the checkpoint copied from another run?"
            )
    counts = metadata.get("class_counts")
    class_counts = np.asarray(counts, dtype=np.float64) if counts is not None else None
    check_run_provenance(metadata, config.backbone, config.loss, str(meta_path))
    model = build_model(config, taxonomy, class_counts, pretrained=False)
    load_weights(paths.weights(which), model)
    stored_id = metadata.get("checkpoint_id")
    if stored_id and weights_checkpoint_id(paths.weights(which)) not in (None, stored_id):
        raise CheckpointError(
            f"{meta_path}: the {which} weights file does not belong to this metadata (another checkpoint id): "
            "was it copied from another run, or is training saving it right now? Try again after the save, "
            "or `hiercls fit --resume` an interrupted run"
        )
    model.eval()
    calibration = _run_calibration(paths, which, metadata, taxonomy) if calibrated else None
    return LoadedRun(taxonomy=taxonomy, config=config, model=model, metadata=metadata, run_dir=paths.root,
                     calibration=calibration)


def _run_calibration(paths: RunPaths, which: str, metadata: dict[str, Any], taxonomy: Taxonomy) -> dict[str, Any] | None:
    """The run's temperatures when they belong to the ``which`` checkpoint; a warning when they do not."""
    import warnings

    from hiercls.calibration import read_calibration
    from hiercls.errors import HierclsWarning

    payload = read_calibration(paths.root, taxonomy)
    if payload is None:
        return None
    again = f"`hiercls calibrate --run {paths.root} --checkpoint {which}`"
    if payload["checkpoint"] != which:
        warnings.warn(f"{paths.root / 'calibration.json'} was fitted on the {payload['checkpoint']} checkpoint; "
                      f"the {which} checkpoint's probabilities are not calibrated ({again} calibrates it)",
                      HierclsWarning, stacklevel=3)
        return None
    fitted_id, current_id = payload.get("checkpoint_id"), metadata.get("checkpoint_id")
    if fitted_id and current_id and fitted_id != current_id:
        warnings.warn(f"{paths.root / 'calibration.json'} was fitted on an earlier {which} checkpoint (the run "
                      f"trained on since); probabilities are not calibrated: run {again} again",
                      HierclsWarning, stacklevel=3)
        return None
    return payload


def predict_table(
    loaded_run: LoadedRun,
    table,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    console: Console | None = None,
    compile: bool = False,
    calibrated: bool = True,
) -> NodeProbabilities:
    """Node probabilities for every image of ``table`` (an ``ImageTable``), in table order.

    ``batch_size`` defaults to twice the training batch (no gradients are kept);
    ``compile`` runs the model through ``torch.compile`` (pays off for many images on a GPU);
    ``calibrated`` applies the run's temperatures (``LoadedRun.calibration``) when it has them.
    """
    from hiercls.data import ImageCache

    config = loaded_run.config
    resolve_device(device)  # an unavailable device is refused before any image is decoded
    images = ImageCache(config.cache_dir).load(list(table.paths), config.img_size, progress=progress)
    return predict_images(loaded_run, images, batch_size=batch_size, device=device, progress=progress,
                          console=console, compile=compile, calibrated=calibrated)


def predict_images(
    loaded_run: LoadedRun,
    images: np.ndarray,
    batch_size: int | None = None,
    device: str = "auto",
    progress: bool = True,
    console: Console | None = None,
    compile: bool = False,
    calibrated: bool = True,
) -> NodeProbabilities:
    """Node probabilities for decoded ``uint8 [N, img_size, img_size, 3]`` images (see ``predict_table``)."""
    config = loaded_run.config
    dev = resolve_device(device)
    configure_backends(dev, config.deterministic)
    model = loaded_run.model.to(dev)
    channels_last = use_channels_last(config.channels_last, dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    conditional = predict_conditionals(
        model,
        images,
        batch_size=batch_size or 2 * config.batch_size,
        device=dev,
        precision=config.precision,
        channels_last=channels_last,
        progress=progress,
        console=console,
        forward=torch.compile(model.node_conditionals, dynamic=False) if compile else None,
        fixed_batch=compile,
    )
    probs = NodeProbabilities.from_conditionals(loaded_run.taxonomy, conditional)
    if calibrated and loaded_run.calibration:
        from hiercls.calibration import apply_temperatures

        probs = apply_temperatures(probs, loaded_run.calibration["temperatures"])
    return probs


def decode(probs: NodeProbabilities, config: FitConfig) -> list[str]:
    """Predicted node per image with the run's decoding rule (greedy / best_leaf / threshold)."""
    return probs.decode(config.decode, threshold=config.threshold)


# -- the run's own images -----------------------------------------------------------------


def read_run_split(run_dir: str | Path) -> dict[str, set[str]]:
    """The resolved image paths of the run's ``train`` and ``val`` splits (RUN/split.json)."""
    import json

    split_file = RunPaths(Path(run_dir)).split
    try:
        if split_file.stat().st_size > MAX_SPLIT_BYTES:
            raise CheckpointError(f"{split_file}: larger than {MAX_SPLIT_BYTES >> 20} MiB; not a split hiercls wrote")
        data = json.loads(split_file.read_text(encoding="utf-8"))
        split = {name: {str(Path(p).resolve()) for p in data[name]} for name in ("train", "val")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{split_file}: cannot read the run's train / val split ({exc})") from None
    return split


def run_image_warnings(run_dir: str | Path, paths: Sequence[object], checkpoint: str) -> list[str]:
    """Warnings for images the run has seen: trained on, or (with the best checkpoint) chose it on.

    A prediction on such an image is optimistic. Returns an empty list when none are, and one
    line saying the check was skipped when the run has no readable ``split.json``.
    """
    try:
        split = read_run_split(run_dir)
    except CheckpointError as exc:
        return [f"cannot check which images the run trained on: {exc}"]
    resolved = [str(Path(str(p)).resolve()) for p in paths]
    n_train = sum(p in split["train"] for p in resolved)
    n_val = sum(p in split["val"] for p in resolved)
    warnings = []
    if n_train:
        warnings.append(
            f"{n_train} of {len(resolved)} image(s) were in the run's training split "
            f"({RunPaths(Path(run_dir)).split}); their predictions and scores are optimistic"
        )
    if n_val and checkpoint == "best":
        warnings.append(
            f"{n_val} of {len(resolved)} image(s) are the run's validation images, on which the best "
            "checkpoint was chosen; their scores are optimistic (--checkpoint last avoids that)"
        )
    return warnings
