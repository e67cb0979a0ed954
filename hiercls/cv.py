"""Grouped K-fold cross-validation over a grid of strategies and backbones (``hiercls cv``).

One *cell* is one (strategy, backbone, fold): a ``hiercls fit`` run in
``OUT/<strategy>__<backbone>/fold<k>/`` trained on the other folds, then scored on its held-out
fold with the run's **last** checkpoint. ``fit`` picks its ``best`` checkpoint on the
validation images, which here *are* the held-out fold; scoring that checkpoint would let the
test data choose the model and inflate every number, so the last epoch is what is reported.

Every cell ends with an atomically written ``cv_done.json``; a finished cell is never redone, so
an interrupted cross-validation continues where it stopped when the same command is run again.
After every finished cell the paper-style tables (Hamdi et al., Tables 1-4) are rewritten to
``OUT/tables.md`` and ``OUT/tables.json`` from the cells finished so far. See ``docs/cv.md``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)
from rich.console import Console
from rich.table import Table

from hiercls.config import FitConfig, check_regex, check_strategy, read_config_file
from hiercls.console import bars_enabled
from hiercls.errors import CheckpointError, ConfigError, DataError
from hiercls.io import YamlTooLarge, atomic_write_json, atomic_write_text, json_ready, load_yaml, read_user_text
from hiercls.metrics import cut_classes

if TYPE_CHECKING:
    from hiercls.taxonomy import Taxonomy

__all__ = [
    "CVConfig",
    "CVResult",
    "CellResult",
    "load_cv_config",
    "run_cv",
    "cell_dir",
    "safe_name",
    "collect_cells",
    "build_tables",
    "render_tables_markdown",
    "write_tables",
    "write_seed_tables",
    "CV_OWNED_OPTIONS",
    "DONE_FILE",
]

# FitConfig options that the cross-validation sets itself, per cell; they are not allowed under ``fit:``.
CV_OWNED_OPTIONS = ("taxonomy", "data", "out", "strategy", "backbone", "fold", "folds", "val_fraction", "seed",
                    "split_seed", "group_regex", "exclude")
# ``fit:`` options that may change between two invocations on the same OUT (they do not change results).
_RESTART_FREE = ("device", "num_workers", "cache_dir", "precision", "compile")
DONE_FILE = "cv_done.json"
SETTINGS_FILE = "cv_config.yaml"
CHECKPOINT = "last"


# -- configuration --------------------------------------------------------------------------


class CVConfig(BaseModel):
    """A cross-validation grid: data, folds, the strategies x backbones to compare, shared fit options."""

    model_config = ConfigDict(extra="forbid")

    taxonomy: Path
    data: Path
    out: Path
    folds: int = Field(5, ge=2)
    seed: int = 0
    # Training seeds: each trains the whole grid again in OUT/seed<s>/, on the same folds (split by ``seed``).
    seeds: list[int] | None = Field(None, min_length=1)
    group_regex: str | None = None
    exclude: list[str] = Field(default_factory=list)
    # Registered strategies (hiercls.plugins.strategy_names); ``strategy+loss`` trains that strategy
    # with another registered loss than fit.loss (e.g. ``joint+hxe``), as a model of its own.
    strategies: list[str] = Field(
        default_factory=lambda: ["flat", "per_node", "joint"], min_length=1
    )
    backbones: list[str] = Field(default_factory=lambda: ["resnet18"], min_length=1)
    aggregator: str = "mode"
    group_scoring: Literal["groups", "images"] = "groups"
    group_by_available: bool | Literal["auto"] = "auto"
    fit: dict[str, Any] = Field(default_factory=dict)
    # Table 4's rows: row name -> node(s) pooled into one class (the paper's "AML+APML");
    # None = one row per node of the tree. Tables only: may change between invocations.
    table4_rows: dict[str, str | list[str]] | None = None
    # The comparison table: every other strategy against this one, same backbone, paired on the
    # same held-out images (bootstrap CI of the difference, McNemar). Tables only.
    reference: str = "flat"

    _source: str | None = PrivateAttr(default=None)
    _train_seed: int | None = PrivateAttr(default=None)

    @field_validator("strategies", "backbones", "exclude")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted({v for v in value if value.count(v) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once; give each once")
        return value

    @field_validator("strategies")
    @classmethod
    def _registered_strategies(cls, value: list[str]) -> list[str]:
        for name in value:
            strategy, loss = split_model(name)
            check_strategy(strategy)
            if loss is not None:
                _check_loss(name, loss)
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int] | None) -> list[int] | None:
        repeated = sorted({v for v in value or [] if value.count(v) > 1})
        if repeated:
            raise ValueError(f"lists seed {', '.join(map(str, repeated))} more than once; give each once")
        return value

    @field_validator("backbones")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("a backbone name is empty")
        paths = [safe_name(v) for v in value]
        clash = sorted({v for v, p in zip(value, paths) if paths.count(p) > 1})
        if clash:
            raise ValueError(f"{', '.join(clash)} map to the same folder name; keep one of them")
        return value

    @field_validator("table4_rows")
    @classmethod
    def _table4_rows(cls, value: dict[str, str | list[str]] | None) -> dict[str, list[str]] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("names no row; leave it out for one row per node, or map row names to nodes")
        rows: dict[str, list[str]] = {}
        for name, nodes in value.items():
            nodes = [nodes] if isinstance(nodes, str) else list(nodes)
            if not name.strip() or not nodes or any(not n.strip() for n in nodes):
                raise ValueError(f"row '{name}' needs a name and one or more node names, e.g. AML+APML: [AML, APML]")
            if len(set(nodes)) < len(nodes):
                raise ValueError(f"row '{name}' names a node more than once")
            rows[name] = nodes
        return rows

    @field_validator("group_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return check_regex(value)

    @field_validator("fit")
    @classmethod
    def _fit_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = [k for k in value if k in CV_OWNED_OPTIONS]
        if owned:
            hints = {"strategy": "strategies", "backbone": "backbones", "fold": "folds"}
            where = ", ".join(f"'{k}'" + (f" (use top-level '{hints[k]}')" if k in hints else " (set it at top level)")
                              for k in owned)
            raise ValueError(f"{where} cannot be under fit:, the cross-validation sets it for every cell")
        unknown = [k for k in value if k not in FitConfig.model_fields]
        if unknown:
            valid = ", ".join(k for k in FitConfig.model_fields if k not in CV_OWNED_OPTIONS)
            raise ValueError(f"unknown fit option(s) {', '.join(unknown)}; valid ones: {valid}")
        pretrained = value.get("pretrained")
        if isinstance(pretrained, dict):
            bad = [k for k, v in pretrained.items() if v is not None and not isinstance(v, (str, Path))]
            if bad:
                raise ValueError(f"fit.pretrained maps a backbone name to a weights file path; '{bad[0]}' is not")
        elif pretrained is not None and not isinstance(pretrained, (str, Path)):
            raise ValueError("fit.pretrained is a weights file path, or a mapping backbone name -> path")
        return value

    # -- derived ---------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The config file this came from (for error messages), or 'cv config'."""
        return self._source or "cv config"

    @property
    def cells(self) -> list[tuple[str, str, int]]:
        """(strategy, backbone, fold) of every cell, fold-major so partial tables compare all models."""
        return [(s, b, k) for k in range(self.folds) for b in self.backbones for s in self.strategies]

    def for_seed(self, seed: int) -> CVConfig:
        """The grid of one training seed: cells in ``OUT/seed<s>/``, folds still split with ``seed``."""
        copy = self.model_copy(update={"out": Path(self.out) / f"seed{seed}", "seeds": None})
        copy._source, copy._train_seed = self._source, seed
        return copy

    def pretrained_for(self, backbone: str) -> Path | None:
        """The local weights file for ``backbone`` (``fit.pretrained`` is one path or a per-backbone mapping)."""
        value = self.fit.get("pretrained")
        if isinstance(value, dict):
            value = value.get(backbone)
        return Path(value) if value else None

    def strategy_options_for(self, strategy: str) -> dict[str, Any]:
        """``fit.strategy_options`` for one strategy.

        Keys named after a strategy hold that strategy's own options (``joint: {feed_parent: true}``);
        the other keys apply to every strategy (``dropout: 0.1``).
        """
        from hiercls.strategies import strategy_names, strategy_options

        value = self.fit.get("strategy_options") or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: option 'fit.strategy_options': must be a mapping, got {value!r}")
        shared = {k: v for k, v in value.items() if k not in strategy_names()}
        own = value.get(strategy) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"{self.source}: option 'fit.strategy_options.{strategy}': must be a mapping of options")
        options = {**shared, **own}
        accepted = strategy_options(strategy)
        unknown = [k for k in options if k not in accepted]
        if unknown:
            owners = [s for s in strategy_names() if unknown[0] in strategy_options(s)]
            hint = f"; put it under strategy_options.{owners[0]}" if owners else ""
            raise ConfigError(
                f"{self.source}: option 'fit.strategy_options': '{unknown[0]}' is not an option of {strategy} "
                f"(accepted: {', '.join(accepted)}){hint}"
            )
        return options

    def fit_config(self, model: str, backbone: str, fold: int) -> FitConfig:
        """The ``FitConfig`` of one cell: the shared ``fit:`` options plus what the grid sets.

        ``model`` is an entry of ``strategies``: a strategy, or ``strategy+loss``.
        """
        strategy, loss = split_model(model)
        options = {k: v for k, v in self.fit.items() if k != "pretrained"}
        if loss is not None and loss != options.get("loss", FitConfig.model_fields["loss"].default):
            # fit.loss_options belong to fit.loss; a model that names another loss takes its defaults
            options.update(loss=loss, loss_options={})
        # The tables score each cell's last checkpoint, so validating every epoch would only
        # draw learning curves; by default a cell validates once, after its last epoch.
        options.setdefault("val_every", options.get("epochs", FitConfig.model_fields["epochs"].default))
        pretrained = self.pretrained_for(backbone)
        if "strategy_options" in options:
            options["strategy_options"] = self.strategy_options_for(strategy)
        options.update(
            taxonomy=self.taxonomy, data=self.data, out=cell_dir(self.out, model, backbone, fold),
            strategy=strategy, backbone=backbone, fold=fold, folds=self.folds, seed=self.seed,
            group_regex=self.group_regex, exclude=list(self.exclude),
            pretrained=pretrained,
        )
        if self._train_seed is not None:  # a seed of the ``seeds`` axis trains; ``seed`` still splits
            options.update(seed=self._train_seed, split_seed=self.seed)
        try:
            return FitConfig.model_validate(options)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            message = first["msg"].removeprefix("Value error, ")
            if "input" in first and not isinstance(first["input"], dict):
                message += f" (got {first['input']!r})"
            raise ConfigError(f"{self.source}: option 'fit.{loc}': {message}") from None

    def table4_rows_for(self, taxonomy: Taxonomy) -> list[tuple[str, tuple[str, ...]]]:
        """Table 4's (row name, member nodes), checked against ``taxonomy`` (aliases resolved)."""
        if self.table4_rows is None:
            return [(node, (node,)) for node in taxonomy.nodes if node != taxonomy.root]
        rows = []
        for name, nodes in self.table4_rows.items():
            members = []
            for node in nodes:
                try:
                    resolved = taxonomy.resolve(node)
                except DataError:
                    resolved = None
                if resolved is None or resolved == taxonomy.root:
                    why = ("is excluded ('exclude')" if node in self.exclude
                           else "is the root, not a class" if resolved == taxonomy.root
                           else f"is not a node of {self.taxonomy}")
                    valid = ", ".join(n for n in taxonomy.nodes if n != taxonomy.root)
                    raise ConfigError(f"{self.source}: option 'table4_rows.{name}': '{node}' {why}; "
                                      f"use node names of the tree ({valid})")
                members.append(resolved)
            rows.append((name, tuple(members)))
        return rows

    def settings(self) -> dict[str, Any]:
        """The options that define the results (compared when an OUT folder is continued)."""
        data = self.model_dump(mode="json")
        fit = {k: v for k, v in data["fit"].items() if k not in _RESTART_FREE}
        return {k: data[k] for k in ("taxonomy", "data", "folds", "seed", "group_regex", "exclude", "aggregator",
                                     "group_by_available")} | {"fit": fit} | (
            # only when set, so an OUT folder written before the option existed still continues
            {"group_scoring": self.group_scoring} if self.group_scoring != "groups" else {})


def split_model(name: str) -> tuple[str, str | None]:
    """A grid model name as (strategy, loss): ``joint+hxe`` -> ("joint", "hxe"); ``flat`` -> ("flat", None)."""
    strategy, plus, loss = name.partition("+")
    if plus and (not strategy.strip() or not loss.strip()):
        raise ValueError(f"'{name}': write a strategy with another loss as strategy+loss, e.g. joint+hxe")
    return strategy.strip(), (loss.strip() if plus else None)


def _check_loss(model: str, loss: str) -> None:
    """A pydantic validator body: the loss of ``strategy+loss`` must be registered (built-in or plugin)."""
    from hiercls.plugins import find_loss

    try:
        find_loss(loss)
    except ConfigError as exc:
        raise ValueError(f"'{model}': {exc}") from None


def safe_name(name: str) -> str:
    """A backbone name as a folder name (``hf-hub:org/model`` -> ``hf-hub_org_model``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "backbone"


def cell_dir(out: str | Path, strategy: str, backbone: str, fold: int) -> Path:
    """``OUT/<strategy>__<backbone>/fold<k>``: the run folder of one cell."""
    return Path(out) / f"{strategy}__{safe_name(backbone)}" / f"fold{fold}"


_PATH_KEYS_IN_FIT = ("pretrained", "cache_dir")


def _resolve_fit_paths(fit: Any, folder: Path) -> Any:
    """Make ``fit.pretrained`` (one path or a mapping) and ``fit.cache_dir`` absolute against ``folder``."""
    if not isinstance(fit, dict):
        return fit

    def absolute(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str((folder / value).resolve())
        return value

    fit = dict(fit)
    for key in _PATH_KEYS_IN_FIT:
        if key in fit:
            value = fit[key]
            fit[key] = {k: absolute(v) for k, v in value.items()} if isinstance(value, dict) else absolute(value)
    return fit


def _format_error(error: ValidationError, path: Path | None, given: dict[str, Any]) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    option = ".".join(loc)
    top = loc[0] if loc else ""
    if top in given and top != "fit":
        where = f"command-line option --{top.replace('_', '-')}"
    elif path is not None:
        where = f"{path}: option '{option}'"
    else:
        where = f"option '{option}'"
    kind = first["type"]
    if kind == "extra_forbidden":
        message = f"unknown option; valid options are: {', '.join(CVConfig.model_fields)}"
    elif kind == "missing":
        message = f"is required; add '{top}:' to the config file"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and not isinstance(first["input"], (dict, list)):
            message += f" (got {first['input']!r})"
    more = f" (and {len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return f"{where}: {message}{more}"


def load_cv_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> CVConfig:
    """Read a cv YAML file, apply ``overrides`` and validate everything before any training.

    Relative paths in the file (``taxonomy``, ``data``, ``out``, ``fit.pretrained``,
    ``fit.cache_dir``) are relative to the file's folder. ``overrides`` holds top-level options
    (``None`` values are ignored) and may hold a ``fit`` dict merged into the file's ``fit:``.
    Every cell's ``FitConfig`` is built once, so a bad ``fit:`` value fails here, naming the
    file and option, not hours later.
    """
    file = Path(path) if path is not None else None
    data = read_config_file(file) if file is not None else {}
    if file is not None:
        data["fit"] = _resolve_fit_paths(data.get("fit") or {}, file.parent.resolve())
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        if key == "fit" and isinstance(value, dict) and isinstance(data.get("fit"), dict):
            data["fit"] = {**data["fit"], **{k: v for k, v in value.items() if v is not None}}
        else:
            data[key] = value
    try:
        config = CVConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, file, given)) from None
    config._source = str(file) if file is not None else "cv config"
    if config.table4_rows is not None and Path(config.taxonomy).is_file():
        config.table4_rows_for(_table_taxonomy(config))
    from_command_line = [k for k in (given.get("fit") or {}) if isinstance(given.get("fit"), dict)]
    for strategy in config.strategies:
        for backbone in config.backbones:
            try:
                config.fit_config(strategy, backbone, 0)
            except ConfigError as exc:
                for key in from_command_line:
                    prefix = f"{config.source}: option 'fit.{key}'"
                    if str(exc).startswith(prefix):
                        raise ConfigError(f"command-line option --{key.replace('_', '-')}" + str(exc)[len(prefix):]) from None
                raise
    return config


# -- results --------------------------------------------------------------------------------


@dataclass
class CellResult:
    """One (strategy, backbone, fold) cell: where it lives and what happened to it in this call."""

    strategy: str
    backbone: str
    fold: int
    run_dir: Path
    status: Literal["done", "skipped", "pending"]
    seconds: float | None = None
    metrics: dict[str, Any] | None = None


@dataclass
class CVResult:
    """What ``run_cv`` leaves behind."""

    out: Path
    tables_md: Path
    tables_json: Path
    cells: list[CellResult] = field(default_factory=list)
    interrupted: bool = False

    @property
    def finished(self) -> int:
        return sum(c.status in ("done", "skipped") for c in self.cells)

    @property
    def trained(self) -> int:
        return sum(c.status == "done" for c in self.cells)


# -- running the grid -----------------------------------------------------------------------


def _prepare_out(config: CVConfig) -> tuple[Path, bool]:
    """Create OUT, or check that an existing OUT is this cross-validation; True when its settings changed.

    Settings may change only while no cell has finished (``cv_done.json``): a command that failed
    before its first cell finished leaves no results that the corrected command could contradict.
    """
    out = Path(config.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: out must be a folder for the cross-validation, but a file has that name")
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        try:
            stored = load_yaml(read_user_text(settings_path, "cv settings", CheckpointError)) or {}
        except (yaml.YAMLError, YamlTooLarge) as exc:
            raise CheckpointError(f"{settings_path}: cannot read ({exc}); choose another out folder") from None
        changed = _changed_settings(stored.get("settings", {}), config.settings())
        if changed and _finished_cells(out):
            raise ConfigError(
                f"{out}: holds a cross-validation with other settings ({'; '.join(changed[:3])}); its finished "
                "folds would not be comparable. Choose another out folder (or restore the settings)"
            )
        # No cell finished (e.g. the last command failed): the new settings simply replace the old ones,
        # and unfinished cells start again rather than resume a model trained with the old settings.
        settings_changed = bool(changed)
    else:
        settings_changed = False
    if not settings_path.is_file() and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"{out}: folder exists, is not empty and is not a hiercls cv folder (no {SETTINGS_FILE}); "
            "choose another out folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings_path, yaml.safe_dump(
        {"settings": config.settings(), "config": config.model_dump(mode="json")}, sort_keys=False))
    return out, settings_changed


def _finished_cells(out: Path) -> list[Path]:
    """The ``cv_done.json`` files under ``out`` (cells of every seed): results that new settings would orphan."""
    return sorted(out.glob(f"*/fold*/{DONE_FILE}")) + sorted(out.glob(f"seed*/*/fold*/{DONE_FILE}"))


def _changed_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    changed = []
    for key in sorted(set(stored) | set(current)):
        if key == "fit":
            a, b = stored.get("fit", {}), current.get("fit", {})
            changed += [f"fit.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif stored.get(key) != current.get(key):
            changed.append(f"{key}: {stored.get(key)!r} -> {current.get(key)!r}")
    return changed


def _check_inputs(config: CVConfig) -> None:
    """Fail on missing data, taxonomy, weights or excluded nodes before the first cell trains."""
    from hiercls.taxonomy import load_taxonomy

    for key in ("taxonomy", "data"):
        value = Path(getattr(config, key))
        if not value.exists():
            raise ConfigError(f"{config.source}: option '{key}': {value} not found; fix the path "
                              "(relative paths are relative to the config file's folder)")
    taxonomy = load_taxonomy(config.taxonomy)
    if config.exclude:
        taxonomy = taxonomy.exclude(config.exclude)
    config.table4_rows_for(taxonomy)
    for backbone in config.backbones:
        weights = config.pretrained_for(backbone)
        if weights is not None and not weights.is_file():
            raise ConfigError(
                f"{config.source}: option 'fit.pretrained' for {backbone}: {weights} not found; hiercls never "
                "downloads weights: save them once (see docs/training.md) and give the local file"
            )
    from hiercls.aggregate import get_aggregator

    get_aggregator(config.aggregator)
    _check_folds(config)


def _check_folds(config: CVConfig) -> None:
    """Refuse more folds than groups (or images) now, before the plan is printed or OUT is written."""
    from hiercls.data import load_images
    from hiercls.data.splits import check_fold_count
    from hiercls.taxonomy import load_taxonomy

    full = load_taxonomy(config.taxonomy)
    kept = full.exclude(config.exclude) if config.exclude else full
    table = load_images(config.data, taxonomy=full, group_regex=config.group_regex, require_labels=True)
    # the images each cell splits: those of the excluded nodes are dropped first (as ``hiercls fit`` does)
    table = table.subset(np.array([i for i, label in enumerate(table.labels) if label in kept.index], dtype=np.int64))
    check_fold_count(table, config.folds)


def _absolute(config: CVConfig) -> CVConfig:
    """A copy with absolute taxonomy / data / out paths (cells and tables then agree on them)."""
    update = {k: Path(getattr(config, k)).expanduser().resolve() for k in ("taxonomy", "data", "out")}
    copy = config.model_copy(update=update)
    copy._source = config._source
    return copy


def _cell_state(run_dir: Path) -> Literal["done", "resume", "restart", "new"]:
    from hiercls.run import RunPaths

    if (run_dir / DONE_FILE).is_file():
        return "done"
    paths = RunPaths(run_dir)
    if paths.is_run() and paths.metadata("last").is_file() and paths.state.is_file():
        return "resume"
    if paths.is_run():
        return "restart"
    # A run that failed before writing its config (e.g. too few groups) leaves an empty checkpoints folder.
    if paths.checkpoints.is_dir() and not any(paths.checkpoints.iterdir()):
        paths.checkpoints.rmdir()
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(
            f"{run_dir}: cell folder holds files that hiercls did not make (no config.yaml); move them away "
            "and run the cross-validation again"
        )
    return "new"


def _format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _print_plan(console: Console, config: CVConfig, states: dict[tuple[str, str, int], str], out: Path) -> None:
    table = Table(title=f"hiercls cv -> {out}", title_justify="left", header_style="bold")
    table.add_column("strategy x backbone")
    for k in range(config.folds):
        table.add_column(f"fold {k}", justify="center")
    marks = {"done": "[green]done[/]", "resume": "[yellow]resume[/]", "restart": "[yellow]restart[/]", "new": "–"}
    for backbone in config.backbones:
        for strategy in config.strategies:
            table.add_row(f"{strategy} x {backbone}",
                          *(marks[states[(strategy, backbone, k)]] for k in range(config.folds)))
    console.print(table)
    done = sum(s == "done" for s in states.values())
    if done:
        console.print(f"{done} of {len(states)} cells already finished: skipped (their results are kept as they are)")


def run_cv(config: CVConfig, console: Console | None = None, progress: bool = True) -> CVResult:
    """Train and evaluate every (strategy, backbone, fold) cell not finished yet, and write the tables.

    Finished cells (``cv_done.json`` present) are skipped; an unfinished cell with a checkpoint is
    resumed, one without is started again (only that hiercls-made cell folder is cleared). Every
    fold uses the same grouped split for all strategies and backbones (same seed). With ``seeds``
    the grid runs once per training seed in ``OUT/seed<s>/`` (its own tables there), every seed on
    the same folds, and ``OUT/tables.md`` compares the seeds.
    """
    console = console or Console(stderr=True)
    config = _absolute(config)
    _check_inputs(config)
    out, settings_changed = _prepare_out(config)
    if settings_changed:
        console.print(f"{out}: settings changed since the last command, which finished no cell; "
                      "the cross-validation starts with the new settings")
    if config.seeds is None:
        return _run_grid(config, out, console, progress, restart=settings_changed)
    result = CVResult(out, out / "tables.md", out / "tables.json")
    for seed in config.seeds:
        one_seed = config.for_seed(seed)
        part = _run_grid(one_seed, Path(one_seed.out), console, progress, restart=settings_changed)
        result.cells += part.cells
        write_seed_tables(config, out)
        if part.interrupted:
            result.interrupted = True
            break
    return result


def _run_grid(config: CVConfig, out: Path, console: Console, progress: bool, restart: bool = False) -> CVResult:
    """The cells of one training seed, in ``out``; ``restart``: unfinished cells start again, not resume."""
    from hiercls import engine

    out.mkdir(parents=True, exist_ok=True)
    cells = config.cells
    states = {(s, b, k): _cell_state(cell_dir(out, s, b, k)) for s, b, k in cells}
    if restart:
        states = {cell: "restart" if state == "resume" else state for cell, state in states.items()}
    _print_plan(console, config, states, out)
    for backbone in config.backbones:
        if "pretrained" in config.fit and config.pretrained_for(backbone) is None:
            console.print(f"[yellow]warning:[/] no fit.pretrained entry for {backbone}: it starts from random weights")

    result = CVResult(out, out / "tables.md", out / "tables.json")
    table_cache: dict[str, Any] = {}
    started = time.perf_counter()
    durations: list[float] = []
    todo = [c for c in cells if states[c] != "done"]
    for position, (strategy, backbone, fold) in enumerate(cells, start=1):
        run_dir = cell_dir(out, strategy, backbone, fold)
        state = states[(strategy, backbone, fold)]
        if state == "done":
            result.cells.append(CellResult(strategy, backbone, fold, run_dir, "skipped"))
            continue
        left = len(todo) - len(durations)
        eta = _format_seconds(np.mean(durations) * left) if durations else "?"
        console.rule(
            f"cell {position}/{len(cells)}: {strategy} x {backbone}, fold {fold} "
            f"({'resuming' if state == 'resume' else 'starting'}) | elapsed "
            f"{_format_seconds(time.perf_counter() - started)}, ETA {eta}",
            align="left",
        )
        t0 = time.perf_counter()
        fit_config = config.fit_config(strategy, backbone, fold)
        run = engine.fit(fit_config, console, resume=state == "resume", overwrite=state == "restart",
                         progress=progress)
        if run.interrupted:
            result.interrupted = True
            result.cells.append(CellResult(strategy, backbone, fold, run_dir, "pending"))
            console.print("[yellow]cross-validation interrupted[/]: run the same command again to continue; "
                          "finished cells are kept")
            break
        metrics = evaluate_cell(config, run_dir, table_cache, console, progress)
        seconds = time.perf_counter() - t0
        atomic_write_json(run_dir / DONE_FILE, {
            "strategy": strategy, "backbone": backbone, "fold": fold, "folds": config.folds, "seed": fit_config.seed,
            "epochs": run.epochs_completed, "checkpoint": CHECKPOINT, "seconds": round(seconds, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        durations.append(seconds)
        result.cells.append(CellResult(strategy, backbone, fold, run_dir, "done", seconds, metrics))
        write_tables(config, out)
        console.print(_cell_line(strategy, backbone, fold, metrics, seconds))
    write_tables(config, out)
    for cell in cells[len(result.cells):]:
        result.cells.append(CellResult(cell[0], cell[1], cell[2], cell_dir(out, *cell), "pending"))
    return result


def _cell_line(strategy: str, backbone: str, fold: int, metrics: dict[str, Any], seconds: float) -> str:
    def f(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}"

    auroc = (metrics.get("auroc") or {}).get("leaf_macro")
    text = (f"[green]finished[/] {strategy} x {backbone}, fold {fold} in {_format_seconds(seconds)}: "
            f"acc {f(metrics.get('accuracy'))}, macro-F1 {f(metrics.get('macro_f1'))}, AUROC {f(auroc)}, "
            f"hF {f(metrics.get('hF'))} on {metrics.get('n_images')} held-out images")
    groups = metrics.get("groups")
    if groups:
        text += f"; {groups['n_groups']} groups: acc {f(groups.get('accuracy'))}"
    return text


# -- evaluating one cell --------------------------------------------------------------------


def _dataset(config: CVConfig, cache: dict[str, Any]):
    """The full labelled table (all folds), loaded once per ``run_cv`` call."""
    if "table" not in cache:
        from hiercls.data import load_images
        from hiercls.taxonomy import load_taxonomy

        table = load_images(config.data, taxonomy=load_taxonomy(config.taxonomy), group_regex=config.group_regex)
        if config.group_by_available is True and not table.has_groups:
            raise DataError(
                f"{config.data}: group_by_available is true but no image has a group; give a manifest group "
                "column or group_regex, or set group_by_available: auto"
            )
        cache["table"] = table
        cache["index"] = {str(p): i for i, p in enumerate(table.paths)}
    return cache["table"], cache["index"]


def evaluate_cell(
    config: CVConfig, run_dir: Path, cache: dict[str, Any] | None = None, console: Console | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a trained cell on its held-out fold with the last checkpoint.

    Writes ``predictions.csv`` and ``metrics.json`` (image level, and group level under
    ``groups`` when the data have groups) into ``run_dir`` and returns the metrics.
    """
    from hiercls.evaluation import evaluate_prediction_set, run_provenance
    from hiercls.inference import decode, load_run, predict_table
    from hiercls.predictions import PredictionSet, write_predictions_csv

    cache = cache if cache is not None else {}
    table, index = _dataset(config, cache)
    split_path = run_dir / "split.json"
    try:
        held_out = json.loads(split_path.read_text(encoding="utf-8"))["val"]
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{split_path}: cannot read the held-out fold ({exc}); delete {run_dir} and run again") from None
    missing = [p for p in held_out if p not in index]
    if missing:
        raise DataError(f"{run_dir}: {len(missing)} held-out image(s) are no longer in {config.data} "
                        f"(e.g. {missing[0]}); the data changed since this cell was trained")
    val = table.subset([index[p] for p in held_out])
    loaded = load_run(run_dir, CHECKPOINT)
    probs = predict_table(loaded, val, device=loaded.config.device, progress=bars_enabled(console, progress),
                          console=console)
    preds = PredictionSet([str(p) for p in val.paths], list(val.labels), list(val.groups), decode(probs, loaded.config),
                          probs, source=str(run_dir / "predictions.csv"))
    write_predictions_csv(run_dir / "predictions.csv", probs, preds.paths, preds.labels, preds.groups, preds.predictions)
    use_groups = config.group_by_available is True or (config.group_by_available == "auto" and table.has_groups)
    has_groups = use_groups and any(g is not None for g in preds.groups)
    metrics = evaluate_prediction_set(
        loaded.taxonomy, preds, group_by="group" if has_groups else None, aggregator=config.aggregator,
        group_scoring=config.group_scoring, provenance=run_provenance(loaded, CHECKPOINT, "val", config.data),
    ).metrics
    if use_groups and not has_groups:
        metrics["groups"] = {"n_groups": 0, "notes": ["no held-out image has a group"]}
    metrics["cv"] = {
        "strategy": loaded.config.strategy, "backbone": loaded.config.backbone, "fold": loaded.config.fold,
        "folds": loaded.config.folds, "checkpoint": CHECKPOINT, "epoch": loaded.metadata.get("epoch"),
        "seed": loaded.config.seed,
    }
    metrics = json_ready(metrics)
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics


# -- the tables -----------------------------------------------------------------------------

# (key in tables.json, column title, how to read it from a metrics dict)
_TABLE2_METRICS = (
    ("accuracy", "ACC", lambda m: m.get("accuracy")),
    ("macro_f1", "macro-F1", lambda m: m.get("macro_f1")),
    ("auroc", "AUROC", lambda m: (m.get("auroc") or {}).get("leaf_macro")),
    ("hF", "hF", lambda m: m.get("hF")),
)


def collect_cells(config: CVConfig, out: str | Path | None = None) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The metrics of every finished cell of the grid (read from disk, so restarts see all of them)."""
    out = Path(out or config.out)
    found = {}
    for strategy, backbone, fold in config.cells:
        run_dir = cell_dir(out, strategy, backbone, fold)
        if (run_dir / DONE_FILE).is_file() and (run_dir / "metrics.json").is_file():
            found[(strategy, backbone, fold)] = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return found


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (n - 1) of the defined values; std is None with fewer than two."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None, 0
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std, len(present)


def _fold_row(per_fold: list[dict[str, Any] | None], get, **keys: Any) -> dict[str, Any]:
    """One table row: ``keys``, the value ``get`` reads from each fold's metrics, their mean and std."""
    values = [get(m) if m else None for m in per_fold]
    mean, std, n = _mean_std(values)
    return {**keys, "folds": values, "mean": mean, "std": std, "n_folds": n}


def _table_taxonomy(config: CVConfig) -> Taxonomy:
    """The tree the cells were trained and scored on (``exclude`` applied)."""
    from hiercls.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(config.taxonomy)
    return taxonomy.exclude(config.exclude) if config.exclude else taxonomy


def _decision_rows(per_fold, taxonomy, model: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """One Table 3 row per internal node, read from ``metrics[key]`` (decision or end-to-end accuracy)."""
    return [
        _fold_row(per_fold, lambda m, node=node: (m.get(key) or {}).get(node),
                  **model, node=node, decision=" vs ".join(taxonomy.children(node)), metric=key)
        for node in taxonomy.internal_nodes
    ]


def _level_tables(config: CVConfig, cells, taxonomy, level: str) -> dict[str, list[dict[str, Any]]]:
    """Tables 1, 2, 3 (decision and end-to-end) and the depth cuts at one level (images or groups)."""
    models = [(s, b) for b in config.backbones for s in config.strategies]
    n_leaves = len(taxonomy.leaves)
    # the deepest cut is Table 2's ACC; the shallower ones compare with coarser flat classifiers
    cut_depths = [str(d) for d in range(1, taxonomy.max_depth)]
    out: dict[str, list[dict[str, Any]]] = {"table1": [], "table2": [], "table3": [], "end_to_end": [], "depths": []}
    for strategy, backbone in models:
        per_fold = [cells.get((strategy, backbone, k)) for k in range(config.folds)]
        if level == "groups":
            per_fold = [m.get("groups") if m else None for m in per_fold]
        model = {"strategy": strategy, "backbone": backbone}
        out["table1"].append(_fold_row(per_fold, lambda m: m.get("macro_f1"), **model, metric="macro_f1"))
        for key, _title, get in _TABLE2_METRICS:
            out["table2"].append(_fold_row(per_fold, get, **model, metric=key))
        out["table3"] += _decision_rows(per_fold, taxonomy, model, "decision_accuracy")
        out["table3"].append(_fold_row(per_fold, lambda m: m.get("accuracy"), **model, node="all",
                                       decision=f"All {n_leaves} classes", metric="accuracy"))
        out["end_to_end"] += _decision_rows(per_fold, taxonomy, model, "per_level_accuracy")
        for depth in cut_depths:
            out["depths"].append(_fold_row(per_fold, lambda m, depth=depth: (m.get("depth_accuracy") or {}).get(depth),
                                           **model, depth=int(depth), classes=cut_classes(taxonomy, int(depth))))
    return out


def _cell_labels(run_dir: Path, taxonomy) -> tuple[list[str], list[str]] | None:
    """(labels, predictions) of the labelled held-out images of a cell, or ``None`` without its CSV."""
    from hiercls.predictions import read_predictions_csv

    path = run_dir / "predictions.csv"
    if not path.is_file():
        return None
    preds = read_predictions_csv(path, taxonomy)
    keep = [i for i, t in enumerate(preds.labels) if t is not None]
    return [preds.labels[i] for i in keep], [preds.predictions[i] for i in keep]


def _paired_folds(config: CVConfig, cells, taxonomy, out: Path, reference: str, strategy: str, backbone: str,
                  keep_paths: bool = False):
    """Rows of both models on the same held-out images, pooled over the folds both finished:
    (labels, reference's predictions, the strategy's predictions, groups or None, folds used),
    and the images' paths when ``keep_paths``."""
    from hiercls.predictions import read_predictions_csv

    labels, pred_a, pred_b, groups, used, paths_used = [], [], [], [], 0, []
    for k in range(config.folds):
        paths = [cell_dir(out, s, backbone, k) / "predictions.csv" for s in (reference, strategy)]
        if (reference, backbone, k) not in cells or (strategy, backbone, k) not in cells or not all(
                p.is_file() for p in paths):
            continue
        a, b = (read_predictions_csv(p, taxonomy) for p in paths)
        rows_b = {path: i for i, path in enumerate(b.paths)}
        for i, path in enumerate(a.paths):
            j = rows_b.get(path)
            if j is None or a.labels[i] is None:
                continue
            labels.append(a.labels[i])
            pred_a.append(a.predictions[i])
            pred_b.append(b.predictions[j])
            groups.append(a.groups[i])  # a group is in one fold only: the folds need no prefix
            paths_used.append(path)
        used += 1
    # with groups, slides are resampled (an image without one is its own); without, images
    found = labels, pred_a, pred_b, (groups if any(g is not None for g in groups) else None), used
    return (*found, paths_used) if keep_paths else found


def _comparisons(config: CVConfig, cells, taxonomy, out: Path) -> list[dict[str, Any]]:
    """Each strategy against ``config.reference`` (same backbone), paired and pooled over folds."""
    from hiercls.stats import paired_comparison

    if config.reference not in config.strategies:
        return []
    table = []
    for backbone in config.backbones:
        for strategy in (s for s in config.strategies if s != config.reference):
            labels, pred_a, pred_b, groups, used = _paired_folds(config, cells, taxonomy, out, config.reference,
                                                                  strategy, backbone)
            if not labels:
                continue
            result = paired_comparison(taxonomy, labels, pred_a, pred_b, groups=groups)
            table.append({"strategy": strategy, "backbone": backbone, "reference": config.reference,
                          "folds": used, **result})
    return table


def _table4(config: CVConfig, cells, taxonomy, out: Path) -> list[dict[str, Any]]:
    """Per-class P/R/F1 per model: mean ± std over folds and pooled over folds (summed counts)."""
    from hiercls.metrics import prf_counts, prf_from_counts

    rows_spec = config.table4_rows_for(taxonomy)
    table = []
    for strategy, backbone in ((s, b) for b in config.backbones for s in config.strategies):
        folds = [
            _cell_labels(cell_dir(out, strategy, backbone, k), taxonomy) if (strategy, backbone, k) in cells else None
            for k in range(config.folds)
        ]
        for name, members in rows_spec:
            counts = [prf_counts(taxonomy, *f, members) if f else None for f in folds]
            present = [c for c in counts if c is not None]
            row: dict[str, Any] = {
                "strategy": strategy, "backbone": backbone, "node": name, "nodes": list(members),
                "leaf": all(taxonomy.is_leaf(m) for m in members), "depth": min(taxonomy.depth(m) for m in members),
            }
            per_fold = [prf_from_counts(**c) if c else None for c in counts]
            for key in ("precision", "recall", "f1"):
                row[key], row[f"{key}_std"], _n = _mean_std([f[key] if f else None for f in per_fold])
            total = {k: sum(c[k] for c in present) for k in ("tp", "fp", "fn")}
            pooled = prf_from_counts(**total)
            row["pooled"] = {k: pooled[k] for k in ("precision", "recall", "f1")} | total
            row["n_folds"], row["support"] = len(present), pooled["support"]
            table.append(row)
    return table


def build_tables(
    config: CVConfig, cells: dict[tuple[str, str, int], dict[str, Any]], out: str | Path | None = None
) -> dict[str, Any]:
    """Tables 1-4 of Hamdi et al. as JSON-ready data, from the finished cells' metrics.

    Table 4 reads each finished cell's ``predictions.csv`` under ``out`` (default ``config.out``),
    so merged rows (``table4_rows``) and counts pooled over folds need no re-training.
    """
    taxonomy = _table_taxonomy(config)
    has_groups = any("groups" in m and m["groups"].get("n_groups") for m in cells.values())
    levels = ["images"] + (["groups"] if has_groups else [])
    per_level = {level: _level_tables(config, cells, taxonomy, level) for level in levels}

    def pick(key: str) -> dict[str, list[dict[str, Any]]]:
        return {level: tables[key] for level, tables in per_level.items()}

    return {
        "settings": {
            "taxonomy": str(config.taxonomy), "data": str(config.data), "folds": config.folds, "seed": config.seed,
            "exclude": list(config.exclude), "strategies": list(config.strategies), "backbones": list(config.backbones),
            "group_regex": config.group_regex, "aggregator": config.aggregator, "checkpoint": CHECKPOINT,
            "fit": json_ready({k: (str(v) if isinstance(v, Path) else v) for k, v in config.fit.items()}),
            "table4_rows": config.table4_rows,
        },
        "finished_cells": len(cells),
        "total_cells": len(config.cells),
        "notes": [
            "mean and std over folds; std is the sample standard deviation (n - 1) of the finished folds",
            f"every fold is scored with the {CHECKPOINT} checkpoint of a run trained on the other folds",
            "ACC is exact accuracy on images labelled at a leaf; AUROC is the unweighted mean of the "
            "one-vs-rest leaf AUROCs; hF is the hierarchical F1 (micro)",
            "Table 3 scores each decision on its own subtree (decision_accuracy: the most probable child "
            "among the images labelled under the node, whatever happened above); the end-to-end table "
            "counts a routing error above the node as a miss (per_level_accuracy)",
        ],
        "table1": pick("table1"),
        "table2": pick("table2"),
        "table3": pick("table3"),
        "table3_end_to_end": pick("end_to_end"),
        "depth_accuracy": pick("depths"),
        "table4": _table4(config, cells, taxonomy, Path(out or config.out)),
        "comparison": _comparisons(config, cells, taxonomy, Path(out or config.out)),
    }


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt_mean_std(mean: float | None, std: float | None, n: int, total: int) -> str:
    if mean is None:
        return "–"
    text = f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"
    return text + (f" ({n}/{total} folds)" if n < total else "")


def _split_kind(tables: dict[str, Any]) -> str:
    if "groups" in tables["table2"]:
        return "grouped "
    return "(no groups: split image by image) " if tables["finished_cells"] else ""


def _mean_std_rows(rows: list[dict[str, Any]], folds: int) -> list[str]:
    """One markdown line per model: its rows' mean ± std, in order."""
    lines = []
    for model in dict.fromkeys((r["strategy"], r["backbone"]) for r in rows):
        cells = [r for r in rows if (r["strategy"], r["backbone"]) == model]
        lines.append(f"| {model[0]} / {model[1]} | "
                     + " | ".join(_fmt_mean_std(r["mean"], r["std"], r["n_folds"], folds) for r in cells) + " |")
    return lines


def _table1_lines(tables: dict[str, Any], level_title: dict[str, str], folds: int) -> list[str]:
    """Table 1: macro-F1 per backbone (rows) and strategy (columns)."""
    lines: list[str] = []
    for level, rows in (tables.get("table1") or {}).items():
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        lines += [f"## Table 1: macro-F1 per backbone (mean ± std over folds), {level_title[level]}", "",
                  "| backbone | " + " | ".join(strategies) + " |", "|---|" + "---:|" * len(strategies)]
        for backbone in dict.fromkeys(r["backbone"] for r in rows):
            by_strategy = {r["strategy"]: r for r in rows if r["backbone"] == backbone}
            lines.append(f"| {backbone} | " + " | ".join(
                _fmt_mean_std(by_strategy[s]["mean"], by_strategy[s]["std"], by_strategy[s]["n_folds"], folds)
                for s in strategies) + " |")
        lines.append("")
    return lines


def _table3_lines(tables: dict[str, Any], level_title: dict[str, str], folds: int) -> list[str]:
    """Table 3 (each decision on its own subtree, and all classes) and its end-to-end companion."""
    lines: list[str] = []
    sections = (
        ("table3", "Table 3: accuracy of each decision on its own subtree, and over all leaf classes",
         "Each decision is scored among the images labelled under its node, as a model dedicated to it "
         "would be (`decision_accuracy`); the last column is the exact accuracy over all leaf classes."),
        ("table3_end_to_end", "End-to-end accuracy at each decision",
         "The same decisions read off the final prediction (`per_level_accuracy`): a routing error higher "
         "up counts as a miss here (with greedy decoding a decision never scores above its Table 3 value)."),
    )
    for key, title, explanation in sections:
        for level, rows in (tables.get(key) or {}).items():
            nodes = list(dict.fromkeys((r["node"], r["decision"]) for r in rows))
            lines += [f"## {title} (mean ± std over folds), {level_title[level]}", "", explanation, "",
                      "| model | " + " | ".join(d if n == "all" else f"{n}: {d}" for n, d in nodes) + " |",
                      "|---|" + "---:|" * len(nodes)]
            lines += _mean_std_rows(rows, folds) + [""]
    return lines


def _comparison_lines(tables: dict[str, Any], pooled: str = "the folds both finished") -> list[str]:
    """Each strategy against the reference, paired on the same images and pooled over ``pooled``."""
    rows = tables.get("comparison") or []
    if not rows:
        return []
    first = rows[0]["bootstrap"]
    lines = [f"## Does the tree pay? Each strategy against {rows[0]['reference']}, same backbone", "",
             f"Paired on the same held-out images, pooled over {pooled}; difference = strategy − "
             f"{rows[0]['reference']}, 95 % {first['method']} CI ({first['resamples']} resamples over "
             f"{first['unit']}s, seed {first['seed']}); McNemar's exact test on images labelled at a leaf "
             "(b: only the reference right, c: only the strategy right). See docs/statistics.md.", "",
             "| model | images | metric | reference | strategy | difference | 95 % CI | McNemar b / c, p |",
             "|---|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        test = r["mcnemar"]
        for i, (name, m) in enumerate(r["metrics"].items()):
            ci = "–" if m["low"] is None else f"[{m['low']:+.3f}, {m['high']:+.3f}]"
            diff = "–" if m["difference"] is None else f"{m['difference']:+.3f}"
            model = f"{r['strategy']} / {r['backbone']}" if i == 0 else ""
            images = str(r["n_images"]) if i == 0 else ""
            mcnemar = f"{test['b']} / {test['c']}, p = {test['p_value']:.3g}" if i == 0 else ""
            lines.append(f"| {model} | {images} | {name} | {_fmt(m['A'])} | {_fmt(m['B'])} | {diff} | {ci} | {mcnemar} |")
    return lines + [""]


def _table4_lines(tables: dict[str, Any], folds: int) -> list[str]:
    """Table 4: per model, each row's P/R/F1 as the fold mean ± std and pooled over the folds."""
    lines = ["## Table 4: per-class precision / recall / F1, image level", "",
             "Mean ± std over folds, and pooled: the counts of all folds summed, then P/R/F1 computed once.", ""]
    models = list(dict.fromkeys((r["strategy"], r["backbone"]) for r in tables["table4"]))
    for model in models:
        lines += [f"### {model[0]} / {model[1]}", "",
                  "| class | precision | recall | F1 | pooled precision | pooled recall | pooled F1 | support |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in tables["table4"] if (r["strategy"], r["backbone"]) == model):
            name = r["node"] if r["leaf"] or len(r.get("nodes", [])) > 1 else f"*{r['node']}*"
            name = "&nbsp;&nbsp;" * (r["depth"] - 1) + name
            fold_values = [_fmt_mean_std(r[k], r[f"{k}_std"], r["n_folds"], folds) for k in ("precision", "recall", "f1")]
            pooled = [_fmt(r["pooled"][k]) for k in ("precision", "recall", "f1")]
            lines.append(f"| {name} | " + " | ".join(fold_values + pooled) + f" | {r['support']} |")
        lines.append("")
    lines.append("Internal nodes (in italics) count an image as positive when its label or prediction lies under "
                 "them; a merged row (several nodes) when it lies under any of its nodes.")
    return lines


def render_tables_markdown(tables: dict[str, Any]) -> str:
    """The tables as a markdown document (what ``OUT/tables.md`` holds)."""
    s = tables["settings"]
    folds = s["folds"]
    lines = [
        "# Cross-validation results",
        "",
        f"- taxonomy: `{s['taxonomy']}`" + (f", without {', '.join(s['exclude'])}" if s["exclude"] else ""),
        f"- data: `{s['data']}`" + (f", groups from `{s['group_regex']}`" if s["group_regex"] else ""),
        f"- {folds}-fold " + _split_kind(tables) + f"cross-validation (seed {s['seed']}), the same split for every model;"
        f" scored with the **{s['checkpoint']}** checkpoint",
        "- fit options: " + (", ".join(f"{k}={v}" for k, v in s["fit"].items()) or "defaults"),
        f"- finished cells: {tables['finished_cells']} of {tables['total_cells']}",
        "",
        *(f"Note: {n}." for n in tables["notes"]),
        "",
    ]
    voted = f"{s['aggregator']} of the images' predictions"
    level_title = {"images": "image level", "groups": f"group level ({voted})"}
    if s.get("group_scoring") == "images":  # the paper's reading: images scored with their group's vote
        level_title["groups"] = f"image level, each image given its group's vote ({voted})"
    lines += _table1_lines(tables, level_title, folds)
    titles = {key: title for key, title, _ in _TABLE2_METRICS}
    for level, rows in tables["table2"].items():
        lines += [f"## Table 2: ACC, macro-F1, AUROC (and hF) per fold, {level_title[level]}", "",
                  "| model | metric | " + " | ".join(f"fold {k}" for k in range(folds)) + " | mean ± std |",
                  "|---|---|" + "---:|" * folds + "---:|"]
        for r in rows:
            lines.append(f"| {r['strategy']} / {r['backbone']} | {titles[r['metric']]} | "
                         + " | ".join(_fmt(v) for v in r["folds"])
                         + f" | {_fmt_mean_std(r['mean'], r['std'], r['n_folds'], folds)} |")
        lines.append("")
    lines += _table3_lines(tables, level_title, folds)
    for level, rows in (tables.get("depth_accuracy") or {}).items():
        if not rows:
            continue
        cuts = list(dict.fromkeys((r["depth"], r["classes"]) for r in rows))
        lines += [f"## Accuracy of the tree cut at each depth (mean ± std over folds), {level_title[level]}", "",
                  "Each node counts as its ancestor at that depth (a leaf above it as itself): the classes a "
                  "flat classifier of that granularity would have. The deepest cut is Table 2's ACC.", "",
                  "| model | " + " | ".join(f"depth {d} ({c} classes)" for d, c in cuts) + " |",
                  "|---|" + "---:|" * len(cuts)]
        lines += _mean_std_rows(rows, folds) + [""]
    lines += _table4_lines(tables, folds)
    lines += _comparison_lines(tables)
    return "\n".join(lines) + "\n"


def write_tables(config: CVConfig, out: str | Path | None = None) -> tuple[Path, Path]:
    """Rewrite ``OUT/tables.json`` and ``OUT/tables.md`` from the cells finished so far."""
    out = Path(out or config.out)
    tables = build_tables(config, collect_cells(config, out), out)
    json_path = atomic_write_json(out / "tables.json", tables)
    md_path = atomic_write_text(out / "tables.md", render_tables_markdown(tables))
    return md_path, json_path


# -- several training seeds -----------------------------------------------------------------


def _rows_over_seeds(per_seed: dict[int, dict[str, Any]], table: str, level: str, key_fields: tuple[str, ...]):
    """Rows of ``table`` at ``level``: each seed's fold mean side by side, then mean ± std over the seeds."""
    seeds = list(per_seed)
    found = [r for t in per_seed.values() for r in t[table].get(level, [])]
    keys = list(dict.fromkeys(tuple(r[f] for f in key_fields) for r in found))
    rows = []
    for key in keys:
        values = [next((r["mean"] for r in per_seed[seed][table].get(level, [])
                        if tuple(r[f] for f in key_fields) == key), None) for seed in seeds]
        mean, std, n = _mean_std(values)
        template = next(r for r in found if tuple(r[f] for f in key_fields) == key)
        rows.append({**{f: template[f] for f in key_fields if f in template},
                     **({"decision": template["decision"]} if "decision" in template else {}),
                     "seeds": values, "mean": mean, "std": std, "n_seeds": n})
    return rows


def _seed_comparisons(config: CVConfig, out: Path) -> list[dict[str, Any]]:
    """Each model against ``config.reference`` (same backbone), paired and pooled over folds *and* seeds.

    An image appears once per seed; its copies (or its group's) are one bootstrap cluster, so the
    interval reflects the images, not the number of repetitions.
    """
    from hiercls.stats import paired_comparison

    if config.reference not in config.strategies:
        return []
    taxonomy = _table_taxonomy(config)
    table = []
    for backbone in config.backbones:
        for model in (s for s in config.strategies if s != config.reference):
            labels, pred_a, pred_b, clusters, pairs, has_groups = [], [], [], [], 0, False
            for seed in config.seeds or []:
                one_seed = config.for_seed(seed)
                seed_out = out / f"seed{seed}"
                rows = _paired_folds(one_seed, collect_cells(one_seed, seed_out), taxonomy, seed_out,
                                     config.reference, model, backbone, keep_paths=True)
                seed_labels, a, b, groups, used, paths = rows
                has_groups = has_groups or groups is not None
                labels += seed_labels
                pred_a += a
                pred_b += b
                # one cluster per group (or per image without one), the same in every seed
                clusters += [("group", g) if g is not None else ("image", p)
                             for g, p in zip(groups or [None] * len(paths), paths)]
                pairs += used
            if not labels:
                continue
            result = paired_comparison(taxonomy, labels, pred_a, pred_b, groups=clusters,
                                       unit="group" if has_groups else "image")
            table.append({"strategy": model, "backbone": backbone, "reference": config.reference,
                          "fold_runs": pairs, **result})
    return table


def build_seed_tables(config: CVConfig, out: str | Path | None = None) -> dict[str, Any]:
    """Tables 2 and 3 over the training seeds, and the comparison pooled over folds and seeds.

    A seed's value is its mean over folds; the std over seeds measures how much a model's
    cross-validated score moves with its training seed alone (the folds are the same for every
    seed). Each seed's own tables are in ``OUT/seed<s>/tables.md``.
    """
    out = Path(out or config.out)
    seeds = list(config.seeds or [])
    per_seed = {}
    for seed in seeds:
        one_seed = config.for_seed(seed)
        per_seed[seed] = build_tables(one_seed, collect_cells(one_seed, out / f"seed{seed}"), out / f"seed{seed}")
    levels = list(dict.fromkeys(level for t in per_seed.values() for level in t["table2"]))
    return {
        "seeds": seeds,
        "split_seed": config.seed,
        "folds": config.folds,
        "finished_cells": sum(t["finished_cells"] for t in per_seed.values()),
        "total_cells": len(config.cells) * len(seeds),
        "notes": [
            f"every seed trains on the same {config.folds} folds (split with seed {config.seed})",
            "a seed's value is its mean over the folds (of the folds finished so far); mean and std "
            "(n - 1) over the seeds measure the training-seed variation alone",
        ],
        "table2": {level: _rows_over_seeds(per_seed, "table2", level, ("strategy", "backbone", "metric"))
                   for level in levels},
        "table3": {level: _rows_over_seeds(per_seed, "table3", level, ("strategy", "backbone", "node"))
                   for level in levels},
        "comparison": _seed_comparisons(config, out),
    }


def render_seed_tables_markdown(tables: dict[str, Any]) -> str:
    """The seeds summary as markdown (what ``OUT/tables.md`` holds when ``seeds`` is given)."""
    seeds = tables["seeds"]
    titles = {key: title for key, title, _ in _TABLE2_METRICS}
    lines = ["# Cross-validation results over training seeds", "",
             f"- seeds {', '.join(map(str, seeds))}; finished cells: {tables['finished_cells']} of "
             f"{tables['total_cells']}",
             "- each seed's full tables: " + ", ".join(f"[seed {s}](seed{s}/tables.md)" for s in seeds), "",
             *(f"Note: {n}." for n in tables["notes"]), ""]
    for level, rows in tables["table2"].items():
        lines += [f"## Table 2 per seed (mean over folds), {'image' if level == 'images' else 'group'} level", "",
                  "| model | metric | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std over seeds |",
                  "|---|---|" + "---:|" * len(seeds) + "---:|"]
        for r in rows:
            spread = "–" if r["mean"] is None else f"{r['mean']:.3f}"
            spread += f" ± {r['std']:.3f}" if r["std"] is not None else ""
            lines.append(f"| {r['strategy']} / {r['backbone']} | {titles[r['metric']]} | "
                         + " | ".join(_fmt(v) for v in r["seeds"]) + f" | {spread} |")
        lines.append("")
    lines += _seed_table3_lines(tables)
    lines += _comparison_lines(tables, pooled="the folds and the seeds both finished (the copies of an image "
                                              "over the seeds are resampled together)")
    return "\n".join(lines)


def _seed_table3_lines(tables: dict[str, Any]) -> list[str]:
    """Table 3 over the seeds: each decision on its own subtree, mean ± std over the seeds' fold means."""
    lines: list[str] = []
    for level, rows in (tables.get("table3") or {}).items():
        nodes = list(dict.fromkeys((r["node"], r.get("decision", r["node"])) for r in rows))
        models = list(dict.fromkeys((r["strategy"], r["backbone"]) for r in rows))
        lines += [f"## Table 3 over seeds: accuracy of each decision on its own subtree (mean ± std over seeds), "
                  f"{'image' if level == 'images' else 'group'} level", "",
                  "| model | " + " | ".join(d if n == "all" else f"{n}: {d}" for n, d in nodes) + " |",
                  "|---|" + "---:|" * len(nodes)]
        for strategy, backbone in models:
            cells = []
            for node, _ in nodes:
                r = next((r for r in rows if (r["strategy"], r["backbone"], r["node"]) == (strategy, backbone, node)),
                         None)
                if r is None or r["mean"] is None:
                    cells.append("–")
                else:
                    cells.append(f"{r['mean']:.3f}" + (f" ± {r['std']:.3f}" if r["std"] is not None else ""))
            lines.append(f"| {strategy} / {backbone} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def write_seed_tables(config: CVConfig, out: str | Path | None = None) -> tuple[Path, Path]:
    """Rewrite ``OUT/tables.json`` and ``OUT/tables.md`` with the comparison of the seeds."""
    out = Path(out or config.out)
    tables = json_ready(build_seed_tables(config, out))
    json_path = atomic_write_json(out / "tables.json", tables)
    md_path = atomic_write_text(out / "tables.md", render_seed_tables_markdown(tables))
    return md_path, json_path
