"""Tiny ONNX models and manifests shared by the export tests (built with onnx.helper, no files committed).

``blur_model`` is an image-to-image model for X-ray phantoms: a Gaussian blur split over four
channels and averaged back (PSNR against the clean phantom is finite and sensitive to any change
of the weights, which is all the gate tests need). ``damage`` perturbs its weights; ``outlier`` adds a channel with a huge
constant activation that per-tensor INT8 cannot represent next to the small signal (and that the
next conv ignores), so quantising that tensor ruins the output until both convs around it stay float.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.phantoms import xr_frame


def blur_model(path: str | Path, *, damage: float = 0.0, outlier: bool = False, seed: int = 0) -> Path:
    g = cv2.getGaussianKernel(5, 1.2)
    w = (g @ g.T).astype(np.float32)
    w1 = np.stack([w] * 4)[:, None].copy()  # 4 output channels, 1 input, 5x5
    b1 = np.zeros(4, np.float32)
    w2 = np.full((1, 4, 1, 1), 0.25, np.float32)
    if outlier:
        b1[3] = 500.0
        w2[0, :, 0, 0] = (0.25, 0.25, 0.5, 0.0)
    if damage:
        w1 = w1 + np.random.default_rng(seed).normal(0, damage, w1.shape).astype(np.float32)
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["h"], name="conv1", pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
             helper.make_node("Conv", ["hr", "w2", "b2"], ["enhanced"], name="conv2")]
    graph = helper.make_graph(
        nodes, "blur", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, [1, 1, "H", "W"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(1, np.float32), "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def blur_manifest(name: str = "xr-blur", size: int = 64) -> dict[str, Any]:
    return {"name": name, "task": "enhancement", "modality": ["DX", "CR", "XR"], "bits_stored": 12,
            "photometric": "MONOCHROME2", "description": "test model: Gaussian blur",
            "inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
            "outputs": [{"name": "enhanced", "dtype": "float32", "shape": [1, 1, "H", "W"]}],
            "preprocess": {}, "postprocess": {"type": "enhance", "output": "enhanced"},
            "artifacts": [{"file": "fp32.onnx", "kind": "onnx", "precision": "fp32"}],
            "tolerances": {"psnr_db": 0.3, "ssim": 0.01}, "training": {"frame_size": [size, size]}}


def save(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any], path: str | Path,
         opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return Path(path)


def test_blur_model_is_a_gaussian_blur(tmp_path: Path) -> None:
    path = blur_model(tmp_path / "m.onnx")
    f = xr_frame(3, size=(64, 64))
    x = f.pixels.astype(np.float32) / 4095
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x[None, None]})[0]
    g = cv2.getGaussianKernel(5, 1.2)
    want = cv2.filter2D(x, -1, (g @ g.T).astype(np.float32), borderType=cv2.BORDER_CONSTANT)
    np.testing.assert_allclose(y[0, 0], want, atol=1e-5)
