"""Smoke test of benchmarks/bench_fit.py at its smallest setting (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fit.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_fit", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_reports_every_figure(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    results = bench.main([
        "--backbone", "test_resnet", "--img-size", "16", "--batch-size", "8", "--steps", "2", "--warmup", "1",
        "--device", "cpu", "--synthetic", "40", "--json", str(out),
    ])
    for key in ("raw_train", "hiercls_train", "raw_infer", "hiercls_predict"):
        measure = results[key]
        assert measure["images_per_second"] > 0 and math.isfinite(measure["images_per_second"]), key
        assert measure["images"] > 0 and measure["seconds"] > 0, key
        assert measure["peak_memory_gib"] is None  # CPU: no GPU memory to report
    assert results["hiercls_train"]["images"] == 2 * 8, "two timed steps of 8 images"
    for key in ("train_ratio", "predict_ratio"):
        assert results[key] > 0 and math.isfinite(results[key])
    hours = results["cv_grid_hours"]
    assert set(hours) == {"flat", "joint", "per_node", "total"}
    assert hours["per_node"] > hours["flat"] > 0
    assert hours["total"] == pytest.approx(hours["flat"] + hours["joint"] + hours["per_node"])
    assert json.loads(out.read_text())["train_ratio"] == pytest.approx(results["train_ratio"])
    raw_rate = results["raw_train"]["images_per_second"]
    assert results["cv_bound_hours"] == pytest.approx(bench.cv_bound_hours(raw_rate))
    printed = capsys.readouterr().out
    for row in ("raw timm training", "hiercls fit (joint)", "raw timm inference", "hiercls predict_table", "CV grid"):
        assert row in printed


def test_cv_extrapolation_follows_the_formula():
    bench = load_bench()
    hours = bench.cv_grid_hours(train_rate=100.0, infer_rate=400.0)
    flat = 5 * (80 * 2970 / 100.0 + 2 * 742 / 400.0) / 3600
    per_node = 5 * (80 * 2970 * 2.4 / 100.0 + 2 * 742 * 4 / 400.0) / 3600
    assert hours["flat"] == pytest.approx(flat) and hours["per_node"] == pytest.approx(per_node)
    # the bound: ViT-S/16 at 2,143 img/s raw is about 41 minutes for the three strategies
    assert bench.cv_bound_hours(2143.0) * 60 == pytest.approx(5 * 80 * 2970 * 4.4 / 2143.0 / 60)
    assert 40 < bench.cv_bound_hours(2143.0) * 60 < 42


def test_synthetic_images_are_real_jpegs_over_the_leaves(tmp_path):
    from PIL import Image

    bench = load_bench()
    folder = bench.write_synthetic(tmp_path / "data", 14, img_size=16)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 14 and len({f.parent.name for f in files}) == 7
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and image.size == (20, 20)


def test_cycled_labels_give_real_images_the_leaves_in_turn(tmp_path):
    import csv

    from hiercls.taxonomy import load_taxonomy

    bench = load_bench()
    folder = bench.write_synthetic(tmp_path / "data", 9, img_size=16)
    taxonomy = load_taxonomy(bench.DEFAULT_TAXONOMY)
    manifest = bench.cycled_manifest(folder, taxonomy, tmp_path / "cycled.csv")
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    assert len(rows) == 9 and {r["label"] for r in rows} == set(taxonomy.leaves)
    assert [r["label"] for r in rows[:2]] == list(taxonomy.leaves[:2])


def test_table_rows_carry_the_ratios(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_table", BENCH.parent / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    measure = {"images_per_second": 1000.0, "peak_memory_gib": 3.25, "images": 1, "seconds": 1.0}
    result = {
        "backbone": "vit_small_patch16_384", "compile": True, "device": "NVIDIA H100", "torch": "2.x",
        "raw_train": measure, "hiercls_train": measure | {"images_per_second": 960.0},
        "raw_infer": measure, "hiercls_predict": measure | {"images_per_second": 910.0},
        "train_ratio": 0.96, "predict_ratio": 0.91, "cv_grid_hours": {"total": 1.1}, "cv_bound_hours": 1.0,
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    assert table.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| vit_small_patch16_384 | yes | 1,000 | 960 | 0.960 | 1,000 | 910 | 0.910 | 3.2 | 1.10 | 1.00 | 1.100 |" in printed


def load_sibling(name: str):
    """Another script of benchmarks/; they import bench_fit by name, so it is loaded first."""
    load_bench()
    spec = importlib.util.spec_from_file_location(name, BENCH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench_cv():
    return load_sibling("bench_cv")


def test_cv_cells_extrapolate_from_their_steady_epochs(tmp_path):
    bench_cv = load_bench_cv()
    run = tmp_path / "cell"
    run.mkdir()
    (run / "cv_done.json").write_text(json.dumps({"seconds": 30.0, "epochs": 4}))
    records = [  # epoch 1 compiles (slow); epochs 2-3 steady; epoch 4 also validates
        {"epoch": 1, "seconds": 20.0, "images_per_second": 5.0, "elapsed_seconds": 20.0},
        {"epoch": 2, "seconds": 2.0, "images_per_second": 50.0, "elapsed_seconds": 22.5},
        {"epoch": 3, "seconds": 2.0, "images_per_second": 50.0, "elapsed_seconds": 25.0},
        {"epoch": 4, "seconds": 2.0, "images_per_second": 50.0, "elapsed_seconds": 27.5},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    times = bench_cv.cell_times(run, target_epochs=80)
    assert times["steady_epoch_seconds"] == pytest.approx(2.5)  # training 2 s + 0.5 s around it
    assert times["images_per_epoch"] == pytest.approx(100.0)
    assert times["extrapolated_seconds"] == pytest.approx(30.0 + 76 * 2.5)
    summary = bench_cv.grid_summary([{"strategy": "joint", "backbone": "b", **times}], {"b": 200.0}, 80)
    assert summary["total"]["bound_seconds"] == pytest.approx(80 * 100 / 200.0)
    assert summary["total"]["ratio"] == pytest.approx((30.0 + 76 * 2.5) / 40.0)


def test_cv_benchmark_runs_the_grid(tmp_path, capsys):
    bench_cv = load_bench_cv()
    out = tmp_path / "cv.json"
    results = bench_cv.main([
        "--backbones", "test_resnet", "--strategies", "flat", "joint", "--folds", "2", "--epochs", "3",
        "--img-size", "16", "--batch-size", "8", "--synthetic", "48", "--raw-steps", "3", "--raw-warmup", "1",
        "--device", "cpu", "--json", str(out),
    ])
    assert len(results["cells"]) == 4 and {c["strategy"] for c in results["cells"]} == {"flat", "joint"}
    for cell in results["cells"]:
        assert cell["epochs"] == 3 and cell["extrapolated_seconds"] > cell["measured_seconds"] > 0
        assert cell["bound_seconds"] > 0
    assert results["total"]["ratio"] > 0 and json.loads(out.read_text())["folds"] == 2
    assert "grid" in capsys.readouterr().out


def test_plain_timm_reference_trains_on_the_runs_split_with_folder_labels(tmp_path):
    import numpy as np
    from PIL import Image

    plain = load_sibling("plain_timm")
    rng = np.random.default_rng(0)
    paths = {"train": [], "val": []}
    for folder in ("b_cells", "a_cells"):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(6):
            path = tmp_path / "data" / folder / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
            paths["val" if i >= 4 else "train"].append(str(path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps(paths))
    out = tmp_path / "plain.json"
    results = plain.main(["--run", str(run), "--backbone", "test_resnet", "--img-size", "16", "--epochs", "2",
                          "--batch-size", "4", "--workers", "0", "--eval-every", "1", "--device", "cpu",
                          "--json", str(out)])
    assert results["classes"] == ["a_cells", "b_cells"]  # sorted folder names, as ImageFolder
    assert (results["n_train"], results["n_val"]) == (8, 4)
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    assert 0.0 <= results["val_accuracy"] <= 1.0
    assert json.loads(out.read_text())["val_accuracy"] == results["val_accuracy"]
    with pytest.raises(SystemExit, match="split.json"):
        plain.main(["--run", str(tmp_path / "data")])
