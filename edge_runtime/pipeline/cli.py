"""``edge-runtime run``: one command (or one YAML file, for carts) starts the supervised pipeline.

    edge-runtime run --source cine.dcm --bundle us-lesion-det --workers 2 --record out/run
    edge-runtime run --source synthetic --processor detect+slow:20 --duration 10 --fast
    edge-runtime run --config /etc/edge/cart.yaml

Command-line options override the config file. Keys of the YAML file are the long option names
with ``_`` for ``-`` (source, bundle, processor, workers, device, record, video, view, realtime,
loop, bind, keys, insecure, duration, mode, transport, report, frame_timeout) plus ``source_options`` (a mapping
passed to ``open_source``) and ``settings`` (heartbeat_s, liveness_s, drain_s, stats_interval_s,
max_message_bytes).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, expected
from ..outputs import private_dir
from .builtins import BuiltinProcessor
from .nodes import NodeSettings
from .protocol import Limits
from .security import SecurityConfig
from .supervisor import RuntimeProcessor, SourceSpec, run_pipeline

log = logging.getLogger(__name__)

# key -> (type(s) accepted, default)
KEYS: dict[str, tuple[Any, Any]] = {
    "source": (str, None), "bundle": ((str, list), None), "processor": (str, None), "workers": (int, 1),
    "device": (str, None), "gpu": (int, 0), "record": (str, None), "video": (bool, False), "view": ((str, bool), None),
    "realtime": (bool, True), "loop": (bool, False), "bind": (str, None), "keys": (str, None),
    "insecure": (bool, False), "duration": ((int, float), None), "mode": (str, "process"),
    "transport": (str, "auto"), "report": (str, None), "frame_timeout": ((int, float), None), "shared_memory": (bool, False), "source_options": (dict, {}), "settings": (dict, {}),
}
SETTINGS_KEYS = {"heartbeat_s", "liveness_s", "drain_s", "stats_interval_s", "send_timeout_s", "max_message_bytes"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help="source spec for edge_runtime.sources.open_source, or 'synthetic[:HxW]'")
    parser.add_argument("--bundle", action="append", help="model bundle directory, loaded in each worker; "
                                                          "repeat for several models (e.g. detect + enhance)")
    parser.add_argument("--processor", help="built-in processor instead of a bundle: identity, detect, slow:MS, "
                                            "joined by '+' (testing and benchmarks)")
    parser.add_argument("--workers", type=int, help="worker processes (default 1)")
    parser.add_argument("--device", help="device config name or YAML path, passed to the Runtime")
    parser.add_argument("--gpu", type=int, metavar="N", help="CUDA device the models' engines are built for "
                                                             "and run on (default 0)")
    parser.add_argument("--record", metavar="DIR", help="write DIR/results.jsonl (and videos with --video)")
    parser.add_argument("--video", action="store_true", default=None, help="annotated video per stream in --record")
    parser.add_argument("--view", nargs="?", const=True, metavar="DIR",
                        help="show results: a window if a display exists, else PNG snapshots in DIR "
                             "(default: RECORD_DIR/view with --record, else out/view)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                      help="pace the source at its frame rate; latest frame wins (default)")
    pace.add_argument("--fast", dest="realtime", action="store_false",
                      help="replay as fast as the workers go; every frame is processed")
    parser.add_argument("--loop", action="store_true", default=None, help="loop a finite source")
    parser.add_argument("--bind", metavar="ENDPOINT", help="also publish results here, e.g. tcp://0.0.0.0:5555")
    parser.add_argument("--keys", metavar="DIR", help="CURVE keys from `edge-runtime keys generate` (needed "
                                                      "for a non-loopback --bind)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="allow a non-loopback --bind WITHOUT encryption (logged loudly)")
    parser.add_argument("--modality", help="what an image folder (required there with --bundle) or a video shows, "
                        "e.g. DX, US; DICOM and phantoms state their own (source_options in --config)")
    parser.add_argument("--bits-stored", dest="bits_stored", type=int,
                        help="bits used in 16-bit images, e.g. 12 for detector data")
    parser.add_argument("--stream-id", dest="stream_id", help="stream id (default for a file source: a "
                        "pseudonym from a keyed hash of its absolute path); 1-64 of A-Z a-z 0-9 _ . : -")
    parser.add_argument("--config", metavar="FILE.yaml", help="read options from a YAML file")
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--mode", choices=["process", "thread"], help="node isolation (default process)")
    parser.add_argument("--transport", choices=["auto", "ipc", "tcp"], help="between nodes (default: ipc)")
    parser.add_argument("--report", metavar="DIR", help="write latency.json and latency.png here")
    parser.add_argument("--frame-timeout", dest="frame_timeout", type=float, metavar="S",
                        help="restart a worker whose model call takes longer than S seconds (a hang)")
    parser.add_argument("--shared-memory", dest="shared_memory", action="store_true", default=None,
                        help="process mode on one host: pixels travel through shared memory, ZeroMQ "
                             "carries the headers (docs/PROTOCOL.md 3.1)")


def load_config(path: str | Path) -> dict[str, Any]:
    """A cart's YAML file, checked key by key (safe_load: no code, no custom tags)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(expected("a readable YAML config file", f"{p}: {exc.strerror}")) from exc
    except UnicodeDecodeError:
        raise ConfigError(expected("a UTF-8 YAML config file", "a binary file (not named: it may be a patient's)")) from None
    except yaml.YAMLError as exc:
        raise ConfigError(expected("valid YAML", f"{p}: {exc}")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(expected(f"a mapping of options in {p}", type(data).__name__))
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigError(expected(f"a key in {sorted(KEYS)}", f"{key!r} in {p}"))
        kinds = KEYS[key][0]
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if value is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise ConfigError(expected(f"{key!r} of type {'/'.join(k.__name__ for k in kinds)}",
                                       f"{type(value).__name__} in {p}"))
    if isinstance(data.get("bundle"), list) and not all(isinstance(b, str) for b in data["bundle"]):
        raise ConfigError(expected("'bundle' as a path or a list of paths", data["bundle"]))
    unknown = set(data.get("settings") or {}) - SETTINGS_KEYS
    if unknown:
        raise ConfigError(expected(f"settings keys in {sorted(SETTINGS_KEYS)}", sorted(unknown)))
    return data


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < command line."""
    options = {key: default for key, (_, default) in KEYS.items()}
    if getattr(args, "config", None):
        options.update({k: v for k, v in load_config(args.config).items() if v is not None})
    for key in KEYS:
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    if not options["source"]:
        raise ConfigError(expected("--source SPEC (or 'source:' in --config)", "none"))
    if options["gpu"] < 0:  # checked here: the workers would each fail to load
        raise ConfigError(expected("--gpu N >= 0 (a CUDA device index)", options["gpu"]))
    if bool(options["bundle"]) == bool(options["processor"]):
        raise ConfigError(expected("exactly one of --bundle PATH or --processor NAME",
                                   "both" if options["bundle"] else "neither"))
    return options


def _settings(options: dict[str, Any]) -> NodeSettings:
    raw = dict(options["settings"])
    limits = Limits()
    if "max_message_bytes" in raw:
        size = raw.pop("max_message_bytes")
        # 0 dropped every message, stats included: "0 results", exit 0
        if isinstance(size, bool) or not isinstance(size, int) or size < limits.max_header_bytes:
            raise ConfigError(expected(f"settings.max_message_bytes as an integer >= {limits.max_header_bytes} "
                                       "(a header's limit)", size))
        limits = replace(limits, max_message_bytes=size)
    security = None
    if options["keys"]:
        # Keys given: CURVE on every tcp bind, loopback included (a loopback port is open to all local users).
        security = SecurityConfig.from_keys_dir(options["keys"], insecure=bool(options["insecure"]),
                                                curve_on_loopback=True)
    elif options["insecure"]:
        security = SecurityConfig(insecure=True)
    values = {}
    for key, value in raw.items():  # a negative or NaN time gave a ZeroMQ traceback deep in a node
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(expected(f"settings.{key} as a number of seconds > 0", value))
        values[key] = float(value)
    settings = NodeSettings(**values, limits=limits, security=security)
    if settings.liveness_s <= settings.heartbeat_s:
        raise ConfigError(expected(f"settings.liveness_s > heartbeat_s ({settings.heartbeat_s} s): a worker is "
                                   "lost when silent that long", settings.liveness_s))
    return settings


def _stated(o: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """--modality / --bits-stored / --stream-id as source options (as `infer` takes them); a folder of images must say
    what it shows when a model reads it: its frames would otherwise be "OT" and every one refused."""
    from ..sources import source_kind, stated_options

    modality, bits = getattr(args, "modality", None), getattr(args, "bits_stored", None)
    stream_id = getattr(args, "stream_id", None)
    if str(o["source"]).startswith("synthetic"):  # the built-in test source takes no source options
        return {}
    kind = source_kind(o["source"])
    given = stated_options(kind, modality, bits) if (modality or bits is not None) else {}
    if stream_id:
        given["stream_id"] = stream_id
    if kind == "images" and o["bundle"] and "modality" not in {**o["source_options"], **given}:
        raise ConfigError(expected("--modality for a folder of images (the files do not say what they show)", "none"))
    return given


def _check_modality(o: dict[str, Any]) -> None:
    """A source whose frames all state one modality that no bundle takes (an ultrasound cine given to
    the radiograph detector) is refused before any node starts: the workers refused it frame by frame,
    and a live run without --duration never ended."""
    from ..bundle import Bundle
    from ..runtime import resolve_bundle
    from ..sources import check_stated_modality, open_source, source_kind

    if not o["bundle"] or str(o["source"]).startswith(("synthetic", "camera:")):
        return  # a camera is opened by the source node only
    kind = source_kind(o["source"])
    if kind == "dicom" and Path(o["source"]).is_dir():
        return  # a series folder: each file states its own, and reading every header twice is slow
    wanted = {m for b in _as_list(o["bundle"]) for m in Bundle.load(resolve_bundle(str(b)), verify=False).manifest["modality"]}
    check_stated_modality(open_source(o["source"], **o["source_options"]), wanted, kind,  # no frame is read
                          "modality" in o["source_options"])


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run(args: argparse.Namespace) -> int:
    o = resolve(args)
    processor = (BuiltinProcessor(o["processor"]) if o["processor"]
                 else RuntimeProcessor(tuple(str(b) for b in _as_list(o["bundle"])), device=o["device"],
                                    gpu=o["gpu"]))
    realtime = bool(o["realtime"])
    o["source_options"] = {**o["source_options"], **_stated(o, args)}
    _check_modality(o)
    options = tuple(sorted(o["source_options"].items()))
    if realtime and not SourceSpec(o["source"], options=options).has_rate():
        # "Latest frame wins" would re-read such a source as fast as it decodes and drop most of it:
        # replay every frame at the pipeline's pace instead, as --fast does.
        print("the source has no frame rate (source_options: {fps: N} in a --config gives it one): "
              "every frame is replayed at the pipeline's pace")
        realtime = False
    source = SourceSpec(o["source"], realtime=realtime, loop=bool(o["loop"]), options=options)
    for folder in {o["record"], o["report"]} - {None}:  # a file named there fails now, not after the run
        private_dir(folder)
    view = o["view"]
    report = run_pipeline(
        source, processor, n_workers=int(o["workers"]), mode=o["mode"], record_dir=o["record"],
        duration=None if o["duration"] is None else float(o["duration"]), transport=o["transport"],
        policy="latest" if realtime else "all", window=1 if realtime else 2, video=bool(o["video"]),
        view=bool(view), view_dir=view if isinstance(view, str) else None, public_endpoint=o["bind"],
        settings=_settings(o), frame_timeout_s=None if o["frame_timeout"] is None else float(o["frame_timeout"]),
        shared_memory=bool(o["shared_memory"]))
    print(report.summary())
    report_dir = o["report"] or o["record"]
    if report_dir:
        json_path, png_path = report.write_latency_report(report_dir)
        print(f"latency report: {json_path} {png_path}")
    # A run that read frames but got no result back (e.g. every frame rejected) failed, whatever
    # the nodes' exit codes: summary() printed why; so did one that skipped unreadable files of a
    # folder (as `infer` does: it did not see all its input).
    incomplete = report.no_results() or report.drops.get("unreadable_file")
    return 1 if report.source_error or report.failure or incomplete else 0
