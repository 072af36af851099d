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

Graph-level choices make the same file fast on ONNX Runtime's x86 CPU provider without changing
what TensorRT sees (the form above) or, except the merged heads' shared scale, the numbers. ORT runs a
QDQ graph fast only where it can fuse "DQ -> op -> Q" into an int8 kernel; on x86 it also converts
every int8 Q/DQ pair to uint8 (QDQS8ToU8Transformer; with "session.qdqisint8allowed" = 1 it keeps
int8 x int8 convolutions instead, and us-lesion-det ran 8x slower), and it converts a QuantizeLinear only when it feeds exactly one DequantizeLinear.
Profiled per node on the reference models (2 threads), what kept INT8 at ~1.0x of FP32 was:
- Relu: written as LeakyRelu(alpha=0) (identical function): ORT runs "DQ -> LeakyRelu -> Q" as one
  int8 QLinearLeakyRelu, while "DQ -> Relu -> Q" with a zero point of 0 runs in float between a
  DequantizeLinear and a QuantizeLinear (ORT folds Relu into Q only when the zero point is the
  type's minimum, i.e. asymmetric uint8, which TensorRT refuses). TensorRT fuses either into the conv.
  It still costs one pass over the activation per Relu (the asymmetric form folds it away).
- Tensors read by several nodes: DedicatedQDQPair gives each reader its own Q/DQ pair, and those
  per-reader QuantizeLinear nodes get distinct values of their ``axis`` attribute (ignored for
  per-tensor scales by the ONNX spec) so that ORT's common-subexpression elimination does not merge
  them back into one Q with several DQ readers, which ORT would then leave in int8 and run every conv
  after it in float. :func:`dedicate_readers` extends this to readers kept in float (``--repair``),
  which ORT's quantiser leaves sharing a DequantizeLinear: us-despeckle's e2.0 conv ran as a plain
  float Conv (1.9 ms, slower than in the FP32 model) because the skip-connection Add was kept in float.
  The producer of such a tensor still runs in float with one quantise pass per reader (ORT's int8 ops
  need exactly one Q after them), so fewer readers is faster:
- :func:`merge_sibling_convs` (in :func:`preprocess`): convolutions with the same input and attributes
  (CenterNet's heatmap / size / offset heads) become one Conv + Split, which ORT runs as one QLinearConv
  and a uint8 Split. Their outputs then share one activation scale.
- :func:`single_channel_convs`: a 3x3 conv over one input channel (the grey-image stem) runs 5x slower
  as ORT's int8 conv than as its FP32 NCHWc conv, so it stays in float (``nodes_in_float_for_speed``)
  and quantisation starts at its output (TensorRT builds it in float: no Q/DQ around it). In the CPU form
  a strided stem is rewritten first (below) and is then no longer single-channel.

INT8 for ONNX Runtime on the CPU (``form="cpu"``, :func:`quantize_int8_cpu`, the bundle's ``int8_cpu.onnx``):
even with the graph forms above, the symmetric file reaches only 1.03-1.10x of FP32 on x86 (quiet machine;
1.2-1.45x with the cores loaded), because ORT's
x86 int8 kernels want uint8 activations (ReLU folds into an asymmetric uint8 Q whose zero point is the
type's minimum; a tensor read by several nodes stays uint8 instead of falling back to float). The CPU form
is QDQ with asymmetric uint8 activations (calibrated zero points) and symmetric per-channel int8 weights
reduced to 7 bits (ORT's reduce_range: |q| <= 64), so that x86 int8 kernels without VNNI, which add pairs of
u8 x s8 products in saturating 16-bit lanes, compute the same sums as VNNI ones (with 8-bit weights an AMD EPYC
without VNNI lost 0.9 dB on us-despeckle's CPU form against the gate's VNNI verdict; edge_runtime.devices
INT8_DOT_FLAGS): same calibration frames and method (its own range cache: ranges are not symmetrised), same
pre-processing (sibling convs merged), ``nodes_to_exclude`` honoured, Relu left for ORT's quantiser to fold
(no LeakyRelu rewrite, no kept activations, no dedicated pairs: none of that is needed in uint8), and a
strided single-channel stem written as SpaceToDepth + conv (:func:`stem_as_space_to_depth`, same function)
so that it runs as an int8 conv too; likewise a ConvTranspose whose kernel is its stride (the U-Nets'
up-convolutions, which have no int8 CPU kernel) as a 1x1 conv + DepthToSpace (:func:`conv_transpose_as_conv`).
After quantisation, nearest Resize and DepthToSpace between a DQ and a Q of one scale move the uint8 tensor
channels-last, where ONNX Runtime runs the int8 convs (:func:`uint8_movement_in_nhwc`; measured on the AMD
EPYC Zen 4 with VNNI, 2 threads, interleaved, random calibration frames: xr-nodule-det int8_cpu / FP32 1.80x -> 2.05x, us-lesion-det 1.65x -> 1.80x,
us-despeckle 2.14x -> 2.69x). Measured 1.08-1.60x of FP32 on the reference models on a quiet
2-core Intel Xeon with VNNI, with 8-bit weights; the 7-bit form and CPUs without VNNI: each machine's page
under benchmarks/results/. TensorRT refuses it (non-zero zero points, uint8), so bundles carry it as a second artefact targeted at ``onnxruntime-cpu`` only (docs/BUNDLE.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.onnxruntime import INT8_EXACT_PEAK, int8_weight_peak
from edge_runtime.errors import ExportError, expected

METHODS = ("minmax", "entropy", "percentile")
FORMS = ("tensorrt", "cpu")  # int8.onnx (runs everywhere, TensorRT's form) / int8_cpu.onnx (ORT CPU only)
FORM_FILES = {"tensorrt": "int8.onnx", "cpu": "int8_cpu.onnx"}
FORM_TARGETS = {"tensorrt": ["tensorrt", "onnxruntime"], "cpu": ["onnxruntime-cpu"]}
# Bias of the CPU form: ORT's QDQ quantiser stores it as int32 (scale = input x weight scale) when True.
# Measured on the reference models (ORT 1.31, 2 threads, interleaved, stem conv in float): int32 vs float bias
# 1.66x vs 1.71x (us-lesion-det), 1.96x vs 1.90x (us-despeckle), 1.67x vs 1.66x (xr-nodule-det): within the
# noise, so the bias stays float32 (no extra rounding, as in the TensorRT form). The single-channel stem conv
# stays in float in this form too (1.52x -> 1.71x on us-lesion-det, 1.56x -> 1.66x on xr-nodule-det).
CPU_QUANTIZE_BIAS = False


def check_loads(path: str | os.PathLike[str]) -> None:
    """Raise ExportError unless ONNX Runtime's CPU provider can load ``path``."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several Fail/InvalidGraph types
        raise ExportError(f"{path}: ONNX Runtime (CPU) cannot load the converted model: {exc}") from None


# ONNX metadata_props key: the sha256 of the FP32 file an FP16 / INT8 file was made from. `export
# bundle` records it (artifact info.source_fp32_sha256: a bundle pairing the file with another FP32 is
# stale and refused) and `export validate` refuses a candidate judged against another FP32.
SOURCE_KEY = "edge_runtime.source_fp32_sha256"
# ... and the sha256 of the calibration set an INT8 file was calibrated on (calibration.json's sha256):
# `export bundle --calibration` refuses a record of another set.
CALIBRATION_KEY = "edge_runtime.calibration_sha256"


def stamp_source(path: str | os.PathLike[str], fp32: str | os.PathLike[str], calibration_sha256: str | None = None
                 ) -> str:
    """Record in ``path`` the sha256 of the FP32 model ``fp32`` it was made from (and of the calibration
    set, for INT8); returns the FP32 sha256."""
    import onnx

    from edge_runtime.bundle import sha256_file

    sha = sha256_file(fp32)
    model = onnx.load(str(path))
    stamps = {SOURCE_KEY: sha, **({CALIBRATION_KEY: calibration_sha256} if calibration_sha256 else {})}
    kept = [p for p in model.metadata_props if p.key not in (SOURCE_KEY, CALIBRATION_KEY)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in stamps.items():
        model.metadata_props.add(key=key, value=value)
    out = Path(path)
    tmp = out.with_name(f".{out.name}.stamp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)  # never half a model where the file was
    return sha


def stamped_source(path: str | os.PathLike[str], key: str = SOURCE_KEY) -> str | None:
    """The FP32 sha256 (or with ``key`` CALIBRATION_KEY, the calibration set's) stamp_source recorded
    in ``path``, or None (a file made elsewhere)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: not an ONNX file
        raise ExportError(f"{Path(path).name}: " + expected("an ONNX model file", f"one that does not parse "
                                                            f"({type(exc).__name__})")) from None
    return next((p.value for p in model.metadata_props if p.key == key), None)


def provenance_problems(fp32: str | os.PathLike[str], files: dict[str, str | os.PathLike[str]]) -> list[str]:
    """Each of ``files`` (label: ONNX path) that stamp_source says was made from another FP32 file."""
    from edge_runtime.bundle import sha256_file

    fp32_sha = sha256_file(fp32)
    out = []
    for label, path in files.items():
        made_from = stamped_source(path) if Path(path).suffix.lower() == ".onnx" else None
        if made_from and made_from != fp32_sha:
            out.append(f"{label} ({Path(path).name}) was made from fp32 sha256 {made_from[:12]}..., not from "
                       f"{Path(fp32).name} (sha256 {fp32_sha[:12]}...)")
    return out


PROVENANCE_HINT = ("another model's file? If it was quantised from a pre-processed copy of this model, judge and "
                   "bundle it with that copy as the FP32 (or quantise this FP32 file: export quantize "
                   "pre-processes it itself)")


def to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, keep_io_types: bool = True,
            op_block_list: Sequence[str] | None = None, node_block_list: Sequence[str] = ()) -> Path:
    """Write an FP16 copy of ``src``; inputs/outputs stay float32 (casts inside) when keep_io_types."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    blocks = list(DEFAULT_OP_BLOCK_LIST if op_block_list is None else op_block_list)
    fp16 = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=blocks,
                                    node_block_list=list(node_block_list))
    # The converter appends the input Casts after the nodes that read them: ONNX Runtime loads that,
    # onnx.checker (and so `export check`) refuses it. Sort, then hold the file to the checker too.
    from onnxruntime.transformers.onnx_model import OnnxModel

    sorted_model = OnnxModel(fp16)
    sorted_model.topological_sort()
    out = Path(dst)
    onnx.save(sorted_model.model, str(out))
    try:
        onnx.checker.check_model(str(out), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{out}: the FP16 conversion is not a valid ONNX model: {exc}") from None
    check_loads(out)
    return out


@contextlib.contextmanager
def _working_dir(path: str | os.PathLike[str]) -> Iterator[None]:
    """Run a block in ``path`` (contextlib.chdir needs Python 3.11)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def preprocess(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, merge_siblings: bool = True,
               keep: Sequence[str] = ()) -> Path:
    """ORT's recommended quantisation pre-processing: shape inference + graph optimisation (BN folded),
    then sibling convolutions merged (:func:`merge_sibling_convs`, same function) except those in ``keep``
    (nodes to be kept in float: merged, they would lose their names and be quantised after all)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    # When symbolic inference gives up, ORT saves its partial model as sym_shape_infer_temp.onnx plus
    # an external-data file into the current directory: run it in a scratch directory instead.
    with tempfile.TemporaryDirectory(prefix="edge-preprocess-") as scratch, _working_dir(scratch):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - ORT's symbolic inference raises a bare Exception on symbolic dims
            # Symbolic shape inference does not complete on the enhancers' dynamic H/W graphs;
            # ONNX's own shape inference plus ORT's graph optimisation is all quantisation needs.
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    if merge_siblings:
        merge_sibling_convs(dst, dst, keep)
    return Path(dst)


def _node_names(path: str | os.PathLike[str]) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


def _splits_after(path: str | os.PathLike[str], in_float: Sequence[str]) -> list[str]:
    """Split nodes reading an output of a node kept in float. ORT quantises a Split on its own (it is
    in its QDQ registry), so the merged CenterNet heads (one Conv + Split, merge_sibling_convs) kept
    their outputs in int8 with every node "kept in float": sizes off by 1.5 px, a repair never passing."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    made_by = {o: n.name for n in graph.node for o in n.output}
    return [n.name for n in graph.node if n.op_type == "Split" and made_by.get(n.input[0]) in set(in_float)]


def _drop_unused_initializers(graph: Any) -> None:
    """Remove the initializers no node reads any more (after a rewrite replaced their readers)."""
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def merge_sibling_convs(src: str | os.PathLike[str], dst: str | os.PathLike[str], skip: Sequence[str] = ()) -> int:
    """Merge convolutions that read the same tensor with the same attributes (e.g. CenterNet's heatmap /
    size / offset 1x1 heads) into one Conv (weights and biases concatenated over output channels)
    followed by a Split back into the original output tensors: the same function, one conv instead of
    several. Returns the number of convolutions merged away. See the module doc: a tensor read by several
    quantised nodes costs extra float passes on ONNX Runtime's CPU provider; after the merge it has one."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for n in g.node:
        if n.op_type != "Conv" or n.domain not in ("", "ai.onnx") or len(n.input) < 2 or n.input[1] not in inits \
                or n.name in skip:
            continue
        if len(n.input) > 2 and n.input[2] and n.input[2] not in inits:
            continue
        if inits[n.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        attrs = tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute))
        if dict(attrs).get("group", "1") != "1":
            continue
        w = inits[n.input[1]]
        groups.setdefault((n.input[0], attrs, tuple(w.dims[1:])), []).append(n)
    merged = 0
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    for (x, _, _), convs in groups.items():
        if len(convs) < 2:
            continue
        ws = [numpy_helper.to_array(inits[c.input[1]]) for c in convs]
        bs = [numpy_helper.to_array(inits[c.input[2]]) if len(c.input) > 2 and c.input[2]
              else np.zeros(w.shape[0], w.dtype) for c, w in zip(convs, ws)]
        base = convs[0].name or convs[0].output[0]
        wname, bname, yname = f"{base}_merged.weight", f"{base}_merged.bias", f"{base}_merged_output"
        g.initializer.extend([numpy_helper.from_array(np.concatenate(ws, 0), wname),
                              numpy_helper.from_array(np.concatenate(bs, 0), bname)])
        conv = helper.make_node("Conv", [x, wname, bname], [yname], name=f"{base}_merged")
        conv.attribute.extend(convs[0].attribute)
        sizes = [int(w.shape[0]) for w in ws]
        if opset >= 13:
            sname = f"{base}_merged.split"
            g.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), sname))
            split = helper.make_node("Split", [yname, sname], [c.output[0] for c in convs], name=f"{base}_split",
                                     axis=1)
        else:
            split = helper.make_node("Split", [yname], [c.output[0] for c in convs], name=f"{base}_split",
                                     axis=1, split=sizes)
        at = list(g.node).index(convs[0])
        for c in convs:
            g.node.remove(c)
        g.node.insert(at, split)
        g.node.insert(at, conv)
        merged += len(convs) - 1
    if merged:
        _drop_unused_initializers(g)
    onnx.save(model, str(dst))
    return merged


@dataclass
class Int8Result:
    path: Path
    method: str
    nodes_excluded: list[str] = field(default_factory=list)
    op_types_to_quantize: list[str] | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    float_for_speed: list[str] = field(default_factory=list)
    form: str = "tensorrt"
    stems_as_space_to_depth: list[str] = field(default_factory=list)
    conv_transposes_as_conv: list[str] = field(default_factory=list)
    uint8_movement_in_nhwc: list[str] = field(default_factory=list)

    def info(self) -> dict[str, Any]:
        """What the bundle records about how this INT8 artefact was made."""
        weights = "int8 symmetric, per-channel" + (", 7-bit (+-64)" if self.form == "cpu" else "")
        common = {"format": "QDQ", "weights": weights, "calibration_method": self.method,
                  "sibling_convs_merged": True, "nodes_in_float": self.nodes_excluded,
                  "nodes_in_float_for_speed": self.float_for_speed,
                  "op_types_to_quantize": self.op_types_to_quantize, "qdq": self.summary}
        if self.form == "cpu":
            return {"form": "onnxruntime-cpu", "activations": "uint8 asymmetric (calibrated zero points)",
                    "bias": "int32" if CPU_QUANTIZE_BIAS else "float32",
                    "relu_as": "folded into QuantizeLinear by ONNX Runtime", **common,
                    "stems_as_space_to_depth": self.stems_as_space_to_depth,
                    "conv_transposes_as_conv": self.conv_transposes_as_conv,
                    "uint8_movement_in_nhwc": self.uint8_movement_in_nhwc,
                    "note": "ONNX Runtime CPU provider only; not for TensorRT: TensorRT accepts only symmetric Q/DQ"}
        return {"form": "tensorrt", "activations": "int8 symmetric (zero point 0)", "bias": "float32",
                "relu_as": "LeakyRelu(alpha=0)", "dedicated_qdq_pairs": True, **common}


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


def _readers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    return readers


def dedicate_readers(path: str | os.PathLike[str]) -> int:
    """Give every reader of a quantised activation its own QuantizeLinear -> DequantizeLinear pair, also
    readers kept in float (``nodes_to_exclude``), which ORT's DedicatedQDQPair leaves sharing one DQ.

    ONNX Runtime (level 1) duplicates a DequantizeLinear read by several nodes, and then its x86 S8->U8
    conversion skips the QuantizeLinear that now feeds several DequantizeLinear: every int8 conv reading
    that tensor falls back to float (dequantised weights, a plain Conv without the NCHWc layout: slower
    than the FP32 model's). Returns the number of nodes added."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name for i in g.initializer}
    outputs = {o.name for o in g.output}
    readers = _readers(g)
    added = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]:
        dqs = readers.get(q.output[0], [])
        if not dqs or any(r.op_type != "DequantizeLinear" for r in dqs) or q.output[0] in outputs:
            continue  # read by something other than DequantizeLinear: leave it alone
        # one (DQ, reader) per reader of each DQ's output; None stands for "the DQ is a graph output"
        pairs = [(dq, r) for dq in dqs for r in {id(r): r for r in readers.get(dq.output[0], [])}.values()]
        pairs += [(dq, None) for dq in dqs if dq.output[0] in outputs and not readers.get(dq.output[0])]
        for k, (dq, reader) in enumerate(pairs[1:], 1):
            q2 = helper.make_node("QuantizeLinear", list(q.input), [f"{q.output[0]}_r{k}"], name=f"{q.name}_r{k}")
            q2.attribute.extend([a for a in q.attribute if a.name != "axis"])
            at = list(g.node).index(dq)
            if reader is None:  # the graph output keeps its DQ (and name), fed by its own Q
                dq.input[0] = q2.output[0]
                g.node.insert(at, q2)
                added += 1
                continue
            dq2 = helper.make_node("DequantizeLinear", [q2.output[0], *dq.input[1:]], [f"{dq.output[0]}_r{k}"],
                                   name=f"{dq.name}_r{k}")
            dq2.attribute.extend(dq.attribute)
            for i, x in enumerate(reader.input):
                if x == dq.output[0]:
                    reader.input[i] = dq2.output[0]
            g.node.insert(at + 1, dq2)
            g.node.insert(at + 1, q2)
            added += 2
    if added:  # DequantizeLinear nodes whose readers all moved to copies go
        live = {x for n in g.node for x in n.input} | outputs
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] not in live]:
            g.node.remove(n)
        onnx.save(model, str(path))
    return added


def single_channel_convs(path: str | os.PathLike[str], max_depth: int = 9) -> list[str]:
    """Convolutions over a single input channel with a reduction depth (kernel height x width) of at most
    ``max_depth`` (the 3x3 stem conv on a grey image), with their activation when it is their only reader:
    ONNX Runtime's x86 int8 convolution is much slower there than the FP32 NCHWc kernel (measured 0.46 ms
    int8 vs 0.09 ms float for us-lesion-det's stem), so they stay in float and quantisation starts at their
    output."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    readers = _readers(model.graph)
    names: list[str] = []
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if w is None or len(w.dims) < 3 or w.dims[1] != 1 or group != 1 or not n.name \
                or int(np.prod(w.dims[2:])) > max_depth:
            continue
        names.append(n.name)
        rs = readers.get(n.output[0], [])
        if len(rs) == 1 and rs[0].op_type in ("Relu", "LeakyRelu", "Clip") and rs[0].name:
            names.append(rs[0].name)
    return names


def _static_hw(graph: Any, name: str) -> tuple[int, int] | None:
    """(H, W) of a 4-D tensor when the graph states both as numbers."""
    for vi in [*graph.input, *graph.value_info]:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
                return dims[2].dim_value, dims[3].dim_value
    return None


def stem_as_space_to_depth(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                           skip: Sequence[str] = ()) -> list[str]:
    """Write ``src`` to ``dst`` with every strided convolution over a single input channel (the grey-image
    stem, 3x3 stride 2) as SpaceToDepth(stride) followed by a stride-1 convolution over stride**2 channels:
    the same function (weights rearranged, outputs equal to float rounding), applied only where the input's
    H and W are static multiples of the stride. ONNX Runtime then runs the stem as an int8 conv, which the
    single-channel form is not worth (:func:`single_channel_convs`), and the float stem's NCHWc output no
    longer has to be reordered and quantised at full width (measured int8_cpu / FP32 with 2 threads:
    us-lesion-det 1.34-1.42x -> 1.48-1.49x, xr-nodule-det 1.38-1.42x -> 1.49-1.51x). The CPU form only: TensorRT
    builds the stem well as it is. Returns the names of the rewritten convolutions."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done: list[str] = []
    for n in list(g.node):
        w_init = inits.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        strides = list(attrs.get("strides", [1, 1]))
        if w_init is None or len(w_init.dims) != 4 or w_init.dims[1] != 1 or attrs.get("group", 1) != 1 \
                or any(d != 1 for d in attrs.get("dilations", [1, 1])) or attrs.get("auto_pad", b"NOTSET") != b"NOTSET" \
                or len(set(strides)) != 1 or strides[0] < 2 or not n.name or n.name in skip:
            continue
        s = int(strides[0])
        hw = _static_hw(g, n.input[0])
        if hw is None or hw[0] % s or hw[1] % s:
            continue
        w = numpy_helper.to_array(w_init)
        k = w.shape[2:]
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        # Along one axis: tap u reads x[s*i + u - pb] = block (i + m) at offset a, with u - pb = s*m + a.
        lo = [-pads[d] // s for d in (0, 1)]  # most negative block offset m (floor division)
        size = [(k[d] - 1 - pads[d]) // s - lo[d] + 1 for d in (0, 1)]
        out = [(hw[d] + pads[d] + pads[d + 2] - k[d]) // s + 1 for d in (0, 1)]
        end = [out[d] - hw[d] // s + lo[d] + size[d] - 1 for d in (0, 1)]  # trailing pad that keeps the size
        if min(end) < 0:
            continue
        w2 = np.zeros((w.shape[0], s * s, size[0], size[1]), w.dtype)
        for uy in range(k[0]):
            my, ay = divmod(uy - pads[0], s)
            for ux in range(k[1]):
                mx, ax = divmod(ux - pads[1], s)
                w2[:, ay * s + ax, my - lo[0], mx - lo[1]] += w[:, 0, uy, ux]  # SpaceToDepth order: (ay, ax, c)
        w_init.CopyFrom(numpy_helper.from_array(w2, w_init.name))
        blocks = f"{n.name}_space_to_depth"
        g.node.insert(list(g.node).index(n), helper.make_node("SpaceToDepth", [n.input[0]], [blocks],
                                                              name=blocks, blocksize=s))
        n.input[0] = blocks
        del n.attribute[:]
        n.attribute.extend([helper.make_attribute("kernel_shape", size), helper.make_attribute("strides", [1, 1]),
                            helper.make_attribute("pads", [-lo[0], -lo[1], end[0], end[1]])])
        done.append(n.name)
    onnx.save(model, str(dst))
    return done


def conv_transpose_as_conv(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                           skip: Sequence[str] = ()) -> list[str]:
    """Write ``src`` to ``dst`` with every ConvTranspose whose kernel equals its stride (the U-Nets' 2x2
    stride-2 up-convolutions: no padding, one group, no dilation or output padding) as a 1x1 Conv to
    stride**2 x C_out channels followed by DepthToSpace (DCR): the same function, each output pixel a
    weighted sum of the one input pixel above it. ONNX Runtime has no int8 ConvTranspose on the CPU, so
    the up-convolution stayed float between a DQ and a Q; the 1x1 Conv runs as an int8 conv and the
    DepthToSpace as uint8 data movement (:func:`uint8_movement_in_nhwc`). The CPU form only: TensorRT
    builds ConvTranspose in int8. Nodes named in ``skip`` (kept in float) stay as they are. Returns the
    names of the rewritten nodes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    taken = _names_in_use(g)
    done: list[str] = []
    for n in list(g.node):
        w_init = inits.get(n.input[1]) if n.op_type == "ConvTranspose" and len(n.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if w_init is None or len(w_init.dims) != 4 or not n.name or n.name in skip:
            continue
        k = list(w_init.dims[2:])
        strides = list(attrs.get("strides", [1, 1]))
        if k != strides or k[0] != k[1] or k[0] < 2 or attrs.get("group", 1) != 1 \
                or any(attrs.get("pads", [0] * 4)) or any(attrs.get("output_padding", [0, 0])) \
                or any(d != 1 for d in attrs.get("dilations", [1, 1])) or "output_shape" in attrs \
                or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
            continue
        has_bias = len(n.input) > 2 and bool(n.input[2])
        blocks = f"{n.name}_as_conv"
        fresh = {blocks, f"{blocks}.weight", f"{blocks}.bias", f"{n.name}_depth_to_space"}
        if (has_bias and n.input[2] not in inits) or fresh & taken:  # a computed bias; a name in use
            continue
        taken |= fresh
        s = k[0]
        w = numpy_helper.to_array(w_init)  # [C_in, C_out, s, s]
        c_out = w.shape[1]
        # DepthToSpace DCR: output (s*i + a, s*j + b, c) is input channel (a*s + b)*C_out + c.
        w2 = np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(s * s * c_out, w.shape[0], 1, 1))
        conv_w = numpy_helper.from_array(w2, f"{blocks}.weight")
        inputs = [n.input[0], conv_w.name]
        if has_bias:
            bias = numpy_helper.from_array(np.tile(numpy_helper.to_array(inits[n.input[2]]), s * s), f"{blocks}.bias")
            g.initializer.append(bias)
            inputs.append(bias.name)
        g.initializer.append(conv_w)
        at = list(g.node).index(n)
        g.node.insert(at, helper.make_node("Conv", inputs, [blocks], name=blocks, kernel_shape=[1, 1]))
        g.node.insert(at + 1, helper.make_node("DepthToSpace", [blocks], [n.output[0]], name=f"{n.name}_depth_to_space",
                                               blocksize=s, mode="DCR"))
        g.node.remove(n)
        done.append(n.name)
    if done:
        _drop_unused_initializers(g)
    onnx.save(model, str(dst))
    return done


def _names_in_use(graph: Any) -> set[str]:
    """Every node and tensor name of ``graph``: a rewrite adds only names outside it."""
    names = {n.name for n in graph.node} | {i.name for i in graph.initializer}
    names |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    return names | {t for n in graph.node for t in [*n.input, *n.output]}


def _same_qparams(inits: dict[str, Any], dq: Any, q: Any) -> bool:
    """A DequantizeLinear and a QuantizeLinear with the same constant per-tensor scale and zero point:
    then Q(DQ(v)) is v and data movement between them may run on the quantised tensor itself."""
    from onnx import numpy_helper

    if len(dq.input) < 3 or len(q.input) < 3:
        return False
    try:
        pairs = [(numpy_helper.to_array(inits[a]), numpy_helper.to_array(inits[b]))
                 for a, b in zip(dq.input[1:3], q.input[1:3])]
    except KeyError:  # not constants
        return False
    return all(x.size == 1 and x.dtype == y.dtype and np.array_equal(x, y) for x, y in pairs)


def uint8_movement_in_nhwc(path: str | os.PathLike[str], skip: Sequence[str] = ()) -> list[str]:
    """In a quantised CPU-form graph, rewrite DQ -> op -> Q, where op is a nearest Resize by an integer
    factor (asymmetric coordinates, floor) or a DCR DepthToSpace and the DQ and the Q share one scale and
    zero point, as the same movement of the uint8 tensor written channels-last: Transpose to NHWC,
    Unsqueeze + Expand + Reshape (Resize) or Reshape + Transpose + Reshape (DepthToSpace), Transpose back.
    Exactly the same values. Why: ONNX Runtime runs the int8 convolutions channels-last and moves the
    Resize there too, where its nearest kernel takes 0.6-1.4 ms for xr-nodule-det's two 2x upsamplings
    (0.03 ms on NCHW); a DepthToSpace stays NCHW, with Transposes into and out of it. Written
    channels-last, the data moves in C-byte runs, and the two Transposes cancel against the ones ONNX
    Runtime's layout transformer puts around its NHWC convolutions (measured: 0.17 ms for the two
    upsamplings, no Transpose added). Nodes named in ``skip`` (kept in float) and graphs below opset 13
    (Unsqueeze with an axes input) are left as they are. Returns the names of the rewritten nodes; the
    file is rewritten in place when there are any."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 13:
        return []
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers = _readers(g)
    outputs = {o.name for o in g.output}
    taken = _names_in_use(g)
    done: list[str] = []
    dqs: list[Any] = []
    for n in list(g.node):
        if n.op_type not in ("Resize", "DepthToSpace") or not n.name or n.name in skip:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        dq = producer.get(n.input[0])
        rs = readers.get(n.output[0], [])
        if dq is None or dq.op_type != "DequantizeLinear" or len(rs) != 1 or rs[0].op_type != "QuantizeLinear" \
                or n.output[0] in outputs or not _same_qparams(inits, dq, rs[0]):
            continue
        q = rs[0]
        p = n.name
        consts: list[tuple[str, list[int]]] = []
        if n.op_type == "Resize":
            scales = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            sc = numpy_helper.to_array(scales) if scales is not None else None
            if sc is None or sc.shape != (4,) or list(sc[:2]) != [1, 1] or sc[2] != sc[3] or sc[2] != int(sc[2]) \
                    or sc[2] < 2 or (len(n.input) > 3 and n.input[3]) or attrs.get("mode", b"nearest") != b"nearest" \
                    or attrs.get("coordinate_transformation_mode", b"half_pixel") != b"asymmetric" \
                    or attrs.get("nearest_mode", b"round_prefer_floor") != b"floor":
                continue
            s = int(sc[2])
            consts = [("axes", [2, 4]), ("expand", [1, 1, s, 1, s, 1]), ("mul", [1, s, s, 1])]
            body = [helper.make_node("Unsqueeze", [f"{p}_nhwc", f"{p}_axes"], [f"{p}_a"], name=f"{p}_unsqueeze"),
                    helper.make_node("Expand", [f"{p}_a", f"{p}_expand"], [f"{p}_b"], name=f"{p}_expand"),
                    helper.make_node("Shape", [f"{p}_nhwc"], [f"{p}_shape"], name=f"{p}_shape"),
                    helper.make_node("Mul", [f"{p}_shape", f"{p}_mul"], [f"{p}_shape2"], name=f"{p}_shape2"),
                    helper.make_node("Reshape", [f"{p}_b", f"{p}_shape2"], [f"{p}_c"], name=f"{p}_reshape")]
        else:
            if attrs.get("mode", b"DCR") != b"DCR":
                continue
            s = int(attrs["blocksize"])
            consts = [("blocks", [0, 0, 0, s, s, -1]), ("mul", [1, s, s, 1]), ("div", [1, 1, 1, s * s])]
            body = [helper.make_node("Reshape", [f"{p}_nhwc", f"{p}_blocks"], [f"{p}_a"], name=f"{p}_reshape1"),
                    helper.make_node("Transpose", [f"{p}_a"], [f"{p}_b"], name=f"{p}_interleave",
                                     perm=[0, 1, 3, 2, 4, 5]),
                    helper.make_node("Shape", [f"{p}_nhwc"], [f"{p}_shape"], name=f"{p}_shape"),
                    helper.make_node("Mul", [f"{p}_shape", f"{p}_mul"], [f"{p}_shape1"], name=f"{p}_shape1"),
                    helper.make_node("Div", [f"{p}_shape1", f"{p}_div"], [f"{p}_shape2"], name=f"{p}_shape2"),
                    helper.make_node("Reshape", [f"{p}_b", f"{p}_shape2"], [f"{p}_c"], name=f"{p}_reshape2")]
        nodes = [helper.make_node("Transpose", [dq.input[0]], [f"{p}_nhwc"], name=f"{p}_to_nhwc", perm=[0, 2, 3, 1]),
                 *body,
                 helper.make_node("Transpose", [f"{p}_c"], [q.output[0]], name=f"{p}_to_nchw", perm=[0, 3, 1, 2])]
        fresh = {f"{p}_{k}" for k, _ in consts} | {t for m in nodes for t in [m.name, *m.output]} - {q.output[0]}
        if fresh & taken:  # a name in use
            continue
        taken |= fresh
        g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), f"{p}_{k}") for k, v in consts)
        at = list(g.node).index(q)
        for i, node in enumerate(nodes):
            g.node.insert(at + i, node)
        g.node.remove(n)
        g.node.remove(q)
        dqs.append(dq)
        done.append(p)
    if done:
        read = {i for n in g.node for i in n.input} | outputs
        for dq in {id(d): d for d in dqs}.values():  # a DQ the rewrites left without readers
            if dq.output[0] not in read:
                g.node.remove(dq)
        _drop_unused_initializers(g)
        onnx.save(model, str(path))
    return done


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
                  preprocessed: bool = False, float_single_channel_convs: bool = True,
                  form: str = "tensorrt") -> Int8Result:
    """Quantise ``src`` to INT8 QDQ at ``dst``.

    ``reader`` is an ORT CalibrationDataReader with ``__len__`` and ``set_range`` (see
    export.calibration.FrameReader); it may be None when ``cache`` holds ranges from an earlier
    run with the same method and form. ``preprocessed``: ``src`` already went through :func:`preprocess`.
    ``float_single_channel_convs``: keep :func:`single_channel_convs` in float (for speed, not accuracy).
    ``form``: ``"tensorrt"`` (symmetric int8 everywhere, int8.onnx) or ``"cpu"`` (uint8 asymmetric
    activations for ONNX Runtime's CPU provider, int8_cpu.onnx; see the module doc). The two forms'
    calibration ranges differ (symmetrised or not): give each its own ``cache``, and make it with no
    ``nodes_to_exclude``: the CPU form's rewrites depend on them, so a cache made with nodes kept in float
    can lack ranges that a later call needs (an ExportError says so).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if form not in FORMS:
        raise ExportError(expected(f"INT8 form in {FORMS}", form))
    cal = _calibration_method(method)
    cache_path = Path(cache) if cache is not None else None
    if reader is None and (cache_path is None or not cache_path.is_file()):
        raise ExportError(expected("calibration frames or a calibration cache", "neither"))
    cpu = form == "cpu"
    if cpu:
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True,
                                 "QuantizeBias": CPU_QUANTIZE_BIAS}
    else:
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                 "QDQKeepRemovableActivations": True, "CalibTensorRangeSymmetric": True, "DedicatedQDQPair": True}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    shapes = {tuple(t.shape) for t in getattr(reader, "tensors", ())}
    if method in ("percentile", "entropy") and len(shapes) > 1:
        # ONNX Runtime's histogram calibrators stack every frame's activations: mixed sizes fail inside it
        raise ExportError(expected(f"calibration frames of one tensor size for method {method} (or method minmax)",
                                   f"{len(shapes)} sizes, e.g. {sorted(shapes)[:3]}"))
    if reader is not None:
        # Calibrate in chunks: ORT's histogram calibrators otherwise hold every activation of every frame.
        extra["CalibStridedMinMax"] = _chunk(len(reader))
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        model_in = Path(src) if preprocessed else preprocess(src, Path(tmp) / "pre.onnx", keep=nodes_to_exclude)
        if not cpu:
            model_in = relu_as_leaky_relu(model_in, Path(tmp) / "leaky.onnx")
        stems = stem_as_space_to_depth(model_in, Path(tmp) / "stem.onnx", nodes_to_exclude) if cpu else []
        if stems:
            model_in = Path(tmp) / "stem.onnx"
        up_convs = conv_transpose_as_conv(model_in, Path(tmp) / "up.onnx", nodes_to_exclude) if cpu else []
        if up_convs:
            model_in = Path(tmp) / "up.onnx"
        for_speed = [n for n in single_channel_convs(model_in) if n not in nodes_to_exclude] \
            if float_single_channel_convs else []
        follow = _splits_after(model_in, nodes_to_exclude)  # implied by the nodes kept in float
        # ONNX Runtime skips names it does not find without a word: the node would be quantised while the
        # manifest records it as kept in float (a typo, or a name from another graph).
        unknown = sorted(set(nodes_to_exclude) - _node_names(model_in))
        if unknown:
            raise ExportError(f"nodes_to_exclude: {unknown} not in the graph being quantised; " + expected(
                "names of its nodes (as in the FP32 file; the repair loop uses those of the pre-processed graph)",
                unknown))
        try:
            quantize_static(str(model_in), str(dst), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8 if cpu else QuantType.QInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=cpu,
                            calibrate_method=cal, nodes_to_exclude=[*nodes_to_exclude, *for_speed, *follow],
                            op_types_to_quantize=list(op_types_to_quantize) if op_types_to_quantize else None,
                            extra_options=extra, calibration_cache_path=str(cache_path) if cache_path else None)
        except (ValueError, RuntimeError) as exc:
            hint = ""
            if cache_path is not None and reader is None and "not specified for param" in str(exc):
                # e.g. the cache came from a call that kept a ConvTranspose in float, so it has no range
                # for the 1x1 conv that replaces it here: the repair loop makes its cache with none kept.
                hint = (f" (the calibration cache {cache_path} lacks that tensor's range: make the cache with"
                        " nodes_to_exclude empty, or delete it to calibrate again)")
            raise ExportError(f"INT8 quantisation of {src} failed: {exc}{hint}") from None
    moved = uint8_movement_in_nhwc(dst, nodes_to_exclude) if cpu else []
    if not cpu:
        dedicate_readers(dst)
        distinct_q_axes(dst)
    check_loads(dst)
    summary = qdq_summary(dst)
    if cpu and summary["int8_activation_zero_points"]:
        raise ExportError(expected("uint8 activation zero points (CPU form)",
                                   f"{summary['int8_activation_zero_points']} int8"))
    if cpu and summary["weight_peak"] > INT8_EXACT_PEAK:
        raise ExportError(expected(f"CPU-form weights within +-{INT8_EXACT_PEAK} (7 bits)", summary["weight_peak"]))
    if not cpu and summary["nonzero_zero_points"]:
        raise ExportError(expected("every Q/DQ zero point 0", f"{summary['nonzero_zero_points']} non-zero"))
    return Int8Result(Path(dst), method, sorted(nodes_to_exclude),
                      list(op_types_to_quantize) if op_types_to_quantize else None, summary, for_speed, form,
                      stems, up_convs, moved)


def quantize_int8_cpu(src: str | os.PathLike[str], dst: str | os.PathLike[str], reader: Any | None,
                      **options: Any) -> Int8Result:
    """The ONNX Runtime CPU form (``int8_cpu.onnx``): :func:`quantize_int8` with ``form="cpu"``."""
    return quantize_int8(src, dst, reader, form="cpu", **options)


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
    act_types: dict[str, int] = {}  # zero point dtype of activation (non-initializer) Q/DQ
    for n in q + dq:
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            nonzero += int(np.count_nonzero(zp))
            if n.input[0] not in inits:
                act_types[str(zp.dtype)] = act_types.get(str(zp.dtype), 0) + 1
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
            "activation_zero_point_types": dict(sorted(act_types.items())),
            "int8_activation_zero_points": act_types.get("int8", 0), "float_compute_nodes": float_compute,
            "weight_peak": int8_weight_peak(path)}


def dump_info(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2, sort_keys=True)
