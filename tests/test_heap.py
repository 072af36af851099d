"""edge_runtime.heap: pinned glibc malloc thresholds keep per-call arrays off fresh pages.

Runs in a subprocess so the pinning does not leak into the test session, and after `import
onnxruntime`, the process state in which cv2.bilateralFilter paid ~610 page faults per call here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import onnxruntime  # noqa: F401  (the state in which the faults were seen)
    from edge_runtime.heap import pin_malloc_thresholds

    def faults_per_call(n=40):
        img = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512)
        for _ in range(5):
            np.clip(img.astype(np.float32) + 0.5, 0, 4095).astype(np.uint16)
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):  # megabyte temporaries, as a hand-written filter or peer allocates per frame
            np.clip(img.astype(np.float32) + 0.5, 0, 4095).astype(np.uint16)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n

    first = pin_malloc_thresholds()
    print(json.dumps({"pinned": first, "again": pin_malloc_thresholds(), "faults": faults_per_call()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt thresholds are glibc's (Linux)")
def test_pinned_thresholds_reuse_memory() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["pinned"] is True and res["again"] is True
    # A 512x512 float32 temporary is 256 pages: unpinned, such loops faulted ~600 pages per call here.
    assert res["faults"] < 20, res


def test_runtime_processes_pin_unless_told_not_to() -> None:
    """`edge-runtime infer` calls pin_for_runtime; EDGE_RUNTIME_PIN_MALLOC=0 leaves glibc's adaptive
    thresholds alone."""
    import os

    code = "from edge_runtime import heap; print(heap.pin_for_runtime(), heap._pinned)"
    env = {**os.environ, "EDGE_RUNTIME_PIN_MALLOC": "0"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=env)
    assert off.stdout.split() == ["False", "None"]
    env["EDGE_RUNTIME_PIN_MALLOC"] = "1"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=env)
    assert on.stdout.split() == (["True", "True"] if sys.platform.startswith("linux") else ["False", "False"])
