"""`edge-runtime export <step>`: onnx, check, quantize, validate, build, bundle, verify, reference.

Each step is a function in its own module (file in, file out); this module parses options, wires
steps together and turns failures into exit codes: 0 ok, 1 a refused input or a failed gate (the
message names what was expected and found), 2 bad usage (argparse).

``reference NAME|all`` runs the whole flow on a shipped reference bundle (edge_runtime/models/NAME):
check -> FP16 -> INT8 in two forms calibrated on the same phantom frames of the model's modality
(int8.onnx: symmetric Q/DQ that TensorRT and every ONNX Runtime provider run; int8_cpu.onnx: uint8
asymmetric activations for ONNX Runtime's CPU provider only, see export/quantize.py) -> accuracy gate on
held-out phantoms (seed ranges disjoint from training and from each other; every candidate gated, each
INT8 file repaired on its own with --repair) -> bundle rewritten in place with fp16.onnx, int8.onnx,
int8_cpu.onnx, calibration.json, validation.json and per-artefact metrics and targets.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.errors import AccuracyGateError, ConfigError, EdgeRuntimeError, ExportError, expected

MODELS_DIR = Path(__file__).resolve().parents[1] / "edge_runtime" / "models"
SMALL_SET = 50  # held-out frames below which `export validate` says its verdict is noisy
METRIC_KEYS = ("ap50", "sensitivity", "fppi", "psnr_db", "ssim", "dice", "frames")
# Candidate label of each INT8 form in the gate (validation.json) -> form (export.quantize.FORMS).
INT8_LABELS = {"int8": "tensorrt", "int8_cpu": "cpu"}


def _say(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _shape(text: str) -> list[int]:
    try:
        return [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise ConfigError(expected("a shape like 1x1x256x256", text)) from None


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _device(name: str | None) -> Any:
    if not name:
        return None
    from edge_runtime.devices import load_config

    return load_config(name)


def _manifest(args: argparse.Namespace) -> dict[str, Any]:
    """The model description from --bundle DIR (verified) or --manifest FILE."""
    if getattr(args, "bundle", None):
        from edge_runtime.bundle import Bundle

        return dict(Bundle.load(args.bundle).manifest)
    if getattr(args, "manifest", None):
        m = _read_json(args.manifest, "--manifest")
        need = ("task", "modality", "inputs", "outputs", "preprocess", "postprocess")
        if not isinstance(m, dict) or any(k not in m for k in need):
            raise ConfigError(f"--manifest {args.manifest}: " + expected(
                f"a JSON object with {list(need)} (docs/BUNDLE.md)",
                sorted(m) if isinstance(m, dict) else type(m).__name__))
        return dict(m)
    raise ConfigError(expected("--bundle DIR or --manifest FILE (the model's modality, pre/post-processing)",
                               "neither"))


# -- step: onnx ------------------------------------------------------------------------------
def cmd_onnx(args: argparse.Namespace) -> int:
    import numpy as np

    try:
        import torch
    except ImportError:
        raise ConfigError("'export onnx' needs PyTorch: the train extra (pip install torch==2.13.0, then "
                          "pip install -e '.[train]')") from None

    from .onnx_export import export_onnx

    mod_name, _, attr = args.module.partition(":")
    if os.getcwd() not in sys.path:  # a module of the user's own folder, as `python -m` finds it
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), attr or "build_model")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(expected("--module package.module:callable returning a torch.nn.Module", args.module)
                          + f" ({exc})") from None
    module = factory()
    if args.weights:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        try:
            module.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError, ValueError) as exc:  # another model's weights, a file not of weights
            raise ConfigError(expected(f"--weights for the module {args.module} builds",
                                       str(exc).splitlines()[0][:300])) from None
    rng = np.random.default_rng(0)
    samples = [torch.from_numpy(rng.random(_shape(s), dtype=np.float32)) for s in [args.input_shape, *args.extra_shape]]
    inputs = _csv(args.input_names)
    dynamic: dict[str, dict[int, str]] = {}
    for spec in args.dynamic:  # image:2=H,3=W
        name, _, dims = spec.partition(":")
        try:
            dynamic[name] = {int(k): v for k, v in (d.split("=") for d in _csv(dims))}
        except ValueError:
            raise ConfigError(expected("--dynamic NAME:AXIS=LABEL[,AXIS=LABEL], e.g. image:2=H,3=W", spec)) from None
        if name not in inputs and name not in _csv(args.output_names):
            raise ConfigError(expected(f"--dynamic naming an input {inputs} or output", name))
    out = export_onnx(module, samples[0], args.out, input_names=inputs,
                      output_names=_csv(args.output_names), dynamic_axes=dynamic, opset=args.opset,
                      extra_inputs=samples[1:], rtol=args.rtol, atol=args.atol)
    print(f"wrote {out} (ONNX Runtime matches PyTorch within rtol {args.rtol:g}, atol {args.atol:g})")
    return 0


# -- step: check -----------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from .lint import check_model, parse_profile

    report = check_model(args.model, profile=parse_profile(args.profile) if args.profile else None,
                         device=_device(args.device), dla=args.dla)
    print(report.to_json() if args.json else report.table())
    return 0 if report.ok else 1


# -- step: quantize --------------------------------------------------------------------------
def _is_phantom(spec: str) -> bool:
    return spec == "phantom" or spec.startswith("phantom:")  # a folder named phantom_x is a folder


def _validation_set(manifest: dict[str, Any], frames: int, source: str = "phantom", *, reference: str | None = None,
                    labels: str | None = None, opts: dict[str, Any] | None = None,
                    flags: Mapping[str, str] | None = None) -> Any:
    """Held-out frames with ground truth: phantoms drawn like the model's training data, or the user's
    own (``source`` a path) with clean ``reference`` frames, label maps or COCO ``labels``
    (export/ground_truth.py); ``flags``: the CLI's names of source / reference / labels."""
    from edge_runtime.preprocess import Preprocessor
    from edge_runtime.sources import bits_hint, source_kind

    from .calibration import VALIDATION_SEED0, _unnamed, describe, frames_from, governance_problems
    from .ground_truth import FLAGS, labelled_frames
    from .validate import EvalSet

    flags = flags or FLAGS
    give = {"enhancement": f"{flags['reference']} CLEAN", "segmentation": f"{flags['reference']} MASKS",
            "detection": f"{flags['labels']} COCO.json"}[manifest["task"]]  # the ground truth of one's own frames
    phantom = _is_phantom(source)
    if phantom:
        if reference or labels:
            raise ConfigError(expected(f"{flags['reference']} / {flags['labels']} with held-out frames of your own "
                                       f"({flags['source']} PATH)", "phantom frames, which carry their own ground truth"))
        try:
            items = list(frames_from(source, manifest, frames, seed0=VALIDATION_SEED0, role="validation"))
        except ExportError as exc:  # e.g. an MR model: the phantoms make US and X-ray frames only
            raise ExportError(f"validation frames ({flags['source']} {source}): {exc}; give held-out frames of your "
                              f"own ({flags['source']} PATH with {give})") from None
        label = describe(source, manifest, len(items), VALIDATION_SEED0)
    else:
        items = labelled_frames(source, manifest, frames, reference=reference, labels=labels, flags=flags,
                                **(opts or {}))
        # by kind, never by path: the label goes into validation.json and the bundle's manifest, and
        # file and folder names can identify patients (the set is identified by its sha256)
        truth = {"enhancement": f"clean references {_unnamed(str(reference))}",
                 "segmentation": f"label maps {_unnamed(str(reference))}",
                 "detection": "COCO boxes"}[manifest["task"]]
        label = f"your frames {_unnamed(source)}, {len(items)} frames, {truth}"
    problems = governance_problems(items, manifest, Preprocessor.from_manifest(manifest).invert_monochrome1)
    if problems:
        # said before pre-processing would refuse the first frame as if the user's data were wrong
        hint = ("; the phantom generators make 8-bit ultrasound and 12-bit X-ray frames only: validate this model "
                f"on held-out frames of your own ({flags['source']} PATH with {give})") if phantom else ""
        if not phantom and manifest.get("bits_stored") and "bits_stored" not in (opts or {}):
            # a COCO folder is read as images (_val_opts); DICOM states its own depth and refuses the option
            kind = "images" if labels else source_kind(source)
            hint = next((h for f in items if (h := bits_hint(kind, f, [int(manifest["bits_stored"])],
                                                           flags.get("bits", "--bits-stored")))), hint)
        raise ExportError(f"validation frames from {label if phantom else flags['source']} do not match model "
                          f"{manifest.get('name')!r}: " + "; ".join(problems) + hint)
    return EvalSet.build(manifest, items, source=label)


def _calibration_set(manifest: dict[str, Any], source: str, frames: int, min_frames: int, exclude: Sequence[str],
                     progress: bool, source_opts: dict[str, Any] | None = None) -> Any:
    from . import calibration as C

    items = C.frames_from(source, manifest, frames, seed0=C.CALIBRATION_SEED0, **(source_opts or {}))
    label = C.describe(source, manifest, frames, C.CALIBRATION_SEED0)
    try:
        return C.build(items, manifest, source=label, min_frames=min_frames, exclude=exclude, progress=progress)
    except ExportError as exc:  # the options that answer it (C.build names none: it is an API too)
        why = str(exc)
        answers = {"calibration frames, found": "--calib-frames N reads more, --min-frames N lowers the minimum",
                   "bits_stored": "--calib-bits N states a folder's or video's bit depth",
                   "modality in": "--calib-modality M states a folder's or video's modality"}
        hints = [h for cue, h in answers.items()
                 if cue in why and (cue.startswith("calibration") or not _is_phantom(source))]
        raise ExportError(why + "".join(f"; {h}" for h in hints)) from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from .lint import refuse_external_data
    from .quantize import FORM_TARGETS, quantize_int8, stamp_source, to_fp16

    if not Path(args.model).is_file():
        raise ConfigError(expected("an existing ONNX model to quantise", args.model))
    refuse_external_data(args.model, "the model to quantise")
    written = [Path(args.out), *([Path(args.record)] if args.record else [])]
    inside = [str(w) for w in written if _in_bundle(w)]
    if inside:  # it overwrote a bundle's int8.onnx and calibration.json, and the bundle no longer verified
        raise ConfigError(expected("--out (and --record) outside a bundle (bundle the result with `export bundle`)",
                                   inside))
    for w in written:  # folders made now: a missing one failed only after the calibration
        w.parent.mkdir(parents=True, exist_ok=True)
    if args.precision == "fp16":
        out = to_fp16(args.model, args.out, op_block_list=_csv(args.keep_op_types) or None,
                      node_block_list=_csv(args.exclude_nodes))
        stamp_source(out, args.model)
        import onnx

        graph = onnx.load(str(out), load_external_data=False).graph
        io = sorted({_dtype(v) for v in [*graph.input, *graph.output] if v.name not in {i.name for i in graph.initializer}})
        print(f"wrote {out} (FP16 inside, inputs/outputs {'/'.join(io)} as in the FP32 model; loads in ONNX Runtime CPU)")
        return 0
    manifest = _manifest(args)
    val = _validation_set(manifest, args.val_frames, **_val_opts(args, manifest, "val_"))
    cal = _calibration_set(manifest, args.calib, args.calib_frames, args.min_frames, val.exclude_hashes,
                           not args.no_progress, _source_opts(args, manifest))
    method = calibration_method(manifest, args.method)
    res = quantize_int8(args.model, args.out, cal.reader(_bar(len(cal), "calibrate", not args.no_progress)),
                        method=method, nodes_to_exclude=_csv(args.exclude_nodes),
                        op_types_to_quantize=_csv(args.op_types) or None, form=args.form)
    stamp_source(res.path, args.model, cal.sha256)
    record = cal.record(method=method, min_frames=args.min_frames, validation_sha256=_set_sha(val))
    Path(args.record or Path(args.out).with_name("calibration.json")).write_text(json.dumps(record, indent=2) + "\n")
    zp = "zero points all 0" if args.form == "tensorrt" else \
        f"activation zero points {res.summary['activation_zero_point_types']} (uint8 asymmetric)"
    print(f"wrote {res.path} ({args.form} form, for {FORM_TARGETS[args.form]}): {res.summary['quantize_linear']} "
          f"Q / {res.summary['dequantize_linear']} DQ, {res.summary['per_channel_weights']} per-channel weights, "
          f"{zp}; calibration {len(cal)} frames sha256 {cal.sha256[:16]}...")
    return 0


def _source_opts(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    """Source options of the calibration frames (--calib, --calib-modality, --calib-bits)."""
    return _frame_opts(str(args.calib), args.calib_modality, args.calib_bits, ("--calib-modality", "--calib-bits"),
                       manifest, "calibration")


def _frame_opts(spec: str, modality: str | None, bits: int | None, flags: tuple[str, str],
                manifest: Mapping[str, Any], role: str, kind: str | None = None) -> dict[str, Any]:
    """What a folder or video cannot say about itself (edge_runtime.sources.stated_options); for them
    the modality must be stated here (a default would make the governance check pass anything).
    ``kind``: the source's kind when known (a COCO image folder may hold its images in subfolders)."""
    from edge_runtime.sources import source_kind, stated_options

    kind = kind or ("phantom" if _is_phantom(spec) else source_kind(spec))
    given = stated_options(kind, modality, bits, flags)
    if kind in ("phantom", "dicom"):
        return given
    if "modality" not in given:
        raise ConfigError(expected(f"{flags[0]} for {kind} {role} frames (the files do not say what "
                                   f"they show; the model takes {manifest.get('modality')})", "none"))
    if (manifest.get("preprocess") or {}).get("color", "gray") == "gray":
        given["gray"] = True  # what the runtime's pre-processing makes of colour frames for a grey model
    return given


def _val_opts(args: argparse.Namespace, manifest: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """_validation_set's keywords from validate's --source / --reference / --labels / --modality /
    --bits-stored, or (``prefix`` "val_") quantize's --val-source / --val-reference / ... / --val-bits."""
    a = {k: getattr(args, prefix + k, None) for k in ("source", "reference", "labels", "modality", "bits")}
    dash = prefix.replace("_", "-")
    names = ("--val-modality", "--val-bits") if prefix else ("--modality", "--bits-stored")
    source = str(a["source"])
    # a COCO file names images in the folder (or its subfolders): read them as images whatever else is there
    kind = "images" if a["labels"] and not _is_phantom(source) else None
    opts = _frame_opts(source, a["modality"], a["bits"], names, manifest, "validation", kind)
    return {"source": source, "reference": a["reference"], "labels": a["labels"], "opts": opts,
            "flags": {**{k: f"--{dash}{k}" for k in ("source", "reference", "labels")}, "bits": names[1]}}


def _in_bundle(path: Path) -> bool:
    """``path`` lies in a bundle directory: one whose manifest.json lists hashed files (a model manifest
    given with --manifest does not)."""
    from edge_runtime.bundle import MANIFEST

    for d in path.resolve().parents:
        try:
            data = json.loads((d / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("files"), dict):
            return True
    return False


def _check_calibration_record(rec: Any, manifest: Mapping[str, Any]) -> None:
    """A calibration record made for this model: its name, and modalities / bits_stored within the
    manifest's (another model's record went into a bundle and the manifest claimed its calibration)."""
    if not isinstance(rec, dict):
        raise ConfigError(expected("--calibration: a calibration.json object", type(rec).__name__))
    if rec.get("model") is not None and rec.get("model") != manifest.get("name"):
        raise ConfigError(expected(f"--calibration made for {manifest.get('name')!r}", f"one for {rec.get('model')!r}"))
    mods = {str(m) for m in manifest.get("modality") or []}
    if mods and not {str(m) for m in rec.get("modality") or []} <= mods:
        raise ConfigError(expected(f"--calibration frames of modality in {sorted(mods)}", rec.get("modality")))
    bits = manifest.get("bits_stored")
    if bits is not None and rec.get("bits_stored") and set(rec["bits_stored"]) != {bits}:
        raise ConfigError(expected(f"--calibration frames of bits_stored {bits}", rec.get("bits_stored")))


def _set_sha(evalset: Any) -> str:
    from .calibration import set_sha256

    return set_sha256(evalset.frame_hashes)


def _bar(total: int, desc: str, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False)


# -- step: validate --------------------------------------------------------------------------
def cmd_validate(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import sha256_file

    from . import validate as V
    from .lint import refuse_external_data
    from .quantize import stamp_source

    manifest = _manifest(args)
    fp32 = args.fp32 or (str(Path(args.bundle) / "fp32.onnx") if args.bundle else None)
    if not fp32:
        raise ConfigError(expected("--fp32 MODEL (or --bundle DIR holding fp32.onnx)", "none"))
    refuse_external_data(fp32, "--fp32")
    cands = {}
    for c in args.candidate:
        precision, _, path = c.partition("=")
        if not path:
            raise ConfigError(expected("--candidate LABEL=PATH, e.g. int8=int8.onnx or int8_cpu=int8_cpu.onnx", c))
        cands[precision] = path
    if not cands and args.bundle:
        cands = _bundle_candidates(args.bundle)
    if not cands:
        raise ConfigError(expected("a candidate to validate (--candidate LABEL=PATH, or --bundle DIR with FP16/INT8 "
                                   "artefacts)", "none"))
    # where --repair writes each INT8 candidate; never inside a bundle (any directory with a manifest):
    # the rewritten file would no longer match it
    targets = {label: Path(args.repaired_out or cands[label]) for label in INT8_LABELS if label in cands}
    if args.repair:
        inside = [str(t) for t in targets.values() if _in_bundle(t)]
        if inside:
            raise ConfigError(expected("--repaired-out PATH outside the bundle (bundle a repaired file with "
                                       "`export bundle`, or use `export reference --repair`)", inside))
    V.check_provenance(fp32, cands)  # before the work: another model's file is refused in any case
    for name in ("report", "repaired_out"):  # their folders made now: a missing one failed after the work
        if getattr(args, name, None):
            Path(getattr(args, name)).parent.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress
    evalset = _validation_set(manifest, args.frames, **_val_opts(args, manifest))
    ref = V.reference(fp32, evalset, threads=args.threads, progress=show)
    report = V.validate(manifest, fp32, cands, evalset, threads=args.threads, progress=show, ref=ref)
    failing = [label for label in INT8_LABELS if label in cands and not report.candidate(label).passed]
    if args.repair and failing:
        if not args.calib:
            raise ConfigError(expected("--calib SOURCE for --repair (it re-quantises)", "none"))
        if args.repaired_out and len(failing) > 1:
            raise ConfigError(expected("one failing INT8 candidate for --repaired-out", failing))
        cal = _calibration_set(manifest, args.calib, args.calib_frames, args.min_frames, evalset.exclude_hashes, show,
                               _source_opts(args, manifest))
        method, max_float = calibration_method(manifest, args.method), repair_limit(manifest, args.max_float)
        with tempfile.TemporaryDirectory(prefix="edge-repair-") as tmp:
            for label in failing:
                q, nodes = _int8_factory(fp32, cal, method, Path(tmp), show, INT8_LABELS[label])
                rr = V.repair_int8(q, nodes, fp32, evalset, ref, report.tolerances, tmp, max_float=max_float,
                                   threads=args.threads, progress=show, label=label)
                out = targets[label]
                rr.report.file = out.name  # never the repair's temporary file (deleted with its folder)
                if rr.report.passed:
                    shutil.copyfile(rr.path, out)
                    stamp_source(out, fp32, cal.sha256)
                    # the verdict is matched to the file by sha256 (export bundle, the runtime): the stamp is
                    # metadata_props only, not the graph the gate ran, so the verdict holds for these bytes
                    rr.report.sha256 = sha256_file(out)
                    # what it was calibrated on, for `export bundle --calibration` (as quantize writes one)
                    record = cal.record(method=method, min_frames=args.min_frames, validation_sha256=_set_sha(evalset))
                    rec_path = out.with_name(f"{out.stem}.calibration.json")
                    rec_path.write_text(json.dumps(record, indent=2) + "\n")
                    _say(f"repaired {label} -> {out}; its calibration record -> {rec_path}")
                else:
                    _say(f"repair of {label} did not pass the gate: {out} left as it was")
                report.replace(label, rr.report, rr.to_dict())
    if args.report:
        report.write(args.report)
    print(report.text())
    if report.frames < SMALL_SET:
        _say(f"note: {report.frames} held-out frames; on fewer than {SMALL_SET} one frame can flip a verdict")
    report.raise_if_failed(with_report=False)
    return 0


def _bundle_candidates(bundle_dir: str | Path) -> dict[str, str]:
    """The gate's candidates in a bundle: fp16, int8 (int8.onnx) and int8_cpu (the onnxruntime-cpu form)."""
    from edge_runtime.bundle import Bundle

    b = Bundle.load(bundle_dir)
    out = {}
    for a in b.artifacts:
        if a.kind == "onnx" and a.precision != "fp32":
            label = "int8_cpu" if a.precision == "int8" and a.targets == ("onnxruntime-cpu",) else a.precision
            out[label] = str(b.file(a.file))
    return out


def _int8_factory(fp32: str | Path, cal: Any, method: str, work: Path, progress: bool, form: str = "tensorrt"
                  ) -> tuple[Callable[[Sequence[str], Path], Any], list[str]]:
    """quantize(nodes_to_exclude, out) in ``form`` over one pre-processed graph (shared by the forms in
    ``work``) and one cached calibration per form (same frames; the forms' ranges differ)."""
    from .quantize import preprocess, quantizable_nodes, quantize_int8

    pre = work / "pre.onnx"
    if not pre.is_file():
        preprocess(fp32, pre)
    cache = work / f"ranges-{form}.json"

    def q(exclude: Sequence[str], out: Path) -> Any:
        reader = None if cache.is_file() else cal.reader(_bar(len(cal), f"calibrate ({method}, {form})", progress))
        return quantize_int8(pre, out, reader, method=method, nodes_to_exclude=exclude, cache=cache,
                             preprocessed=True, form=form)

    return q, quantizable_nodes(pre)


# -- step: build -----------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    try:
        trt_build = importlib.import_module("export.trt_build")
    except ImportError as exc:
        raise ExportError(f"engine build is not available in this install ({exc})") from None
    from .lint import parse_profile

    if (args.out is None) == (args.cache is None):
        raise ConfigError("export build: " + expected("one of --out FILE or --cache [DIR]",
                                                      "both" if args.out else "neither"))
    if args.cache is not None:
        return _build_into_cache(args, trt_build)
    dev = _device(args.device)
    profiles = {k: (v["min"], v["opt"], v["max"]) for k, v in parse_profile(args.profile).items()} \
        if args.profile else None
    dla = args.dla_core if args.dla_core is not None else None
    report = trt_build.build_engine(args.model, args.out, precision=args.precision,
                                    workspace_mb=args.workspace_mb or (getattr(dev, "trt_workspace_mb", None) or 1024),
                                    dla_core=dla, gpu_fallback=not args.no_gpu_fallback, profiles=profiles,
                                    timing_cache=args.timing_cache, version_compatible=args.version_compatible,
                                    hardware_compatible=args.hardware_compatible,
                                    device_kind=getattr(dev, "kind", None),
                                    compute_capability=getattr(dev, "compute_capability", None),
                                    device_index=args.gpu)
    print(f"wrote {args.out}: {report}")
    return 0


def _build_into_cache(args: argparse.Namespace, trt_build: Any) -> int:
    """Pre-build into the engine cache the engine a Runtime will look up for this bundle, precision and
    device (so TensorRT serves from the first frame; identical carts can share the cache directory)."""
    from edge_runtime.bundle import Bundle
    from edge_runtime.engine_cache import EngineCache
    from edge_runtime.runtime import choose_precision, engine_request, resolve_device

    given = [f"--{n.replace('_', '-')}" for n in ("dla_core", "profile", "no_gpu_fallback", "timing_cache")
             if getattr(args, n) is not None and getattr(args, n) is not False]  # --dla-core 0 counts
    if given:  # the runtime's lookup fixes these: another value builds an engine it never looks for
        raise ConfigError("export build --cache: " + expected(
            "no " + " / ".join(given) + " (DLA core, profile and timing cache follow the runtime's choice)",
            " ".join(given)))
    bundle = Bundle.load(args.model, verify=True)
    dev = resolve_device(args.device)
    precision = choose_precision(bundle, dev, args.precision, "tensorrt")
    req = engine_request(bundle, dev, precision)
    cache = EngineCache(args.cache or None)
    key = trt_build.engine_key_for(req.onnx_path, precision, dla_core=req.dla_core, profiles=req.profiles,
                                   version_compatible=args.version_compatible,
                                   hardware_compatible=args.hardware_compatible, device_index=args.gpu)
    path = cache.lookup(key)
    if path is None:
        path = trt_build.build_into_cache(cache, key, req.onnx_path,
                                          workspace_mb=args.workspace_mb or dev.trt_workspace_mb,
                                          device_kind=dev.kind, compute_capability=dev.compute_capability,
                                          progress=True, device_index=args.gpu)
        print(f"built {path} ({key.describe()})")
    else:
        print(f"already in the cache: {path} ({key.describe()})")
    return 0


# -- step: bundle / verify -------------------------------------------------------------------
def _read_json(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def _gate_record(report: dict[str, Any], derived: dict[str, Path], fp32: Path | None = None) -> dict[str, Any]:
    """manifest["validation"] from a validation.json, checked against the files being bundled: the FP32
    it judged against must be ``fp32`` (where the report records its sha256: reports since 2026-12-03),
    and each FP16/INT8 file must have a passing result in it (matched by sha256 where the report
    records it, else by file name). The runtime serves FP16/INT8 only when this record says passed."""
    from edge_runtime.bundle import gate_results, judged_fp32, sha256_file

    from .validate import REPORT_FORMAT

    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ConfigError("--validation: " + expected(f"a {REPORT_FORMAT} report", type(report).__name__ if
                                                      not isinstance(report, dict) else report.get("format")))
    judged = judged_fp32(report)
    if judged and fp32 is not None and judged != (mine := sha256_file(fp32)):
        raise ConfigError("--validation: " + expected(
            f"a report on this bundle's fp32 model (sha256 {mine[:12]}...)",
            f"one judged against fp32 sha256 {str(judged)[:12]}... (another model: validate this bundle's files)"))
    for name, path in derived.items():
        if not path.is_file():
            raise ConfigError(expected(f"{name}, listed in the manifest, in {path.parent} or given", "no such file"))
        digest = sha256_file(path)
        match = gate_results(report, name, digest)
        if not match:
            raise ConfigError("--validation: " + expected(
                f"a result for {name} (sha256 {digest[:12]}...)",
                [c.get("file") for c in report.get("candidates") or [] if isinstance(c, dict)]))
        if not all(c.get("passed") for c in match):
            raise AccuracyGateError(f"{name} failed the accuracy gate in the --validation report; bundle only "
                                    "candidates that passed (or re-export with --repair)")
    return {"file": "validation.json", "frames": report.get("frames"), "source": report.get("source"),
            "passed": bool(derived), "tolerances": report.get("tolerances")}


def cmd_bundle(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import Bundle, sha256_file

    from .bundle_write import named_as, staged, write_archive, write_bundle
    from .lint import refuse_external_data
    from .quantize import CALIBRATION_KEY, PROVENANCE_HINT, stamped_source

    manifest = _read_json(args.manifest, "--manifest")
    if not isinstance(manifest, dict):
        raise ConfigError("--manifest: " + expected("a JSON object", type(manifest).__name__))
    files = {"fp32.onnx": args.fp32, "fp16.onnx": args.fp16, "int8.onnx": args.int8,
             "int8_cpu.onnx": args.int8_cpu, "calibration.json": args.calibration, "validation.json": args.validation}
    missing = [f"{name}: {src}" for name, src in files.items() if src and not Path(src).is_file()]
    missing += [extra for extra in [*args.add, *args.engine] if not Path(extra).is_file()]
    if missing:
        raise ConfigError(expected("existing files to bundle", missing))
    for name, src in files.items():
        if src and name.endswith(".onnx"):
            refuse_external_data(src, _flag(name))
    out = Path(args.out)
    artifacts = {a["file"]: a for a in manifest.get("artifacts", []) if isinstance(a, dict)}
    listed = manifest.get("files")
    template_files: dict[str, Any] = listed if isinstance(listed, dict) else {}
    template = dict(artifacts)
    fp32_given = files["fp32.onnx"] or (out / "fp32.onnx")
    fp32_sha = sha256_file(fp32_given) if Path(fp32_given).is_file() else None
    for name, src in files.items():
        if src and name.endswith(".onnx"):  # a file given now: the template's record of an older one does not apply
            artifacts[name] = {"file": name, "kind": "onnx", "precision": name.split(".")[0].split("_")[0]} \
                | _targets(name)
            if name == "fp32.onnx":
                continue
            _check_int8_form(name, src)
            made_from = stamped_source(src)
            if not made_from and template_files.get(name) == sha256_file(src):
                # the template's own file (a shipped bundle's, written by `export reference`): its record says
                made_from = ((template.get(name) or {}).get("info") or {}).get("source_fp32_sha256")
            if made_from:  # the bundle's stale check compares it with fp32.onnx (edge_runtime.bundle)
                artifacts[name]["info"] = {"source_fp32_sha256": made_from}
                if fp32_sha and made_from != fp32_sha:  # said now, not as a stale staging folder after the copies
                    raise ConfigError(f"{_flag(name)}: " + expected(
                        f"a file made from this --fp32 (sha256 {fp32_sha[:12]}...)",
                        f"one made from fp32 sha256 {made_from[:12]}...") + f" ({PROVENANCE_HINT})")
    if args.archive:
        Path(args.archive).parent.mkdir(parents=True, exist_ok=True)
    # A template (a shipped manifest, say) describes files of its own bundle: those neither given now nor
    # already in --out are left out, instead of failing after the copies as "listed but not in files".
    absent = [f for f in artifacts if not files.get(f) and not (out / f).is_file()]
    if absent:
        _say(f"the --manifest template lists {', '.join(absent)}, neither given nor in --out: left out")
        artifacts = {f: a for f, a in artifacts.items() if f not in absent}
    # This bundle's own creation time and toolchain, not the template's (write_bundle stamps them).
    manifest = {k: v for k, v in manifest.items() if k not in ("created", "toolchain")}
    # as `export verify` does: an unknown pre/post key or tensors the model lacks fail now, not on a cart
    _check_processing(manifest, Path(files.get("fp32.onnx") or out / "fp32.onnx"))
    # Every FP16/INT8 file the bundle will list, given now or already in --out from the template.
    derived = {a["file"]: Path(files.get(a["file"]) or out / a["file"]) for a in artifacts.values()
               if a.get("kind") == "onnx" and a.get("precision") != "fp32"}
    # Only this call's report speaks for these files (a template's record may describe other ones).
    manifest.pop("validation", None)
    report = _read_json(args.validation, "--validation") if args.validation else None
    if report is not None:
        fp32 = files["fp32.onnx"] or (out / "fp32.onnx")
        manifest["validation"] = _gate_record(report, derived, Path(fp32) if Path(fp32).is_file() else None)
    elif derived:
        _say(f"no --validation report: the runtime will serve only FP32 from this bundle ({', '.join(derived)} "
             "stay unused until a passing report is bundled)")
    # Likewise the calibration record when another INT8 file is given now: the template's describes its own.
    new_int8 = any(files[n] and template_files.get(n) != sha256_file(files[n]) for n in ("int8.onnx", "int8_cpu.onnx"))
    if new_int8 and not args.calibration and manifest.pop("calibration", None):
        _say("the --manifest template's calibration record left out: it describes the template's INT8 file "
             "(give --calibration for the one bundled now)")
    if args.calibration:
        rec = _read_json(args.calibration, "--calibration")
        _check_calibration_record(rec, manifest)
        judged = set((report or {}).get("frame_sha256") or [])
        for name in ("int8.onnx", "int8_cpu.onnx"):  # each INT8 given: calibrated on the set the record names?
            made_on = stamped_source(files[name], CALIBRATION_KEY) if files[name] else None
            if made_on and made_on != rec.get("sha256"):
                raise ConfigError("--calibration: " + expected(
                    f"the record of the set {_flag(name)} was calibrated on (sha256 {made_on[:12]}...)",
                    f"one of set sha256 {str(rec.get('sha256'))[:12]}..."))
        shared = judged & set(rec.get("frame_sha256") or [])
        if shared:  # quantize checked overlap only with its own --val-source (phantoms by default)
            raise ConfigError("--calibration: " + expected(
                "calibration frames none of which the gate (--validation) judged by",
                f"{len(shared)} of its {len(rec.get('frame_sha256') or [])} frames among them"))
        manifest["calibration"] = {k: rec.get(k) for k in ("frames", "source", "sha256", "method", "min_frames")} \
            | {"file": "calibration.json"}

    def assemble(stage: Path) -> None:
        for name, src in files.items():
            if src and Path(src).resolve() != (stage / name).resolve():
                shutil.copyfile(src, stage / name)
        for extra in args.add:
            shutil.copyfile(extra, stage / Path(extra).name)
        for src in args.engine:  # an engine from a cache (with its sidecar): for one fixed target
            from edge_runtime.engine_cache import EngineCache

            engine = Path(src)
            cache = EngineCache(engine.parent)
            key = cache.read_key(engine)
            cache.verify(engine, key)  # the bytes its sidecar describes
            rel = f"engines/{engine.name}"
            (stage / "engines").mkdir(exist_ok=True)
            shutil.copyfile(engine, stage / rel)
            artifacts[rel] = {"file": rel, "kind": "engine", "precision": key.precision, "targets": ["tensorrt"],
                              "info": {"engine_key": key.to_dict()}}
        manifest["artifacts"] = list(artifacts.values())
        write_bundle(stage, manifest)

    # Assembled aside and swapped in whole: a refused bundle leaves --out as it was (or absent).
    if out.is_dir():
        with staged(out) as stage:
            assemble(stage)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.new-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            with named_as(stage, out):
                assemble(stage)
            os.rename(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    bundle = Bundle.load(out, verify=True)
    print(f"bundle {bundle.path}: {len(bundle.manifest['files'])} files, manifest sha256 {bundle.sha256}")
    if args.archive:
        print(f"archive {write_archive(out, args.archive)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import Bundle

    from .bundle_write import named_as, unpack_archive
    from .lint import refuse_external_data

    def check(b: Bundle) -> tuple[str, str, int]:
        for a in b.artifacts:
            if a.kind == "onnx":
                refuse_external_data(b.file(a.file), f"bundle {b.name!r}: {a.file}")
        _check_processing(b.manifest, b.file(b.artifact("fp32").file))
        return b.name, b.sha256, len(b.manifest["files"])

    failed = 0
    for target in args.bundles:
        p = Path(target)
        try:
            if p.is_file():
                with tempfile.TemporaryDirectory(prefix="edge-verify-") as tmp, named_as(Path(tmp), p):
                    name, sha, n = check(Bundle.load(unpack_archive(p, tmp)))  # errors name the archive
            else:
                name, sha, n = check(Bundle.load(p))
            print(f"OK {target}: {name}, {n} files verified, manifest sha256 {sha}")
        except EdgeRuntimeError as exc:
            failed += 1
            print(f"FAILED {target}: {exc}")
    return 1 if failed else 0


def _check_processing(manifest: dict[str, Any], fp32: Path | None = None) -> None:
    """The runtime's own pre/post-processing built from a manifest: unknown or bad keys fail here, not
    at the first frame on a cart; and with ``fp32``, the manifest's tensors against that model's graph."""
    from edge_runtime.postprocess import Postprocessor
    from edge_runtime.preprocess import Preprocessor

    pre = Preprocessor.from_manifest(manifest)
    post = Postprocessor.from_manifest(manifest, pre)
    if fp32 is not None and fp32.is_file():
        dims = _check_io(manifest, fp32, post)
        if pre.mode == "none" and post.tile is None and len(dims) == 4 and dims[2] and dims[3]:
            _say(f"note: the model's input is fixed at {dims[2]}x{dims[3]} and preprocess.resize mode is none: "
                 "frames of any other size will be refused (letterbox or stretch resize them)")


def _check_io(manifest: dict[str, Any], fp32: Path, post: Any) -> list[int | None]:
    """Input and output names, dtypes, ranks and fixed sizes as the FP32 graph has them, the outputs
    post-processing reads, and the detector's class count and stride where its output fixes them: a
    bundle naming input 'images' for a model's 'image', or 3 classes for a 2-class head, verified OK
    and then every frame was skipped on the cart. The model input's dims (None: dynamic)."""
    import onnx

    graph = onnx.load(str(fp32), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}

    def dims(v: Any) -> list[int | None]:
        return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in v.type.tensor_type.shape.dim]

    graph_inputs = [v for v in graph.input if v.name not in inits]
    if len(graph_inputs) != 1:  # a second input was listed as asked, then never fed: every frame skipped
        raise ConfigError(expected("a model with one image input (format 1 feeds one tensor a frame)",
                                   f"inputs {[v.name for v in graph_inputs]}"))
    tensors = {"inputs": {v.name: (dims(v), _dtype(v)) for v in graph_inputs},
               "outputs": {v.name: (dims(v), _dtype(v)) for v in graph.output}}
    for key, have in tensors.items():
        for t in manifest[key]:
            if t["name"] not in have:
                raise ConfigError(f"manifest {key} {t['name']!r}: " + expected(f"a name of the model's {key} {sorted(have)}",
                                                                               t["name"]))
            shape, (real, kind) = t.get("shape") or [], have[t["name"]]
            if real and (len(shape) != len(real) or any(isinstance(a, int) and b is not None and a != b
                                                        for a, b in zip(shape, real))):
                raise ConfigError(f"manifest {key} {t['name']!r}: " + expected(f"the model's shape {real} "
                                                                               "(None: any size)", shape))
            if t.get("dtype", kind) != kind:  # e.g. a float16 output: 12-bit levels do not fit its mantissa
                raise ConfigError(f"manifest {key} {t['name']!r}: " + expected(f"the model's dtype {kind}", t["dtype"]))
    (in_name, (in_dims, _)), = tensors["inputs"].items()
    missing = sorted({in_name} - {t["name"] for t in manifest["inputs"]})
    if missing:
        raise ConfigError(expected("the model's input in the manifest's inputs", f"{missing} missing"))
    spec = manifest.get("postprocess") or {}
    outs = {name: d for name, (d, _) in tensors["outputs"].items()}
    kind = str(spec.get("type"))
    read = list(post.centernet_outputs.values()) if kind == "centernet" else \
        [str(spec["output"])] if spec.get("output") is not None else []
    unknown = [n for n in read if n not in outs]
    if unknown or (not read and len(outs) != 1):  # every frame was skipped: "expected model output 'hm'"
        raise ConfigError(f"postprocess ({kind}): " + expected(
            f"output names among the model's outputs {sorted(outs)}" if unknown
            else "an 'output' naming one of the model's outputs", unknown or "none named"))
    names = list(getattr(post, "classes", None) or [])
    if kind == "yolov8" and names:
        real = outs[read[0]] if read else next(iter(outs.values()))
        fixed = [d for d in real[1:] if d is not None]
        if fixed and 4 + len(names) not in fixed:
            raise ConfigError(f"postprocess classes {names}: " + expected(
                f"a model output [1, 4 + {len(names)}, N] (YOLOv8 layout)", real))
    if kind == "centernet":
        heat = outs[post.centernet_outputs["heatmap"]]
        if names and len(heat) > 1 and heat[1] is not None and heat[1] != len(names):
            raise ConfigError(f"postprocess classes {names}: " + expected(
                f"a heatmap output of {len(names)} channel(s)", heat))
        sides = [(a, b) for a, b in zip(in_dims[2:], heat[2:]) if a and b]
        if len(sides) == 2 and any(b not in (a // post.stride, -(-a // post.stride)) for a, b in sides):
            # stride 8 on a stride-4 head gave no findings, stride 2 boxes in the wrong place (a side
            # not a multiple of the stride gives the heatmap the side rounded either way: 250 -> 63)
            raise ConfigError(f"postprocess.stride {post.stride}: " + expected(
                f"input / heatmap size, {[round(a / b, 2) for a, b in sides]}", post.stride))
    return in_dims


def _flag(file: str) -> str:
    """The `export bundle` option that gives a bundle file: int8_cpu.onnx -> --int8-cpu."""
    return "--" + file.split(".")[0].replace("_", "-")


def _dtype(value: Any) -> str:
    """An ONNX graph input's or output's element type as numpy names it (float32, float16, ...)."""
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _check_int8_form(name: str, src: str) -> None:
    """--int8 takes the TensorRT form (int8 activations), --int8-cpu the CPU form (uint8): the CPU form
    given as --int8 was bundled as a TensorRT artefact, which TensorRT refuses (asymmetric Q/DQ)."""
    from .quantize import qdq_summary

    forms = {"int8.onnx": ("int8", "the TensorRT form", "--int8"), "int8_cpu.onnx": ("uint8", "the CPU form", "--int8-cpu")}
    if name not in forms:
        return
    found = set(qdq_summary(src)["activation_zero_point_types"])
    want, form, flag = forms[name]
    if found and found != {want}:
        other = next((f"{w} activations, {fm}: give it as {fl}" for w, fm, fl in forms.values() if {w} == found),
                     f"{sorted(found)} activations")
        raise ConfigError(f"{flag}: " + expected(f"{form} ({want} activations)", other))


def _targets(file: str) -> dict[str, Any]:
    """The manifest ``targets`` of an INT8 file (docs/BUNDLE.md); other artefacts serve every backend."""
    from .quantize import FORM_FILES, FORM_TARGETS

    return {"targets": FORM_TARGETS[f]} if (f := next((k for k, v in FORM_FILES.items() if v == file), None)) \
        else {}


# -- reference: the whole flow on a shipped bundle --------------------------------------------
def _metric_summary(m: dict[str, Any], ms: float, emulated: bool = False) -> dict[str, Any]:
    out = {k: (round(float(m[k]), 5) if isinstance(m[k], float) else m[k]) for k in METRIC_KEYS if k in m}
    out["ms_per_frame_ort_cpu"] = round(ms, 3)
    if emulated:  # the export CPU's int8 kernels would saturate this file's weights: its ms is not its speed
        out["ort_cpu_int8_emulated"] = True
    return out


def failed_report_path(name: str) -> Path:
    """Where export_reference leaves the report of a failed gate (relative to the working directory)."""
    return Path("out") / "export" / f"{name}.validation.failed.json"


def calibration_method(manifest: Mapping[str, Any], requested: str | None = None) -> str:
    """The calibration method to quantise with: as asked, else the one the bundle was (or its recipe wants
    to be) quantised with: the manifest's ``calibration.method``, else ``training.calibration_method``
    (reference recipes), else minmax."""
    return str(requested or (manifest.get("calibration") or {}).get("method")
               or (manifest.get("training") or {}).get("calibration_method") or "minmax")


def repair_limit(manifest: Mapping[str, Any], requested: int | None = None) -> int | None:
    """Most nodes a repair may keep in float: as asked, else the recipe's ``training.repair_max_float``,
    else None (repair_int8's default, half of the quantisable nodes)."""
    if requested is not None:
        return requested
    value = (manifest.get("training") or {}).get("repair_max_float")
    return None if value is None else int(value)


def export_reference(bundle_dir: str | Path, *, method: str | None = None, calib_frames: int = 200,
                     val_frames: int = 200, repair: bool = False, max_float: int | None = None, threads: int = 2,
                     progress: bool = True) -> dict[str, Any]:
    """check -> fp16 -> int8 -> gate -> rewrite the bundle in place; returns step times and results.

    Raises AccuracyGateError (bundle untouched, the report written to out/export/NAME.validation.failed.json)
    when a candidate fails the gate (after repair when asked).
    """
    from edge_runtime.bundle import Bundle, sha256_file

    from . import validate as V
    from .bundle_write import staged, toolchain_versions, write_bundle
    from .lint import check_model
    from .quantize import FORM_FILES, Int8Result, to_fp16

    root = Path(bundle_dir)
    bundle = Bundle.load(root)
    manifest = dict(bundle.manifest)
    method = calibration_method(manifest, method)
    max_float = repair_limit(manifest, max_float)
    fp32 = bundle.file(bundle.artifact("fp32").file)
    fp32_sha = sha256_file(fp32)
    times: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        if progress:
            _say(f"[{bundle.name}] {name} ...")
        out = fn()
        times[name] = round(time.perf_counter() - t, 3)
        return out

    evalset = step("validation frames", lambda: _validation_set(manifest, val_frames))
    # Only the FP32 graph is linted for TensorRT: int8_cpu.onnx is ONNX Runtime CPU only (its uint8
    # asymmetric Q/DQ is a TensorRT error by design) and int8.onnx is built by quantize_int8's checks.
    lint = step("check", lambda: check_model(fp32, profile=evalset.profile()))
    if not lint.ok:
        raise ExportError(f"{fp32} fails the TensorRT lint:\n{lint.table()}")
    files = {label: FORM_FILES[form] for label, form in INT8_LABELS.items()}  # label -> file name
    with tempfile.TemporaryDirectory(prefix=f"edge-ref-{bundle.name}-") as tmp_s:
        tmp = Path(tmp_s)
        step("fp16", lambda: to_fp16(fp32, tmp / "fp16.onnx"))
        cal = step("calibration frames", lambda: _calibration_set(manifest, "phantom", calib_frames, 200,
                                                                  evalset.exclude_hashes, progress))
        factories = {label: _int8_factory(fp32, cal, method, tmp, progress, form) for label, form in INT8_LABELS.items()}
        res: dict[str, Int8Result] = {}
        for label, (q, _) in factories.items():
            out = tmp / files[label]
            res[label] = step(f"{label} (calibrate + quantize)", lambda q=q, out=out: q([], out))  # type: ignore[misc]
        ref = step("validate fp32", lambda: V.reference(fp32, evalset, threads=threads, progress=progress))
        report = step("validate candidates", lambda: V.validate(
            manifest, fp32, {"fp16": tmp / "fp16.onnx", **{k: tmp / f for k, f in files.items()}}, evalset,
            threads=threads, progress=progress, ref=ref))
        for label, (q, nodes) in factories.items():
            if not repair or report.candidate(label).passed:
                continue
            rr = step(f"repair {label}", lambda q=q, nodes=nodes, label=label: V.repair_int8(  # type: ignore[misc]
                q, nodes, fp32, evalset, ref, report.tolerances, tmp, max_float=max_float, threads=threads,
                progress=progress, label=label))
            res[label] = q(rr.nodes_in_float, tmp / files[label])  # its Int8Result (same options as rr's)
            shutil.copyfile(rr.path, tmp / files[label])  # and the very file the gate judged
            rr.report.file = files[label]
            report.replace(label, rr.report, rr.to_dict())
        if progress:
            _say(report.text())
        if not report.passed:
            failed = failed_report_path(bundle.name)
            failed.parent.mkdir(parents=True, exist_ok=True)
            report.write(failed)
            raise AccuracyGateError(f"accuracy gate failed for {bundle.name} "
                                    f"({', '.join(c.file for c in report.candidates if not c.passed)}); "
                                    f"bundle left unchanged; the report is in {failed.resolve()}:\n" + report.text())
        if sha256_file(fp32) != fp32_sha:
            raise ExportError(f"{fp32} changed while exporting (re-trained?); run `export reference` again")
        report.write(tmp / "validation.json")
        record = cal.record(method=method, validation_sha256=report.validation_set_sha256)
        (tmp / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
        new_files = {name: (tmp / name).read_bytes()
                     for name in ("fp16.onnx", *files.values(), "calibration.json", "validation.json")}
    fp16_rep = report.candidate("fp16")
    src = {"source_fp32_sha256": fp32_sha}
    old = {a["precision"]: a for a in manifest["artifacts"] if a.get("kind") == "onnx"}
    manifest["artifacts"] = [
        {**old.get("fp32", {}), "file": bundle.artifact("fp32").file, "kind": "onnx", "precision": "fp32",
         "metrics": _metric_summary(report.fp32, report.fp32_ms_per_frame)},
        {"file": "fp16.onnx", "kind": "onnx", "precision": "fp16",
         "metrics": _metric_summary(fp16_rep.metrics, fp16_rep.ms_per_frame),
         "info": {"converter": "onnxruntime.transformers.float16", "io_types": "float32", **src}},
    ] + [{"file": files[label], "kind": "onnx", "precision": "int8", **_targets(files[label]),
          "metrics": _metric_summary(report.candidate(label).metrics, report.candidate(label).ms_per_frame,
                                     report.candidate(label).emulated),
          "info": {**res[label].info(), **src}} for label in INT8_LABELS
         ] + [a for a in manifest["artifacts"] if a.get("kind") != "onnx"]
    manifest["calibration"] = {"file": "calibration.json", "frames": len(cal), "source": cal.source,
                               "sha256": cal.sha256, "method": method, "min_frames": 200}
    manifest["validation"] = {"file": "validation.json", "frames": report.frames, "source": report.source,
                              "passed": report.passed, "tolerances": report.tolerances}
    manifest["toolchain"] = {**(manifest.get("toolchain") or {}), **toolchain_versions()}
    manifest["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with staged(root) as stage:  # swapped in whole: a crash or a reader meanwhile never sees a mix
        for name, data in new_files.items():
            (stage / name).write_bytes(data)
        write_bundle(stage, manifest)
    new = Bundle.load(root)
    return {"model": bundle.name, "bundle_sha256": new.sha256, "times_s": times, "passed": report.passed,
            "report": report.text(), "fp32": report.fp32, "fp16": fp16_rep.metrics,
            **{label: report.candidate(label).metrics for label in INT8_LABELS},
            "nodes_in_float": {files[label]: r.nodes_excluded for label, r in res.items()},
            "repair": report.repair, "repairs": report.repairs}


def reference_bundles(names: Sequence[str], models_dir: Path = MODELS_DIR) -> list[Path]:
    if list(names) == ["all"]:
        found = sorted(p.parent for p in models_dir.glob("*/manifest.json"))
        if not found:
            raise ExportError(expected(f"reference bundles in {models_dir}", "none"))
        return found
    return [models_dir / n for n in names]


def cmd_reference(args: argparse.Namespace) -> int:
    failed = 0
    for d in reference_bundles(args.names, Path(args.models_dir)):
        try:
            out = export_reference(d, method=args.method, calib_frames=args.calib_frames, val_frames=args.val_frames,
                                   repair=args.repair, max_float=args.max_float, threads=args.threads,
                                   progress=not args.no_progress)
            print(out["report"])
            print(json.dumps({k: out[k] for k in ("model", "passed", "times_s", "nodes_in_float")}))
        except AccuracyGateError as exc:
            failed += 1
            print(f"{d.name}: {exc}", file=sys.stderr)
    return 1 if failed else 0


# -- argparse --------------------------------------------------------------------------------
def _calib_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="phantom", help="calibration frames: phantom, phantom:us|xr, or a folder / "
                   "video / DICOM series (default phantom = the model's modality)")
    p.add_argument("--calib-frames", type=int, default=200, help="frames to take (default 200)")
    p.add_argument("--min-frames", type=int, default=200, help="refuse fewer calibration frames (default 200)")
    p.add_argument("--calib-modality", help="modality of folder / video frames (e.g. US); DICOM says its own")
    p.add_argument("--calib-bits", type=int, help="bits stored of folder frames (e.g. 12 in 16-bit PNGs)")
    p.add_argument("--method", choices=("minmax", "entropy", "percentile"),
                   help="calibration method (default: the manifest's own, from its calibration record or recipe, "
                   "else minmax)")


def _truth_opts(p: argparse.ArgumentParser, prefix: str) -> None:
    src = f"--{prefix}source"
    p.add_argument(f"--{prefix}reference", help=f"enhancement: the clean frames paired in order with {src}'s "
                   "(a folder with the same file names, a DICOM or a video); segmentation: label-map images "
                   "paired the same way (value k = class k)")
    p.add_argument(f"--{prefix}labels", help=f"detection: COCO JSON of boxes over the {src} image folder "
                   "(file_name relative to it; categories named as the model's classes)")
    p.add_argument(f"--{prefix}modality", help="modality of folder / video frames (e.g. US, DX); DICOM says its own")
    p.add_argument(f"--{prefix}bits" if prefix else "--bits-stored", dest=f"{prefix.replace('-', '_')}bits", type=int,
                   help="bits stored of folder frames (e.g. 12 in 16-bit PNGs)")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", required=True)

    p = sub.add_parser("onnx", help="PyTorch module -> ONNX, refused unless ONNX Runtime matches PyTorch")
    p.add_argument("--module", required=True, help="package.module:callable returning the torch.nn.Module (found "
                   "on sys.path and in the working directory)")
    p.add_argument("--weights", help="state_dict file (torch.save), loaded with weights_only=True")
    p.add_argument("--input-shape", required=True, help="sample input shape, e.g. 1x1x256x256")
    p.add_argument("--extra-shape", action="append", default=[], help="another sample shape (dynamic axes)")
    p.add_argument("--input-names", default="image")
    p.add_argument("--output-names", required=True, help="comma-separated")
    p.add_argument("--dynamic", action="append", default=[], help="NAME:AXIS=DIM[,AXIS=DIM], e.g. image:2=H,3=W")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_onnx)

    p = sub.add_parser("check", help="onnx.checker + shape inference + TensorRT lint (exit 1 on errors)")
    p.add_argument("model")
    p.add_argument("--profile", help="input:MINxx..,OPTxx..,MAXxx.. (';' between inputs)")
    p.add_argument("--device", help="device config name or YAML path (DLA cores)")
    p.add_argument("--dla", type=int, help="DLA cores, overriding the device config")
    p.add_argument("--json", action="store_true", help="JSON instead of the table")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("quantize", help="FP16 or INT8 (symmetric Q/DQ, calibrated) variant of an FP32 ONNX")
    p.add_argument("model")
    p.add_argument("--precision", choices=("fp16", "int8"), required=True)
    p.add_argument("--form", choices=("tensorrt", "cpu"), default="tensorrt",
                   help="int8: tensorrt = symmetric Q/DQ that runs everywhere (int8.onnx, default); cpu = uint8 "
                   "asymmetric activations for ONNX Runtime's CPU provider only (int8_cpu.onnx, not for TensorRT)")
    p.add_argument("--out", required=True)
    p.add_argument("--bundle", help="bundle whose manifest describes the model (int8)")
    p.add_argument("--manifest", help="manifest.json describing the model (int8)")
    _calib_opts(p)
    p.add_argument("--val-source", default="phantom", help="validation set whose frames calibration must avoid "
                   "(as `export validate --source`; with --val-reference / --val-labels / --val-modality / --val-bits)")
    p.add_argument("--val-frames", type=int, default=200)
    _truth_opts(p, "val-")
    p.add_argument("--exclude-nodes", help="comma-separated node names kept in float")
    p.add_argument("--op-types", help="int8: only these op types quantised (comma-separated)")
    p.add_argument("--keep-op-types", help="fp16: op types kept in float32 (comma-separated)")
    p.add_argument("--record", help="where calibration.json goes (default next to --out)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("validate", help="accuracy gate: FP32 vs candidates on held-out frames (exit 1 on failure)")
    p.add_argument("--bundle", help="bundle directory or reference model name: its manifest, fp32.onnx and (without "
                   "--candidate) its FP16 / INT8 files")
    p.add_argument("--manifest", help="manifest.json describing the model (without --bundle)")
    p.add_argument("--fp32", help="the FP32 ONNX the candidates are judged against (default: the bundle's)")
    p.add_argument("--candidate", action="append", default=[],
                   help="LABEL=PATH (.onnx or engine): fp16, int8 (int8.onnx), int8_cpu (int8_cpu.onnx); "
                   "default with --bundle: the bundle's fp16 and INT8 files")
    p.add_argument("--frames", type=int, default=200, help="held-out frames to judge on (default 200; from --source "
                   "the first N; fewer than 50 make a noisy verdict)")
    p.add_argument("--source", default="phantom", help="held-out frames: phantom (default; drawn like the "
                   "training data, ground truth included), or a folder / DICOM / video of your own with "
                   "--reference (enhancement, segmentation) or --labels (detection)")
    _truth_opts(p, "")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--repair", action="store_true",
                   help="keep sensitive nodes in float until the gate passes (each failing INT8 candidate; it "
                   "re-quantises with the --calib* / --method options below, which only --repair uses)")
    p.add_argument("--max-float", type=int, help="repair: most nodes kept in float (default: the manifest's "
                   "training.repair_max_float, else half)")
    p.add_argument("--repaired-out", help="repair: where the repaired INT8 goes (default over the candidate file; "
                   "needed with --bundle: a bundle's files are never rewritten); its calibration record goes next "
                   "to it (NAME.calibration.json)")
    _calib_opts(p)
    p.add_argument("--report", help="write validation.json here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("build", help="TensorRT engine (export/trt_build.py) on the machine it will run on")
    p.add_argument("model", help="an ONNX file (with --out) or a bundle directory (with --cache)")
    p.add_argument("--out", help="the engine file to write")
    p.add_argument("--cache", nargs="?", const="",
                   help="build the engine the runtime looks up for this bundle into the engine cache "
                        "(DIR, default $EDGE_RUNTIME_CACHE or ~/.cache/edge-runtime/engines)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True)
    p.add_argument("--device", help="device config (default: detected; with --cache, the runtime's device)")
    p.add_argument("--dla-core", type=int)
    p.add_argument("--gpu", type=int, default=0, metavar="N",
                   help="CUDA device to build on; the engine runs on that GPU model only (default 0)")
    p.add_argument("--no-gpu-fallback", action="store_true", help="with --dla-core: fail where DLA cannot run a layer")
    p.add_argument("--workspace-mb", type=int)
    p.add_argument("--profile")
    p.add_argument("--timing-cache")
    p.add_argument("--version-compatible", action="store_true",
                   help="an engine later TensorRT releases of the same major version can run (lean runtime)")
    p.add_argument("--hardware-compatible", action="store_true",
                   help="an engine for any Ampere or later discrete GPU (not on Jetson)")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser("bundle", help="assemble a bundle directory (and optionally a .tar) from artefacts")
    p.add_argument("--manifest", required=True, help="manifest.json with name, task, I/O, pre/post, ...")
    p.add_argument("--out", required=True)
    for name in ("fp32", "fp16", "int8", "calibration", "validation"):
        p.add_argument(f"--{name}")
    p.add_argument("--int8-cpu", help="int8_cpu.onnx (ONNX Runtime CPU form; manifest targets onnxruntime-cpu)")
    p.add_argument("--add", action="append", default=[], help="any other file to include")
    p.add_argument("--engine", action="append", default=[],
                   help="a TensorRT engine from an engine cache (its .json sidecar next to it), carried for a "
                        "fixed target; repeatable (one per GPU / TensorRT version)")
    p.add_argument("--archive", help="also write one uncompressed .tar of the bundle")
    p.set_defaults(fn=cmd_bundle)

    p = sub.add_parser("verify", help="verify bundle directories or .tar archives (exit 1 naming each problem)")
    p.add_argument("bundles", nargs="+")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("reference", help="full flow on shipped reference bundles, rewriting them in place")
    p.add_argument("names", nargs="+", help="model names under edge_runtime/models, or 'all'")
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--method", choices=("minmax", "entropy", "percentile"),
                   help="calibration method (default: the bundle's own, from its manifest, else minmax)")
    p.add_argument("--calib-frames", type=int, default=200)
    p.add_argument("--val-frames", type=int, default=200)
    p.add_argument("--repair", action="store_true")
    p.add_argument("--max-float", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_reference)


def run(args: argparse.Namespace) -> int:
    from edge_runtime.runtime import resolve_bundle

    # a reference model's name stands for its shipped bundle, as in `infer --bundle NAME`
    if getattr(args, "bundle", None):
        args.bundle = str(resolve_bundle(args.bundle))
    if getattr(args, "bundles", None):
        args.bundles = [str(resolve_bundle(b)) for b in args.bundles]
    return int(args.fn(args))
