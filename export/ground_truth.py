"""Held-out frames of the user's own, with the ground truth the accuracy gate needs.

Phantom frames carry their ground truth; a user's frames need it beside them (`export validate
--source PATH` with one of):
- enhancement, ``reference``: a second source of clean frames (an image folder, a DICOM file or
  series, a video) paired one to one, in order, with the input frames (e.g. low-dose / full-dose
  pairs). Two image folders must hold the same file names; each pair must agree in shape, dtype
  and bits stored.
- segmentation, ``reference``: label-map images paired the same way (pixel value k = the model's
  class k; 0 is background when the model's first class is named so, or when it names none).
- detection, ``labels``: a COCO detection JSON (``images[].file_name`` / ``width`` / ``height``,
  ``annotations[].image_id`` / ``bbox`` as x, y, width, height in pixels / ``category_id``,
  ``categories[].id`` / ``name``) over an image folder. The frames are the images it lists, in
  natural file-name order, matched by name; an image without annotations is a frame with no
  objects. Category names must be the model's class names.
Nothing is skipped: an unreadable file would misalign a pair or a label, so it is an error here.
Messages name a frame by its position, never by its file name (file names can identify patients).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edge_runtime.errors import ConfigError, EdgeRuntimeError, ExportError, expected
from edge_runtime.frames import Frame, GroundTruth

# How far (pixels) a COCO box may reach past the image before it is refused rather than clipped:
# annotation tools round to the pixel grid and some write x + width = image width + 1.
EDGE_SLACK_PX = 1.0


def labelled_frames(source: str, manifest: Mapping[str, Any], count: int, *, reference: str | None = None,
                    labels: str | None = None, **opts: Any) -> list[Frame]:
    """Up to ``count`` frames from ``source`` with ground truth from ``reference`` or ``labels``
    (which one the model's task needs); ``opts`` go to edge_runtime.sources.open_source."""
    task = manifest["task"]
    given = {"--reference": reference, "--labels": labels}
    need, what = {"enhancement": ("--reference", "CLEAN: the clean frames paired with these"),
                  "segmentation": ("--reference", "MASKS: label-map images paired with these"),
                  "detection": ("--labels", "COCO.json: their boxes")}[task]
    wrong = [flag for flag, v in given.items() if v is not None and flag != need]
    if wrong:
        raise ConfigError(expected(f"{need} for a {task} model", wrong[0]))
    if given[need] is None:
        raise ConfigError(expected(f"{need} {what} (held-out frames of your own carry no ground truth)", "none"))
    truth = str(given[need])
    classes = [str(c) for c in (manifest.get("postprocess") or {}).get("classes") or []]
    try:
        if task == "enhancement":
            return paired_frames(source, truth, count, **opts)
        if task == "segmentation":
            return paired_frames(source, truth, count, label_maps=classes or True, **opts)
        return coco_frames(source, truth, count, classes=classes, **opts)
    except ExportError:
        raise
    except EdgeRuntimeError as exc:  # a source's InputError: say it was the validation set
        raise ExportError(f"validation frames: {exc}") from None


# -- enhancement and segmentation: paired reference frames --------------------------------
def paired_frames(source: str, reference: str, count: int, *, label_maps: Sequence[str] | bool = False,
                  **opts: Any) -> list[Frame]:
    """Frames of ``source``, each with the same-position frame of ``reference`` as its clean image, or
    (``label_maps``: the model's class names, or True without them) as its segmentation label map."""
    from edge_runtime.sources import ImageFolderSource, open_source

    # label maps are read as stored: neither a bit depth nor a grey conversion (it would mix the values)
    ref_opts = {k: v for k, v in opts.items() if k not in ("bits_stored", "gray")} if label_maps else opts
    src, ref = open_source(source, **opts), open_source(reference, **ref_opts)
    if isinstance(src, ImageFolderSource) and isinstance(ref, ImageFolderSource):
        a, b = [p.name for p in src.files], [p.name for p in ref.files]
        if a != b:
            only = len(set(a) ^ set(b))
            raise ExportError(expected("the same image file names in the validation and --reference folders",
                                       f"{only} name(s) in one folder only" if only else
                                       f"{len(a)} and {len(b)} files"))
    out: list[Frame] = []
    pairs = itertools.zip_longest(iter(src), iter(ref))
    while len(out) < count:
        frame, clean = next(pairs, (None, None))
        if src.skipped or ref.skipped:  # the other side's next frame would be paired with the wrong one
            side = "validation" if src.skipped else "--reference"
            raise ExportError(f"validation frame {len(out) + 1}: " + expected(
                f"every {side} file readable (an unreadable one would misalign the pairs)", "one skipped"))
        if frame is None and clean is None:
            break
        if frame is None or clean is None:
            raise ExportError(expected("as many --reference frames as validation frames",
                                       f"{len(out)} reference frames for more validation frames" if clean is None
                                       else f"more reference frames than the {len(out)} validation frames"))
        where = f"validation frame {len(out) + 1}: "
        if label_maps:
            frame.truth = label_map_truth(clean.pixels, frame.pixels.shape[:2], label_maps, where)
        else:
            mine = (frame.pixels.shape, str(frame.pixels.dtype), frame.bits_stored)
            theirs = (clean.pixels.shape, str(clean.pixels.dtype), clean.bits_stored)
            if mine != theirs:
                raise ExportError(where + expected(
                    f"a --reference frame of the same shape, dtype and bits stored {mine}", theirs))
            frame.truth = GroundTruth(clean=clean.pixels)
        out.append(frame)
    if not out:
        raise ExportError(expected("held-out validation frames", "none"))
    return out


def label_map_truth(label_map: np.ndarray, shape: tuple[int, ...], classes: Sequence[str] | bool,
                    where: str = "") -> GroundTruth:
    """Segmentation truth from a label map (pixel value k = class k, 0 = background when the model's
    first class is): one mask (with its bounding box) per class present, labelled with its name."""
    if label_map.ndim != 2 or label_map.dtype == np.float32 or label_map.shape != tuple(shape):
        raise ExportError(where + expected(f"a single-channel integer label map of the frame's size {tuple(shape)} "
                                           "(a palette PNG reads as colour: save the indices as 8-bit grey)",
                                           f"{label_map.dtype} {label_map.shape}"))
    names = list(classes) if not isinstance(classes, bool) else []
    values = [int(v) for v in np.unique(label_map)]
    if names and values[-1] >= len(names):
        raise ExportError(where + expected(f"label values 0..{len(names) - 1} (one per class {names})", values[-1]))
    masks, boxes, labels = [], [], []
    for v in values:
        if v == 0 and (not names or names[0].lower() == "background"):
            continue
        m = label_map == v
        ys, xs = np.nonzero(m)
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(names[v] if names else str(v))
    return GroundTruth(np.asarray(boxes, np.float32).reshape(-1, 4), labels,
                       masks=np.stack(masks) if masks else np.zeros((0, *shape), bool))


# -- detection: COCO boxes ----------------------------------------------------------------
def coco_frames(folder: str, labels: str, count: int, *, classes: Sequence[str], **opts: Any) -> list[Frame]:
    """The images ``labels`` (COCO JSON) lists, read from ``folder``, with their boxes as truth."""
    from edge_runtime.sources import ImageFolderSource, natural_key

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(expected("--source: the image folder the --labels file describes", "not a folder"))
    images, boxes = read_coco(labels, classes)
    names = sorted(images, key=natural_key)[:count]
    out = []
    for i, name in enumerate(names, 1):
        where = f"image {i} of {len(names)} listed in --labels"
        path = root.joinpath(*PurePosixPath(name).parts)
        if not path.is_file():
            raise ExportError(f"{where}: " + expected("its file in the --source folder", "none"))
        frames = list(ImageFolderSource(path, **opts))
        if len(frames) != 1:
            raise ExportError(f"{where}: " + expected("one image per file", f"{len(frames)} pages"))
        frame = frames[0]
        h, w = frame.height, frame.width
        stated = images[name]
        if stated and stated != (w, h):
            raise ExportError(f"{where}: " + expected(f"width x height {stated[0]}x{stated[1]} as --labels says",
                                                      f"{w}x{h} (another or a resized image?)"))
        b, lab = boxes.get(name, (np.zeros((0, 4), np.float32), []))
        outside = (b[:, 0] < -EDGE_SLACK_PX) | (b[:, 1] < -EDGE_SLACK_PX) | (b[:, 2] > w + EDGE_SLACK_PX) \
            | (b[:, 3] > h + EDGE_SLACK_PX)
        if outside.any():
            k = int(np.argmax(outside))
            raise ExportError(f"{where}: " + expected(f"boxes inside the {w}x{h} image", [round(float(v), 1)
                                                                                           for v in b[k]]))
        b = np.clip(b, 0, [w, h, w, h]).astype(np.float32)
        frame.truth = GroundTruth(b, list(lab))
        frame.position = where.replace(" listed in --labels", "")
        out.append(frame)
    if not out:
        raise ExportError(expected("images listed in --labels", "none"))
    return out


def read_coco(path: str, classes: Sequence[str]) -> tuple[dict[str, tuple[int, int] | None],
                                                          dict[str, tuple[np.ndarray, list[str]]]]:
    """(file name -> (width, height) or None, file name -> (boxes x0 y0 x1 y1, labels)) from a COCO
    detection file, checked; every annotated category must be one of ``classes`` (when given)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError("--labels: " + expected("a readable COCO JSON file", type(exc).__name__)) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ConfigError("--labels: " + expected("a COCO object with 'images' and 'annotations' lists",
                                                  sorted(data) if isinstance(data, dict) else type(data).__name__))
    try:
        cats = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
        ids: dict[Any, str] = {}
        sizes: dict[str, tuple[int, int] | None] = {}
        for img in data["images"]:
            name = str(img["file_name"])
            parts = PurePosixPath(name.replace("\\", "/")).parts
            if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                raise ConfigError("--labels: " + expected("image file names relative to the --source folder",
                                                          f"image id {img['id']}: an absolute or '..' path"))
            if name in sizes:
                raise ConfigError("--labels: " + expected("each file name listed once", f"image id {img['id']}"))
            ids[img["id"]] = name
            sizes[name] = (int(img["width"]), int(img["height"])) if "width" in img and "height" in img else None
        found: dict[str, tuple[list[list[float]], list[str]]] = {}
        for ann in data["annotations"]:
            aid = ann.get("id", "?")
            if ann["image_id"] not in ids:
                raise ConfigError("--labels: " + expected(f"annotation {aid}'s image_id among the images",
                                                          ann["image_id"]))
            if ann.get("iscrowd"):
                raise ConfigError("--labels: " + expected("no crowd regions (iscrowd 1 is not scored here)",
                                                          f"annotation {aid}"))
            if ann["category_id"] not in cats:
                raise ConfigError("--labels: " + expected(f"annotation {aid}'s category_id among the categories",
                                                          ann["category_id"]))
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
                raise ConfigError("--labels: " + expected(f"annotation {aid}: a bbox [x, y, width, height] with "
                                                          "width and height > 0", ann["bbox"]))
            b, lab = found.setdefault(ids[ann["image_id"]], ([], []))
            b.append([x, y, x + bw, y + bh])
            lab.append(cats[ann["category_id"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError("--labels: " + expected("COCO images (id, file_name), annotations (image_id, bbox, "
                                                  "category_id) and categories (id, name)",
                                                  f"{type(exc).__name__}: {exc}")) from None
    used = sorted({lab for _, labs in found.values() for lab in labs})
    unknown = [c for c in used if classes and c not in classes]
    if unknown:
        raise ConfigError("--labels: " + expected(f"category names among the model's classes {list(classes)}",
                                                  unknown))
    return sizes, {k: (np.asarray(b, np.float32).reshape(-1, 4), lab) for k, (b, lab) in found.items()}
