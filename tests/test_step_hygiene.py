"""What keeps a GPU busy, checked on the CPU: no host sync inside a training step, and a
compiled model that is compiled once per shape and never falls back to eager.

On CUDA an op whose result the host must read (``.item()``, ``bool(tensor)``, ``nonzero``,
boolean-mask indexing, ``unique`` ...) makes the host wait for every queued kernel, so the
GPU idles while the next step is launched. These ops are visible on the CPU too: a dispatch
mode records them while ``trainer._train_step`` runs (torch's own optimizer step excluded:
on CUDA it is the fused kernel, which keeps its step counter on the device).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_engine import make_config, write_smears
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

from hiercls.builtin.strategies import BUILTIN_STRATEGIES as STRATEGIES
from hiercls.engine import fit
from hiercls.training import trainer

#: aten ops that make the host wait for the device when their input lives on a GPU.
SYNCING_OPS = {
    "aten::_local_scalar_dense",  # .item(), float(t), bool(t), .tolist()
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::histc",
    "aten::repeat_interleave",
}
#: ops that sync when indexed with a boolean mask (the mask is turned into indices first).
INDEXING_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class SyncRecorder(TorchDispatchMode):
    """Records every op of ``SYNCING_OPS`` and every boolean-mask index while active."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not self.paused:
            if name in SYNCING_OPS:
                self.found.append(name)
            elif name in INDEXING_OPS and _has_bool_index(args):
                self.found.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()))


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    return write_smears(tmp_path_factory.mktemp("hygiene") / "data")


def record_syncs(monkeypatch) -> SyncRecorder:
    """Run every ``_train_step`` of the next ``fit`` under a ``SyncRecorder`` (returned)."""
    recorder = SyncRecorder()
    original = trainer._train_step

    def pause(optimizer, *args, **kwargs):
        recorder.paused = True

    def resume(optimizer, *args, **kwargs):
        recorder.paused = False

    def recorded_step(*args, **kwargs):
        pre = register_optimizer_step_pre_hook(pause)
        post = register_optimizer_step_post_hook(resume)
        try:
            with recorder:
                return original(*args, **kwargs)
        finally:
            pre.remove()
            post.remove()

    monkeypatch.setattr(trainer, "_train_step", recorded_step)
    return recorder


@pytest.mark.parametrize(
    "syncing, expected",
    [
        (lambda x: x.sum().item(), ["aten::_local_scalar_dense"]),
        (lambda x: bool(x.any()), ["aten::_local_scalar_dense"]),
        (lambda x: x[x > 2].sum(), ["aten::index with a boolean mask"]),
        (lambda x: torch.unique(x), ["aten::_unique2"]),
        (lambda x: torch.where(x > 2, x, 0).sum(), []),  # the sync-free way
    ],
)
def test_the_recorder_catches_a_host_sync(syncing, expected):
    """The check itself can fail."""
    with SyncRecorder() as recorder:
        syncing(torch.arange(6.0))
    assert recorder.found == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("loss", ["ce", "weighted_ce", "focal"])
def test_a_training_step_never_waits_for_the_device(smears, tmp_path, monkeypatch, strategy, loss):
    recorder = record_syncs(monkeypatch)
    steps = []
    config = make_config(smears, tmp_path / "run", strategy=strategy, loss=loss, epochs=1,
                         augment={"color_jitter": 0.2})
    fit(config, progress=False, on_step=lambda *a: steps.append(a))
    assert steps, "no training step ran"
    assert recorder.found == [], f"host-device syncs inside a {strategy} / {loss} training step: {recorder.found}"


@pytest.mark.parametrize("strategy, loss", [("flat", "hxe"), ("flat", "soft_labels"), ("joint", "hxe")])
def test_the_tree_losses_of_the_hxe_plugin_stay_sync_free(smears, tmp_path, monkeypatch, strategy, loss):
    pytest.importorskip("hiercls_hxe", reason="the hiercls-hxe plugin is not installed (pip install -e plugins/hiercls-hxe)")
    recorder = record_syncs(monkeypatch)
    steps = []
    config = make_config(smears, tmp_path / "run", strategy=strategy, loss=loss, epochs=1)
    fit(config, progress=False, on_step=lambda *a: steps.append(a))
    assert steps, "no training step ran"
    assert recorder.found == [], f"host-device syncs inside a {strategy} / {loss} training step: {recorder.found}"


def test_partial_labels_and_level_weights_stay_sync_free(smears, tmp_path, monkeypatch):
    recorder = record_syncs(monkeypatch)
    config = make_config(smears, tmp_path / "run", strategy="joint", epochs=1,
                         strategy_options={"level_weights": [1.0, 0.5, 0.5], "head_reduction": "head"})
    fit(config, progress=False)
    assert recorder.found == []


# -- torch.compile ------------------------------------------------------------------------

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on the CPU needs a C++ compiler (g++), which this machine lacks",
)


def compiled_graphs(smears: Path, out: Path, strategy: str, reset: bool = True, **overrides) -> tuple[list[int], dict]:
    """Fit 2 compiled epochs; unique graphs after each epoch, and dynamo's graph-break counts."""
    from torch._dynamo.utils import counters

    if reset:
        torch._dynamo.reset()
        counters.clear()
    after_epoch: list[int] = []

    def on_step(epoch, unit, step):
        while len(after_epoch) <= epoch:
            after_epoch.append(0)
        after_epoch[epoch] = counters["stats"]["unique_graphs"]

    # 24 training images at batch 7: the 3 left over must not cost a second graph
    options = {"strategy": strategy, "compile": True, "epochs": 2, "batch_size": 7} | overrides
    fit(make_config(smears, out, **options), progress=False, on_step=on_step)
    return after_epoch, dict(counters["graph_break"])


@needs_compiler
def test_compiled_joint_model_is_one_graph(smears, tmp_path):
    after_epoch, breaks = compiled_graphs(smears, tmp_path / "run", "joint")
    assert breaks == {}, f"graph breaks in the joint model: {breaks}"
    # the augmentation's graph and the model's, both built in the first steps and never again
    assert after_epoch == [2, 2], f"graphs after each epoch: {after_epoch} (a second batch shape recompiled?)"


@needs_compiler
def test_compiled_per_node_units_share_graphs_and_never_recompile(smears, tmp_path):
    from hiercls.taxonomy import load_taxonomy

    after_epoch, breaks = compiled_graphs(smears, tmp_path / "run", "per_node")
    assert breaks == {}
    assert after_epoch[1] == after_epoch[0], f"recompiled in epoch 2: {after_epoch}"
    # units with the same head size share a graph; a unit smaller than one batch (Chronic: 6
    # images) trains eagerly; plus the augmentation's graph
    taxonomy = load_taxonomy(make_config(smears, tmp_path / "x").taxonomy)
    head_sizes = {len(taxonomy.children(node)) for node in taxonomy.internal_nodes}
    assert 2 <= after_epoch[0] <= len(head_sizes) + 1, after_epoch
    # another model of the same shapes in the same process (the next cv cell): no new graph
    again, _ = compiled_graphs(smears, tmp_path / "run2", "per_node", reset=False, seed=1)
    assert again[-1] == after_epoch[-1], f"the second run compiled again: {after_epoch} then {again}"


@needs_compiler
def test_compiled_augmentation_equals_eager():
    from hiercls.augment import BatchAugment
    from hiercls.config import AugmentConfig

    images = torch.randint(0, 256, (6, 20, 20, 3), dtype=torch.uint8)
    config = AugmentConfig(color_jitter=0.3)
    eager = BatchAugment(config, channels_last=True)(images, torch.Generator().manual_seed(3))
    compiled = BatchAugment(config, channels_last=True, compile_batch_size=6)
    out = compiled(images, torch.Generator().manual_seed(3))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    # the same shapes again: the compiled graph is reused, not rebuilt
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled(images, torch.Generator().manual_seed(4))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_a_fixed_batch_forward_sees_full_batches_only_and_changes_no_prediction(smears, tmp_path):
    from hiercls.inference import load_run, predict_conditionals

    run = tmp_path / "run"
    fit(make_config(smears, run, epochs=1), progress=False)
    model = load_run(run, "last").model
    images = torch.randint(0, 256, (11, 16, 16, 3), dtype=torch.uint8)
    common = dict(batch_size=4, device=torch.device("cpu"), progress=False)
    plain = predict_conditionals(model, images, **common)
    seen = []

    def forward(x):
        seen.append(len(x))
        return model.node_conditionals(x)

    fixed = predict_conditionals(model, images, fixed_batch=True, forward=forward, **common)
    assert seen == [4, 4]  # the last 3 images went the eager way
    assert plain.shape == fixed.shape == (11, model.taxonomy.num_nodes)
    np.testing.assert_allclose(fixed, plain, atol=1e-6)


@needs_compiler
def test_compiled_prediction_is_one_graph_and_equals_eager(smears, tmp_path):
    from torch._dynamo.utils import counters

    from hiercls.data import load_images
    from hiercls.inference import load_run, predict_table

    run = tmp_path / "run"
    fit(make_config(smears, run, epochs=1), progress=False)
    loaded = load_run(run, "last")
    table = load_images(smears, taxonomy=loaded.taxonomy)  # 32 images: batches of 12, 12 and 8
    eager = predict_table(loaded, table, batch_size=12, device="cpu", progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = predict_table(loaded, table, batch_size=12, device="cpu", progress=False, compile=True)
    assert counters["stats"]["unique_graphs"] == 1  # the last batch runs eagerly, not recompiled
    np.testing.assert_allclose(compiled.conditional, eager.conditional, atol=1e-4)
