"""The exported program: one file, run with plain torch, scoring an image as the API does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import patchnet
from patchnet.data import load_image
from patchnet.export import ExportError, check_export, export
from patchnet.training.trainer import train

from conftest import tiny_recipe


@pytest.mark.parametrize(
    ("compress", "members", "unlock"), [("none", 1, 0), ("pca_int8", 1, 0), ("none", 3, 0), ("none", 1, 1)]
)
def test_the_exported_program_matches_the_api_without_patchnet(tmp_path, small_voc, compress, members, unlock):
    recipe = tiny_recipe(
        tmp_path,
        small_voc,
        "train.epochs=1",
        "infer.fuse=true",
        "train.holdout=0.5",
        f"cache.compress={compress}",
        "cache.pca_dim=8",
        f"head.members={members}",
        f"train.unlock={unlock}",
        "train.unlock_lr=30",  # the unlocked stage moves visibly in one epoch
    )
    train(recipe, progress=False)
    ckpt = recipe.run_dir / "last.pt"
    image = load_image(small_voc / "JPEGImages" / "e.jpg")  # 88 x 66
    h, w = image.shape[:2]
    model, _ = export(ckpt, w, h, tmp_path / "model.pt2")
    predictor = patchnet.load(ckpt, device="cpu", precision="fp32").predictor
    api = predictor.predict(image)
    assert ("+unlock1:" in predictor.extractor.backbone.weights_id) == bool(unlock)  # the trained stage is in it
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    probs, scores, values = model(x)
    np.testing.assert_allclose(scores.numpy(), api.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs.numpy(), api.probabilities, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(values.numpy(), api.values, rtol=1e-4, atol=1e-5)
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["patchnet"] = None  # plain torch only: importing patchnet would fail
        import numpy as np, torch
        program = torch.export.load({str(tmp_path / "model.pt2")!r}).module()
        probs, scores, values = program(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))
        np.save({str(tmp_path / "probs.npy")!r}, probs.numpy())
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), probs.numpy(), rtol=1e-6, atol=1e-7)


def test_exact_mode_checkpoints_are_refused_with_the_reason(tmp_path, small_voc):
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1", "patches.mode=exact")
    train(recipe, progress=False)
    with pytest.raises(ExportError, match="shared mode"):
        export(recipe.run_dir / "last.pt", 64, 48, tmp_path / "m.pt2")


def test_onnx_runs_in_onnx_runtime_and_check_export_states_the_differences(tmp_path, small_voc):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    recipe = tiny_recipe(tmp_path, small_voc, "train.epochs=1", "infer.fuse=true", "train.holdout=0.5")
    train(recipe, progress=False)
    ckpt = recipe.run_dir / "last.pt"
    image = load_image(small_voc / "JPEGImages" / "f.jpg")  # 64 x 80: odd padding in the depthwise convolutions
    h, w = image.shape[:2]
    export(ckpt, w, h, tmp_path / "model.pt2", tmp_path / "model.onnx")
    r = check_export(ckpt, tmp_path / "model.pt2", image, tmp_path / "model.onnx", repeats=1)
    assert r["program_diff"] < 1e-4 and r["onnx_diff"] < 1e-4
    assert all(r[k] > 0 for k in ("program_ms", "onnx_ms", "api_ms", "api_fp32_ms"))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]  # the names the README documents
    assert [o.name for o in session.get_outputs()] == ["probabilities", "scores", "patch_values"]


@pytest.mark.parametrize("size", ["0x375", "-5x10", "500", "axb"])
def test_export_command_refuses_a_bad_size_in_one_line(tmp_path, size):
    from typer.testing import CliRunner

    from patchnet.cli import app

    # the size is checked before the checkpoint is read
    result = CliRunner().invoke(app, ["export", "-c", str(tmp_path / "none.pt"), "--size", size])
    assert result.exit_code == 2 and "--size must be WIDTHxHEIGHT in positive pixels" in result.output
    assert "Traceback" not in result.output


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.linear(x)


class _Payload:
    """Unpickling it would create a file: what a hostile archive could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rewrite(path, change):
    """The .pt2 archive at ``path`` with its members passed through ``change(name, data) -> data``."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = [(i, change(i.filename, z.read(i.filename))) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, data)


def test_load_program_reads_its_own_programs_and_refuses_pickled_objects(tmp_path):
    import io
    import json
    import zipfile

    from patchnet.export import load_program

    x = torch.rand(1, 3)
    program = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(_Tiny().eval(), (x,)), program)
    torch.testing.assert_close(load_program(program).module()(x), torch.export.load(str(program)).module()(x))

    # a constant torch would unpickle in full: refused before torch reads the archive
    custom = tmp_path / "custom.pt2"
    custom.write_bytes(program.read_bytes())
    entry = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    _rewrite(
        custom,
        lambda name, data: (
            json.dumps({"config": {"evil": entry}}).encode() if name.endswith("_constants_config.json") else data
        ),
    )
    with pytest.raises(ExportError, match=r"custom.pt2: refused: it holds objects that loading would unpickle"):
        load_program(custom)

    # a weight stored as a pickle (torch.export.load unpickles those in full: the payload would run)
    marker, hostile = tmp_path / "ran", tmp_path / "hostile.pt2"
    hostile.write_bytes(program.read_bytes())
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    with zipfile.ZipFile(program) as z:
        config_name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(config_name))
    config["config"]["linear.weight"]["use_pickle"] = True
    weight = "/weights/" + config["config"]["linear.weight"]["path_name"]

    def poison(name, data):
        if name == config_name:
            return json.dumps(config).encode()
        return buffer.getvalue() if name.endswith(weight) else data

    _rewrite(hostile, poison)
    with pytest.raises(ExportError, match=r"hostile.pt2: cannot load it as a program .*load only programs you made"):
        load_program(hostile)
    assert not marker.exists()  # nothing ran
    (tmp_path / "text.pt2").write_text("hello")
    with pytest.raises(ExportError, match="text.pt2: not a torch.export program"):
        load_program(tmp_path / "text.pt2")
