import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from patchnet.backbones import BACKBONES, BackboneError, Conv2dSame, backbone_spec, build_backbone, weights_id
from patchnet.backbones.quantize import Int8Trunk, calibrate_int8, int8_trunk
from patchnet.recipe import RecipeError, recipe_from_dict

# random weights: tests never download; 64 px is the smallest input AlexNet's layers accept
SIZE = 64
TIMM = ["timm/resnet18", "timm/vit_tiny_patch16_224"]


@pytest.fixture(scope="module", params=sorted(BACKBONES) + TIMM)
def backbone(request):
    torch.manual_seed(0)
    # the packaged Lite weights are local; torchvision weights would need a download
    weights = "imagenet" if request.param.startswith("efficientnet") else "random"
    return build_backbone(request.param, weights, input_size=SIZE)


def test_features_have_the_declared_size(backbone):
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = backbone(x)
    assert out.shape == (2, backbone.feature_dim)
    assert torch.isfinite(out).all()


def test_frozen_means_no_gradients_and_eval_mode_for_good(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()  # a caller asking for training mode must not unfreeze BatchNorm or dropout
    assert not any(m.training for m in backbone.modules())
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone(torch.rand(2, 3, SIZE, SIZE) * 3)  # would move BN running stats in training mode
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_copy_gives_the_same_features(backbone):
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = backbone(x), backbone.fused()(x)
    assert a.abs().max() > 0
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


@pytest.mark.parametrize("size", [7, 8, 9, 223, 224, 225])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (3, 1), (5, 1)])
def test_tf_same_padding(size, kernel, stride):
    conv = Conv2dSame(1, 1, kernel, stride, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, size, size)
    y = conv(x)
    assert y.shape[-1] == math.ceil(size / stride)
    # TF puts the odd pixel of padding at the end: the first output sees no padding on the left
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    left = total // 2
    assert y[0, 0, 0, 0].item() == pytest.approx((kernel - left) ** 2)


@pytest.mark.parametrize("h,w", [(8, 8), (8, 9), (9, 8), (224, 336)])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2)])
def test_depthwise_same_padding_without_a_padded_copy_matches_tf(h, w, kernel, stride):
    """Depthwise convs move the odd pad into a zero kernel tap: same outputs and gradients as padding."""
    torch.manual_seed(0)
    conv = Conv2dSame(4, 4, kernel, stride, groups=4, bias=True)
    x = torch.randn(2, 4, h, w, requires_grad=True)
    ph = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pw = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    ref = F.conv2d(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]), conv.weight, conv.bias, stride, groups=4)
    y = conv(x)
    assert y.shape == ref.shape == (2, 4, math.ceil(h / stride), math.ceil(w / stride))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(y.square().sum(), [x, conv.weight])
    rx, rw = torch.autograd.grad(ref.square().sum(), [x, conv.weight])
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,h,w", [(5, 1, 25, 37), (5, 2, 33, 48), (5, 2, 9, 10), (7, 1, 8, 8)])
@pytest.mark.parametrize("bf16", [False, True])
def test_depthwise_weight_gradient_is_torchs(kernel, stride, h, w, bf16):
    """The depthwise convolutions that train (``train.unlock``) take their weight gradient from a grouped
    convolution (``_DepthwiseConv``): the same gradients as torch's own, channels-last and under bf16 autocast."""
    from patchnet.backbones import lite

    torch.manual_seed(0)
    conv = Conv2dSame(8, 8, kernel, stride, groups=8, bias=True)
    x = torch.randn(2, 8, h, w).to(memory_format=torch.channels_last)
    grads = []
    for fast in (True, False):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if fast:
                y = conv(xx)
            else:  # torch's convolution and its gradients
                original, lite.depthwise_conv2d = (
                    lite.depthwise_conv2d,
                    lambda x, wt, b, st, p: F.conv2d(x, wt, b, st, p, 1, wt.shape[0]),
                )
                try:
                    y = conv(xx)
                finally:
                    lite.depthwise_conv2d = original
        assert y.grad_fn is not None and ("DepthwiseConv" in y.grad_fn.name()) is fast
        weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        grads.append(torch.autograd.grad((y.float() * weights).sum(), [xx, conv.weight, conv.bias]))
    tol = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-4, "atol": 1e-4}
    for fast, ref in zip(*grads, strict=True):
        assert fast.dtype == ref.dtype
        torch.testing.assert_close(fast, ref, **tol)
    with torch.no_grad():  # inference: torch's convolution itself
        assert conv(x).grad_fn is None
    small = Conv2dSame(8, 8, 3, stride, groups=8)  # 3 x 3: oneDNN's own gradient is the faster one
    assert "DepthwiseConv" not in small(x.clone().requires_grad_()).grad_fn.name()


def test_lite0_imagenet_weights_classify_a_real_photo():
    """The port (padding, ReLU6, BN eps, normalisation) is right if the packaged weights see a cat."""
    data = pytest.importorskip("skimage.data")
    from patchnet.backbones.lite import lite_weight_file
    from patchnet.backbones.weights import read_state_dict

    backbone = build_backbone("efficientnet_lite0", "imagenet")
    state = read_state_dict(lite_weight_file("efficientnet_lite0"))
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = F.linear(backbone(image), state["_fc.weight"], state["_fc.bias"]).softmax(-1)[0]
    assert probs.argmax().item() == 285  # ImageNet class 285: Egyptian cat
    assert probs[285] > 0.5


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg99'; available: efficientnet_lite0"):
        build_backbone("vgg99")


def test_weight_file_errors(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone("efficientnet_lite0", str(tmp_path / "none.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(BackboneError, match="wrong.pt: does not match backbone efficientnet_lite0"):
        build_backbone("efficientnet_lite0", str(wrong))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(BackboneError, match="junk.pt: not a loadable state_dict"):
        build_backbone("efficientnet_lite0", str(junk))


def test_local_weight_file_loads_and_names_its_hash(tmp_path):
    torch.manual_seed(1)
    ref = build_backbone("resnet50", "random")
    path = tmp_path / "r50.pth"
    from torchvision.models import resnet50

    model = resnet50()
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = build_backbone("resnet50", str(path))
    assert loaded.weights_id.startswith("resnet50:") and loaded.weights_id != ref.weights_id
    assert torch.equal(loaded.trunk[0].weight, model.conv1.weight)


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto", "mobilenetv3_small_050"])
def test_timm_feature_of_a_whole_patch_is_the_models_own_pre_logits(arch):
    """The head after pooling is timm's: ConvNeXt's LayerNorm, MobileNetV3's 1x1 conv to 1024 channels."""
    torch.manual_seed(0)
    backbone = build_backbone(f"timm/{arch}", "random", input_size=SIZE)
    model, x = backbone.trunk.model, torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features((x - backbone.mean) / backbone.std), pre_logits=True)
        got = backbone(x)
    assert got.shape == ref.shape == (2, backbone.feature_dim)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    fused = backbone.fused()
    assert fused.head.trunk[0] is fused.trunk  # the copy's head runs the copy's model, and moves with it


def test_timm_vit_map_is_its_patch_token_grid_and_its_feature_their_mean():
    torch.manual_seed(0)
    backbone = build_backbone("timm/vit_tiny_patch16_224", "random", input_size=SIZE)
    model, x = backbone.trunk.model, torch.rand(1, 3, 70, 90)  # no multiple of 16: padded to 5 x 6 patches
    with torch.no_grad():
        fmap = backbone.feature_map(x)
        tokens = model.forward_features((x - backbone.mean) / backbone.std)
        feature = backbone(x[..., :SIZE, :SIZE])
        ref = model.forward_features((x[..., :SIZE, :SIZE] - backbone.mean) / backbone.std)[:, 1:].mean(1)
    assert fmap.shape == (1, 192, 5, 6) and tokens.shape == (1, 1 + 30, 192)
    torch.testing.assert_close(fmap[0, :, 1, 2], tokens[0, 1 + 6 + 2])  # the class token is dropped
    torch.testing.assert_close(feature, ref)


def test_timm_spec_comes_from_the_model_and_its_pretrained_cfg():
    r18, vit = backbone_spec("timm/resnet18"), backbone_spec("timm/vit_tiny_patch16_224")
    assert (r18.feature_dim, r18.input_size, r18.stride, r18.layout, r18.fixed_size) == (512, 224, 32, "nchw", False)
    assert r18.timm_name == "resnet18.a1_in1k" and r18.mean == (0.485, 0.456, 0.406)
    assert (vit.feature_dim, vit.stride, vit.layout, vit.mean) == (192, 16, "tokens", (0.5, 0.5, 0.5))
    assert vit.timm_kwargs == {"dynamic_img_size": True, "dynamic_img_pad": True} and not vit.fixed_size
    # the weights are named by their pretrained tag, which comes without loading them
    assert weights_id(backbone_spec("timm/resnet18"), "imagenet") == "timm/resnet18:resnet18.a1_in1k"
    assert weights_id(backbone_spec("timm/resnet18.a1_in1k"), "random") == "timm/resnet18.a1_in1k:random"


def test_timm_names_validate_in_recipes_and_unknown_ones_say_how_to_find_names():
    assert recipe_from_dict({}, ["backbone.name=timm/convnext_tiny.fb_in22k"]).backbone.name.startswith("timm/")
    with pytest.raises(RecipeError, match=r"unknown timm model 'resnet5O'.*resnet50.*timm.list_models\('resnet\*'\)"):
        recipe_from_dict({}, ["backbone.name=timm/resnet5O"])
    with pytest.raises(RecipeError, match="Invalid pretrained tag"):
        recipe_from_dict({}, ["backbone.name=timm/resnet50.no_such_tag"])


def test_a_fixed_size_timm_model_runs_in_exact_mode_only():
    assert backbone_spec("timm/mixer_s32_224").fixed_size  # its token-mixing MLPs fix the token count
    recipe_from_dict({}, ["backbone.name=timm/mixer_s32_224", "patches.mode=exact"])
    with pytest.raises(RecipeError, match="runs only on 224x224 inputs.*set patches.mode: exact"):
        recipe_from_dict({}, ["backbone.name=timm/mixer_s32_224", "patches.mode=shared"])
    with pytest.raises(RecipeError, match="backbone.input_size: 0"):
        recipe_from_dict({}, ["backbone.name=timm/mixer_s32_224", "patches.mode=exact", "backbone.input_size=64"])


def test_timm_weight_files_load_and_name_their_hash(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("resnet18")  # with its 1000-class classifier, as timm's files have it
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    save_file(model.state_dict(), tmp_path / "r18.safetensors")
    for path in (tmp_path / "r18.pth", tmp_path / "r18.safetensors"):
        loaded = build_backbone("timm/resnet18", str(path))
        assert torch.equal(loaded.trunk.model.conv1.weight, model.conv1.weight)
        assert loaded.weights_id.startswith("timm/resnet18:") and loaded.weights_id != "timm/resnet18:random"
    with pytest.raises(BackboneError, match="none.pth does not exist"):
        build_backbone("timm/resnet18", str(tmp_path / "none.pth"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(BackboneError, match="wrong.pth: cannot be loaded as timm model resnet18.a1_in1k"):
        build_backbone("timm/resnet18", str(tmp_path / "wrong.pth"))


def test_timm_imagenet_weights_missing_offline_say_how_to_supply_them(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        BackboneError,
        match=r"resnet18.a1_in1k.*Hugging Face cache \(.*hub/models--timm--resnet18.a1_in1k\)"
        r".*backbone.weights",
    ):
        build_backbone("timm/resnet18", "imagenet")


@pytest.mark.slow  # a subprocess or several processes
def test_timm_is_imported_only_when_a_timm_backbone_is_used():
    code = "import sys, patchnet.training.trainer, patchnet.cli; assert 'timm' not in sys.modules, 'timm imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_lite0_stages_end_each_block_stage_at_the_documented_channels_and_strides():
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0", "random", input_size=SIZE)
    with torch.no_grad():
        maps = backbone.stage_maps(torch.rand(1, 3, SIZE, SIZE))
    assert [(s.name, s.module) for s in backbone.stages] == [
        ("stage1", "_blocks.0"),
        ("stage2", "_blocks.2"),
        ("stage3", "_blocks.4"),
        ("stage4", "_blocks.7"),
        ("stage5", "_blocks.10"),
        ("stage6", "_blocks.14"),
        ("stage7", "_blocks.15"),
        ("head", ""),
    ]
    shapes = [tuple(m.shape[1:]) for m in maps.values()]
    assert shapes == [
        (16, 32, 32),
        (24, 16, 16),
        (40, 8, 8),
        (80, 4, 4),
        (112, 4, 4),
        (192, 2, 2),
        (320, 2, 2),
        (1280, 2, 2),
    ]
    # depth scaling moves the stage ends: Lite2 has 1, 3, 3, 4, 4, 5, 1 blocks per stage
    lite2 = BACKBONES["efficientnet_lite2"]
    assert [s.module for s in lite2.stages[:-1]] == [f"_blocks.{i}" for i in (0, 3, 6, 10, 14, 19, 20)]
    assert [s.dim for s in lite2.stages] == [16, 24, 48, 88, 120, 208, 352, 1280]


def test_stage_maps_match_their_specs(backbone):
    """Every stage of every backbone: its channels, its stride (by map size and by the trunk's layers), its vector."""
    from patchnet.studies.units import stage_receptive_field

    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        maps = backbone.stage_maps(x)
        assert list(maps) == [s.name for s in backbone.stages]
        for s in backbone.stages:
            m = maps[s.name]
            cells = torch.tensor([[0.0, 0.0, m.shape[-1], m.shape[-2]]])
            assert backbone.pool_stage(s, m, cells).shape == (1, s.dim), s
            assert stage_receptive_field(backbone, s).stride == s.stride, s
            if not s.head:
                assert m.shape[1] == s.dim, s
                assert abs(m.shape[-1] - SIZE / s.stride) <= 1, s  # AlexNet's unpadded layers lose a cell
        # the last stage is the backbone's feature
        last = backbone.stages[-1]
        fmap = backbone.feature_map(x)
        whole = torch.tensor([[0.0, 0.0, fmap.shape[-1], fmap.shape[-2]]])
        torch.testing.assert_close(
            backbone.pool_stage(last, maps[last.name], whole), backbone.pool_regions(fmap, whole)
        )


def test_a_traced_trunk_has_no_stage_maps():
    backbone = build_backbone("resnet50", "random", input_size=SIZE).fused()  # FX-fused: layer1 never runs as a module
    with pytest.raises(BackboneError, match="use the unfused backbone"):
        backbone.stage_maps(torch.rand(1, 3, SIZE, SIZE), ["layer1"])
    with pytest.raises(BackboneError, match="has no stage 'conv9'; its stages: layer1, layer2"):
        backbone.stage("conv9")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_int8_trunk_layers_before_quantisation_are_the_fused_trunk_on_multiples_of_32(name):
    # the static padding (a zero tap in front of each stride-2 kernel) must be TF "same" padding exactly
    trunk = build_backbone(name, "imagenet").fused().trunk
    model = Int8Trunk(trunk).eval()
    for m in model.modules():  # float: ReLU6, whose cap quantisation's calibrated range applies
        if isinstance(m, torch.ao.nn.intrinsic.ConvReLU2d):
            m[1] = torch.nn.ReLU6()
    x = torch.randn(1, 3, 96, 160)
    with torch.inference_mode():
        assert torch.allclose(model(x), trunk(x), atol=1e-4)
        assert model(torch.randn(1, 3, 70, 101)).shape == trunk(torch.randn(1, 3, 70, 101)).shape


def _photo_like(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images (normalised), more like photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    return [F.interpolate(torch.randn(1, 3, 8, 12, generator=g), size=(128, 192), mode="bilinear") for _ in range(n)]


def test_int8_trunk_is_close_to_fp32_and_rebuilds_from_its_ranges():
    trunk = build_backbone("efficientnet_lite0", "imagenet").fused().trunk
    ranges = calibrate_int8(trunk, _photo_like(4))
    assert all(len(v) == 2 and v[0] > 0 and 0 <= v[1] <= 255 for v in ranges.values())
    a, b = int8_trunk(trunk, ranges), int8_trunk(trunk, json.loads(json.dumps(ranges)))  # as a checkpoint keeps them
    x = _photo_like(2, seed=1)[1]
    with torch.inference_mode():
        ref, out = trunk(x).mean((2, 3)), a(x)
        assert torch.equal(out, b(x))
        assert out.shape[1:] == (1280, 4, 6) and out.dtype == torch.float32
        assert F.cosine_similarity(out.mean((2, 3)), ref).item() > 0.8  # 0.88 here; real photos: see the README


def test_int8_ranges_of_another_trunk_are_refused():
    ranges = calibrate_int8(build_backbone("efficientnet_lite0", "imagenet").fused().trunk, _photo_like(1))
    with pytest.raises(BackboneError, match="another backbone"):
        int8_trunk(build_backbone("efficientnet_lite2", "imagenet").fused().trunk, ranges)


def test_int8_needs_a_frozen_lite_trunk():
    with pytest.raises(RecipeError, match="int8 quantises a frozen EfficientNet-Lite"):
        recipe_from_dict({"backbone": {"name": "resnet50", "precision": "int8"}}).validate()
    with pytest.raises(RecipeError, match="int8 quantises a frozen EfficientNet-Lite"):
        recipe_from_dict({"backbone": {"precision": "int8"}, "train": {"unlock": 1}}).validate()
    with pytest.raises(RecipeError, match="must be one of auto, fp32, bf16, fp16\\b"):
        recipe_from_dict({"train": {"precision": "int8"}}).validate()
