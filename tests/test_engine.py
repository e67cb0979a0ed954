"""The training loop: augmentation, schedules, resume equivalence, interruption, failures, run dirs."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hiercls import engine
from hiercls.augment import BatchAugment, normalize
from hiercls.checkpoint import load_weights
from hiercls.config import AugmentConfig, FitConfig, load_config
from hiercls.engine import TrainingError, fit
from hiercls.errors import ConfigError
from hiercls.inference import load_run
from hiercls.run import prepare_run_dir
from hiercls.training import trainer

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
LABELS = ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML", "Acute")  # Acute: a partial label


def write_smears(root: Path, per_label: int = 4, size: int = 20) -> Path:
    """Tiny JPEGs, a colour per label, file names ``slideK_...`` (K = group)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for li, label in enumerate(LABELS):
        (root / label).mkdir(parents=True)
        for k in range(per_label):
            base = np.array([30 * li % 255, 255 - 25 * li, 90 + 15 * k], dtype=np.float64)
            pixels = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"slide{k}_{label}_{k}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    return write_smears(tmp_path_factory.mktemp("smears") / "data")


def make_config(smears: Path, out: Path, **overrides) -> FitConfig:
    options = {
        "taxonomy": str(LEUKEMIA), "data": str(smears), "out": str(out), "backbone": "test_resnet",
        "img_size": 16, "epochs": 2, "batch_size": 8, "lr": 1e-3, "group_regex": r"^(slide\d+)_",
        "val_fraction": 0.25, "cache_dir": str(out.parent / "cache"), "device": "cpu",
    }
    options.update(overrides)
    return load_config(None, options)


def state_of(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"{which}.safetensors"))


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- augmentation --------------------------------------------------------------------------


def batch(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_augment_shapes_dtype_and_channels_last():
    out = BatchAugment(AugmentConfig(), channels_last=True)(batch(), torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 12, 12) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_augment_is_deterministic_for_a_seed_and_varies_across_seeds():
    aug, x = BatchAugment(AugmentConfig()), batch()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_orientation_only_augment_gives_exact_dihedral_copies():
    config = AugmentConfig(color_jitter=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    x = batch(n=16)
    out = BatchAugment(config)(x, torch.Generator().manual_seed(0))
    base = normalize(x)
    seen = set()
    for i in range(len(x)):
        img = base[i]
        variants = [torch.rot90(v, k, dims=(1, 2)) for v in (img, torch.flip(img, dims=(2,))) for k in range(4)]
        matches = [j for j, v in enumerate(variants) if torch.allclose(out[i], v, atol=1e-4)]
        assert matches, f"image {i} is not a flip/rotation of its input"
        seen.add(matches[0])
    assert len(seen) > 1, "orientations should vary across the batch"


def test_disabled_augment_is_the_eval_transform():
    config = AugmentConfig(hflip=False, vflip=False, rot90=False, color_jitter=0.0,
                           crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    x = batch()
    out = BatchAugment(config, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(x, torch.Generator().manual_seed(0))
    expected = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert torch.allclose(out, expected, atol=1e-5)


def test_colour_jitter_changes_colour_within_range():
    config = AugmentConfig(hflip=False, vflip=False, rot90=False, color_jitter=0.5,
                           crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    x = batch()
    out = BatchAugment(config, mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x.permute(0, 3, 1, 2).float() / 255, atol=1e-3)


# -- schedules ---------------------------------------------------------------------------


def test_epochs_take_full_batches_only():
    # one batch shape per unit: a compiled model never sees a second size
    assert trainer._batches(17, 8) == 2  # 8 + 8; the leftover image is another one next epoch
    assert trainer._batches(23, 8) == 2
    assert trainer._batches(24, 8) == 3


def test_a_unit_smaller_than_one_batch_trains_on_all_its_images():
    assert trainer._batches(5, 8) == 1
    assert trainer._batches(2, 8) == 1
    assert trainer._batches(1, 8) == 0  # BatchNorm needs two images
    assert trainer._batches(0, 8) == 0
    assert trainer._batches(3, 8, min_last=4) == 0  # two processes need two images each


def test_cosine_schedule_with_warmup(tmp_path):
    config = load_config(None, {"taxonomy": "t", "data": "d", "out": "o", "epochs": 4, "warmup_epochs": 1, "lr": 1.0})
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = trainer._optimizer(config, [param])
    scheduler = trainer._scheduler(config, optimizer, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.01


# -- fit -----------------------------------------------------------------------------------


def test_fit_writes_a_complete_run(smears, tmp_path):
    run = tmp_path / "run"
    result = fit(make_config(smears, run), progress=False)
    assert result.epochs_completed == 2 and not result.interrupted
    records = metrics_of(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "lr", "seconds", "images_per_second", "val_loss", "val_accuracy", "val_hF"):
        assert key in records[-1]
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    groups = lambda paths: {Path(p).name.split("_")[0] for p in paths}  # noqa: E731
    assert not groups(split["train"]) & groups(split["val"]), "a slide is on both sides of the split"
    meta = json.loads((run / "checkpoints" / "last.json").read_text())
    assert meta["epoch"] == 2 and meta["strategy"] == "joint" and meta["backbone"] == "test_resnet"
    assert meta["label_map"][0] == "root" and len(meta["taxonomy_fingerprint"]) == 16
    assert (run / "checkpoints" / "best.safetensors").is_file()
    assert (run / "checkpoints" / "last.state.pt").is_file()
    saved = load_config(run / "config.yaml", {})
    assert saved.out == run.resolve() and saved.epochs == 2


def test_resume_two_plus_one_epochs_equals_three(smears, tmp_path):
    """Also shows determinism: two separate runs from the same seed end with equal weights."""
    options = {"scheduler": "none", "strategy": "per_node"}
    fit(make_config(smears, tmp_path / "straight", epochs=3, **options), progress=False)
    fit(make_config(smears, tmp_path / "resumed", epochs=2, **options), progress=False)
    fit(make_config(smears, tmp_path / "resumed", epochs=3, **options), resume=True, progress=False)
    straight, resumed = state_of(tmp_path / "straight"), state_of(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    drop_time = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "images_per_second", "elapsed_seconds")}  # noqa: E731
    assert [drop_time(r) for r in metrics_of(tmp_path / "straight")] == [drop_time(r) for r in metrics_of(tmp_path / "resumed")]


def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted(smears, tmp_path):
    fit(make_config(smears, tmp_path / "straight"), progress=False)

    def interrupt(epoch, unit, step):
        if (epoch, step) == (1, 0):
            signal.raise_signal(signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    result = fit(make_config(smears, tmp_path / "cut"), progress=False, on_step=interrupt)
    assert result.interrupted and result.epochs_completed == 1
    assert json.loads((tmp_path / "cut" / "checkpoints" / "last.json").read_text())["partial_epoch"] is True
    assert signal.getsignal(signal.SIGINT) is before, "the handler must be restored"
    fit(make_config(smears, tmp_path / "cut"), resume=True, progress=False)
    straight, cut = state_of(tmp_path / "straight"), state_of(tmp_path / "cut")
    assert all(torch.equal(straight[k], cut[k]) for k in straight)
    assert len(metrics_of(tmp_path / "cut")) == 2


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_last_checkpoint(smears, tmp_path, monkeypatch):
    real_build = engine.build_model
    calls = {"n": 0}

    def build_poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        unit = model.training_units()[0]
        real_loss = unit.compute_loss

        def compute_loss(outputs, labels):
            loss, parts = real_loss(outputs, labels)
            calls["n"] += 1
            return (loss * float("nan"), parts) if calls["n"] > 3 else (loss, parts)

        unit.compute_loss = compute_loss
        return model

    monkeypatch.setattr(engine, "build_model", build_poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"epoch 2 in unit 'joint'.*lower --lr"):
        fit(make_config(smears, run), progress=False)
    assert json.loads((run / "checkpoints" / "last.json").read_text())["epoch"] == 1
    assert load_run(run, "last").metadata["epoch"] == 1


def test_exclude_drops_nodes_and_their_images(smears, tmp_path):
    run = tmp_path / "run"
    fit(make_config(smears, run, epochs=1, exclude=["Reactive"], strategy="flat"), progress=False)
    from hiercls.taxonomy import load_taxonomy

    tree = load_taxonomy(run / "taxonomy.yaml")
    assert "Reactive" not in tree.nodes and "Normal" in tree.nodes
    split = json.loads((run / "split.json").read_text())
    assert not any("/Reactive/" in p for p in split["train"] + split["val"])
    assert len(split["train"]) + len(split["val"]) == 7 * 4


def test_run_dir_rules(tmp_path, smears):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_run_dir(other)
    with pytest.raises(ConfigError, match="not a hiercls run"):
        prepare_run_dir(other, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep me"
    run = tmp_path / "run"
    fit(make_config(smears, run, epochs=1), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        fit(make_config(smears, run, epochs=1), progress=False)
    (run / "extra.txt").write_text("user file")
    fit(make_config(smears, run, epochs=1, seed=3), overwrite=True, progress=False)
    assert (run / "extra.txt").is_file(), "overwrite removes only the run's own files"
    assert len(metrics_of(run)) == 1


def test_loaded_run_reproduces_validation_predictions(smears, tmp_path):
    from hiercls.data import load_images
    from hiercls.inference import predict_table
    from hiercls.taxonomy import load_taxonomy

    run = tmp_path / "run"
    fit(make_config(smears, run, epochs=1, strategy="per_level"), progress=False)
    loaded = load_run(run, "best")
    table = load_images(smears, taxonomy=load_taxonomy(LEUKEMIA))
    val = set(json.loads((run / "split.json").read_text())["val"])
    rows = [i for i, p in enumerate(table.paths) if str(p) in val]
    probs = predict_table(loaded, table.subset(rows), progress=False, device="cpu")
    true = [table.labels[i] for i in rows]
    again = trainer.validation_metrics(loaded.taxonomy, probs, true, "greedy", 0.5)
    logged = metrics_of(run)[-1]
    assert again["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-9)
    assert again["val_hF"] == pytest.approx(logged["val_hF"])
    # weights really come from the file: a fresh model differs until they are loaded
    from hiercls.inference import build_model

    fresh = build_model(loaded.config, loaded.taxonomy, None, pretrained=False)
    load_weights(run / "checkpoints" / "best.safetensors", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), loaded.model.state_dict().values()))


def test_host_syncs_only_every_check_interval(smears, tmp_path, monkeypatch):
    """The loss is fetched from the device every CHECK_EVERY steps and at each unit's last step."""
    checks, steps = [], []
    from hiercls.training import trainer

    real_check = trainer._check

    def counting(step_losses, step, *args, **kwargs):
        checks.append(step)
        return real_check(step_losses, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "CHECK_EVERY", 4)
    monkeypatch.setattr(trainer, "_check", counting)
    fit(make_config(smears, tmp_path / "run", epochs=1, batch_size=4), progress=False,
        on_step=lambda epoch, unit, step: steps.append(step))
    last = max(steps)
    assert last >= 4, "the test needs more steps than the check interval"
    assert checks == sorted({s for s in steps if (s + 1) % 4 == 0} | {last})
    assert metrics_of(tmp_path / "run")[0]["train_loss"]["joint"] > 0


def test_optimizer_kernels_follow_the_device():
    config = load_config(None, {"taxonomy": "t", "data": "d", "out": "o"})
    cpu = trainer._optimizer(config, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(cpu, torch.optim.AdamW) and not cpu.defaults.get("fused")
    if torch.cuda.is_available():
        gpu = trainer._optimizer(config, [torch.nn.Parameter(torch.zeros(2, device="cuda"))])
        assert gpu.defaults.get("fused") is True


def test_validation_accuracy_scores_leaf_labels_only():
    """A partial label has no single right leaf: it is left out of val_accuracy (not counted wrong)."""
    from hiercls import load_taxonomy
    from hiercls.engine import validation_metrics
    from hiercls.probabilities import NodeProbabilities

    tax = load_taxonomy(Path(__file__).resolve().parents[1] / "taxonomy" / "leukemia.yaml")
    leaf_probs = np.full((2, len(tax.leaves)), 0.01)
    leaf_probs[:, tax.leaves.index("AML")] = 1.0
    probs = NodeProbabilities.from_leaf_probabilities(tax, leaf_probs / leaf_probs.sum(1, keepdims=True))
    metrics = validation_metrics(tax, probs, ["AML", "Leukemia"], "greedy", 0.5)
    assert metrics["val_accuracy"] == 1.0
    metrics = validation_metrics(tax, probs, ["ALL", "Leukemia"], "greedy", 0.5)
    assert metrics["val_accuracy"] == 0.0


def test_val_every_validates_every_nth_and_the_last_epoch(smears, tmp_path):
    run = tmp_path / "run"
    result = fit(make_config(smears, run, epochs=3, val_every=2), progress=False)
    records = metrics_of(run)
    assert [("val_hF" in r) for r in records] == [False, True, True]
    assert result.best_epoch in (2, 3)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["epoch"] == result.best_epoch


def test_val_every_on_the_command_line(tmp_path):
    from hiercls.cli import build_parser
    from hiercls.cli.fit import overrides_from_args

    args = build_parser().parse_args(["fit", "--taxonomy", "t", "--data", "d", "--out", "o", "--val-every", "5"])
    assert overrides_from_args(args)["val_every"] == 5
    with pytest.raises(ConfigError, match="--val-every.*greater than or equal to 1"):
        load_config(None, {"taxonomy": "t", "data": "d", "out": "o", "val_every": 0})


# -- how often the resumable checkpoint is written ------------------------------------------


def saved_epochs_seen(smears, out, **overrides) -> list[int | None]:
    """The epoch of ``last.json`` as seen at the first step of each epoch (None: none yet)."""
    seen: list[int | None] = []

    def on_step(epoch, unit, step):
        if step == 0:
            path = out / "checkpoints" / "last.json"
            seen.append(json.loads(path.read_text())["epoch"] if path.is_file() else None)

    fit(make_config(smears, out, **overrides), progress=False, on_step=on_step)
    seen.append(json.loads((out / "checkpoints" / "last.json").read_text())["epoch"])
    return seen


def test_short_epochs_are_not_checkpointed_every_time(smears, tmp_path):
    # no validation, so no new best forces a save: only the end of training writes `last`
    seen = saved_epochs_seen(smears, tmp_path / "run", epochs=3, val_fraction=0, checkpoint_minutes=60)
    assert seen == [None, None, None, 3]
    assert json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())["epoch"] == 3


def test_checkpoint_minutes_zero_saves_every_epoch(smears, tmp_path):
    assert saved_epochs_seen(smears, tmp_path / "run", epochs=3, val_fraction=0, checkpoint_minutes=0) == [None, 1, 2, 3]


def test_a_checkpoint_is_written_once_the_interval_has_passed(smears, tmp_path, monkeypatch):
    now = [0.0]  # a clock at 200 s x epochs trained: epoch k ends at 200 k seconds
    from hiercls.training import run_folder

    monkeypatch.setattr(run_folder.time, "monotonic", lambda: now[0])  # the clock of the save policy
    seen: list[int | None] = []
    last = tmp_path / "run" / "checkpoints" / "last.json"

    def on_step(epoch, unit, step):
        if step == 0:
            seen.append(json.loads(last.read_text())["epoch"] if last.is_file() else None)
            now[0] = 200.0 * (epoch + 1)

    fit(make_config(smears, tmp_path / "run", epochs=3, val_fraction=0, checkpoint_minutes=5), progress=False,
        on_step=on_step)
    # 200 s after the start at the end of epoch 1: not yet; 400 s at the end of epoch 2: saved; then the end
    assert seen + [json.loads(last.read_text())["epoch"]] == [None, None, 2, 3]


def test_a_new_best_always_saves_last_with_it(smears, tmp_path):
    from hiercls.checkpoint import load_training_state

    run = tmp_path / "run"
    seen = saved_epochs_seen(smears, run, epochs=3, checkpoint_minutes=60)
    assert seen[1] == 1  # epoch 1 is always a new best, so `last` is saved with it
    best = json.loads((run / "checkpoints" / "best.json").read_text())["epoch"]
    # the resumable state names the best epoch whose weights are on disk
    assert load_training_state(run / "checkpoints" / "last.state.pt")["best_epoch"] == best


# -- the in-memory trainer ------------------------------------------------------------------


def test_the_trainer_trains_in_memory_with_callbacks_and_writes_nothing(tmp_path, monkeypatch, capfd):
    """``Trainer`` alone: no run folder, no console; the callbacks see every step and epoch."""
    from hiercls.inference import build_model
    from hiercls.taxonomy import load_taxonomy
    from hiercls.training import Callback, Trainer, TrainingData, build_units

    monkeypatch.chdir(tmp_path)
    config = FitConfig(taxonomy=LEUKEMIA, data=tmp_path / "unused", out=tmp_path / "unused-run",
                       backbone="test_resnet", img_size=16, epochs=2, batch_size=4, device="cpu")
    taxonomy = load_taxonomy(LEUKEMIA)
    labels = np.array([taxonomy.index[name] for name in LABELS] * 2)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (len(labels), 16, 16, 3), dtype=np.uint8))
    model = build_model(config, taxonomy, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    units = build_units(config, model, labels, engine.Dist(), torch.device("cpu"))
    data = TrainingData(images, torch.from_numpy(labels), images.numpy()[:6], list(LABELS[:6]), has_val=True)

    class Recorder(Callback):
        steps, epochs = [], []

        def on_step(self, trainer, epoch, unit, step):
            self.steps.append((epoch, unit.name, step))

        def on_epoch_end(self, trainer, epoch, record, improved):
            self.epochs.append((record["epoch"], "val_hF" in record, improved))

    recorder = Recorder()
    trainer = Trainer(config, taxonomy, model, units, data, BatchAugment(config.augment), torch.device("cpu"),
                      callbacks=[recorder])
    assert trainer.fit() == (2, False)
    assert recorder.steps == [(e, "joint", s) for e in range(2) for s in range(4)]
    assert [e[:2] for e in recorder.epochs] == [(1, True), (2, True)] and recorder.epochs[0][2]
    assert trainer.best_epoch in (1, 2) and trainer.last_metrics["epoch"] == 2
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr() == ("", "")


def test_training_functions_stay_short():
    """The loop stays readable: no function of the engine, trainer, run folder or estimator over 80 lines."""
    import ast

    package = Path(engine.__file__).parent
    files = [package / "engine.py", package / "estimator.py", *sorted((package / "training").glob("*.py"))]
    long = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
