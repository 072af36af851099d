"""``edge-runtime models``: train, list and document the reference models.

``list`` needs no torch (it reads the shipped manifests); ``train`` and ``card`` import the
training code, which needs the ``train`` extra (PyTorch CPU).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from edge_runtime.bundle import Bundle
from edge_runtime.errors import ConfigError, EdgeRuntimeError

MODELS_DIR = Path(__file__).resolve().parents[2] / "edge_runtime" / "models"
NAMES = ("us-lesion-det", "xr-nodule-det", "us-despeckle", "xr-denoise")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="shipped bundles and their held-out metrics")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    tr = sub.add_parser("train", help="train one reference model and write its bundle (and card)")
    tr.add_argument("name", choices=NAMES)
    tr.add_argument("--out", help="bundle directory, replaced whole if it holds a bundle (default: "
                                  "edge_runtime/models/NAME)")
    tr.add_argument("--steps", type=int, help="optimisation steps (default: the recipe's)")
    tr.add_argument("--seed", type=int, default=0, help="training seed, 0..89 (default 0)")
    tr.add_argument("--no-card", action="store_true", help="skip writing the model card (docs/models/NAME.md for "
                                                           "the shipped bundle, OUT-card/ beside OUT with --out)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    rx = sub.add_parser("reexport", help="write a bundle's fp32.onnx again from its weights with the current "
                        "exporter (no training); leaves an FP32-only bundle: then `export reference NAME --repair`")
    rx.add_argument("name", choices=NAMES)
    rx.add_argument("--bundle", help="bundle directory (default: edge_runtime/models/NAME)")
    rt = sub.add_parser("retune-baseline", help="tune a bundle's classical baseline again (after a fix to the "
                        "baseline code) and replace only its baselines record (no training); then `models card NAME`")
    rt.add_argument("name", choices=NAMES)
    rt.add_argument("--bundle", help="bundle directory (default: edge_runtime/models/NAME)")
    rt.add_argument("--quiet", action="store_true", help="no progress bars")
    cd = sub.add_parser("card", help="regenerate docs/models/NAME.md and its PNGs from the bundle")
    cd.add_argument("name", choices=NAMES)
    cd.add_argument("--bundle", help="bundle directory (default: edge_runtime/models/NAME)")
    cd.add_argument("--out", help="docs directory (default: docs/models)")
    cd.add_argument("--quiet", action="store_true", help="no progress bars")


def _row(b: Bundle) -> dict:
    m = b.manifest
    metrics = {k: v for k, v in m.get("metrics", {}).items() if k in ("ap50", "sensitivity_at_0.5_fppi", "psnr_db", "ssim")}
    info = next((a.info for a in b.artifacts if a.precision == "fp32"), {})
    flops = {k: v for k, v in info.items() if k.startswith("gflops")}
    return {"name": b.name, "task": b.task, "modality": m.get("modality"),
            "precisions": sorted({a.precision for a in b.artifacts}), "params": info.get("params"),
            **flops, **metrics, "sha256": b.sha256[:12]}


def run(args: argparse.Namespace) -> int:
    if args.command == "list":
        rows = []
        for d in sorted(p for p in MODELS_DIR.glob("*") if (p / "manifest.json").is_file()):
            try:
                rows.append(_row(Bundle.load(d)))
            except EdgeRuntimeError as exc:
                rows.append({"name": d.name, "error": str(exc)})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print("  ".join(f"{k}={v}" for k, v in r.items()))
            if not rows:
                print(f"no bundles under {MODELS_DIR}")
            else:  # the gate's FP32 figures (its own frames) differ: a reader compared the two
                print("(metrics: FP32 on each model card's held-out phantoms, seeds 9000000..; the accuracy gate's "
                      "validation frames are other phantoms, its figures are in each bundle's validation.json)")
        return 0
    # libgomp threads spin ~300k iterations at every barrier before sleeping; with another
    # process on the two cores that spinning made training 4-40x slower (0.05 s per step alone,
    # 0.19 to 2.2 s shared). A short spin keeps the speed alone (0.053 s) and behaves like the
    # default under a one-core neighbour (0.17 s). Must be set before torch is imported.
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    try:
        from . import cards, train
    except ImportError as exc:
        raise ConfigError(f"'models {args.command}' needs the train extra (pip install 'edge-runtime[train]'): {exc}") from None
    if args.command == "train":
        bundle = train.train(args.name, args.out, steps=args.steps, seed=args.seed, progress=not args.quiet,
                             card=not args.no_card)
        print(json.dumps({"bundle": str(bundle.path), "sha256": bundle.sha256, "metrics": bundle.manifest["metrics"],
                          "baselines": bundle.manifest.get("baselines"),
                          "wall_s": bundle.manifest["training"]["wall_s"]}, indent=2))
        return 0
    if args.command == "reexport":
        bundle = train.reexport(args.name, args.bundle)
        where = f" --models-dir {Path(args.bundle).resolve().parent}" if args.bundle else ""
        print(json.dumps({"bundle": str(bundle.path), "sha256": bundle.sha256, "artifacts": ["fp32"],
                          "next": [f"edge-runtime export reference {args.name}{where} --repair",
                                   f"edge-runtime models card {args.name}" + (f" --bundle {args.bundle}" if args.bundle else "")]},
                         indent=2))
        return 0
    if args.command == "retune-baseline":
        bundle = train.retune_baseline(args.name, args.bundle, progress=not args.quiet)
        print(json.dumps({"bundle": str(bundle.path), "sha256": bundle.sha256, "baselines": bundle.manifest["baselines"],
                          "next": [f"edge-runtime models card {args.name}" + (f" --bundle {args.bundle}" if args.bundle else "")]},
                         indent=2))
        return 0
    path = cards.write_card(args.name, bundle_dir=args.bundle, docs_dir=args.out, progress=not args.quiet)
    print(path)
    return 0
