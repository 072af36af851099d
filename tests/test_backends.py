"""Backends: the shared base class and the ONNX Runtime backend on tiny models built here."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.backends import OrtBackend, TensorSpec, check_feeds, select_backend
from edge_runtime.backends.onnxruntime import resolve_providers, session_options
from edge_runtime.errors import BackendError, ConfigError, InputError

RNG = np.random.default_rng(0)
WEIGHT = RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)


def conv_model(path: Path) -> Path:
    """1x1xHxW float32 -> 3x3 conv (4 channels, pad 1) + ReLU, H and W dynamic."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "H", "W"])
    y = helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 4, "H", "W"])
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["features"]),
    ]
    inits = [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "b")]
    graph = helper.make_graph(nodes, "conv", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def add_model(path: Path) -> Path:
    """Two inputs: a (N, 3) float32 with dynamic N, b (3,) float32; out = a + b; count = int64 shape."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])
    out = helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Shape", ["sum"], ["shape"])],
        "add", [a, b], [out, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, path)
    return path


def conv_reference(image: np.ndarray) -> np.ndarray:
    """Direct numpy cross-correlation (what ONNX Conv computes), padding 1, then ReLU."""
    _, _, h, w = image.shape
    padded = np.pad(image[0, 0].astype(np.float64), 1)
    out = np.zeros((1, 4, h, w))
    for k in range(4):
        acc = np.full((h, w), float(BIAS[k]))
        for dy in range(3):
            for dx in range(3):
                acc += WEIGHT[k, 0, dy, dx] * padded[dy:dy + h, dx:dx + w]
        out[0, k] = acc
    return np.maximum(out, 0.0)


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_model(tmp_path_factory.mktemp("models") / "conv.onnx")


@pytest.fixture(scope="module")
def add_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return add_model(tmp_path_factory.mktemp("models") / "add.onnx")


# -- ONNX Runtime backend: correctness ------------------------------------------------------------
def test_conv_outputs_match_numpy_for_two_sizes(conv_path: Path) -> None:
    with OrtBackend(conv_path, threads=1) as backend:
        for h, w in [(16, 20), (33, 7)]:  # dynamic H/W: two different sizes through one session
            image = RNG.standard_normal((1, 1, h, w)).astype(np.float32)
            out = backend.infer({"image": image})
            assert set(out) == {"features"}
            assert out["features"].shape == (1, 4, h, w)
            np.testing.assert_allclose(out["features"], conv_reference(image), rtol=1e-4, atol=1e-4)


def test_specs_describe_dynamic_dims_as_none(conv_path: Path, add_path: Path) -> None:
    with OrtBackend(conv_path) as conv, OrtBackend(add_path) as add:
        assert conv.inputs == [TensorSpec("image", np.dtype(np.float32), (1, 1, None, None))]
        assert conv.outputs[0].name == "features" and conv.outputs[0].is_dynamic
        assert [s.name for s in add.inputs] == ["a", "b"]
        assert add.outputs[1] == TensorSpec("shape", np.dtype(np.int64), (2,))


def test_add_model_two_inputs_two_outputs(add_path: Path) -> None:
    with OrtBackend(add_path) as backend:
        a = RNG.standard_normal((5, 3)).astype(np.float32)
        b = np.array([1.0, -2.0, 0.5], dtype=np.float32)
        out = backend.infer({"a": a, "b": b})
        np.testing.assert_array_equal(out["sum"], a + b)
        np.testing.assert_array_equal(out["shape"], [5, 3])


def test_non_contiguous_input_is_accepted(conv_path: Path) -> None:
    image = RNG.standard_normal((1, 1, 12, 24)).astype(np.float32)[:, :, :, ::2]
    assert not image.flags["C_CONTIGUOUS"]
    with OrtBackend(conv_path) as backend:
        np.testing.assert_allclose(backend.infer({"image": image})["features"], conv_reference(image),
                                   rtol=1e-4, atol=1e-4)


def test_provider_and_attributes(conv_path: Path) -> None:
    backend = OrtBackend(conv_path, precision="int8")
    assert backend.provider == "" and not backend.loaded  # construction loads nothing
    with backend:
        assert backend.provider == "CPUExecutionProvider"
        assert backend.precision == "int8" and backend.name == "onnxruntime"


# -- input checks: one clear error per mistake ---------------------------------------------------
@pytest.mark.parametrize(
    ("feeds", "fragments"),
    [
        ({"img": np.zeros((1, 1, 8, 8), np.float32)}, ["expected inputs ['image']", "missing ['image']", "unknown ['img']"]),
        ({"image": np.zeros((1, 1, 8, 8), np.float64)}, ["'image'", "expected dtype float32", "found float64"]),
        ({"image": np.zeros((1, 8, 8), np.float32)}, ["'image'", "expected rank 4", "found rank 3"]),
        ({"image": np.zeros((1, 3, 8, 8), np.float32)}, ["'image'", "axis 1: expected 1, found 3"]),
        ({"image": [[1.0]]}, ["'image'", "expected a numpy array", "list"]),
        ({"image": np.zeros((1, 1, 0, 8), np.float32)}, ["'image'", "no empty axis"]),
    ],
)
def test_wrong_inputs_raise_input_error_naming_tensor(conv_path: Path, feeds: dict, fragments: list[str]) -> None:
    with OrtBackend(conv_path) as backend, pytest.raises(InputError) as info:
        backend.infer(feeds)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_check_feeds_rejects_non_mapping() -> None:
    with pytest.raises(InputError, match="expected a dict"):
        check_feeds([TensorSpec("x", np.dtype(np.float32), (1,))], [np.zeros(1, np.float32)])  # type: ignore[arg-type]


# -- lifecycle -------------------------------------------------------------------------------------
def test_infer_before_load_and_after_close_raise_backend_error(conv_path: Path) -> None:
    backend = OrtBackend(conv_path)
    image = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(BackendError, match="call load"):
        backend.infer({"image": image})
    with pytest.raises(BackendError, match="needs a loaded model"):
        _ = backend.inputs
    with backend:
        assert backend.loaded
        backend.infer({"image": image})
    assert not backend.loaded
    with pytest.raises(BackendError, match="call load"):
        backend.infer({"image": image})
    backend.close()  # closing twice is harmless
    assert backend.load() is backend and backend.loaded  # and it reloads
    backend.close()


def test_context_manager_closes_on_error(conv_path: Path) -> None:
    backend = OrtBackend(conv_path)
    with pytest.raises(InputError), backend:
        backend.infer({"image": np.zeros((2, 2), np.float32)})
    assert not backend.loaded and backend._session is None


def test_missing_model_and_bad_model_are_backend_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="expected a file"):
        OrtBackend(tmp_path / "absent.onnx").load()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="could not load"):
        OrtBackend(bad).load()


def test_timing_is_recorded_per_call(conv_path: Path) -> None:
    with OrtBackend(conv_path) as backend:
        assert np.isnan(backend.last_infer_ms)
        for _ in range(5):
            backend.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})
        summary = backend.timing_summary()
    assert summary["calls"] == 5 and summary["window"] == 5
    assert backend.last_infer_ms > 0
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]


def test_concurrent_infer_from_threads(conv_path: Path) -> None:
    image = RNG.standard_normal((1, 1, 10, 10)).astype(np.float32)
    expected_out = conv_reference(image)
    errors: list[BaseException] = []
    with OrtBackend(conv_path, threads=1) as backend:
        def work() -> None:
            try:
                for _ in range(5):
                    np.testing.assert_allclose(backend.infer({"image": image})["features"], expected_out,
                                               rtol=1e-4, atol=1e-4)
            except BaseException as exc:  # noqa: BLE001 - collected for the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert not errors and backend.timing_summary()["calls"] == 15


# -- options, providers, optimised-graph cache -----------------------------------------------------
def test_session_options_follow_arguments() -> None:
    import onnxruntime as ort

    opts = session_options(threads=2, graph_optimization="basic", spinning=False)
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.enable_cpu_mem_arena and opts.enable_mem_pattern
    assert session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"  # default off
    run = session_options(spinning="run")  # spin during a run, stop when it returns
    assert run.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert run.get_session_config_entry("session.force_spinning_stop") == "1"
    always = session_options(spinning=True)
    assert always.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    with pytest.raises(RuntimeError, match="force_spinning_stop"):  # not set: ORT keeps spinning after a run
        always.get_session_config_entry("session.force_spinning_stop")
    with pytest.raises(ConfigError, match="spinning"):
        session_options(spinning="sometimes")
    with pytest.raises(ConfigError, match="graph_optimization"):
        session_options(graph_optimization="max")
    with pytest.raises(ConfigError, match="threads"):
        session_options(threads=-1)


def test_resolve_providers() -> None:
    available = ["CPUExecutionProvider"]
    assert resolve_providers("auto", available) == ["CPUExecutionProvider"]
    assert resolve_providers("auto", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider", "CPUExecutionProvider"]  # auto never picks the TensorRT EP (blocking builds)
    assert resolve_providers(["tensorrt", "cpu"], ["TensorrtExecutionProvider", "CPUExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["cuda", "cpu"], available) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="found only"):
        resolve_providers(["cuda"], available)
    with pytest.raises(ConfigError, match="'opencl'"):
        resolve_providers(["opencl"], available)


def test_optimized_graph_cache_is_written_then_used(conv_path: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    cache = tmp_path / "ort-cache"
    image = RNG.standard_normal((1, 1, 9, 9)).astype(np.float32)
    with OrtBackend(conv_path, optimized_cache_dir=cache) as first:
        out1 = first.infer({"image": image})["features"]
    saved = list(cache.glob("conv.*.ort.onnx"))
    assert len(saved) == 1 and "using optimised graph cache" not in caplog.text
    with OrtBackend(conv_path, optimized_cache_dir=cache) as second:
        out2 = second.infer({"image": image})["features"]
    assert list(cache.glob("conv.*.ort.onnx")) == saved
    assert f"using optimised graph cache {saved[0]}" in caplog.text
    np.testing.assert_allclose(out1, out2, rtol=1e-6)


def test_optimized_graph_cache_is_not_shared_across_cpus(conv_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph optimised on an AVX-512 CPU (NCHWc blocks of 16) is not read on an AVX2 one (blocks of 8):
    the cache key holds the CPU's identity (faked here), so a cache dir carried to another CPU is rebuilt."""
    from edge_runtime.backends import onnxruntime as B
    from edge_runtime.devices import cpu_identity

    cache = tmp_path / "ort-cache"
    for cpu in ("x86_64|CPU A|avx2 avx512f", "x86_64|CPU B|avx2"):
        monkeypatch.setattr(B, "cpu_identity", lambda cpu=cpu: cpu)
        with OrtBackend(conv_path, optimized_cache_dir=cache) as b:
            b.infer({"image": RNG.standard_normal((1, 1, 9, 9)).astype(np.float32)})
    assert len(list(cache.glob("conv.*.ort.onnx"))) == 2
    ident = cpu_identity(tmp_path, machine="x86_64")  # no /proc/cpuinfo under tmp_path
    assert ident == "x86_64|None|"
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text("processor\t: 0\nmodel name\t: CPU A\nflags\t\t: sse2 avx2 avx512f\n")
    assert cpu_identity(tmp_path, machine="x86_64") == "x86_64|CPU A|avx2 avx512f sse2"


# -- selection -------------------------------------------------------------------------------------
def test_select_backend_auto_falls_back_to_onnxruntime_and_logs(conv_path: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"x")
    backend = select_backend("auto", onnx_path=conv_path, engine_path=engine, threads=1)
    assert isinstance(backend, OrtBackend) and not backend.loaded
    assert "backend: onnxruntime (TensorRT not used" in caplog.text


def test_select_backend_errors(conv_path: Path) -> None:
    with pytest.raises(ConfigError, match="one of"):
        select_backend("openvino", onnx_path=conv_path)
    with pytest.raises(BackendError, match="backend tensorrt: expected TensorRT"):
        select_backend("tensorrt", onnx_path=conv_path, engine_path="none.engine")
    with pytest.raises(BackendError, match="expected an ONNX model path"):
        select_backend("onnxruntime")


def test_importing_backends_imports_no_inference_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import edge_runtime.backends, edge_runtime.engine_cache, export.trt_build; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('onnxruntime','tensorrt','pycuda')))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
