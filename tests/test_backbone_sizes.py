"""Any timm backbone at any image size: built for the run's size, or one clear error naming sizes that work."""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from hiercls.cli import main
from hiercls.errors import ConfigError
from hiercls.models import create_backbone
from hiercls.strategies import build_strategy
from hiercls.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "benchmarks" / "backbone_sweep.py"
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"
CANNOT = r"backbone '{name}' \(plugin [\w.]+\) cannot take {size} px images \(.+\); it runs at e\.g\. (\d+) or (\d+) px"


def load_sweep():
    spec = importlib.util.spec_from_file_location("backbone_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# Tiny members of each family at a size that is not their default: "ok", or the error expected.
SWEEP_CASES = [
    ("resnet18", 64, "ok"),  # CNN
    ("convnext_atto", 64, "ok"),  # ConvNeXt
    ("mobilenetv3_small_050", 64, "ok"),  # EfficientNet-style (MobileNetV3)
    ("efficientvit_b0", 64, "ok"),  # hybrid conv + linear attention
    ("vit_tiny_patch16_224", 64, "ok"),  # ViT: position embeddings fixed at 224 unless built for 64
    ("deit_tiny_patch16_224", 64, "ok"),  # DeiT
    ("eva02_tiny_patch14_224", 64, "ok"),  # EVA (rotary embeddings), 64 is not a multiple of 14
    ("swin_tiny_patch4_window7_224", 64, "ok"),  # Swin: windows shrink with the size
    ("levit_128s", 64, "ok"),  # hybrid with attention biases per resolution
    ("levit_128s", 72, CANNOT.format(name="levit_128s", size=72)),
    ("maxvit_rmlp_pico_rw_256", 72, CANNOT.format(name="maxvit_rmlp_pico_rw_256", size=72)),
]


@pytest.fixture(scope="module")
def sweep():
    return load_sweep()


@pytest.mark.parametrize(("name", "size", "expected"), SWEEP_CASES, ids=[f"{n}@{s}" for n, s, _ in SWEEP_CASES])
def test_every_family_runs_at_a_foreign_size_or_says_which_sizes_it_takes(sweep, name, size, expected):
    row = sweep.try_backbone(name, size)
    if expected == "ok":
        assert row.status == "ok", row.message
        assert row.output_shape == (2, row.num_features)
        return
    assert row.status == "error", f"{name} at {size} px: {row.status} {row.message}"
    found = re.search(expected, row.message)
    assert found, row.message
    assert "\n" not in row.message
    # the sizes the message offers really work
    assert sweep.try_backbone(name, int(found.group(1))).status == "ok"


def test_sweep_script_prints_a_row_per_model(sweep, capsys):
    rows = sweep.main(["--models", "resnet18,levit_128s", "--img-size", "72"])
    assert [(r.model, r.status) for r in rows] == [("resnet18", "ok"), ("levit_128s", "error")]
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | px | result | params (M)")
    assert table[2].startswith("| resnet18 | 72 | ok | 11.2 | 512 |")
    assert table[3].startswith("| levit_128s | 72 | error | - | - |") and "cannot take 72 px" in table[3]


def test_readme_example_vit_small_384_trains_at_64px():
    backbone = create_backbone("vit_small_patch16_384", run_img_size=64)
    assert backbone.patch_embed.grid_size == (4, 4)
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 384)


def _random_weights(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0.0, 0.05)  # differs from any fresh initialisation, stays finite
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return state


def test_vit_weights_made_at_224_are_resampled_for_64px(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source = _random_weights(timm.create_model("vit_tiny_patch16_224"), tmp_path / "vit224.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tensor may be left random
        backbone = create_backbone("vit_tiny_patch16_224", pretrained=tmp_path / "vit224.pth", run_img_size=64)
    expected = resample_abs_pos_embed(source["pos_embed"], [4, 4], num_prefix_tokens=1)
    assert backbone.pos_embed.shape == (1, 1 + 16, 192)
    assert torch.allclose(backbone.pos_embed, expected)
    assert torch.equal(backbone.blocks[3].attn.qkv.weight, source["blocks.3.attn.qkv.weight"])


def test_position_embeddings_are_resampled_on_the_state_dict_path_too(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source = _random_weights(timm.create_model("vit_tiny_patch16_224"), tmp_path / "plain.pth")
    torch.save({"model_state_dict": source}, tmp_path / "wrapped.pth")  # timm's loader misses these keys
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backbone = create_backbone("vit_tiny_patch16_224", pretrained=tmp_path / "wrapped.pth", run_img_size=64)
    expected = resample_abs_pos_embed(source["pos_embed"], [4, 4], num_prefix_tokens=1)
    assert torch.allclose(backbone.pos_embed, expected)


def test_levit_attention_biases_made_at_224_are_resampled_for_64px(tmp_path):
    from timm.layers import resize_rel_pos_bias_table_levit

    source = _random_weights(timm.create_model("levit_128s"), tmp_path / "levit224.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # without resampling 11 bias tables would stay random (a warning)
        backbone = create_backbone("levit_128s", pretrained=tmp_path / "levit224.pth", run_img_size=64)
    key = "stages.0.blocks.0.attn.attention_biases"
    own = backbone.state_dict()[key]
    assert own.shape == (4, 16) and source[key].shape == (4, 196)
    assert torch.allclose(own, resize_rel_pos_bias_table_levit(source[key].T, (16, 4)).T)
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 384)


def test_dynamic_img_size_keeps_the_default_position_embeddings():
    backbone = create_backbone("vit_tiny_patch16_224", run_img_size=64, dynamic_img_size=True)
    assert backbone.pos_embed.shape == (1, 1 + 14 * 14, 192)  # old runs with this option still load


def test_strategies_build_the_backbone_for_the_image_size():
    model = build_strategy("joint", load_taxonomy(LEUKEMIA), backbone="deit_tiny_patch16_224", image_size=48)
    embeds = [m for m in model.modules() if type(m).__name__ == "PatchEmbed"]
    assert len(embeds) == 1 and embeds[0].grid_size == (3, 3)
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 48, 48))


def _smears(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for li, label in enumerate(("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML")):
        (root / label).mkdir(parents=True)
        for k in range(3):
            pixels = np.clip(np.array([30.0 * li, 200 - 20 * li, 120]) + rng.normal(0, 15, (20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"slide{k}_{label}.png")
    return root


def _fit(data: Path, out: Path, backbone: str, size: int) -> list[str]:
    return [
        "fit", "--taxonomy", str(LEUKEMIA), "--data", str(data), "--out", str(out), "--backbone", backbone,
        "--img-size", str(size), "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--group-regex",
        r"^(slide\d)_", "--val-fraction", "0.34", "--cache-dir", str(out.parent / "cache"), "--no-progress",
    ]


def test_fit_trains_a_vit_at_32px_and_refuses_a_size_levit_cannot_take(tmp_path, capsys):
    data = _smears(tmp_path / "data")
    assert main(_fit(data, tmp_path / "vit", "vit_tiny_patch16_224", 32)) == 0
    assert main(["predict", "--run", str(tmp_path / "vit"), "--data", str(data), "--out",
                 str(tmp_path / "pred.csv"), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(_fit(data, tmp_path / "levit", "levit_128s", 72)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(CANNOT.format(name="levit_128s", size=72), err), err


def test_a_bad_image_size_is_a_config_error():
    with pytest.raises(ConfigError, match="positive integer"):
        create_backbone("resnet18", run_img_size=0)
