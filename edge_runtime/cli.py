"""One entry point: ``edge-runtime <group> ...``.

Each group lives in the module that owns it; that module exposes ``configure(parser)`` and
``run(args) -> int``. Only the chosen group's module is imported, so ``edge-runtime devices``
does not pay for importing onnxruntime or torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from .errors import EdgeRuntimeError, describe_error

# group -> (module, one-line help)
GROUPS: dict[str, tuple[str, str]] = {
    "demo": ("edge_runtime.demo", "stream the bundled phantoms and real DICOM cine, write out/demo/"),
    "devices": ("edge_runtime.devices", "list device configs and detect the current device"),
    "models": ("export.training.cli", "train / list the reference models (training needs the train extra)"),
    "export": ("export.cli", "check, quantise, validate, build engines, write and verify bundles"),
    "infer": ("edge_runtime.infer", "run bundles over a folder, video or DICOM file into an output folder"),
    "run": ("edge_runtime.pipeline.cli", "start the ZeroMQ pipeline: source -> workers -> sinks"),
    "keys": ("edge_runtime.pipeline.security", "make CURVE key pairs for network endpoints"),
    "bench": ("benchmarks.run_all", "run the benchmarks and regenerate this machine's page under benchmarks/results/"),
}


def _usage() -> str:
    lines = ["usage: edge-runtime <group> [options]", "", "groups:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in GROUPS.items()]
    lines += ["", "edge-runtime <group> --help for a group's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    group = argv[0]
    if group not in GROUPS:
        print(f"edge-runtime: unknown group {group!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C for the command's duration (`run` puts its own in place for the
    # pipeline); the caller's handler is back afterwards (tests and integrators call main() in process).
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        # Inside the try: importing a group (onnxruntime, torch) takes seconds, and a Ctrl-C then
        # printed a traceback through the import machinery.
        module = importlib.import_module(GROUPS[group][0])
        parser = argparse.ArgumentParser(prog=f"edge-runtime {group}", description=GROUPS[group][1])
        module.configure(parser)
        args = parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except EdgeRuntimeError as exc:
        # Our own errors already say what was expected and found: no traceback for users.
        print(f"edge-runtime {group}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `edge-runtime devices --json | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as exc:  # a file where a folder was meant, a full disk: no traceback, and no path
        # (file names can identify patients: describe_error drops them)
        print(f"edge-runtime {group}: {type(exc).__name__}: {describe_error(exc)} (check the paths given)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            print(f"edge-runtime {group}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"edge-runtime {group}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception in the main thread, like Ctrl-C: the default action killed the process
    where it stood, leaving a hidden half-written image (``.NAME.partial``) that no later run removes."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
