from typer.testing import CliRunner

from patchnet.cli import app

runner = CliRunner()


def test_inspect_prints_statistics_and_writes_a_png(small_voc, tmp_path):
    out = tmp_path / "labels.png"
    result = runner.invoke(
        app,
        [
            "inspect",
            "--data",
            str(small_voc),
            "--split",
            "train",
            "--out",
            str(out),
            "--set",
            "data.classes=[cat, dog, person]",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output
    for word in ("cat", "dog", "person", "background", "ignored", "positive"):
        assert word in result.output
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"


def test_inspect_reports_bad_input_in_one_line(tmp_path):
    result = runner.invoke(app, ["inspect", "--data", str(tmp_path), "--split", "train"])
    assert result.exit_code == 2
    assert "error:" in result.output and "not a VOC root" in result.output
    assert "Traceback" not in result.output


def test_python_dash_m_runs_the_command_line():
    # torchrun launches `-m patchnet.cli` (README, DDP): the package needs its __main__
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "patchnet.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "train" in p.stdout and "localize" in p.stdout
