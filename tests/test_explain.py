"""Grad-CAM per level (hiercls.explain) and the `hiercls explain` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hiercls.cli import main
from hiercls.errors import ConfigError
from hiercls.explain import (
    LevelCam,
    activation_to_cam,
    decision_path,
    gradcam_per_level,
    render_panel,
)
from hiercls.models.backbone import set_backbone_attributes
from hiercls.strategies import build_strategy
from hiercls.taxonomy import Taxonomy, load_taxonomy

REPO = Path(__file__).resolve().parents[1]
LEUKEMIA = REPO / "taxonomy" / "leukemia.yaml"


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy(LEUKEMIA)


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def greedy_path(model, image) -> list[tuple[str, str]]:
    probs = model.predict_proba(image)
    leaf = probs.decode("greedy")[0]
    steps = model.taxonomy.path(leaf)
    return [(a, b) for a, b in zip(steps[:-1], steps[1:]) if len(model.taxonomy.children(a)) >= 2]


def check_cams(cams: list[LevelCam], model, image, size: int) -> None:
    assert [(c.decision, c.child) for c in cams] == greedy_path(model, image)
    conditional = model.predict_proba(image).conditional[0]
    for cam in cams:
        assert cam.heatmap.shape == (size, size) and cam.heatmap.dtype == np.float32
        assert np.isfinite(cam.heatmap).all()
        assert cam.heatmap.min() >= 0.0 and cam.heatmap.max() <= 1.0
        assert cam.probability == pytest.approx(conditional[model.taxonomy.index[cam.child]], abs=1e-5)
        assert cam.depth == model.taxonomy.depth(cam.decision)


def test_joint_resnet_one_cam_per_decision_and_model_left_as_it_was(taxonomy):
    torch.manual_seed(0)
    model = build_strategy("joint", taxonomy, backbone="resnet18")
    network = model.training_units()[0].module
    for p in network.backbone.layer1.parameters():
        p.requires_grad_(False)  # a partly frozen model must stay partly frozen
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    model.train()
    image = torch.randn(1, 3, 64, 64)
    cams = gradcam_per_level(model, image)
    assert model.training, "training mode must be restored"
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters()), "no parameter gradient may be accumulated"
    assert hook_count(model) == 0
    assert 1 <= len(cams) <= 3 and cams[0].decision == "root" and all(c.unit == "joint" for c in cams)
    check_cams(cams, model.eval(), image, 64)
    # consecutive decisions chain down the tree
    for upper, lower in zip(cams, cams[1:]):
        assert lower.decision == upper.child


def test_vit_tokens_become_a_patch_grid(taxonomy):
    torch.manual_seed(0)
    model = build_strategy(
        "joint", taxonomy, backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "patch_size": 8}
    )
    backbone = model.training_units()[0].module.backbone
    assert backbone.is_token_model and backbone.num_prefix_tokens == 1
    assert tuple(backbone.patch_embed.grid_size) == (4, 4), "backbone_kwargs must reach timm"
    image = torch.randn(1, 3, 32, 32)
    cams = gradcam_per_level(model, image)
    check_cams(cams, model, image, 32)
    assert hook_count(model) == 0


@pytest.mark.parametrize("strategy", ["per_node", "per_level", "flat"])
def test_other_strategies_explain_every_decision(strategy, taxonomy):
    torch.manual_seed(1)
    model = build_strategy(strategy, taxonomy, backbone="test_resnet")
    image = torch.randn(1, 3, 48, 48)
    cams = gradcam_per_level(model, image)
    check_cams(cams, model, image, 48)
    units = [c.unit for c in cams]
    if strategy == "per_node":
        assert units == [f"node:{c.decision}" for c in cams]
    elif strategy == "per_level":
        assert units == [f"level:{c.depth + 1}" for c in cams]
    else:
        assert set(units) == {"flat"}
    assert hook_count(model) == 0


def test_target_explains_the_path_to_a_given_node(taxonomy):
    model = build_strategy("joint", taxonomy, backbone="test_resnet")
    cams = gradcam_per_level(model, torch.randn(1, 3, 32, 32), target="APL")  # an alias of APML
    assert [(c.decision, c.child) for c in cams] == [("root", "Leukemia"), ("Leukemia", "Acute"), ("Acute", "APML")]
    probs = model.predict_proba(torch.randn(1, 3, 32, 32))
    assert decision_path(taxonomy, probs.conditional[0], "Normal") == [("root", "Normal")]


# -- the map follows the evidence ------------------------------------------------------------


class BrightnessNet(nn.Module):
    """A fixed CNN whose features measure brightness: bright regions give large activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3, padding=1)
        nn.init.constant_(self.conv.weight, 0.1)
        nn.init.constant_(self.conv.bias, 0.0)
        self.act = nn.Sequential(self.conv, nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.act(x)).flatten(1)


def brightness_backbone() -> nn.Module:
    net = BrightnessNet()
    return set_backbone_attributes(net, num_features=4, gradcam_layer=net.act)


def blob_image(quadrant: tuple[int, int], size: int = 32, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.0, 0.05, (1, 3, size, size)).astype(np.float32)
    half = size // 2
    row, col = quadrant[0] * half, quadrant[1] * half
    image[:, :, row + 4 : row + half - 4, col + 4 : col + half - 4] = 1.0
    return torch.from_numpy(image)


def test_heatmap_peaks_where_the_evidence_is(taxonomy):
    model = build_strategy("joint", taxonomy, backbone=brightness_backbone)
    with torch.no_grad():
        for head in model.training_units()[0].module.heads:
            head.fc.weight.fill_(-1.0)
            head.fc.weight[0].fill_(1.0)  # first child: more brightness, more evidence
            head.fc.bias.zero_()
    maps = {}
    for quadrant in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        cams = gradcam_per_level(model, blob_image(quadrant))
        assert [c.child for c in cams] == ["Normal"]
        heat = cams[0].heatmap
        quarters = [heat[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].mean() for r in (0, 1) for c in (0, 1)]
        assert int(np.argmax(quarters)) == quadrant[0] * 2 + quadrant[1], (quadrant, quarters)
        assert heat.max() == pytest.approx(1.0)
        maps[quadrant] = heat
    assert not np.allclose(maps[(0, 0)], maps[(1, 1)])


COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1)}
SQUARES = Taxonomy.from_nested({"red": {}, "green": {}, "blank": {}})


def square_images(count: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Grey noise with a red or green square somewhere in one quadrant (class = colour), or none ("blank").

    Returns images, labels (indices into ``SQUARES.leaves``) and the square's quadrant
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right). A third class without a square
    makes each colour evidence of its own, not just the absence of the other colour.
    """
    images = rng.normal(0.0, 0.1, (count, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 3, count)
    quadrants = rng.integers(0, 4, count)
    half, side = size // 2, size // 4
    for i, (label, quadrant) in enumerate(zip(labels, quadrants)):
        name = SQUARES.leaves[label]
        if name == "blank":
            continue
        top = (quadrant // 2) * half + rng.integers(0, half - side + 1)
        left = (quadrant % 2) * half + rng.integers(0, half - side + 1)
        images[i, :, top : top + side, left : left + side] = np.array(COLOURS[name], np.float32)[:, None, None]
    return torch.from_numpy(images), labels, quadrants


def quadrant_of(pixel: tuple[int, int], size: int) -> int:
    return (pixel[0] // (size // 2)) * 2 + pixel[1] // (size // 2)


class TinyCNN(nn.Module):
    """Two convolutions (16 x 16 maps at 32 px) and average pooling."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def tiny_cnn() -> nn.Module:
    net = TinyCNN()
    return set_backbone_attributes(net, num_features=16, gradcam_layer=net.features)


def test_trained_cnn_heatmap_peaks_on_the_coloured_square():
    torch.manual_seed(0)
    model = build_strategy("joint", SQUARES, backbone=tiny_cnn)
    network = model.training_units()[0].module
    optimiser = torch.optim.AdamW(network.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    network.train()
    for _ in range(40):
        images, labels, _ = square_images(32, 32, rng)
        loss = nn.functional.cross_entropy(network(images)["root"], torch.from_numpy(labels))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    images, labels, quadrants = square_images(24, 32, np.random.default_rng(99))
    checked = 0
    for image, label, quadrant in zip(images, labels, quadrants):
        if SQUARES.leaves[label] == "blank":
            continue
        (cam,) = gradcam_per_level(model, image[None])
        assert cam.child == SQUARES.leaves[label], "the tiny CNN should have learnt the colours"
        assert cam.cam_max > 0 and quadrant_of(cam.peak(), 32) == quadrant, (quadrant, cam.peak())
        checked += 1
    assert checked >= 10


def redness_vit(**options) -> nn.Module:
    """A one-block timm ViT (32 px, 4 x 4 patches of 8 px) whose only evidence is how red each patch is.

    Weights are set, not trained: a patch token is ``[mean red, 1, 0, 0]``, attention is
    uniform (zero queries and keys), values and projection copy, the MLP adds nothing and
    the final norms are removed, so the pooled feature's channel 0 grows with every red
    patch and the evidence for "red" sits exactly on the red patches. The class and
    register / distillation tokens start at zero.
    """
    import timm

    vit = timm.create_model(
        options.pop("name", "vit_tiny_patch16_224"), img_size=32, patch_size=8, embed_dim=4, depth=1,
        num_heads=1, mlp_ratio=1.0, num_classes=0, **options,
    )
    width = 4
    with torch.no_grad():
        for parameter in vit.parameters():
            parameter.zero_()
        vit.patch_embed.proj.weight[0, 0] = 1.0 / 64  # channel 0: mean red of the patch
        vit.patch_embed.proj.bias[1] = 1.0  # channel 1: constant, so LayerNorm keeps "how red"
        block = vit.blocks[0]
        block.norm1.weight.fill_(1.0)
        block.norm2.weight.fill_(1.0)
        block.attn.qkv.weight[2 * width :] = torch.eye(width)  # values copy; q = k = 0: uniform attention
        block.attn.proj.weight.copy_(torch.eye(width))
    vit.norm, vit.fc_norm = nn.Identity(), nn.Identity()
    return set_backbone_attributes(
        vit, num_features=width, gradcam_layer=vit.blocks[-1], is_token_model=True,
        num_prefix_tokens=vit.num_prefix_tokens,
    )


@pytest.mark.parametrize(
    ("options", "prefix_tokens"),
    [
        ({}, 1),
        ({"reg_tokens": 4}, 5),
        ({"global_pool": "avg", "class_token": False}, 0),
        ({"name": "deit_tiny_distilled_patch16_224"}, 2),
    ],
    ids=["class-token", "registers", "avg-pool", "distilled"],
)
def test_vit_heatmap_peaks_on_the_patch_holding_the_evidence(options, prefix_tokens):
    tree = Taxonomy.from_nested({"red": {}, "other": {}})
    model = build_strategy("joint", tree, backbone=lambda: redness_vit(**options))
    with torch.no_grad():
        fc = model.training_units()[0].module.heads[0].fc
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0, 0], fc.weight[1, 0] = 1.0, -1.0  # "red" reads channel 0
    backbone = model.training_units()[0].module.backbone
    assert backbone.num_prefix_tokens == prefix_tokens
    rng = np.random.default_rng(0)
    for row, col in [(0, 0), (0, 3), (1, 2), (3, 0), (2, 3)]:  # a patch in each quadrant, corners and inner
        image = rng.normal(0.0, 0.05, (1, 3, 32, 32)).astype(np.float32)
        image[0, 0, row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 1.0
        (cam,) = gradcam_per_level(model, torch.from_numpy(image), target="red")
        assert cam.cam_max > 0
        peak = cam.peak()
        assert (peak[0] // 8, peak[1] // 8) == (row, col), (row, col, peak)
        assert quadrant_of(peak, 32) == (row // 2) * 2 + col // 2
        outside = cam.heatmap.copy()
        outside[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 0
        assert outside.max() < 0.6, "the evidence is one patch: the map must fall off around it"


@pytest.mark.parametrize(
    ("name", "options", "size"),
    [
        ("vit_tiny_patch16_224", {"img_size": 64}, 64),
        ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64),
        ("eva02_tiny_patch14_224", {"img_size": 56}, 56),
        ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "avg", "class_token": False}, 64),
        ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2, "block_fn": "ResPostBlock"}, 64),
        ("vit_tiny_patch16_224", {"dynamic_img_size": True, "depth": 2}, 48),
        ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "depths": (1, 1, 1, 1)}, 64),
    ],
    ids=["vit", "deit-distilled", "eva02", "vit-avg-pool", "vit-post-norm", "vit-dynamic-size", "swin"],
)
def test_untrained_transformers_have_positive_evidence(name, options, size, taxonomy):
    """Before the hook read the tokens entering the last block, every ViT map was exactly zero."""
    import timm

    options = dict(options)
    if options.get("block_fn") == "ResPostBlock":  # post-norm blocks: no leading norm, the block's input is read
        options["block_fn"] = timm.models.vision_transformer.ResPostBlock
    torch.manual_seed(0)
    model = build_strategy("joint", taxonomy, backbone=name, backbone_kwargs=options)
    cams = gradcam_per_level(model, torch.randn(1, 3, size, size), target="AML")
    assert len(cams) == 3
    assert all(c.heatmap.shape == (size, size) for c in cams)
    assert all(c.cam_max > 0 and c.heatmap.max() == pytest.approx(1.0) for c in cams), [c.cam_max for c in cams]
    assert hook_count(model) == 0


def test_torchvision_vit_has_positive_evidence(taxonomy):
    pytest.importorskip("hiercls_torchvision", reason="the hiercls-torchvision plugin is not installed")
    torch.manual_seed(0)
    model = build_strategy("joint", taxonomy, backbone="tv/vit_b_16", backbone_kwargs={"image_size": 32})
    cams = gradcam_per_level(model, torch.randn(1, 3, 32, 32), target="AML")
    assert len(cams) == 3 and all(c.cam_max > 0 and c.heatmap.any() for c in cams), [c.cam_max for c in cams]


def test_a_layer_whose_patch_tokens_get_no_gradient_warns(taxonomy):
    """A token model pointing Grad-CAM at its final norm (after the last block) cannot be explained: say so."""
    torch.manual_seed(0)
    model = build_strategy(
        "joint", taxonomy, backbone="vit_tiny_patch16_224", backbone_kwargs={"img_size": 32, "depth": 1}
    )
    backbone = model.training_units()[0].module.backbone
    object.__setattr__(backbone, "gradcam_layer", backbone.norm)
    with pytest.warns(UserWarning, match="no gradient reaches the patch tokens"):
        cams = gradcam_per_level(model, torch.randn(1, 3, 32, 32))
    assert all(c.cam_max == 0 and not c.heatmap.any() for c in cams)


def test_activation_layouts_agree():
    rng = np.random.default_rng(3)
    nchw = torch.from_numpy(rng.normal(size=(1, 6, 4, 4)).astype(np.float32))
    grad = torch.from_numpy(rng.normal(size=(1, 6, 4, 4)).astype(np.float32))
    nchw[0, :, 1, 2] = 5.0
    grad[0] = 1.0
    reference = activation_to_cam(nchw, grad, (16, 16))
    assert np.unravel_index(reference.argmax(), reference.shape)[0] // 4 == 1
    # channels-last map (Swin-style): found from the channel count
    nhwc = activation_to_cam(nchw.permute(0, 2, 3, 1), grad.permute(0, 2, 3, 1), (16, 16), channels=(6,))
    assert np.allclose(nhwc, reference, atol=1e-6)
    # tokens: a class token in front of the 4x4 patch grid, dropped before reshaping
    tokens = nchw.flatten(2).transpose(1, 2)
    token_grad = grad.flatten(2).transpose(1, 2)
    with_cls = torch.cat([torch.full((1, 1, 6), 100.0), tokens], dim=1)
    with_cls_grad = torch.cat([torch.ones(1, 1, 6), token_grad], dim=1)
    from_tokens = activation_to_cam(with_cls, with_cls_grad, (16, 16), num_prefix_tokens=1)
    assert np.allclose(from_tokens, reference, atol=1e-6)
    # a map with no positive evidence stays zero instead of dividing by zero
    zero = activation_to_cam(-nchw.abs(), grad, (8, 8))
    assert zero.shape == (8, 8) and not zero.any()


# -- the picture ------------------------------------------------------------------------------


def test_render_panel_writes_a_png_and_keeps_existing_files(taxonomy, tmp_path):
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:16, :16] = 1.0
    cams = [
        LevelCam("root", "Leukemia", 0.93, heat, 0, "joint"),
        LevelCam("Leukemia", "Acute", 0.88, heat[::2, ::2].copy(), 1, "joint"),  # another size is resized
    ]
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = render_panel(image, cams, tmp_path / "sub" / "panel.png", taxonomy, title="smear.png")
    with Image.open(path) as png:
        assert png.format == "PNG"
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[1] > 2 * pixels.shape[0], "input + two overlays side by side"
    assert pixels.std() > 10
    assert LevelCam("root", "Leukemia", 0.93, heat, 0, "joint").title(taxonomy) == "root: Leukemia 0.93"
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        render_panel(image, cams, path, taxonomy)
    assert path.read_bytes() == before
    render_panel(image, cams[:1], path, taxonomy, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in path.parent.iterdir()] == ["panel.png"], "no temporary file left behind"


# -- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("explain")
    data = root / "data"
    rng = np.random.default_rng(2)
    for li, label in enumerate(("Normal", "Reactive", "AML", "CLL")):
        (data / label).mkdir(parents=True)
        for k in range(3):
            pixels = np.clip(np.array([40.0 * li, 180 - 30 * li, 120]) + rng.normal(0, 15, (20, 20, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(data / label / f"slide{k}_{label}.png")
    run = root / "run"
    code = main([
        "fit", "--taxonomy", str(LEUKEMIA), "--data", str(data), "--out", str(run), "--backbone", "test_resnet",
        "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--group-regex",
        r"^(slide\d)_", "--val-fraction", "0.34", "--cache-dir", str(root / "cache"), "--no-progress",
        "--allow-incomplete-tree",
    ])
    assert code == 0
    return run, data


def test_explain_command_writes_panels_and_skips_unreadable(trained_run, tmp_path, capsys):
    run, data = trained_run
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "cams"
    args = ["explain", "--run", str(run), "--images", str(data / "AML"), str(data / "CLL" / "slide0_CLL.png"),
            str(bad), str(tmp_path / "missing.jpg"), "--out", str(out), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    written = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert written == ["slide0_AML_gradcam.png", "slide0_CLL_gradcam.png", "slide1_AML_gradcam.png",
                       "slide2_AML_gradcam.png"]
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == ["summary.csv"]
    for name in written:
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.size[0] > png.size[1]
    report = capsys.readouterr().out
    assert "broken.png" in report and "missing.jpg" in report and "skipped 2" in report.replace("\n", " ")

    before = (out / written[0]).stat().st_mtime_ns
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / written[0]).stat().st_mtime_ns == before
    assert main([*args, "--overwrite", "--target", "CML"]) == 0
    assert "Leukemia > Chronic > CML" in capsys.readouterr().out


@pytest.fixture(scope="module")
def vit_run(trained_run, tmp_path_factory) -> Path:
    """A joint ViT (one block, 4 x 4 patches of 8 px at 32 px) trained one epoch through the CLI."""
    _, data = trained_run
    root = tmp_path_factory.mktemp("explain_vit")
    config = root / "vit.yaml"
    config.write_text(
        "backbone: vit_tiny_patch16_224\n"
        "backbone_kwargs: {img_size: 32, patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}\n"
    )
    run = root / "run"
    code = main([
        "fit", "--config", str(config), "--taxonomy", str(LEUKEMIA), "--data", str(data), "--out", str(run),
        "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--group-regex",
        r"^(slide\d)_", "--val-fraction", "0.34", "--cache-dir", str(root / "cache"), "--no-progress",
        "--allow-incomplete-tree",
    ])
    assert code == 0
    return run


def test_explain_command_writes_summary_csv(vit_run, trained_run, tmp_path, capsys):
    import csv

    from hiercls.augment import normalize
    from hiercls.data.cache import decode_resized
    from hiercls.inference import load_run, normalization_stats

    _, data = trained_run
    images = [data / "AML" / "slide0_AML.png", data / "Normal" / "slide1_Normal.png"]
    out = tmp_path / "cams"
    args = ["explain", "--run", str(vit_run), "--images", *map(str, images), "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(args) == 0
    assert "summary.csv" in capsys.readouterr().out
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["path", "decision", "child", "probability", "cam_max", "peak_row", "peak_col"]

    loaded = load_run(vit_run, "best")
    mean, std = normalization_stats(loaded.model)
    expected = []
    for image in images:
        pixels = decode_resized(image, 32)
        cams = gradcam_per_level(loaded.model, normalize(torch.from_numpy(pixels.copy())[None], mean, std))
        assert cams and cams[0].decision == "root"
        for cam in cams:
            assert cam.cam_max > 0, "a ViT's map must not be empty"
            expected.append([str(image.resolve()), cam.decision, cam.child, cam.probability, cam.cam_max, *cam.peak()])
    assert len(rows) - 1 == len(expected)
    for row, (path, decision, child, probability, cam_max, peak_row, peak_col) in zip(rows[1:], expected):
        assert row[:3] == [path, decision, child]
        assert float(row[3]) == pytest.approx(probability, rel=1e-4)
        assert float(row[4]) == pytest.approx(cam_max, rel=1e-3)
        assert (int(row[5]), int(row[6])) == (peak_row, peak_col)
        assert 0 <= peak_row < 32 and 0 <= peak_col < 32

    # an existing summary is kept unless --overwrite, and no temporary file is left behind
    before = (out / "summary.csv").read_bytes()
    (out / "slide0_AML_gradcam.png").unlink()
    (out / "slide1_Normal_gradcam.png").unlink()
    assert main(args) == 2
    assert "summary.csv: file exists" in capsys.readouterr().err
    assert (out / "summary.csv").read_bytes() == before
    assert main([*args, "--overwrite", "--target", "CML"]) == 0
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    to_cml = [("root", "Leukemia"), ("Leukemia", "Chronic"), ("Chronic", "CML")]
    assert [(r["decision"], r["child"]) for r in rows] == to_cml * 2
    names = sorted(p.name for p in out.iterdir())
    assert names == ["slide0_AML_gradcam.png", "slide1_Normal_gradcam.png", "summary.csv"]


def test_summary_rows_leave_the_peak_empty_without_evidence():
    from hiercls.cli.explain import summary_rows

    heat = np.zeros((8, 8), dtype=np.float32)
    rows = summary_rows(Path("a.png"), [LevelCam("root", "Normal", 0.5, heat, 0, "joint", cam_max=0.0)])
    assert rows == [("a.png", "root", "Normal", "0.5", "0", "", "")]
    heat[5, 2] = 1.0
    assert LevelCam("root", "Normal", 0.5, heat, 0, "joint", cam_max=2.5).peak() == (5, 2)


def test_explain_command_user_mistakes_exit_2_without_traceback(trained_run, tmp_path, capsys):
    run, data = trained_run
    image = str(data / "AML" / "slide0_AML.png")
    cases = [
        (["--run", str(tmp_path / "nope"), "--images", image], "run folder not found"),
        (["--run", str(run), "--images", str(tmp_path / "none.png")], "no image to explain"),
        (["--run", str(run), "--images", image, "--target", "Lymphoma"], "--target 'Lymphoma'"),
    ]
    for extra, message in cases:
        assert main(["explain", *extra, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err.replace("\n", "") and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert main(["explain", "--run", str(run), "--images", image, "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_repeated_image_names_get_distinct_panels():
    from hiercls.cli.explain import panel_names

    names = panel_names([Path("a/x.png"), Path("b/x.jpg"), Path("c/y.png"), Path("d/X.png")])
    assert names == ["x_gradcam.png", "x_2_gradcam.png", "y_gradcam.png", "X_3_gradcam.png"]


def test_explain_reports_calibrated_probabilities_when_the_run_has_temperatures(trained_run, tmp_path, capsys):
    import csv
    import shutil

    from hiercls.calibration import write_calibration

    run, data = trained_run
    calibrated = tmp_path / "run"
    shutil.copytree(run, calibrated)
    temperatures = {"root": 3.0, "Leukemia": 0.5, "Acute": 2.0, "Chronic": 4.0}
    write_calibration(calibrated, {"temperatures": temperatures, "checkpoint": "best", "n_images": 4})
    image = str(data / "AML" / "slide0_AML.png")

    def summary(run_dir: Path, out: Path) -> list[dict[str, str]]:
        assert main(["explain", "--run", str(run_dir), "--images", image, "--out", str(out), "--device", "cpu",
                     "--no-progress", "--target", "CML"]) == 0
        with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    raw, tempered = summary(run, tmp_path / "raw"), summary(calibrated, tmp_path / "tempered")
    capsys.readouterr()
    assert [(r["decision"], r["child"]) for r in raw] == [(r["decision"], r["child"]) for r in tempered]
    for before, after in zip(raw, tempered):
        siblings = [c for c in load_taxonomy(LEUKEMIA).children(before["decision"])]
        assert len(siblings) >= 2
        p, t = float(before["probability"]), temperatures[before["decision"]]
        assert float(after["probability"]) != pytest.approx(p, abs=1e-6)
        assert 0.0 < float(after["probability"]) < 1.0
        # a tempered binary decision has a closed form: p^(1/T) / (p^(1/T) + (1-p)^(1/T))
        if len(siblings) == 2:
            expected = p ** (1 / t) / (p ** (1 / t) + (1 - p) ** (1 / t))
            assert float(after["probability"]) == pytest.approx(expected, rel=1e-4)
