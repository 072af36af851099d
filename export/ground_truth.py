"""Held-out frames of the user's own, with the ground truth the accuracy gate needs.

Phantom frames carry their ground truth; a user's frames need it beside them (`export validate
--source PATH` with one of):
- enhancement, ``reference``: clean frames paired one to one with the input frames (e.g. low-dose /
  full-dose pairs): two folders (images, or DICOM series) of the same file names read in the same
  order, frame by frame at the same position, or two single files (DICOM, video, image) of as many
  frames. Each pair agrees in shape and dtype, the reference's values within the frame's bits.
- segmentation, ``reference``: label-map images paired the same way (0 = background; value k = the
  model's class k when its first class is "background", else class k - 1).
- detection, ``labels``: a COCO detection JSON (``images[].file_name`` / ``width`` / ``height``,
  ``annotations[].image_id`` / ``bbox`` as x, y, width, height in pixels / ``category_id``,
  ``categories[].id`` / ``name``) over an image folder. The frames are the images it lists, in
  natural file-name order, matched by name; an image without annotations is a frame with no
  objects. Category names must be the model's class names.
Nothing is skipped: an unreadable file would misalign a pair or a label, so it is an error here.
Messages name a frame by its position (and COCO image id), never by its file name (file names can
identify patients).
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


FLAGS = {"source": "--source", "reference": "--reference", "labels": "--labels"}  # `export validate`'s


def labelled_frames(source: str, manifest: Mapping[str, Any], count: int, *, reference: str | None = None,
                    labels: str | None = None, flags: Mapping[str, str] = FLAGS, **opts: Any) -> list[Frame]:
    """Up to ``count`` frames from ``source`` with ground truth from ``reference`` or ``labels``
    (which one the model's task needs); ``opts`` go to edge_runtime.sources.open_source for
    ``source``; ``flags``: the CLI's names of the three, for messages (quantize has --val-...)."""
    task = manifest["task"]
    given = {"reference": reference, "labels": labels}
    need, what = {"enhancement": ("reference", "CLEAN: the clean frames paired with these"),
                  "segmentation": ("reference", "MASKS: label-map images paired with these"),
                  "detection": ("labels", "COCO.json: their boxes")}[task]
    wrong = [flags[k] for k, v in given.items() if v is not None and k != need]
    if wrong:
        raise ConfigError(expected(f"{flags[need]} for a {task} model", wrong[0]))
    if given[need] is None:
        raise ConfigError(expected(f"{flags[need]} {what} (held-out frames of your own carry no ground truth)",
                                   "none"))
    truth = str(given[need])
    classes = [str(c) for c in (manifest.get("postprocess") or {}).get("classes") or []]
    try:
        if task == "enhancement":
            return paired_frames(source, truth, count, flags=flags, **opts)
        if task == "segmentation":
            return paired_frames(source, truth, count, label_maps=classes or True, flags=flags, **opts)
        return coco_frames(source, truth, count, classes=classes, flags=flags, **opts)
    except ExportError:
        raise
    except EdgeRuntimeError as exc:  # a source's InputError: say it was the validation set
        raise ExportError(f"validation frames: {exc}") from None


# -- enhancement and segmentation: paired reference frames --------------------------------
def paired_frames(source: str, reference: str, count: int, *, label_maps: Sequence[str] | bool = False,
                  flags: Mapping[str, str] = FLAGS, **opts: Any) -> list[Frame]:
    """Frames of ``source``, each with the same-position frame of ``reference`` as its clean image, or
    (``label_maps``: the model's class names, or True without them) as its segmentation label map.

    Alignment: a folder (images or a DICOM series) pairs only with a folder of the same kind holding
    the same file names in the order both are read, frame by frame at the same position (file, page,
    frame), so a file with another page or frame count, a skipped file or another sort order is
    refused; two single files pair frame by frame and must hold as many frames where both say."""
    from edge_runtime.sources import open_source, source_kind

    ref, src_flag = flags["reference"], flags["source"]
    src = open_source(source, **opts)
    ref_src = open_source(reference, **reference_opts(source_kind(reference), opts, bool(label_maps)))
    folders = [len(getattr(x, "files", ())) > 1 or Path(spec).is_dir() for x, spec in ((src, source), (ref_src, reference))]
    if any(folders):
        if not all(folders) or type(src) is not type(ref_src):
            raise ExportError(expected(f"{src_flag} and {ref} both folders of images or both DICOM series (paired by "
                                       "file name), or both single files", f"a {type(src).__name__} and a "
                                       f"{type(ref_src).__name__}"))
        a, b = [p.name for p in getattr(src, "files", [])], [p.name for p in getattr(ref_src, "files", [])]
        if a != b:
            only = len(set(a) ^ set(b))
            raise ExportError(expected(f"the same file names in the {src_flag} and {ref} folders, read in the same "
                                       "order", f"{only} name(s) in one folder only" if only else
                                       f"{len(a)} and {len(b)} files" if len(a) != len(b) else "another order "
                                       "(a DICOM series is read by InstanceNumber)"))
    elif src.n_frames is not None and ref_src.n_frames is not None and src.n_frames != ref_src.n_frames:
        raise ExportError(expected(f"as many {ref} frames as {src_flag} frames", f"{ref_src.n_frames} and "
                                   f"{src.n_frames}"))
    out: list[Frame] = []
    pairs = itertools.zip_longest(iter(src), iter(ref_src))
    while len(out) < count:
        frame, clean = next(pairs, (None, None))
        if src.skipped or ref_src.skipped:  # the other side's next frame would be paired with the wrong one
            side = src_flag if src.skipped else ref
            raise ExportError(f"validation frame {len(out) + 1}: " + expected(
                f"every {side} file readable (an unreadable one would misalign the pairs)", "one skipped"))
        if frame is None and clean is None:
            break
        if frame is None or clean is None:
            raise ExportError(expected(f"as many {ref} frames as {src_flag} frames",
                                       f"{len(out)} {ref} frames for more {src_flag} frames" if clean is None
                                       else f"more {ref} frames than the {len(out)} {src_flag} frames"))
        where = f"validation frame {len(out) + 1}: "
        if any(folders) and frame.position != clean.position:
            raise ExportError(where + expected(f"its {ref} frame at the same place ({frame.position})",
                                               clean.position or "another"))
        if label_maps:
            frame.truth = label_map_truth(clean.pixels, frame.pixels.shape[:2], label_maps, where)
        else:
            check_reference(frame, clean.pixels, where, ref)
            frame.truth = GroundTruth(clean=clean.pixels)
        out.append(frame)
    if not out:
        raise ExportError(expected("held-out validation frames", "none"))
    return out


def reference_opts(kind: str, opts: Mapping[str, Any], label_maps: bool) -> dict[str, Any]:
    """How to read the reference frames: by their own kind (DICOM states its own modality and depth),
    never with the source's bit depth (the pairs are checked against each frame's own, check_reference),
    and label maps as stored (a grey conversion would mix the class values)."""
    if kind in ("dicom", "phantom"):
        return {}
    keep = ("modality",) if label_maps else ("modality", "gray")
    return {k: opts[k] for k in keep if k in opts}


def check_reference(frame: Frame, clean: np.ndarray, where: str, ref: str = "--reference") -> None:
    """A clean reference of the frame's shape and dtype whose values fit the frame's bits stored."""
    if clean.shape != frame.pixels.shape or clean.dtype != frame.pixels.dtype:
        raise ExportError(where + expected(f"a {ref} frame of the same shape and dtype "
                                           f"{frame.pixels.shape} {frame.pixels.dtype}", f"{clean.shape} {clean.dtype}"))
    if clean.dtype != np.float32:
        peak, top = int(clean.max(initial=0)), 2 ** int(frame.bits_stored or clean.dtype.itemsize * 8) - 1
        if peak > top:
            raise ExportError(where + expected(f"{ref} values within the frame's {frame.bits_stored} bits (0..{top})",
                                               f"a maximum of {peak}"))


def label_map_truth(label_map: np.ndarray, shape: tuple[int, ...], classes: Sequence[str] | bool,
                    where: str = "") -> GroundTruth:
    """Segmentation truth from a label map, 0 = background: one mask (with its bounding box) per class
    present, labelled with its name. Pixel value k is the model's class k when its first class is
    named background (softmax with a background channel), else class k - 1 (e.g. ["lesion"]: a 0/1
    mask). Without class names only one foreground value is accepted: the gate would compare every
    output channel with the union of the classes."""
    if label_map.ndim != 2 or label_map.dtype == np.float32 or label_map.shape != tuple(shape):
        raise ExportError(where + expected(f"a single-channel integer label map of the frame's size {tuple(shape)} "
                                           "(a palette PNG reads as colour: save the indices as 8-bit grey)",
                                           f"{label_map.dtype} {label_map.shape}"))
    names = list(classes) if not isinstance(classes, bool) else []
    shift = 0 if names and names[0].lower() == "background" else 1
    values = [int(v) for v in np.unique(label_map) if v != 0]
    if names and values and values[-1] - shift >= len(names):
        raise ExportError(where + expected(f"label values 0..{len(names) - 1 + shift} (0 background, then the classes "
                                           f"{names[1:] if not shift else names})", values[-1]))
    if not names and len(values) > 1:
        raise ExportError(where + expected("one foreground label value without class names (name the classes in the "
                                           "manifest's postprocess.classes)", values))
    masks, boxes, labels = [], [], []
    for v in values:
        m = label_map == v
        ys, xs = np.nonzero(m)
        masks.append(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(names[v - shift] if names else str(v))
    return GroundTruth(np.asarray(boxes, np.float32).reshape(-1, 4), labels,
                       masks=np.stack(masks) if masks else np.zeros((0, *shape), bool))


# -- detection: COCO boxes ----------------------------------------------------------------
def coco_frames(folder: str, labels: str, count: int, *, classes: Sequence[str], flags: Mapping[str, str] = FLAGS,
                **opts: Any) -> list[Frame]:
    """The images ``labels`` (COCO JSON) lists, read from ``folder``, with their boxes as truth."""
    from edge_runtime.sources import ImageFolderSource, natural_key

    lab_flag, src_flag = flags["labels"], flags["source"]
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(expected(f"{src_flag}: the image folder the {lab_flag} file describes", "not a folder"))
    images, boxes = read_coco(labels, classes, lab_flag)
    names = sorted(images, key=natural_key)[:count]
    out = []
    for i, name in enumerate(names, 1):
        image_id, stated = images[name]
        where = f"image {i} of {len(names)} (file-name order) in {lab_flag}, id {image_id}"  # ids name no patient
        path = root.joinpath(*PurePosixPath(name).parts)
        if not path.is_file():
            raise ExportError(f"{where}: " + expected(f"its file in the {src_flag} folder", "none"))
        try:
            frames = list(ImageFolderSource(path, **opts))
        except EdgeRuntimeError as exc:
            raise ExportError(f"{where}: {exc}") from None
        if len(frames) != 1:
            raise ExportError(f"{where}: " + expected("one image per file", f"{len(frames)} pages"))
        frame = frames[0]
        h, w = frame.height, frame.width
        if stated and stated != (w, h):
            raise ExportError(f"{where}: " + expected(f"width x height {stated[0]}x{stated[1]} as {lab_flag} says",
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
        frame.position = f"image {i} of {len(names)} (id {image_id})"
        out.append(frame)
    if not out:
        raise ExportError(expected(f"images listed in {lab_flag}", "none"))
    return out


def coco_name(name: str) -> str:
    """A COCO file_name as the relative POSIX path it names ("./a.png" and "sub\\a.png" as "a.png" and
    "sub/a.png"), or "" when it is absolute or leaves the folder."""
    text = name.replace("\\", "/")
    p = PurePosixPath(text)
    if not p.parts or text.startswith("/") or ".." in p.parts or ":" in p.parts[0]:
        return ""
    return p.as_posix()


def read_coco(path: str, classes: Sequence[str], flag: str = "--labels"
              ) -> tuple[dict[str, tuple[Any, tuple[int, int] | None]], dict[str, tuple[np.ndarray, list[str]]]]:
    """(file name -> (image id, (width, height) or None), file name -> (boxes x0 y0 x1 y1, labels)) from
    a COCO detection file, checked: names relative to the folder, ids and names unique, every annotated
    category one of ``classes`` (when given)."""
    def bad(what: str, found: Any) -> ConfigError:
        return ConfigError(f"{flag}: " + expected(what, found))

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise bad("a readable COCO JSON file", type(exc).__name__) from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise bad("a COCO object with 'images' and 'annotations' lists",
                  sorted(data) if isinstance(data, dict) else type(data).__name__)
    try:
        cats: dict[Any, str] = {}
        for c in data.get("categories") or []:
            if c["id"] in cats:
                raise bad("each category id once", f"id {c['id']} twice")
            cats[c["id"]] = str(c["name"])
        ids: dict[Any, str] = {}
        images: dict[str, tuple[Any, tuple[int, int] | None]] = {}
        for img in data["images"]:
            name = coco_name(str(img["file_name"]))
            if not name:
                raise bad(f"image file names relative to the {FLAGS['source']} folder",
                          f"image id {img['id']}: an absolute or '..' path")
            if img["id"] in ids:
                raise bad("each image id once", f"id {img['id']} twice")
            if name in images:
                raise bad("each image file listed once", f"image ids {images[name][0]} and {img['id']}")
            ids[img["id"]] = name
            size = (int(img["width"]), int(img["height"])) if "width" in img and "height" in img else None
            images[name] = (img["id"], size)
        found: dict[str, tuple[list[list[float]], list[str]]] = {}
        for ann in data["annotations"]:
            aid = ann.get("id", "?")
            if ann["image_id"] not in ids:
                raise bad(f"annotation {aid}'s image_id among the images", ann["image_id"])
            if ann.get("iscrowd"):
                raise bad("no crowd regions (iscrowd 1 is not scored here)", f"annotation {aid}")
            if ann["category_id"] not in cats:
                raise bad(f"annotation {aid}'s category_id among the categories", ann["category_id"])
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
                raise bad(f"annotation {aid}: a bbox [x, y, width, height] with width and height > 0", ann["bbox"])
            b, lab = found.setdefault(ids[ann["image_id"]], ([], []))
            b.append([x, y, x + bw, y + bh])
            lab.append(cats[ann["category_id"]])
    except (KeyError, TypeError, ValueError) as exc:
        raise bad("COCO images (id, file_name), annotations (image_id, bbox, category_id) and categories (id, "
                  "name)", f"{type(exc).__name__}: {exc}") from None
    used = sorted({lab for _, labs in found.values() for lab in labs})
    unknown = [c for c in used if classes and c not in classes]
    if unknown:
        raise bad(f"category names among the model's classes {list(classes)}", unknown)
    return images, {k: (np.asarray(b, np.float32).reshape(-1, 4), lab) for k, (b, lab) in found.items()}
