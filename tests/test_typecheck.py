"""mypy --strict over the two TensorRT modules against NVIDIA's tensorrt-stubs.

TensorRT cannot be installed here, so this is how every TensorRT call in
edge_runtime/backends/tensorrt.py and export/trt_build.py is checked: names, argument and return
types. A negative control proves the check is real (a misspelt TensorRT method and a wrongly typed
argument must make it fail).

Two defects of the generated stub package (10.13) are worked around on a private copy, without
touching the API it describes:
- it installs ``tensorrt/__init__.pyi`` without ``py.typed``, so mypy will not read it from
  site-packages: the copy is passed through MYPYPATH instead;
- five plugin/layer signatures are not valid Python (a parameter named ``in``; one non-default
  parameter after defaults), and the module defines ``bool`` (``trt.bool``, a DataType), which
  shadows the builtin in every ``-> bool``: the copy renames those parameters, gives the one
  parameter a default, and spells the builtin ``builtins.bool``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "mypy-tensorrt.ini"
TARGETS = ["edge_runtime/backends/tensorrt.py", "export/trt_build.py"]
PY_KEYWORDS = ("in", "lambda", "from", "def", "class", "is", "not", "and", "or", "if", "else", "for", "while",
               "with", "as", "global", "return", "yield", "pass", "import", "raise", "try", "except",
               "finally", "del", "assert", "break", "continue", "async", "await", "nonlocal")


def _stub_dirs() -> list[Path] | None:
    """The installed tensorrt + tensorrt_bindings stub directories, if tensorrt-stubs is there."""
    dirs = []
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        found = [Path(p) for p in locations if (Path(p) / "__init__.pyi").is_file()]
        if not found:
            return None
        dirs.append(found[0])
    return dirs


def _split_params(text: str) -> list[str]:
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        out.append(current)
    return out


def _fix_signature(line: str) -> str:
    keywords = "|".join(PY_KEYWORDS)
    line = re.sub(rf"(\(|, )({keywords}): ", r"\1\2_: ", line)
    match = re.match(r"^(\s*def \w+\()(.*)(\)\s*(?:->[^:]*)?:\s*(?:\.\.\.)?\s*)$", line)
    if match:
        seen_default, params = False, []
        for param in _split_params(match.group(2)):
            stripped = param.strip()
            if stripped.startswith("*"):
                seen_default = seen_default and stripped != "*"
            elif "=" in stripped:
                seen_default = True
            elif seen_default:
                param += " = ..."
            params.append(param)
        line = match.group(1) + ",".join(params) + match.group(3)
    return line


def sanitize_stub(path: Path) -> int:
    """Make ``path`` parse (fixing only the lines Python rejects); return how many lines changed."""
    lines = path.read_text().splitlines()
    changed = 0
    for _ in range(100):
        try:
            ast.parse("\n".join(lines))
            break
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            fixed = _fix_signature(lines[index])
            if fixed == lines[index]:
                raise
            lines[index], changed = fixed, changed + 1
    text = "\n".join(lines) + "\n"
    if re.search(r"^bool: ", text, flags=re.MULTILINE):  # the module defines trt.bool: qualify the builtin
        text = "\n".join(
            line if line.startswith("bool:") else re.sub(r"(?<!['\w.])bool(?!['\w])", "builtins.bool", line)
            for line in text.splitlines()
        ) + "\n"
        text = text.replace("from __future__ import annotations\n",
                            "from __future__ import annotations\nimport builtins\n", 1)
    path.write_text(text)
    return changed


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (dev extra)")
    dirs = _stub_dirs()
    if dirs is None:
        pytest.skip("tensorrt-stubs is not installed (make test installs it with --no-deps)")
    root = tmp_path_factory.mktemp("trt-stubs")
    for directory in dirs:
        shutil.copytree(directory, root / directory.name, ignore=shutil.ignore_patterns("*.pyc", "__pycache__"))
    for stub in root.rglob("*.pyi"):
        sanitize_stub(stub)
    return root


def run_mypy(stub_path: Path, files: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MYPYPATH=str(stub_path))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(CONFIG), "--cache-dir", str(cache), *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )


def test_sanitizer_only_touches_invalid_lines(tmp_path: Path) -> None:
    stub = tmp_path / "x.pyi"
    stub.write_text(
        "from __future__ import annotations\n"
        "def ok(self, a: int, b: int = 1) -> bool: ...\n"
        "def bad(self, in: list[int], out: list[int]) -> int: ...\n"
        "def worse(self, a: int = None, axis: int) -> None: ...\n"
        "bool: DataType\n"
    )
    assert sanitize_stub(stub) == 2
    lines = stub.read_text().splitlines()
    assert lines[1] == "import builtins"
    assert lines[2] == "def ok(self, a: int, b: int = 1) -> builtins.bool: ..."
    assert lines[3] == "def bad(self, in_: list[int], out: list[int]) -> int: ..."
    assert lines[4] == "def worse(self, a: int = None, axis: int = ...) -> None: ..."
    assert lines[5] == "bool: DataType"


def test_tensorrt_modules_pass_mypy_strict(stub_path: Path, tmp_path: Path) -> None:
    result = run_mypy(stub_path, TARGETS, tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 2 source files" in result.stdout


def test_mypy_catches_a_wrong_tensorrt_name_and_argument(stub_path: Path, tmp_path: Path) -> None:
    """Negative control: the same check must fail on a misspelt method and a wrongly typed argument."""
    source = (ROOT / "export" / "trt_build.py").read_text()
    broken = source.replace("builder.build_serialized_network(network, config)",
                            "builder.build_enginee(network, config)")
    broken = broken.replace("config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)",
                            "config.set_memory_pool_limit(workspace, trt.MemoryPoolType.WORKSPACE)")
    assert broken.count("build_enginee") == 1 and broken != source
    copy = tmp_path / "trt_build_broken.py"
    copy.write_text(broken)
    probe = tmp_path / "runtime_probe.py"
    probe.write_text(
        "import tensorrt as trt\n\n\n"
        "def run(context: trt.IExecutionContext, engine: trt.ICudaEngine) -> None:\n"
        "    context.execute_async_v3('stream')\n"
        "    print(engine.num_bindings)\n"
    )
    result = run_mypy(stub_path, [str(copy), str(probe)], tmp_path / "cache")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert '"Builder" has no attribute "build_enginee"' in out
    assert 'Argument 1 to "set_memory_pool_limit" of "IBuilderConfig" has incompatible type "int"' in out
    assert 'Argument 1 to "execute_async_v3" of "IExecutionContext" has incompatible type "str"' in out
    assert '"ICudaEngine" has no attribute "num_bindings"' in out  # a TensorRT 8 name removed in 10
