"""Check an ONNX model and lint it for TensorRT: `edge-runtime export check MODEL`.

Runs onnx.checker (full check) and strict shape inference, then a small, cited TensorRT rule set:
operators outside the ONNX parser's support matrix, opset range, Q/DQ nodes TensorRT cannot
build (non-zero zero point, non-int8 types), dynamic input dims without an optimisation profile
and, when the device has DLA cores, nodes that would fall back to the GPU.

A bundle's ``int8_cpu.onnx`` (uint8 asymmetric activations for ONNX Runtime's CPU provider, manifest
target ``onnxruntime-cpu``) fails this lint by design: `export check` on it reports its zero points as
TensorRT errors, and `export reference` lints only the FP32 graph (TensorRT builds from int8.onnx).

Sources (read through the project's search tool, not copied):
- onnx/onnx-tensorrt docs/operators.md for TensorRT 10.15: "supports operators in the inclusive
  range of opset 9 to opset 24"; the same file for TensorRT 10.0 says opset 9 to 20 (JetPack 6 ships
  10.x, so above 20 is a warning). DequantizeLinear: "`x_zero_point` must be zero"; QuantizeLinear:
  "`y_zero_point` must be 0"; INT8 is a quantized type only. The 10.15 changelog lists
  RotaryEmbedding, RMSNormalization and TensorScatter as new in 10.15.
- NVIDIA TensorRT docs, "DLA Supported Layers and Restrictions" (latest): dynamic dims need
  min == opt == max; Activation: ReLU, Sigmoid, TanH, Clipped ReLU, Leaky ReLU; Concatenation:
  channel axis only; Convolution / FC: 2D, kernel [1,32], stride [1,8], channels [1,8192];
  Deconvolution: 2D, no grouped/dilated, padding 0; ElementWise: Sum, Sub, Product, Max, Min, Div,
  Pow; LRN; Parametric ReLU; plus Pooling (2D), Scale, Shuffle, Slice, Softmax, Resize. "Working
  with DLA" (TensorRT 11.x docs): 10.7 was the last release with DLA on Jetson.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ExportError, expected

SEVERITIES = ("error", "warn", "info")

# Operators marked "Y" in onnx-tensorrt docs/operators.md, TensorRT 10.15 (default ai.onnx domain).
_TRT_OPS_TEXT = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN
RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan
Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
"""
TRT_SUPPORTED_OPS = frozenset(_TRT_OPS_TEXT.split())
TRT_RECENT_OPS = {"RotaryEmbedding": "10.15", "RMSNormalization": "10.15", "TensorScatter": "10.15"}
TRT_OPSET_RANGE = (9, 24)  # TensorRT 10.15
TRT_OPSET_JETPACK6_MAX = 20  # TensorRT 10.0
RESIZE_MODES = ("nearest", "linear")

# DLA: op types TensorRT can place on DLA (per the layer table cited above), with the checks we make.
DLA_ACTIVATIONS = {"Relu", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "PRelu"}
DLA_ELEMENTWISE = {"Add", "Sub", "Mul", "Max", "Min", "Div", "Pow"}
DLA_OTHER = {"Conv", "ConvTranspose", "Gemm", "Concat", "LRN", "MaxPool", "AveragePool", "GlobalAveragePool",
             "GlobalMaxPool", "BatchNormalization", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze",
             "Slice", "Softmax", "Resize"}
# Not layers: TensorRT folds them or they carry quantisation scales.
DLA_NEUTRAL = {"Constant", "Identity", "QuantizeLinear", "DequantizeLinear", "Shape", "Dropout"}


@dataclass(frozen=True)
class Finding:
    severity: str  # error / warn / info
    rule: str
    message: str
    node: str = ""
    op_type: str = ""


@dataclass
class LintReport:
    model: str
    opset: int
    node_count: int
    findings: list[Finding] = field(default_factory=list)
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules(self, severity: str | None = None) -> set[str]:
        return {f.rule for f in self.findings if severity is None or f.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        return {"model": self.model, "opset": self.opset, "nodes": self.node_count, "ok": self.ok,
                "counts": counts, "op_counts": self.op_counts, "findings": [asdict(f) for f in self.findings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        rows = [(f.severity, f.rule, f.node or "-", f.message) for f in self.findings]
        head = ("severity", "rule", "node", "message")
        widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(3)]
        lines = [f"{self.model}: opset {self.opset}, {self.node_count} nodes"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(head[:3], widths)) + "  " + head[3])
        lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        c = self.to_dict()["counts"]
        lines.append(f"{c['error']} error(s), {c['warn']} warning(s), {c['info']} note(s): "
                     + ("OK" if self.ok else "FAILED"))
        return "\n".join(lines)


Profile = Mapping[str, Mapping[str, Sequence[int]]]  # input -> {"min": shape, "opt": shape, "max": shape}


def parse_profile(text: str) -> dict[str, dict[str, list[int]]]:
    """`input:1x1x256x256,1x1x512x512,1x1x1024x1024[;other:...]` (min,opt,max) -> profile dict."""
    out: dict[str, dict[str, list[int]]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, shapes = part.rpartition(":")
        dims = [s.strip() for s in shapes.split(",")]
        if not name or len(dims) != 3:
            raise ExportError(expected("a profile like 'input:1x1x256x256,1x1x512x512,1x1x1024x1024'", part))
        try:
            mins, opts, maxs = ([int(d) for d in s.lower().split("x")] for s in dims)
        except ValueError:
            raise ExportError(expected("integer dims separated by 'x'", part)) from None
        out[name] = {"min": mins, "opt": opts, "max": maxs}
    return out


def dla_cores(device: Mapping[str, Any] | Any | None) -> int:
    """DLA core count from a device config (edge_runtime.devices.DeviceConfig or its dict)."""
    if not device:
        return 0
    if not isinstance(device, Mapping):
        return int(getattr(device, "dla_cores", 0) or 0)
    for holder in (device, device.get("tensorrt") or {}, device.get("accelerator") or {}):
        if isinstance(holder, Mapping) and "dla_cores" in holder:
            return int(holder["dla_cores"] or 0)
    return 0


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _walk(graph: Any, where: str = "") -> Any:
    """(node, name) for every node of ``graph`` and, recursively, of its subgraphs (If branches,
    Loop / Scan bodies: graph attributes), which TensorRT must parse as well. A nested node's name is
    prefixed with where it sits: ``if_node/else_branch/node``."""
    for n in graph.node:
        name = n.name or (n.output[0] if n.output else "")
        yield n, f"{where}{name}"
        for a in n.attribute:
            for sub in _attr_graphs(a):
                yield from _walk(sub, f"{where}{name}/{a.name}/")


def _attr_graphs(a: Any) -> list[Any]:
    import onnx

    return [a.g] if a.type == onnx.AttributeProto.GRAPH else \
        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []


def _dims(value_info: Any) -> list[int | str]:
    out: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return out


class _Graph:
    """Initializers, Constant outputs and inferred shapes of a model, for rule look-ups."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        # Subgraphs included: value names are unique across nested scopes (ONNX SSA), and a branch's
        # Q/DQ may read its own initializers or the outer graph's.
        graphs = [model.graph] + [sub for n, _ in _walk(model.graph) for a in n.attribute for sub in _attr_graphs(a)]
        self.consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for gr in graphs
                                              for i in gr.initializer}
        nodes = [n for n, _ in _walk(model.graph)]
        for n in nodes:
            if n.op_type == "Constant" and n.output:
                v = _attr(n, "value")
                if v is not None:
                    self.consts[n.output[0]] = numpy_helper.to_array(v)
        self.producer = {o: n for n in nodes for o in n.output}
        self.shapes: dict[str, list[int | str]] = {}
        for gr in graphs:
            for vi in list(gr.value_info) + list(gr.input) + list(gr.output):
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                    self.shapes[vi.name] = _dims(vi)

    def weight(self, name: str) -> np.ndarray | None:
        """A constant, or the constant behind a DequantizeLinear (a Q/DQ graph's weights)."""
        if name in self.consts:
            return self.consts[name]
        p = self.producer.get(name)
        if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in self.consts:
            return self.consts[p.input[0]]
        return None

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return len(s) if s is not None else None


def _check_structure(model: Any, path: str, findings: list[Finding]) -> Any:
    """onnx.checker (full) and strict shape inference; returns the model with inferred shapes."""
    import onnx

    try:
        onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        findings.append(Finding("error", "onnx-checker", str(exc).strip().splitlines()[0][:300]))
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        # ValueError: what ONNX raises on some malformed graphs (e.g. a branch reading another's value)
        findings.append(Finding("error", "shape-inference", str(exc).strip().splitlines()[0][:300]))
        return model


def _check_ops(model: Any, g: _Graph, findings: list[Finding]) -> None:
    for n, who in _walk(model.graph):
        if n.domain not in ("", "ai.onnx"):
            findings.append(Finding("error", "unsupported-op", f"custom domain {n.domain!r}: TensorRT needs a "
                                    "plugin for it", who, n.op_type))
        elif n.op_type not in TRT_SUPPORTED_OPS:
            findings.append(Finding("error", "unsupported-op", f"{n.op_type} is not in TensorRT's ONNX parser "
                                    "support matrix (onnx-tensorrt operators.md, 10.15)", who, n.op_type))
        elif n.op_type in TRT_RECENT_OPS:
            findings.append(Finding("warn", "recent-op", f"{n.op_type} needs TensorRT >= "
                                    f"{TRT_RECENT_OPS[n.op_type]}; older targets cannot parse it", who, n.op_type))
        elif n.op_type == "Resize":
            mode = _attr(n, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else str(mode)
            if mode not in RESIZE_MODES:
                findings.append(Finding("error", "unsupported-op", f"Resize mode {mode!r}; TensorRT supports "
                                        f"{RESIZE_MODES}", who, n.op_type))


def _check_opset(opset: int, findings: list[Finding]) -> None:
    lo, hi = TRT_OPSET_RANGE
    if not lo <= opset <= hi:
        findings.append(Finding("error", "opset", expected(f"default-domain opset in {lo}..{hi} (TensorRT 10.15)",
                                                           opset)))
    elif opset > TRT_OPSET_JETPACK6_MAX:
        findings.append(Finding("warn", "opset", f"opset {opset} > {TRT_OPSET_JETPACK6_MAX}: TensorRT 10.0 "
                                "(early JetPack 6) parses opset 9..20 only"))


def _check_qdq(model: Any, g: _Graph, findings: list[Finding]) -> None:
    from onnx import TensorProto

    for n, who in _walk(model.graph):
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = n.input[2] if len(n.input) > 2 else ""
        if n.op_type == "DequantizeLinear" and n.input[0] in g.consts:
            qtype = g.consts[n.input[0]].dtype
            if qtype != np.int8:
                findings.append(Finding("error", "qdq-type", expected(
                    "int8 quantised constants (TensorRT quantised types: INT8/FP8/INT4; a bias stays float)",
                    str(qtype)), who, n.op_type))
        if not zp_name:
            # Without y_zero_point ONNX quantises to uint8, or (opset 21+) to the output_dtype attribute's
            # type; only INT8 builds in TensorRT (its zero point then defaults to 0).
            out_type = int(_attr(n, "output_dtype", 0) or TensorProto.UINT8)
            if n.op_type == "QuantizeLinear" and out_type != TensorProto.INT8:
                findings.append(Finding("error", "qdq-zero-point", expected(
                    "an int8 y_zero_point of 0 (or output_dtype INT8, opset 21+): TensorRT quantises to INT8 only",
                    f"no y_zero_point, so ONNX quantises to {TensorProto.DataType.Name(out_type).lower()}"),
                    who, n.op_type))
            continue
        zp = g.consts.get(zp_name)
        if zp is None:
            findings.append(Finding("error", "qdq-zero-point", f"zero point {zp_name!r} is not a constant",
                                    who, n.op_type))
            continue
        if zp.dtype != np.int8:
            hint = (" (uint8 activations: an ONNX Runtime CPU form such as a bundle's int8_cpu.onnx, targeted at "
                    "onnxruntime-cpu; build TensorRT engines from int8.onnx)") if zp.dtype == np.uint8 else ""
            findings.append(Finding("error", "qdq-type", expected("int8 zero point (symmetric int8 Q/DQ)",
                                                                  str(zp.dtype)) + hint, who, n.op_type))
        if np.any(zp != 0):
            nz = np.unique(zp[zp != 0])[:4].tolist()
            findings.append(Finding("error", "qdq-zero-point", expected(
                "zero point 0 (TensorRT accepts only symmetric quantisation)", f"{nz}"), who, n.op_type))


def _check_dynamic(model: Any, profile: Profile | None, dla: int, findings: list[Finding]) -> None:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = _dims(inp)
        dyn = [i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
        prof = (profile or {}).get(inp.name)
        if prof is None:
            if dyn:
                findings.append(Finding("error", "dynamic-dims", f"input {inp.name!r} has dynamic dims {dims} and "
                                        "no optimisation profile (give one with --profile NAME:MIN,OPT,MAX, e.g. "
                                        f"{inp.name}:1x1x256x256,1x1x512x512,1x1x1024x1024)"))
            continue
        bad = _profile_problems(dims, prof)
        if bad:
            findings.append(Finding("error", "profile", f"input {inp.name!r} {dims}: {bad}"))
        elif dyn:
            findings.append(Finding("info", "profile", f"input {inp.name!r} {dims}: profile min {list(prof['min'])}"
                                    f" opt {list(prof['opt'])} max {list(prof['max'])}"))
            if dla and (list(prof["min"]) != list(prof["max"])):
                findings.append(Finding("warn", "dla-dynamic", f"input {inp.name!r}: DLA needs min == opt == max; "
                                        "the whole network falls back to the GPU"))
    for name in (profile or {}):
        if name not in {i.name for i in model.graph.input}:
            findings.append(Finding("error", "profile", expected("a profile for an existing input", name)))


def _profile_problems(dims: list[int | str], prof: Mapping[str, Sequence[int]]) -> str:
    try:
        mn, op, mx = (list(prof[k]) for k in ("min", "opt", "max"))
    except KeyError as exc:
        return f"profile lacks {exc}"
    if not len(mn) == len(op) == len(mx) == len(dims):
        return expected(f"profile shapes of rank {len(dims)}", [mn, op, mx])
    for i, d in enumerate(dims):
        if not mn[i] <= op[i] <= mx[i]:
            return expected(f"min <= opt <= max at dim {i}", (mn[i], op[i], mx[i]))
        if isinstance(d, int) and d > 0 and not mn[i] == mx[i] == d:
            return expected(f"static dim {i} = {d} in the profile", (mn[i], op[i], mx[i]))
    return ""


def _dla_reason(n: Any, g: _Graph) -> str:
    """Why node ``n`` would not run on DLA ('' when it can), per the cited layer table."""
    op = n.op_type
    if op in DLA_NEUTRAL:
        return ""
    if op not in DLA_ACTIVATIONS | DLA_ELEMENTWISE | DLA_OTHER:
        return f"{op} has no DLA layer"
    rank = g.rank(n.input[0]) if n.input else None
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        w = g.weight(n.input[1]) if len(n.input) > 1 else None
        kernel = list(_attr(n, "kernel_shape", []) or (list(w.shape[2:]) if w is not None else []))
        if len(kernel) != 2:
            return f"{op} is not 2D (kernel {kernel})"
        strides = list(_attr(n, "strides", [1, 1]))
        if op == "Conv":
            if max(kernel) > 32 or max(strides) > 8:
                return f"Conv kernel {kernel} / stride {strides} outside [1,32] / [1,8]"
            if w is not None and max(w.shape[0], w.shape[1]) > 8192:
                return f"Conv channels {w.shape[:2]} above 8192"
            if w is None:
                return "Conv weights are not constant"
        if op == "ConvTranspose":
            if int(_attr(n, "group", 1)) != 1 or any(d != 1 for d in _attr(n, "dilations", [1, 1])):
                return "grouped or dilated deconvolution"
            if any(p != 0 for p in _attr(n, "pads", [0, 0, 0, 0])):
                return "deconvolution with padding"
        if op in ("MaxPool", "AveragePool") and max(kernel) > 8:
            return f"pooling window {kernel} above 8"
    elif op == "Concat":
        axis = int(_attr(n, "axis", 1))
        if rank not in (4, None):
            return f"Concat of rank-{rank} tensors (DLA: 4-D, on the channel axis)"
        if axis not in (1, -3):
            return f"Concat on axis {axis} (DLA: channel axis only)"
    elif op == "Resize":
        mode = _attr(n, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode != "nearest":
            ct = _attr(n, "coordinate_transformation_mode", b"half_pixel")
            ct = ct.decode() if isinstance(ct, bytes) else str(ct)
            if ct != "half_pixel":
                return f"Resize {mode} with {ct} (DLA: nearest, or linear with half_pixel)"
    elif op in DLA_ACTIVATIONS | DLA_ELEMENTWISE and rank is not None and rank != 4:
        return f"{op} on a rank-{rank} tensor (DLA: 2D, i.e. NCHW only)"
    return ""


def _check_dla(model: Any, g: _Graph, cores: int, findings: list[Finding]) -> None:
    findings.append(Finding("info", "dla", f"device has {cores} DLA core(s); TensorRT 10.7 was the last release "
                            "with DLA on Jetson, TensorRT 11 builds for the GPU only"))
    for n in model.graph.node:
        reason = _dla_reason(n, g)
        if reason:
            findings.append(Finding("warn", "dla-fallback", f"would fall back to the GPU: {reason}",
                                    n.name or n.output[0], n.op_type))


def _check_cpu_int8(model: Any, g: _Graph, findings: list[Finding]) -> None:
    """Int8 weights beyond +-64 on ONNX Runtime's CPU provider: exact only where the CPU has VNNI."""
    from edge_runtime.backends.onnxruntime import INT8_EXACT_PEAK

    peak, cpu_form = 0, False
    for n, _ in _walk(model.graph):
        if n.op_type == "DequantizeLinear" and n.input[0] in g.consts and g.consts[n.input[0]].dtype == np.int8:
            peak = max(peak, int(np.abs(g.consts[n.input[0]].astype(np.int16)).max(initial=0)))
        zp = g.consts.get(n.input[2]) if n.op_type == "QuantizeLinear" and len(n.input) > 2 else None
        cpu_form |= zp is not None and zp.dtype == np.uint8
    if peak <= INT8_EXACT_PEAK:
        return
    text = (f"int8 weights up to +-{peak}: ONNX Runtime's CPU int8 kernels on x86 without VNNI (e.g. AMD Zen 3) "
            f"sum them in saturating 16 bits, so the runtime runs this file there emulated in float (exact, "
            f"slower than FP32); weights within +-{INT8_EXACT_PEAK} (export quantize --form cpu) run fused everywhere")
    # The CPU form exists only for ONNX Runtime's CPU provider: 8-bit weights there defeat its purpose.
    findings.append(Finding("warn" if cpu_form else "info", "cpu-int8-range", text))


def external_data(model: Any) -> list[str]:
    """The files an ONNX model (loaded without its external data) keeps tensors in, sorted."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return sorted({ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)})


ONE_FILE = ("an ONNX model in one file (weights inside: bundle format 1 lists, hashes and copies one file per "
            "model; onnx.save(onnx.load(PATH), OUT) writes it so, up to 2 GiB)")


def refuse_external_data(path: str | os.PathLike[str], what: str) -> None:
    """ExportError when ``path`` keeps weights in other files: `export bundle` copied only the graph
    (the bundle verified OK, then FP32 could not load), and the sha256 that ties FP16/INT8 files and gate
    reports to their FP32 covered the graph only (new weights passed with the old INT8 and verdict)."""
    import onnx

    try:
        files = external_data(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - not readable: the step that reads it says so
        return
    if files:
        raise ExportError(f"{what}: " + expected(ONE_FILE, f"weights in {files[:3]}"))


def check_model(path: str | os.PathLike[str], *, profile: Profile | None = None,
                device: Mapping[str, Any] | Any | None = None, dla: int | None = None) -> LintReport:
    """Check ``path`` and lint it for TensorRT. ``dla`` overrides the device config's DLA core count."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(expected("an ONNX model file", str(p)))
    try:
        model = onnx.load(str(p))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for a corrupt file
        raise ExportError(f"{p}: not a readable ONNX model ({exc})") from None
    findings: list[Finding] = []
    outside = external_data(onnx.load(str(p), load_external_data=False))
    if outside:
        findings.append(Finding("error", "external-data", expected(ONE_FILE, f"weights in {outside[:3]}")))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inferred = _check_structure(model, str(p), findings)
    g = _Graph(inferred)
    _check_opset(opset, findings)
    _check_ops(inferred, g, findings)
    _check_qdq(inferred, g, findings)
    _check_cpu_int8(inferred, g, findings)
    cores = dla_cores(device) if dla is None else dla
    _check_dynamic(inferred, profile, cores, findings)
    if cores > 0:
        _check_dla(inferred, g, cores, findings)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    order = {s: i for i, s in enumerate(SEVERITIES)}
    findings.sort(key=lambda f: order[f.severity])
    return LintReport(p.name, opset, len(model.graph.node), findings, dict(sorted(counts.items())))
