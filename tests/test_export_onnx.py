"""Step 1: PyTorch -> ONNX, refused when ONNX Runtime disagrees with PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edge_runtime.errors import ExportError
from export.onnx_export import compare_outputs, export_onnx

torch = pytest.importorskip("torch")


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.conv(x))
        return torch.sigmoid(self.head(h)), h.mean(dim=1, keepdim=True)


class Branchy(torch.nn.Module):
    """Data-dependent control flow: tracing bakes in the branch of the first sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.mean()) > 0:
            return x * 2
        return x * 3


def test_export_writes_dynamic_model_matching_torch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = Small()
    out = export_onnx(m, torch.rand(1, 1, 32, 32), tmp_path / "m.onnx", input_names=["image"],
                      output_names=["prob", "feat"], dynamic_axes={"image": {2: "H", 3: "W"}},
                      extra_inputs=[torch.rand(1, 1, 48, 40)])
    model = onnx.load(str(out))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["H", "W"]
    assert model.opset_import[0].version == 17
    x = np.random.default_rng(1).random((1, 1, 24, 56), dtype=np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.no_grad():
        want = [t.numpy() for t in m(torch.from_numpy(x))]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_export_refuses_disagreeing_model_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"max abs error .*tolerance") as err:
        export_onnx(Branchy(), torch.ones(1, 1, 8, 8), target, input_names=["image"], output_names=["out"],
                    extra_inputs=[-torch.ones(1, 1, 8, 8)])
    assert "sample 1" in str(err.value)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_compare_outputs_reports_shape_and_error() -> None:
    ref = [np.zeros((2, 2), np.float32)]
    assert compare_outputs(ref, [np.zeros((2, 2))], ["y"], rtol=1e-3, atol=1e-4) == []
    assert "shape" in compare_outputs(ref, [np.zeros((2, 3))], ["y"], rtol=1e-3, atol=1e-4)[0]
    msg = compare_outputs(ref, [np.full((2, 2), 0.5)], ["y"], rtol=1e-3, atol=1e-4)[0]
    assert "max abs error 0.5" in msg and "4 of 4" in msg


def test_export_mistakes_are_export_errors_not_tracebacks(tmp_path: Path) -> None:
    """From an export walkthrough: three output names for a two-output module was a raw RuntimeError
    traceback from torch.onnx.export; nothing is written."""
    with pytest.raises(ExportError, match=r"torch.onnx.export can export with inputs \['image'\].*RuntimeError"):
        export_onnx(Small(), torch.rand(1, 1, 16, 16), tmp_path / "m.onnx", input_names=["image"],
                    output_names=["a", "b", "c"])
    assert list(tmp_path.iterdir()) == []


def test_cli_finds_a_module_of_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export onnx --module mymodels:enhancer` from the user's own folder failed with "No module named
    'mymodels'": the console script does not put the working directory on sys.path (a review)."""
    import argparse
    import sys

    from export import cli

    (tmp_path / "mymodels_cwd.py").write_text(
        "import torch\n\ndef enhancer():\n    return torch.nn.Conv2d(1, 1, 3, padding=1)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["onnx", "--module", "mymodels_cwd:enhancer", "--input-shape", "1x1x32x32",
                              "--output-names", "enhanced",
                              "--out", str(tmp_path / "m.onnx")])
    assert cli.run(args) == 0 and (tmp_path / "m.onnx").is_file()
