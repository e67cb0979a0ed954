"""``HierarchicalImageClassifier``: hiercls as a scikit-learn style estimator.

``fit(X, y)`` trains through the same engine as ``hiercls fit`` and writes an ordinary run
folder, so a model trained in a notebook is predicted, evaluated and explained by the
command line (after ``save``), and a run of the command line loads as an estimator (``load``).

Without ``run_dir`` the run folder is temporary and the estimator owns it: it is removed when
the estimator is garbage-collected (or at interpreter exit), on ``close()``, when a refit
replaces it, and at once when ``fit`` fails. A folder given as ``run_dir``, a folder passed to
``load`` and a copy made by ``save`` belong to the user and are never removed.

``X`` is a sequence of image paths, or decoded images: a ``uint8`` array ``[N, H, W, 3]``
(or a list of ``uint8 [H, W, 3]`` arrays). Paths are listed in a temporary manifest and
decoded through the image cache exactly as the command line does; arrays are resized to
``img_size`` the way the cache resizes (``hiercls.data.cache.decode_resized``: bicubic,
whole image) and handed to the engine in memory, never written to disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from hiercls.errors import ConfigError, DataError
from hiercls.probabilities import NodeProbabilities, _check_threshold
from hiercls.taxonomy import Taxonomy, load_taxonomy

__all__ = ["HierarchicalImageClassifier", "InputError", "NotFittedError"]

# Estimator parameters that are FitConfig options of the same name and meaning.
_CONFIG_PARAMS = (
    "strategy", "backbone", "img_size", "epochs", "batch_size", "lr", "weight_decay", "optimizer", "loss",
    "loss_options", "strategy_options", "backbone_kwargs", "val_fraction", "seed", "device", "precision",
    "decode", "threshold", "cache_dir", "allow_incomplete_tree", "calibrate",
)


class InputError(DataError, ValueError):
    """``X`` or ``y`` cannot be used as given (wrong type, dtype, rank or length).

    A ``DataError`` for hiercls and a ``ValueError`` for scikit-learn conventions.
    """


class HierarchicalImageClassifier(ClassifierMixin, BaseEstimator):
    """A hierarchical image classifier on any label tree, in the scikit-learn style.

    ``__init__`` only stores its parameters (so ``get_params``, ``set_params`` and
    ``sklearn.base.clone`` work); ``fit`` trains, ``predict_proba`` returns
    ``NodeProbabilities``, ``predict`` node names. See docs/api.md for every parameter.
    """

    def __init__(
        self,
        taxonomy: str | Path | Taxonomy | dict | None = None,
        *,
        strategy: str = "joint",
        backbone: str = "resnet18",
        pretrained: str | Path | bool | None = None,
        img_size: int = 224,
        epochs: int = 10,
        batch_size: int = 32,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        optimizer: str = "adamw",
        loss: str = "ce",
        loss_options: dict | None = None,
        strategy_options: dict | None = None,
        backbone_kwargs: dict | None = None,
        val_fraction: float | None = None,
        seed: int = 0,
        device: str = "auto",
        precision: str = "auto",
        decode: str = "greedy",
        threshold: float = 0.5,
        cache_dir: str | Path | None = None,
        run_dir: str | Path | None = None,
        allow_incomplete_tree: bool = False,
        calibrate: bool = False,
        verbose: bool = False,
    ):
        self.taxonomy = taxonomy
        self.strategy = strategy
        self.backbone = backbone
        self.pretrained = pretrained
        self.img_size = img_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.loss = loss
        self.loss_options = loss_options
        self.strategy_options = strategy_options
        self.backbone_kwargs = backbone_kwargs
        self.val_fraction = val_fraction
        self.seed = seed
        self.device = device
        self.precision = precision
        self.decode = decode
        self.threshold = threshold
        self.cache_dir = cache_dir
        self.run_dir = run_dir
        self.allow_incomplete_tree = allow_incomplete_tree
        self.calibrate = calibrate
        self.verbose = verbose

    # -- training -----------------------------------------------------------------------

    def fit(self, X, y, validation_data: tuple[Any, Any] | None = None) -> HierarchicalImageClassifier:
        """Train on images ``X`` labelled ``y`` (node names or aliases; internal nodes are partial labels).

        ``validation_data=(X_val, y_val)`` validates on those images after every epoch (and
        replaces the ``val_fraction`` split); ``best`` is then chosen on them. Returns ``self``.
        """
        from hiercls.engine import fit as engine_fit

        taxonomy = self._taxonomy_object()
        x_train, y_train = _check_xy(X, y, taxonomy, "X", "y")
        x_val, y_val = (None, [])
        if validation_data is not None:
            x_val, y_val = _check_validation(validation_data, taxonomy, x_train)
        temporary = self.run_dir is None
        out = Path(tempfile.mkdtemp(prefix="hiercls-run-")) if temporary else Path(self.run_dir)
        workspace = Path(tempfile.mkdtemp(prefix="hiercls-fit-"))
        fitted = False
        try:
            config, source = self._fit_inputs(workspace, out, taxonomy, x_train, y_train, x_val, y_val)
            overwrite = getattr(self, "run_dir_", None) == Path(config.out).expanduser().resolve()  # a refit replaces its own run
            result = engine_fit(config, self._console(), overwrite=overwrite, progress=self.verbose, source=source)
            if result.interrupted:
                hint = ("pass run_dir=... to keep a resumable run" if temporary
                        else f"continue with `hiercls fit --out {result.run_dir} --resume`")
                raise KeyboardInterrupt(f"training interrupted; {hint}")
            self._set_fitted(result.run_dir, owned=temporary)
            fitted = True
        finally:
            shutil.rmtree(workspace, ignore_errors=True)
            if temporary and not fitted:  # a failed fit leaves nothing behind; a user's run_dir is never touched
                shutil.rmtree(out, ignore_errors=True)
        return self

    def _replace_run_owner(self, run_dir: Path, owned: bool) -> None:
        """Remove the previous temporary run folder (a refit replaces it) and own ``run_dir`` if ``owned``."""
        previous = self.__dict__.get("_run_owner")
        if previous is not None and previous.alive:
            if previous.peek()[2][0] == str(run_dir):
                previous.detach()  # the same folder, now the user's (given back as run_dir): keep it
            else:
                previous()
        self._run_owner = weakref.finalize(self, shutil.rmtree, str(run_dir), ignore_errors=True) if owned else None

    def close(self) -> None:
        """Remove the temporary run folder now (the model stays usable in memory; ``save`` no longer works).

        Does nothing when the run folder is the user's (``run_dir``, ``load``).
        """
        owner = self.__dict__.get("_run_owner")
        if owner is not None:
            owner()

    def _fit_inputs(self, workspace: Path, out: Path, taxonomy: Taxonomy, x_train, y_train, x_val, y_val):
        """The FitConfig and (for arrays or given validation data) the in-memory TrainingSource."""
        from hiercls.config import load_config
        from hiercls.engine import TrainingSource

        taxonomy_path = self._taxonomy_path(workspace, taxonomy)
        x_all = _concat(x_train, x_val)
        labels = list(y_train) + list(y_val)
        val_idx = np.arange(len(y_train), len(labels)) if x_val is not None else None
        options = self._config_options(taxonomy_path, out)
        if not _is_paths(x_all):
            options["data"] = str(workspace)  # recorded only: the images come in memory
            config = load_config(None, options)
            images = _resize_all(x_all, config.img_size)
            table = _array_table(workspace, labels)
            return config, TrainingSource(table, images=images, val_idx=val_idx)
        manifest = _write_manifest(workspace, x_all, labels)
        options["data"] = str(manifest)
        config = load_config(None, options)
        if val_idx is None:
            return config, None  # the engine reads the manifest exactly as `hiercls fit --data` would
        from hiercls.data import load_images

        table = load_images(manifest, taxonomy=load_taxonomy(taxonomy_path), require_labels=True)
        return config, TrainingSource(table, val_idx=val_idx)

    def _config_options(self, taxonomy_path: Path, out: Path) -> dict[str, Any]:
        options: dict[str, Any] = {name: getattr(self, name) for name in _CONFIG_PARAMS}
        for name in ("loss_options", "strategy_options", "backbone_kwargs"):
            options[name] = dict(options[name] or {})
        if self.pretrained is True:
            raise ConfigError(
                "pretrained=True: hiercls never downloads weights; give the path of a local weights file, "
                "or pretrained=None for random initialisation"
            )
        options["pretrained"] = None if self.pretrained in (None, False) else str(self.pretrained)
        options["taxonomy"] = str(taxonomy_path)
        options["out"] = str(out)
        return options

    def _taxonomy_object(self) -> Taxonomy:
        tree = self.taxonomy
        if tree is None:
            raise ConfigError("taxonomy is required: give a taxonomy YAML path, a Taxonomy or a nested dict")
        if isinstance(tree, Taxonomy):
            return tree
        if isinstance(tree, dict):
            if isinstance(tree.get("children"), list):  # the YAML file's layout, as a dict
                return Taxonomy.from_dict(tree)
            return Taxonomy.from_nested(tree)
        if isinstance(tree, (str, Path)):
            return load_taxonomy(tree)
        raise ConfigError(f"taxonomy must be a YAML path, a Taxonomy or a nested dict, not {type(tree).__name__}")

    def _taxonomy_path(self, workspace: Path, taxonomy: Taxonomy) -> Path:
        if isinstance(self.taxonomy, (str, Path)):
            return Path(self.taxonomy)
        path = workspace / "taxonomy.yaml"
        taxonomy.to_yaml(path)
        return path

    def _console(self):
        from rich.console import Console

        return Console(stderr=True, quiet=not self.verbose)

    def _set_fitted(self, run_dir: Path, which: str = "best", owned: bool = False) -> None:
        """Load the run; ``owned``: a temporary run folder this estimator removes (see the module doc)."""
        from hiercls.inference import load_run

        loaded = load_run(run_dir, which)
        self._replace_run_owner(Path(loaded.run_dir), owned)
        self.loaded_run_ = loaded
        self.checkpoint_ = which
        self.model_ = loaded.model
        self.taxonomy_ = loaded.taxonomy
        self.config_ = loaded.config
        self.classes_ = np.array(loaded.taxonomy.leaves, dtype=object)
        self.run_dir_ = Path(loaded.run_dir)
        self.history_ = _read_history(self.run_dir_)

    # -- prediction ---------------------------------------------------------------------

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def __getstate__(self) -> dict[str, Any]:
        # a copy (pickle, copy.deepcopy) never owns the temporary run folder: only the original removes it
        state = dict(super().__getstate__())  # object.__getstate__ may return __dict__ itself
        state.pop("_run_owner", None)
        return state

    def predict_proba(self, X) -> NodeProbabilities:
        """Probabilities of every node of the tree for each image (``NodeProbabilities``).

        ``.marginal[i, j]`` is P(image i lies under node j); ``.leaf_marginals()`` gives the
        leaf columns in the order of ``classes_``; ``.conditional`` holds P(node | parent).
        """
        from hiercls.inference import predict_images

        check_is_fitted(self)
        x = _check_x(X, "X")
        images = self._decoded(x)
        return predict_images(self.loaded_run_, images, device=self.device, progress=self.verbose,
                              console=self._console())

    def predict(self, X, decode: str | None = None, threshold: float | None = None) -> np.ndarray:
        """The predicted node of each image (names, ``dtype=object``).

        ``decode`` (default: the ``decode`` parameter) is ``greedy``, ``best_leaf`` or
        ``threshold``; with ``threshold`` an image stops at an internal node when its best
        child is less likely than ``threshold`` (default: the ``threshold`` parameter).
        """
        method = self.decode if decode is None else decode
        cut = self.threshold if threshold is None else threshold
        _check_threshold(cut)  # before the model runs
        probs = self.predict_proba(X)
        return np.array(probs.decode(method, threshold=cut), dtype=object)

    def evaluate(
        self,
        X,
        y,
        groups: Sequence[str | None] | None = None,
        *,
        decode: str | None = None,
        threshold: float | None = None,
        aggregator: str = "mode",
        group_scoring: str = "groups",
        ci: bool = False,
    ) -> dict[str, Any]:
        """Every metric of ``hiercls evaluate`` for ``predict(X)`` against ``y``: the ``metrics.json`` dict.

        ``groups`` (one value per image, ``None`` for none) adds group-level metrics under
        ``groups``, each group voting with ``aggregator``; ``ci=True`` adds bootstrap intervals.
        """
        return self._evaluation(X, y, groups, decode=decode, threshold=threshold, aggregator=aggregator,
                                group_scoring=group_scoring, ci=ci).metrics

    def score(self, X, y, sample_weight=None) -> float:
        """Accuracy of ``predict(X)`` on the images labelled at a leaf, as ``hiercls evaluate`` reports it.

        Labels are resolved first (aliases); images labelled at an internal node (partial
        labels) are left out, as in ``evaluate(X, y)["accuracy"]``, which this equals when
        ``sample_weight`` is ``None``.
        """
        evaluation = self._evaluation(X, y)
        accuracy = evaluation.metrics["accuracy"]
        if accuracy is None:
            raise InputError("y has no label at a leaf; score is the accuracy on leaf-labelled images "
                             "(evaluate(X, y) gives the hierarchical metrics of partial labels)")
        if sample_weight is None:
            return float(accuracy)
        return _weighted_leaf_accuracy(evaluation, sample_weight)

    def _evaluation(self, X, y, groups=None, *, decode=None, threshold=None, **scoring):
        from hiercls.evaluation import evaluate_prediction_set, run_provenance
        from hiercls.predictions import PredictionSet

        check_is_fitted(self)
        truth = self.taxonomy_.resolve_labels(_check_labels(y, "y"), source="y")
        x = _check_x(X, "X")
        if len(truth) != len(x):
            raise InputError(f"X has {len(x)} images but y has {len(truth)} labels; give one label per image")
        group_list = _check_groups(groups, len(x))
        method = self.decode if decode is None else decode
        cut = self.threshold if threshold is None else threshold
        probs = self.predict_proba(x)
        names = [str(p) for p in x] if _is_paths(x) else [f"X[{i}]" for i in range(len(x))]
        predictions = PredictionSet(names, list(truth), group_list or [None] * len(x),
                                    probs.decode(method, threshold=cut), probs, source="X")
        provenance = {**run_provenance(self.loaded_run_, self.checkpoint_, None, "X"), "predictions": None}
        return evaluate_prediction_set(self.taxonomy_, predictions, decode=method, threshold=cut,
                                       group_by="group" if group_list else None, provenance=provenance, **scoring)

    def _decoded(self, x) -> np.ndarray:
        size = self.config_.img_size
        if not _is_paths(x):
            return _resize_all(x, size)
        from hiercls.data import ImageCache

        return ImageCache(self.cache_dir).load(x, size, progress=self.verbose)

    # -- run folders --------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Copy the run folder to ``path`` (new or empty): the CLI's predict/evaluate/explain take it."""
        check_is_fitted(self)
        if not self.run_dir_.is_dir():
            raise ConfigError(f"{self.run_dir_}: the temporary run folder was removed (close()); "
                              "fit again, with run_dir=... to keep the run folder")
        target = Path(path).expanduser().resolve()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ConfigError(f"{target}: already exists and is not an empty folder; choose another path")
        if target == self.run_dir_:
            return target
        if target.exists():
            target.rmdir()
        shutil.copytree(self.run_dir_, target, ignore=shutil.ignore_patterns(".hiercls.lock", ".*.tmp"))
        return target

    @classmethod
    def load(cls, run_dir: str | Path, checkpoint: str = "best") -> HierarchicalImageClassifier:
        """An estimator fitted with the ``best`` (or ``last``) checkpoint of a run folder.

        Works for folders written by ``save``, by ``fit`` and by ``hiercls fit``; the
        parameters (``get_params``) are the run's config.
        """
        from hiercls.inference import load_run

        config = load_run(run_dir, checkpoint).config
        params: dict[str, Any] = {name: getattr(config, name) for name in _CONFIG_PARAMS}
        for name in ("loss_options", "strategy_options", "backbone_kwargs"):
            params[name] = dict(params[name]) or None
        params["cache_dir"] = None if config.cache_dir is None else str(config.cache_dir)
        params["pretrained"] = None if config.pretrained is None else str(config.pretrained)
        run = Path(run_dir).expanduser().resolve()
        # the tree the model was trained on: the run's own copy when the original moved or had exclusions
        stored = Path(config.taxonomy)
        params["taxonomy"] = str(stored if stored.is_file() and not config.exclude else run / "taxonomy.yaml")
        estimator = cls(**params)
        estimator._set_fitted(run, checkpoint)
        return estimator


# -- input checks ---------------------------------------------------------------------------


def _check_x(X, name: str):
    """``X`` as a list of paths, or as decoded images (a uint8 array or a list of uint8 images)."""
    if isinstance(X, (str, Path)):
        raise InputError(f"{name} is a single path ({X!s}); give a list of image paths, one per image")
    if isinstance(X, np.ndarray) and X.dtype.kind in "OUS":
        X = list(X)
    if isinstance(X, np.ndarray) or (isinstance(X, Sequence) and X and isinstance(X[0], np.ndarray)):
        return _check_images(X, name)
    try:
        items = list(X)
    except TypeError:
        raise InputError(f"{name} must be a list of image paths or a uint8 array [N, H, W, 3], "
                         f"not {type(X).__name__}") from None
    if not items:
        raise InputError(f"{name} is empty; give at least one image")
    bad = [i for i, item in enumerate(items) if not isinstance(item, (str, Path))]
    if bad:
        raise InputError(f"{name}[{bad[0]}] is a {type(items[bad[0]]).__name__}, not an image path; give paths "
                         "(str or Path) or decoded images as a uint8 array [N, H, W, 3]")
    paths = [Path(p).expanduser().resolve() for p in items]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{name}: {len(missing)} image file(s) not found (e.g. {missing[0]}); check the paths")
    return paths


def _check_images(X, name: str):
    """Decoded images: a uint8 ``[N, H, W, 3]`` array, or a list of uint8 ``[H, W, 3]`` arrays."""
    images = list(X) if not isinstance(X, np.ndarray) else X
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            hint = " (one image: add a first axis, X[None])" if images.ndim == 3 else ""
            raise InputError(f"{name} has shape {images.shape}; decoded images must be [N, H, W, 3] RGB{hint}")
        _check_dtype(images, name)
        if len(images) == 0:
            raise InputError(f"{name} is empty; give at least one image")
        return images
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3:
            shape = getattr(image, "shape", type(image).__name__)
            raise InputError(f"{name}[{i}] has shape {shape}; each decoded image must be [H, W, 3] RGB")
        _check_dtype(image, f"{name}[{i}]")
    return images


def _check_dtype(array: np.ndarray, name: str) -> None:
    if array.dtype != np.uint8:
        raise InputError(
            f"{name} has dtype {array.dtype}; decoded images must be uint8 (0..255). Convert with "
            "(x * 255).round().clip(0, 255).astype(np.uint8) if they are floats in [0, 1]"
        )


def _check_labels(y, name: str) -> list[str]:
    if isinstance(y, (str, bytes)):
        raise InputError(f"{name} is a single string; give one label per image")
    try:
        labels = list(y)
    except TypeError:
        raise InputError(f"{name} must be a sequence of labels (node names), not {type(y).__name__}") from None
    missing = [i for i, label in enumerate(labels) if label is None or (isinstance(label, float) and np.isnan(label))]
    if missing:
        raise InputError(f"{name}[{missing[0]}] has no label ({len(missing)} missing); every image needs a node name")
    return [str(label) for label in labels]


def _check_groups(groups, n: int) -> list[str | None] | None:
    """One group per image (``None``: no group), or ``None`` when no grouping is asked."""
    if groups is None:
        return None
    if isinstance(groups, (str, bytes)):
        raise InputError("groups is a single string; give one group per image (or None)")
    values = [None if g is None else str(g) for g in groups]
    if len(values) != n:
        raise InputError(f"X has {n} images but groups has {len(values)} values; give one group per image")
    return values


def _weighted_leaf_accuracy(evaluation, sample_weight) -> float:
    """``score`` with ``sample_weight``: the weighted exact-match rate over the leaf-labelled images."""
    from sklearn.metrics import accuracy_score

    preds = evaluation.predictions
    weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if len(weights) != len(preds):
        raise InputError(f"sample_weight has {len(weights)} values for {len(preds)} images; give one per image")
    leaves = set(evaluation.taxonomy.leaves)
    keep = [i for i, t in enumerate(preds.labels) if t in leaves]
    return float(accuracy_score([preds.labels[i] for i in keep], [preds.predictions[i] for i in keep],
                                sample_weight=weights[keep]))


def _check_xy(X, y, taxonomy: Taxonomy, x_name: str, y_name: str):
    x = _check_x(X, x_name)
    labels = _check_labels(y, y_name)
    if len(x) != len(labels):
        raise InputError(f"{x_name} has {len(x)} images but {y_name} has {len(labels)} labels; give one label per image")
    return x, taxonomy.resolve_labels(labels, source=y_name)


def _check_validation(validation_data, taxonomy: Taxonomy, x_train):
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise InputError("validation_data must be a pair (X_val, y_val)")
    x_val, y_val = _check_xy(validation_data[0], validation_data[1], taxonomy, "X_val", "y_val")
    kind_val, kind_train = ("paths" if _is_paths(x) else "images" for x in (x_val, x_train))
    if kind_val != kind_train:
        raise InputError(f"X holds {kind_train} but X_val holds {kind_val}; give both as paths or both as images")
    return x_val, y_val


def _is_paths(x) -> bool:
    """Whether checked inputs (``_check_x``) are image paths rather than decoded images."""
    return isinstance(x, list) and isinstance(x[0], Path)


def _concat(x_train, x_val):
    """Training and validation inputs as one list of paths or one uint8 array."""
    if _is_paths(x_train):
        return list(x_train) + list(x_val or [])
    parts = [x_train] if x_val is None else [x_train, x_val]
    return [image for part in parts for image in part] if any(isinstance(p, list) for p in parts) else (
        np.concatenate(parts) if len(parts) > 1 else x_train
    )


# -- images and files -----------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """One image resized as the image cache resizes files (``decode_resized``): bicubic, whole image."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    resized = Image.fromarray(np.ascontiguousarray(image), "RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


def _resize_all(images, size: int) -> np.ndarray:
    if isinstance(images, np.ndarray) and images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = _resize(image, size)
    return out


def _array_table(workspace: Path, labels: list[str]):
    """An ImageTable for decoded images: each image is named by its row (``array/000042``)."""
    from hiercls.data import ImageTable

    width = max(6, len(str(len(labels))))
    paths = [workspace / "array" / f"{i:0{width}d}" for i in range(len(labels))]
    return ImageTable(root=workspace, paths=paths, labels=list(labels), source="X")


def _write_manifest(workspace: Path, paths: list[Path], labels: list[str]) -> Path:
    """The images and labels as a ``path,label`` manifest (absolute paths) for the engine to read."""
    from hiercls.data import ImageTable, write_manifest

    seen: dict[Path, int] = {}
    for i, path in enumerate(paths):
        if path in seen:
            raise InputError(f"X[{i}] repeats X[{seen[path]}] ({path}); list each image once")
        seen[path] = i
    manifest = workspace / "manifest.csv"
    write_manifest(ImageTable(root=workspace, paths=paths, labels=list(labels)), manifest)
    return manifest


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records, one per finished epoch."""
    from hiercls.errors import CheckpointError
    from hiercls.io import RUN_FILE_BYTES, read_user_text

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = read_user_text(path, "metrics", CheckpointError, max_bytes=RUN_FILE_BYTES)
    return [json.loads(line) for line in text.splitlines() if line.strip()]
