"""PyTorch module -> ONNX, refused unless ONNX Runtime reproduces PyTorch's outputs.

The model is exported to a temporary file, run on ONNX Runtime's CPU provider next to the module
on every sample input, and only moved to ``path`` when each output agrees within tolerance. torch
is imported here only, lazily: the runtime never needs it.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ExportError, expected


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], names: Sequence[str], *,
                    rtol: float, atol: float) -> list[str]:
    """Problems where ``candidate`` differs from ``reference`` beyond ``atol + rtol * |reference|``."""
    problems = []
    if len(reference) != len(candidate):
        return [expected(f"{len(reference)} outputs", len(candidate))]
    for name, ref, got in zip(names, reference, candidate):
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            problems.append(f"{name}: " + expected(f"shape {ref.shape}", got.shape))
            continue
        diff = np.abs(ref - got)
        bad = diff > atol + rtol * np.abs(ref)
        if bad.any() or not np.isfinite(got).all():
            rel = float(np.max(diff / np.maximum(np.abs(ref), 1e-12)))
            problems.append(f"{name}: max abs error {float(diff.max()):.3g}, max rel error {rel:.3g} "
                            f"(tolerance atol {atol:g} + rtol {rtol:g} x |ref|; {int(bad.sum())} of {bad.size} "
                            "values outside)")
    return problems


def export_onnx(module: Any, sample_input: Any, path: str | os.PathLike[str], *, input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
                opset: int = 17, extra_inputs: Sequence[Any] = (), rtol: float = 1e-3,
                atol: float = 1e-4) -> Path:
    """Export ``module`` to ONNX at ``path``; raise ExportError (file not written) if ORT disagrees.

    ``sample_input`` is a tensor/array or a tuple of them (one per input name); ``extra_inputs`` are
    more samples of the same structure (e.g. another size, to exercise the dynamic axes).
    """
    import onnxruntime as ort
    import torch

    samples = [tuple(torch.as_tensor(a) for a in _as_tuple(s)) for s in [sample_input, *extra_inputs]]
    if len(samples[0]) != len(input_names):
        raise ExportError(expected(f"{len(input_names)} sample inputs (one per input name)", len(samples[0])))
    module = module.eval()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}-", suffix=".onnx")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter: the dynamo exporter needs onnxscript, which the train extra lacks
            # (its deprecation warning is not actionable for our users). Mismatches are caught below.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                torch.onnx.export(module, samples[0], tmp, dynamo=False, input_names=list(input_names),
                                  output_names=list(output_names), dynamic_axes=dict(dynamic_axes or {}),
                                  opset_version=opset, do_constant_folding=True)
            except (RuntimeError, ValueError, TypeError) as exc:  # e.g. more output names than outputs
                raise ExportError(expected(f"a module torch.onnx.export can export with inputs {list(input_names)} "
                                           f"and outputs {list(output_names)}",
                                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")) from None
            sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
            for i, sample in enumerate(samples):
                ref = [t.detach().cpu().numpy() for t in _as_tuple(module(*sample))]
                got = sess.run(list(output_names), {n: t.cpu().numpy() for n, t in zip(input_names, sample)})
                problems = compare_outputs(ref, got, output_names, rtol=rtol, atol=atol)
                if problems:
                    raise ExportError(f"ONNX Runtime disagrees with PyTorch on sample {i}, not writing {out}: "
                                      + "; ".join(problems))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
