"""First run on a GPU: every CUDA-only path of hiercls once, small and fast, before any benchmark.

The development machine has no GPU, so these paths are tested on the CPU only through their
CPU twins. A device session is short; this script spends about two minutes of it finding what
breaks on CUDA before the long benchmarks do:

- ``compile``: ``torch.compile`` with the triton backend on one small function;
- ``fit/<strategy>``: a tiny ``fit`` of every strategy (joint compiled) with
  ``torch.cuda.set_sync_debug_mode("warn")`` while each training step runs: the host must never
  wait for the GPU inside a step (the CPU tests check the ops; this checks the real thing);
- ``fit/host-images``: the same fit with the training set kept in host memory (as when it does
  not fit the GPU) must train like the resident one;
- ``fit/hxe``: the hxe plugin's flat loss on CUDA, also without syncs (if installed);
- ``predict``: GPU predictions (bf16, compiled, side-stream copies) against the CPU's;
- ``torchrun``: ``torchrun --nproc-per-node 1 -m hiercls fit`` (nccl, rank-0 logic).

Each check prints ok / FAIL with its figures, and ``--json`` writes them all::

    python benchmarks/gpu_smoke.py --json $OUT/smoke.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_fit import (
    DEFAULT_TAXONOMY,
    device_label,
    scratch_folder,
    write_json,
    write_synthetic,
)

STRATEGIES = ("flat", "per_node", "per_level", "joint")
COMPILED = {"joint"}  # one compiled strategy: each compilation costs device minutes


def fit_config(data: Path, out: Path, device: str, **overrides):
    from hiercls.config import load_config

    options = {
        "taxonomy": str(DEFAULT_TAXONOMY), "data": str(data), "out": str(out), "backbone": "resnet18",
        "img_size": 64, "epochs": 2, "batch_size": 32, "lr": 1e-3, "val_fraction": 0.2, "device": device,
        "cache_dir": str(out.parent / "cache"), "checkpoint_minutes": 0,
    }
    options.update(overrides)
    return load_config(None, options)


class StepSyncs:
    """Counts CUDA sync warnings raised while ``trainer._train_step`` runs (set_sync_debug_mode)."""

    def __init__(self, device: str):
        from hiercls.training import trainer as engine  # the module whose _train_step the loop calls

        self.engine, self.original, self.cuda = engine, engine._train_step, device == "cuda"
        self.steps, self.messages = 0, []

    def __enter__(self):
        def step(*args, **kwargs):
            if self.cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = self.original(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
            self.steps += 1
            self.messages += [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            return result

        self.engine._train_step = step
        return self

    def __exit__(self, *exc):
        self.engine._train_step = self.original


def last_train_loss(run: Path) -> dict[str, float]:
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records[-1]["train_loss"]


def check_compile(device: str) -> dict[str, Any]:
    def f(x):
        return torch.nn.functional.gelu(x @ x.T).sum(dim=1)

    x = torch.randn(64, 64, device=device)
    compiled = torch.compile(f, dynamic=False)
    diff = (compiled(x) - f(x)).abs().max().item()
    return {"ok": diff < 1e-2, "max_abs_diff": diff}


def check_fit(data: Path, work: Path, device: str, strategy: str, loss: str = "ce") -> dict[str, Any]:
    from hiercls.engine import fit

    run = work / f"run-{strategy}-{loss}"
    config = fit_config(data, run, device, strategy=strategy, loss=loss, compile=strategy in COMPILED and loss == "ce")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with StepSyncs(device) as syncs:
        fit(config, progress=False)
    losses = last_train_loss(run)
    return {
        "ok": not syncs.messages and all(np.isfinite(v) for v in losses.values()),
        "steps": syncs.steps, "syncs_in_steps": len(syncs.messages), "first_syncs": syncs.messages[:3],
        "train_loss": losses, "seconds": round(time.perf_counter() - t0, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }


def check_host_images(data: Path, work: Path, resident: dict[str, Any]) -> dict[str, Any]:
    """The joint fit again, with mem_get_info reporting no free memory: the set stays on the host."""
    from hiercls.engine import fit

    run = work / "run-joint-host"
    real = torch.cuda.mem_get_info
    torch.cuda.mem_get_info = lambda device=None: (0, real(device)[1])
    try:
        with StepSyncs("cuda") as syncs:
            fit(fit_config(data, run, "cuda", strategy="joint", compile=True), progress=False)
    finally:
        torch.cuda.mem_get_info = real
    losses, reference = last_train_loss(run), resident["train_loss"]
    gap = max(abs(losses[k] - reference[k]) / max(abs(reference[k]), 1e-6) for k in reference)
    return {"ok": not syncs.messages and gap < 0.05, "syncs_in_steps": len(syncs.messages),
            "first_syncs": syncs.messages[:3], "train_loss": losses, "relative_gap_to_resident": gap}


def check_predict(data: Path, work: Path, device: str) -> dict[str, Any]:
    from hiercls.data import load_images
    from hiercls.inference import load_run, predict_table

    results = {}
    for strategy in ("flat", "joint"):
        loaded = load_run(work / f"run-{strategy}-ce", "last")
        table = load_images(data, taxonomy=loaded.taxonomy)
        cpu = predict_table(load_run(work / f"run-{strategy}-ce", "last"), table, device="cpu", progress=False)
        gpu = predict_table(loaded, table, device=device, progress=False, compile=True, batch_size=48)
        diff = float(np.abs(gpu.conditional - cpu.conditional).max())
        agree = float(np.mean(np.asarray(gpu.decode("greedy")) == np.asarray(cpu.decode("greedy"))))
        results[strategy] = {"max_abs_diff": diff, "consistency_error": float(gpu.consistency_error()),
                             "decisions_agree": agree}
    ok = all(r["max_abs_diff"] < 0.05 and r["consistency_error"] < 1e-4 and r["decisions_agree"] > 0.95
             for r in results.values())
    return {"ok": ok, **results}


def check_torchrun(data: Path, work: Path, device: str) -> dict[str, Any]:
    run = work / "run-torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "hiercls", "fit", "--taxonomy", str(DEFAULT_TAXONOMY), "--data", str(data), "--out", str(run),
               "--backbone", "resnet18", "--img-size", "64", "--epochs", "1", "--batch-size", "32",
               "--cache-dir", str(work / "cache"), "--device", device, "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    return {"ok": done.returncode == 0 and (run / "metrics.jsonl").is_file(), "returncode": done.returncode,
            "tail": (done.stdout + done.stderr)[-600:]}


def run_check(name: str, results: dict[str, Any], check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        outcome = check()
    except Exception as exc:  # noqa: BLE001 (a smoke test reports every failure and goes on)
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-1500:]}
    outcome.setdefault("seconds", round(time.perf_counter() - t0, 1))
    results[name] = outcome
    detail = {k: v for k, v in outcome.items() if k not in ("ok", "traceback", "tail")}
    print(f"{'ok  ' if outcome['ok'] else 'FAIL'} {name}: {detail}", flush=True)
    if not outcome["ok"] and "traceback" in outcome:
        print(outcome["traceback"], flush=True)
    return outcome


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=480, help="synthetic smear-like JPEGs to train on")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--device", default="cuda",
                        help="cuda (the point); cpu runs the same checks as a dry run of this script")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_smoke.py checks the CUDA paths and needs a CUDA device; none is visible "
                         "(--device cpu dry-runs the script)")
    results: dict[str, Any] = {"device": device_label(torch.device(device)), "torch": torch.__version__}
    with scratch_folder("hiercls-gpu-smoke-", args.keep) as work:
        data = write_synthetic(work / "images", args.images, 64)
        run_check("compile", results, lambda: check_compile(device))
        for strategy in STRATEGIES:
            run_check(f"fit/{strategy}", results, lambda s=strategy: check_fit(data, work, device, s))
        if device == "cuda" and results["fit/joint"]["ok"]:
            run_check("fit/host-images", results, lambda: check_host_images(data, work, results["fit/joint"]))
        try:
            import hiercls_hxe  # noqa: F401

            run_check("fit/hxe", results, lambda: check_fit(data, work, device, "flat", loss="hxe"))
        except ImportError:
            print("skip fit/hxe: the hiercls-hxe plugin is not installed")
        run_check("predict", results, lambda: check_predict(data, work, device))
        run_check("torchrun", results, lambda: check_torchrun(data, work, device))
    failed = [name for name, r in results.items() if isinstance(r, dict) and not r.get("ok", True)]
    results["failed"] = failed
    print("all checks passed" if not failed else f"failed: {', '.join(failed)}")
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
