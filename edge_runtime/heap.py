"""Steady heap for timing: fixed glibc malloc thresholds, so that per-call arrays reuse memory.

glibc returns freed memory at the top of the heap to the kernel once it exceeds a trim threshold,
and serves large requests by mmap; both thresholds adapt to what the process has freed so far.
Code that allocates megabyte temporaries per frame (numpy pre/post written by hand, OpenCV
filters) then pays fresh page faults on every call in some processes and none in others,
depending on the process's history. Measured here (AMD EPYC, 2 cores, 512x512 12-bit frame):
cv2.bilateralFilter with its float32 conversions took 0.73-0.86 ms and 0 page faults per call in
a fresh process, 1.6-2.2 ms and ~610 faults per call in the same process after `import
onnxruntime`; a hand-written ORT peer 5.9 ms with ~740 faults per call. Fixing the thresholds
brought the filter back to 0.74-0.78 ms. Our Runtime reuses its buffers (0-1 faults per call
either way), so this matters for what it is compared with.

``pin_malloc_thresholds`` is called by the measurement entry points (benchmarks, model cards),
so every contender in a run sees the same allocator, and by ``edge-runtime infer``
(``pin_for_runtime``; EDGE_RUNTIME_PIN_MALLOC=0 turns it off), where it measured a little faster
in alternating runs over 200 16-bit PNGs with xr-nodule-det + xr-denoise: 2.5-2.7 s vs 2.5-3.1 s
(GLIBC_TUNABLES with the same values from process start: 2.7-2.9 s vs 3.0-3.2 s). The streaming
pipeline does not pin: its 30 fps detection + despeckle stream measured the same either way
(120 s runs in ABBA order: p50 9.8 / 9.7 vs 10.1 / 9.5 ms, p99 13.8 / 14.2 vs 15.4 / 14.2 ms), and
its long-running processes should give freed memory back (pinned, up to 128 MiB of it stays).
Not called on import: a library that embeds ``Runtime`` keeps its process's allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 128 << 20

_pinned: bool | None = None


def pin_malloc_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; True if done (glibc only), idempotent."""
    global _pinned
    if _pinned is None:
        _pinned = False
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        if name:
            libc = ctypes.CDLL(name)
            mallopt = getattr(libc, "mallopt", None)
            if mallopt is not None:  # musl has a mallopt that does nothing and returns 0
                _pinned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _pinned


def pin_for_runtime() -> bool:
    """``pin_malloc_thresholds`` for ``edge-runtime infer``, unless EDGE_RUNTIME_PIN_MALLOC=0."""
    if os.environ.get("EDGE_RUNTIME_PIN_MALLOC", "1").strip() == "0":
        return False
    return pin_malloc_thresholds()
