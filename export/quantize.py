"""FP16 and INT8 (explicit symmetric Q/DQ) variants of an FP32 ONNX model.

FP16: onnxruntime.transformers.float16 (the converter onnxconverter-common ships, vendored in ONNX
Runtime, so no extra dependency) with keep_io_types: inputs and outputs stay float32 for the runtime.

INT8: onnxruntime.quantization.quantize_static in QDQ format, chosen over nvidia-modelopt's ONNX PTQ
because it installs with ONNX Runtime (modelopt pulls a large CUDA-oriented dependency tree and
calibrates through GPU execution providers), runs on the field laptop's CPU, and with the options
below produces exactly the graph TensorRT 10/11 build as a strongly typed network:
- activations and weights QInt8 with ActivationSymmetric / WeightSymmetric: every zero point is 0;
- per_channel weights (axis 0 of Conv weights, 1 of ConvTranspose);
- QuantizeBias=False: in QDQ mode ORT 1.31 otherwise stores each bias as int32 behind a
  DequantizeLinear (scale = input scale x weight scale); TensorRT has no INT32 quantised type and
  fuses a float bias itself, so the bias stays float32;
- QDQKeepRemovableActivations: Relu/Clip stay explicit nodes, so a builder that folds Q/DQ
  (TensorRT) still sees them.
Calibration ranges are computed once and cached (ORT's calibration_cache_path), so the repair loop
re-quantises with other nodes kept in float without re-running calibration.

Three graph-level choices make the same file fast on ONNX Runtime's x86 CPU provider (measured on
the reference networks: INT8 went from 0.8x of FP32's speed to 1.2-1.5x) without changing its
numbers or what TensorRT sees:
- Relu is written as LeakyRelu(alpha=0) (identical function): ORT runs "DQ -> LeakyRelu -> Q" as one
  int8 QLinearLeakyRelu, while "DQ -> Relu -> Q" with a zero point of 0 runs in float between a
  DequantizeLinear and a QuantizeLinear (ORT folds Relu into Q only when the zero point is the
  type's minimum, i.e. asymmetric uint8, which TensorRT refuses). TensorRT fuses either into the conv.
- DedicatedQDQPair: a tensor read by several nodes gets one Q/DQ pair per reader.
- Those per-reader QuantizeLinear nodes get distinct values of their ``axis`` attribute, which the
  ONNX spec says is ignored for per-tensor (scalar) scales. Otherwise ORT's common-subexpression
  elimination merges them back into one Q with several DequantizeLinear readers, and its x86 S8->U8
  conversion (QDQS8ToU8Transformer) only converts a Q with exactly one reader: the convolutions
  after such a tensor would fall back to float with dequantised weights.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ExportError, expected

METHODS = ("minmax", "entropy", "percentile")


def check_loads(path: str | os.PathLike[str]) -> None:
    """Raise ExportError unless ONNX Runtime's CPU provider can load ``path``."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several Fail/InvalidGraph types
        raise ExportError(f"{path}: ONNX Runtime (CPU) cannot load the converted model: {exc}") from None


def to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, keep_io_types: bool = True,
            op_block_list: Sequence[str] | None = None, node_block_list: Sequence[str] = ()) -> Path:
    """Write an FP16 copy of ``src``; inputs/outputs stay float32 (casts inside) when keep_io_types."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    blocks = list(DEFAULT_OP_BLOCK_LIST if op_block_list is None else op_block_list)
    fp16 = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=blocks,
                                    node_block_list=list(node_block_list))
    out = Path(dst)
    onnx.save(fp16, str(out))
    check_loads(out)
    return out


def preprocess(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """ORT's recommended quantisation pre-processing: shape inference + graph optimisation (BN folded)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception:  # noqa: BLE001 - ORT's symbolic inference raises a bare Exception on symbolic dims
        # Symbolic shape inference cannot follow reshapes over dynamic H/W (pixel (un)shuffle);
        # ONNX's own shape inference plus ORT's graph optimisation is all quantisation needs.
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return Path(dst)


@dataclass
class Int8Result:
    path: Path
    method: str
    nodes_excluded: list[str] = field(default_factory=list)
    op_types_to_quantize: list[str] | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """What the bundle records about how this INT8 artefact was made."""
        return {"format": "QDQ", "activations": "int8 symmetric (zero point 0)",
                "weights": "int8 symmetric, per-channel", "bias": "float32", "calibration_method": self.method,
                "relu_as": "LeakyRelu(alpha=0)", "dedicated_qdq_pairs": True,
                "nodes_in_float": self.nodes_excluded, "op_types_to_quantize": self.op_types_to_quantize,
                "qdq": self.summary}


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if method not in table:
        raise ExportError(expected(f"calibration method in {METHODS}", method))
    return table[method]


def _chunk(n: int, limit: int = 16) -> int:
    """Largest divisor of n not above ``limit``: ORT's strided calibration needs n % chunk == 0."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def relu_as_leaky_relu(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy of ``src`` with every Relu written as LeakyRelu(alpha=0) (same function; see module doc)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(src))
    for n in model.graph.node:
        if n.op_type == "Relu" and n.domain in ("", "ai.onnx"):
            n.op_type = "LeakyRelu"
            n.attribute.append(helper.make_attribute("alpha", 0.0))
    onnx.save(model, str(dst))
    return Path(dst)


def distinct_q_axes(path: str | os.PathLike[str]) -> int:
    """Give per-tensor QuantizeLinear nodes that read the same tensor distinct (ignored) ``axis``
    values, so that ONNX Runtime does not merge them (see module doc). Returns nodes changed."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[tuple[str, ...], list[Any]] = {}
    for n in model.graph.node:
        scale = inits.get(n.input[1]) if n.op_type == "QuantizeLinear" and len(n.input) > 1 else None
        if scale is not None and len(scale.dims) == 0:  # per-tensor only: there axis means nothing
            groups.setdefault(tuple(n.input), []).append(n)
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    changed = 0
    for key, nodes in groups.items():
        rank = ranks.get(key[0]) or 4
        values = [a for a in range(-rank, rank) if a != 1]  # 1 is the default the first node keeps
        for node, axis in zip(nodes[1:], values):
            for a in [a for a in node.attribute if a.name == "axis"]:
                node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("axis", axis))
            changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str], reader: Any | None, *,
                  method: str = "minmax", nodes_to_exclude: Sequence[str] = (),
                  op_types_to_quantize: Sequence[str] | None = None, per_channel: bool = True,
                  percentile: float = 99.999, cache: str | os.PathLike[str] | None = None,
                  preprocessed: bool = False) -> Int8Result:
    """Quantise ``src`` to INT8 QDQ at ``dst``.

    ``reader`` is an ORT CalibrationDataReader with ``__len__`` and ``set_range`` (see
    export.calibration.FrameReader); it may be None when ``cache`` holds ranges from an earlier
    run with the same method. ``preprocessed``: ``src`` already went through :func:`preprocess`.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    cal = _calibration_method(method)
    cache_path = Path(cache) if cache is not None else None
    if reader is None and (cache_path is None or not cache_path.is_file()):
        raise ExportError(expected("calibration frames or a calibration cache", "neither"))
    extra: dict[str, Any] = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                             "QDQKeepRemovableActivations": True, "CalibTensorRangeSymmetric": True,
                             "DedicatedQDQPair": True}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    if reader is not None:
        # Calibrate in chunks: ORT's histogram calibrators otherwise hold every activation of every frame.
        extra["CalibStridedMinMax"] = _chunk(len(reader))
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        model_in = Path(src) if preprocessed else preprocess(src, Path(tmp) / "pre.onnx")
        model_in = relu_as_leaky_relu(model_in, Path(tmp) / "leaky.onnx")
        try:
            quantize_static(str(model_in), str(dst), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                            calibrate_method=cal, nodes_to_exclude=list(nodes_to_exclude),
                            op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
                            extra_options=extra, calibration_cache_path=str(cache_path) if cache_path else None)
        except (ValueError, RuntimeError) as exc:
            raise ExportError(f"INT8 quantisation of {src} failed: {exc}") from None
    distinct_q_axes(dst)
    check_loads(dst)
    summary = qdq_summary(dst)
    if summary["nonzero_zero_points"]:
        raise ExportError(expected("every Q/DQ zero point 0", f"{summary['nonzero_zero_points']} non-zero"))
    return Int8Result(Path(dst), method, sorted(nodes_to_exclude),
                      list(op_types_to_quantize) if op_types_to_quantize else None, summary)


# Ops whose quantisation can cost accuracy (ORT's QDQ registry minus pure data movement, which
# only propagates its neighbours' scales): the candidates the repair loop may keep in float.
REPAIRABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "Sigmoid", "Resize", "MaxPool",
                  "AveragePool", "GlobalAveragePool", "Relu", "LeakyRelu", "Clip", "Softmax", "BatchNormalization",
                  "InstanceNormalization", "LayerNormalization")


def quantizable_nodes(path: str | os.PathLike[str], op_types: Sequence[str] = REPAIRABLE_OPS) -> list[str]:
    """Names of the nodes (in graph order) the repair loop can keep in float."""
    import onnx

    model = onnx.load(str(path))
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name]


def qdq_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Counts that prove the INT8 graph's form: Q/DQ nodes, zero points, per-channel weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    nonzero, per_channel, per_tensor = 0, 0, 0
    for n in q + dq:
        if len(n.input) > 2 and n.input[2] in inits:
            nonzero += int(np.count_nonzero(numpy_helper.to_array(inits[n.input[2]])))
    for n in dq:
        if n.input[0] in inits:  # a weight
            scale = numpy_helper.to_array(inits[n.input[1]])
            if scale.ndim == 1:  # per-channel scales are 1-D (even with one channel), per-tensor 0-D
                per_channel += 1
            else:
                per_tensor += 1
    dq_out = {d.output[0] for d in dq}
    # A compute node runs in float when its weights do not come out of a DequantizeLinear.
    float_compute = [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                     and len(n.input) > 1 and n.input[1] not in dq_out]
    return {"quantize_linear": len(q), "dequantize_linear": len(dq), "nonzero_zero_points": nonzero,
            "per_channel_weights": per_channel, "per_tensor_weights": per_tensor,
            "float_compute_nodes": float_compute}


def dump_info(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True)
