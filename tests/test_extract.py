import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchnet.backbones import BackboneError, build_backbone
from patchnet.dist import resolve_precision
from patchnet.features.extract import PatchExtractor
from patchnet.patches.grid import patch_grid
from patchnet.recipe import BackboneConfig, PatchConfig

FP32 = BackboneConfig(precision="fp32")


def _image(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "name,size,tol",
    [
        ("efficientnet_lite0", 224, 1e-5),
        ("resnet50", 224, 1e-5),
        ("mobilenet_v3_large", 224, 1e-5),
        ("vgg16", 224, 1e-4),
        ("timm/resnet18", 224, 1e-5),
        ("timm/convnext_atto", 64, 1e-5),
        ("timm/vit_tiny_patch16_224", 64, 1e-5),
    ],
)
def test_shared_mode_equals_exact_mode_for_one_whole_image_patch(name, size, tol):
    """Tolerance: float32 rounding only, relative to the feature's scale."""
    torch.manual_seed(0)
    backbone = build_backbone(name, "imagenet" if name.startswith("efficientnet") else "random", input_size=size)
    img = _image(size, size)
    exact = PatchExtractor(backbone, PatchConfig(scales=[1.0], mode="exact"), FP32, "cpu")(img)
    shared = PatchExtractor(backbone, PatchConfig(scales=[1.0], mode="shared"), FP32, "cpu")(img)
    assert exact.shape == shared.shape == (1, backbone.feature_dim)
    scale = exact.abs().max()
    assert scale > 0
    assert (exact - shared).abs().max() <= tol * scale


def test_exact_mode_feeds_each_patch_through_the_whole_network():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=32)
    img = _image(80, 64)
    cfg = PatchConfig(scales=[1.0, 2.0], step=0.5, mode="exact")
    feats = PatchExtractor(backbone, cfg, FP32, "cpu")(img)
    boxes = patch_grid(80, 64, cfg.scales, cfg.step)
    assert feats.shape == (len(boxes), backbone.feature_dim)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    for i, (x1, y1, x2, _y2) in enumerate(boxes):
        # the reference: crop the patch, resize it to the input size on its own
        side = x2 - x1
        scaled = F.interpolate(
            x, scale_factor=32 / side, mode="bilinear", antialias=side > 32, recompute_scale_factor=False
        )
        xi, yi = round(x1 * 32 / side), round(y1 * 32 / side)
        crop = scaled[:, :, yi : yi + 32, xi : xi + 32]
        if crop.shape[-1] == 32 and crop.shape[-2] == 32:
            with torch.no_grad():
                ref = backbone(crop)
            assert (feats[i] - ref[0]).abs().max() <= 1e-4 * ref.abs().max(), i


def test_shared_mode_gives_one_feature_per_patch_in_grid_order():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=32)
    img = _image(90, 60)
    cfg = PatchConfig(scales=[1.0, 1.5, 2.0, 3.0], mode="shared")
    ex = PatchExtractor(backbone, cfg, FP32, "cpu")
    feats = ex(img)
    assert feats.shape == (len(patch_grid(90, 60, cfg.scales, cfg.step)), backbone.feature_dim)
    # two patches at different places of the same scale see different content
    assert (feats[-1] - feats[-2]).abs().max() > 0.05 * feats[-1].abs().max()


def test_fewer_pyramid_levels_pool_each_scale_from_the_nearest_level():
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=32)
    ex = PatchExtractor(backbone, PatchConfig(scales=[1.0, 1.3, 2.0, 2.8, 4.0], levels=[1.0, 2.0, 4.0]), FP32, "cpu")
    levels = ex.plan(100, 80).levels
    assert [lv.grids for lv in levels] == [[0, 1], [2, 3], [4]]
    assert levels[1].factor == pytest.approx(32 * 2.0 / 80)
    # features still come for every patch
    assert len(ex(_image(100, 80))) == len(ex.boxes(100, 80))


def test_exact_up_to_crops_the_coarse_scales_and_shares_the_rest():
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=32)
    scales, img = [1.0, 1.5, 2.0, 3.0], _image(90, 60)
    exact = PatchExtractor(backbone, PatchConfig(scales=scales, mode="exact"), FP32, "cpu")(img)
    shared = PatchExtractor(backbone, PatchConfig(scales=scales, mode="shared"), FP32, "cpu")(img)
    hybrid_ex = PatchExtractor(backbone, PatchConfig(scales=scales, mode="shared", exact_up_to=1.5), FP32, "cpu")
    hybrid = hybrid_ex(img)
    plan = hybrid_ex.plan(90, 60)
    assert [lv.grids for lv in plan.levels] == [[2], [3]] and plan.cropped == [0, 1]
    n = sum(len(g.boxes) for g in plan.grids if g.scale <= 1.5)
    torch.testing.assert_close(hybrid[:n], exact[:n])
    torch.testing.assert_close(hybrid[n:], shared[n:])
    assert not torch.allclose(exact[:n], shared[:n], atol=1e-3)  # the two paths do differ there


def test_max_side_caps_the_rescaled_image():
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=32)
    ex = PatchExtractor(backbone, PatchConfig(scales=[4.0], max_side=64), FP32, "cpu")
    (level,) = ex.plan(300, 30).levels
    assert 300 * level.factor == pytest.approx(64)


def test_images_smaller_than_the_input_size_work_in_both_modes():
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=64)
    for mode in ("exact", "shared"):
        feats = PatchExtractor(backbone, PatchConfig(scales=[1.0, 2.0], mode=mode), FP32, "cpu")(_image(20, 15))
        assert feats.shape[0] == len(patch_grid(20, 15, [1.0, 2.0])) and torch.isfinite(feats).all()


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native else None)


def test_bf16_features_stay_close_to_fp32():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=64)
    img = _image(96, 80)
    cfg = PatchConfig(scales=[1.0, 2.0])
    a = PatchExtractor(backbone, cfg, FP32, "cpu")(img)
    b = PatchExtractor(backbone, cfg, BackboneConfig(precision="bf16"), "cpu")(img)
    cos = F.cosine_similarity(a, b, dim=1)
    assert cos.min() > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_amp_matches_cpu():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=64)
    img = _image(96, 80)
    cfg = PatchConfig(scales=[1.0, 2.0])
    a = PatchExtractor(backbone, cfg, FP32, "cpu")(img)
    b = PatchExtractor(backbone, cfg, BackboneConfig(precision="auto"), "cuda")(img)
    assert F.cosine_similarity(a, b, dim=1).min() > 0.98


def test_timm_vit_shared_mode_pools_its_token_grid():
    """A ViT built with a resampled position embedding runs once on the whole rescaled image, as CNNs do."""
    torch.manual_seed(0)
    backbone = build_backbone("timm/vit_tiny_patch16_224", "random", input_size=32)
    img = _image(96, 64)  # scale 1: side 64, two patches 32 px apart; rescaled by 1/2 to 3 x 2 tokens of 16 px
    feats = PatchExtractor(backbone, PatchConfig(scales=[1.0], step=0.5, mode="shared"), FP32, "cpu")(img)
    assert feats.shape == (2, 192)
    x = F.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, size=(32, 48), mode="bilinear", antialias=True
    )
    with torch.no_grad():
        tokens = backbone.feature_map(x)  # (1, 192, 2, 3)
    torch.testing.assert_close(feats[0], tokens[0, :, :, 0:2].mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats[1], tokens[0, :, :, 1:3].mean(dim=(1, 2)), rtol=1e-4, atol=1e-5)


def test_int8_extractor_calibrates_then_runs_the_pyramid_at_multiples_of_32():
    backbone = build_backbone("efficientnet_lite0", "imagenet", input_size=64)
    cfg = PatchConfig(scales=[1.0, 2.0])
    ex = PatchExtractor(backbone, cfg, BackboneConfig(precision="int8"), "cpu")
    img = _image(150, 100)
    with pytest.raises(BackboneError, match="not calibrated yet"):
        ex(img)
    assert all(x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0 for x in ex.level_inputs(img))
    ranges = ex.calibrate([_image(150, 100, seed=s) for s in range(3)])
    assert ex.precision_id.startswith("int8-") and ex.int8_ranges is ranges
    a = PatchExtractor(backbone, cfg, FP32, "cpu")(img)
    b = ex(img)
    assert b.shape == a.shape and b.dtype == torch.float32
    assert F.cosine_similarity(a, b, dim=1).median() > 0.9  # the same patches (the levels a little rescaled)


def test_int8_runs_lite_trunks_on_the_cpu_only():
    with pytest.raises(BackboneError, match="EfficientNet-Lite trunk on the CPU"):
        PatchExtractor(build_backbone("resnet50", "random"), PatchConfig(), BackboneConfig(precision="int8"), "cpu")
