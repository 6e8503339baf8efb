#!/usr/bin/env python
"""Run a model over images, folders (recursively) and videos and write results a program can read.

Examples::

    python tools/predict.py --config-file cfg.yaml --input photos/ clip.mp4 --output results/ \
        --batch-size 4 --opts MODEL.WEIGHTS model_final.pkl
    python tools/predict.py --config-file video_cfg.yaml --input clip.mp4 frames_dir/ --output vis_results/

Written under ``--output`` (see docs/predict.md), for an image model, by what it outputs:

* ``panoptic/<name>.png`` (segment id = R + 256 G + 256^2 B, 0 = void) and ``panoptic.json``
  (COCO panoptic: ``images``, ``annotations`` with ``segments_info``, ``categories``);
* ``instances.json``: COCO results (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``,
  ``segmentation`` as compressed RLE);
* ``sem_seg/<name>.png``: the class index of each pixel (uint8, uint16 above 256 classes), and
  with ``--sem-seg-probs`` ``sem_seg_probs/<name>.npz`` (``probs``: (K, H, W) float16);
* ``images.json``: ``id``, ``file_name``, ``height``, ``width`` of each input.

For a video model (``MODEL.META_ARCHITECTURE VideoMaskFormer``) each video file, and each folder
holding frames, is one clip: ``ytvis_results.json`` (YouTube-VIS results: ``video_id``,
``category_id``, ``score``, ``segmentations``: one RLE or null per frame) and ``videos.json``.

Category ids are the dataset's own (from ``DATASETS.TEST[0]``'s metadata). An image's id is its
file name's number when the name is a number (COCO's names), else its name; ``--ids-from JSON``
takes them from a COCO / YouTube-VIS json instead. Each input's results
are kept in ``parts/``; a run skips the inputs whose part exists (``--overwrite`` redoes them),
and the json files are rebuilt from the parts of all inputs of the run.
"""

import argparse
import glob
import json
import logging
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import tqdm
from detectron2.data import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.logger import setup_logger
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mask2former_d2.config import get_cpu_tool_cfg, validate_cfg  # noqa: E402
from mask2former_d2.data.datasets.custom import add_dataset_argument  # noqa: E402
from mask2former_d2.engine.launch import run_cli  # noqa: E402
from mask2former_d2.predictor import Predictor, video_frames  # noqa: E402

logger = logging.getLogger("mask2former_d2.predict")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm")
# Always items per second, also below one per second (tqdm would switch to seconds per item).
_PROGRESS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"


class PredictError(Exception):
    """A problem with the user's arguments or files; reported as one line."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write machine-readable predictions of a model.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config (YAML)")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="image files, video files, folders (searched recursively) or glob patterns")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the results")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="images per model call (image models; see docs/predict.md)")
    parser.add_argument("--sem-seg-probs", action="store_true",
                        help="also write the per-class probabilities as compressed .npz (large)")
    parser.add_argument("--overwrite", action="store_true", help="redo inputs whose results exist")
    parser.add_argument("--device", default=None, help="MODEL.DEVICE (default: cpu)")
    parser.add_argument("--ids-from", metavar="JSON",
                        help="take image / video ids from this COCO or YouTube-VIS json (matched by file "
                        "name / frame folder), so that the results can be scored against it")
    add_dataset_argument(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pkl; must come last")
    return parser


# ----------------------------------------------------------------------------- inputs
def _is_video(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def expand_inputs(patterns: Sequence[str]) -> List[Tuple[str, str]]:
    """``(name, path)`` of every image or video file the ``--input`` values name: a file as
    given (name: its stem), a folder's files recursively (name: path below the folder, without
    extension), glob matches. Names are unique.

    Raises:
        PredictError: a value that names nothing usable, or two inputs with one name.
    """
    items: Dict[str, str] = {}
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if os.path.isdir(path):
            found = []
            for folder, _, names in os.walk(path):
                found += [os.path.join(folder, n) for n in names if _is_image(n) or _is_video(n)]
            pairs = [(os.path.splitext(os.path.relpath(p, path))[0], p) for p in found]
        elif os.path.isfile(path):
            pairs = [(os.path.splitext(os.path.basename(path))[0], path)]
        elif any(c in path for c in "*?["):
            pairs = [(os.path.splitext(os.path.basename(p))[0], p) for p in glob.glob(path) if os.path.isfile(p)]
        else:
            raise PredictError(f"--input {pattern}: no such file or folder")
        pairs = [(n, p) for n, p in pairs if _is_image(p) or _is_video(p)]
        if not pairs:
            raise PredictError(
                f"--input {pattern}: no image ({', '.join(IMAGE_EXTENSIONS)}) or video "
                f"({', '.join(VIDEO_EXTENSIONS)}) files"
            )
        for name, p in pairs:
            if name in items and os.path.abspath(items[name]) != os.path.abspath(p):
                raise PredictError(f"inputs {items[name]} and {p} would both write results named {name!r}")
            items[name] = p
    return sorted(items.items())


def image_id(name: str, *, frame: bool = False) -> Any:
    """The id of an input named ``name``: the number its file name is (COCO's names), else the
    name (always the name for a video frame, whose file name is its index in the video)."""
    base = os.path.basename(name)
    return int(base) if base.isdigit() and not frame else name


def read_ids(json_file: str) -> Dict[str, Any]:
    """File name -> image id of a COCO json's ``images``, or frame folder -> video id of a
    YouTube-VIS json's ``videos``.

    Raises:
        PredictError: the file is missing or has neither list.
    """
    try:
        with open(json_file) as f:
            content = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PredictError(f"--ids-from {json_file}: cannot read it as JSON ({e})") from None
    if isinstance(content, dict) and isinstance(content.get("videos"), list):
        return {os.path.basename(os.path.dirname(v["file_names"][0])): v["id"] for v in content["videos"]}
    if isinstance(content, dict) and isinstance(content.get("images"), list):
        return {os.path.basename(im["file_name"]): im["id"] for im in content["images"]}
    raise PredictError(f"--ids-from {json_file}: has neither 'images' (COCO) nor 'videos' (YouTube-VIS)")


def _read_video(path: str) -> Iterator[np.ndarray]:
    try:
        yield from video_frames(path)
    except ValueError as e:
        raise PredictError(str(e)) from None


def _video_length(path: str) -> int:
    video = cv2.VideoCapture(path)
    try:
        return max(int(video.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
    finally:
        video.release()


# ----------------------------------------------------------------------------- outputs
class CategoryMap:
    """Contiguous class ids of the model <-> the dataset's category ids and names."""

    def __init__(self, metadata: Metadata, num_classes: int) -> None:
        things = dict(metadata.get("thing_dataset_id_to_contiguous_id", None) or {})
        stuff = dict(metadata.get("stuff_dataset_id_to_contiguous_id", None) or {})
        self.thing_ids = set(things.values())
        self.to_dataset = {c: c for c in range(num_classes)}
        self.to_dataset.update({c: d for d, c in stuff.items()})
        self.to_dataset.update({c: d for d, c in things.items()})
        names = metadata.get("stuff_classes", None) or metadata.get("thing_classes", None) or []
        thing_names = metadata.get("thing_classes", None) or []
        self.categories = []
        for c in range(num_classes):
            if c < len(names) and (len(names) == num_classes or c not in self.thing_ids):
                name = names[c]
            elif c < len(thing_names):
                name = thing_names[c]
            else:
                name = f"class_{c}"
            self.categories.append({
                "id": self.to_dataset[c], "name": name, "isthing": int(c in self.thing_ids or not stuff),
            })

    def __call__(self, contiguous_id: int) -> int:
        return self.to_dataset.get(int(contiguous_id), int(contiguous_id))


def _id_to_rgb(seg: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 in COCO panoptic's encoding."""
    return np.stack([seg % 256, seg // 256 % 256, seg // 65536], axis=-1).astype(np.uint8)


def _save_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _atomic_json(path: str, content: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(content, f)
    os.replace(tmp, path)


def write_image_results(
    out_dir: str, name: str, source: str, outputs: Dict[str, Any], categories: CategoryMap, *, probs: bool,
    frame: bool = False, ids: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Writes one image's PNG / npz outputs and returns its part (what the json files hold).

    Args:
        out_dir: the output folder.
        name: the input's name (its path below the input folder, without extension).
        source: the image file (``<video>#<frame index>`` for a video frame).
        outputs: the model's output dict for the image.
        categories: the model's classes -> the dataset's category ids.
        probs: whether to write the semantic probabilities too.
        frame: whether the image is a video frame (see :func:`image_id`).
        ids: file name -> image id (``--ids-from``); other images get :func:`image_id`.
    """
    img_id = None if frame else (ids or {}).get(os.path.basename(source))
    img_id = image_id(name, frame=frame) if img_id is None else img_id
    part: Dict[str, Any] = {"image": {"id": img_id, "name": name, "file_name": source}}
    if "panoptic_seg" in outputs:
        seg, infos = outputs["panoptic_seg"]
        seg = seg.to("cpu").numpy().astype(np.int64)
        height, width = seg.shape
        areas = np.bincount(seg.ravel(), minlength=max([s["id"] for s in infos] + [0]) + 1)
        segments = []
        for s in infos:
            if areas[s["id"]] == 0:
                continue
            ys, xs = np.nonzero(seg == s["id"])
            segments.append({
                "id": int(s["id"]), "category_id": categories(s["category_id"]), "isthing": int(bool(s["isthing"])),
                "iscrowd": 0, "area": int(areas[s["id"]]),
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            })
        _save_png(os.path.join(out_dir, "panoptic", name + ".png"), _id_to_rgb(seg))
        part["panoptic"] = {"file_name": name + ".png", "segments_info": segments}
    if "instances" in outputs:
        instances = outputs["instances"].to("cpu")
        height, width = instances.image_size
        results = instances_to_coco_json(instances, img_id)
        for r in results:
            r["category_id"] = categories(r["category_id"])
        part["instances"] = results
    if "sem_seg" in outputs:
        sem = outputs["sem_seg"].to("cpu")
        labels = (sem.argmax(dim=0) if sem.dim() == 3 else sem).numpy()
        height, width = labels.shape
        dtype = np.uint8 if (sem.shape[0] if sem.dim() == 3 else labels.max() + 1) <= 256 else np.uint16
        _save_png(os.path.join(out_dir, "sem_seg", name + ".png"), labels.astype(dtype))
        if probs and sem.dim() == 3:
            path = os.path.join(out_dir, "sem_seg_probs", name + ".npz")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            np.savez_compressed(path, probs=sem.numpy().astype(np.float16))
        part["sem_seg"] = name + ".png"
    part["image"].update(height=int(height), width=int(width))
    return part


def write_summaries(out_dir: str, parts: Sequence[Dict[str, Any]], categories: CategoryMap) -> List[str]:
    """Writes ``images.json`` and, for the outputs the parts hold, ``panoptic.json`` and
    ``instances.json``; returns the files written."""
    images = [p["image"] for p in parts]
    written = [os.path.join(out_dir, "images.json")]
    _atomic_json(written[0], images)
    if any("panoptic" in p for p in parts):
        annotations = [{"image_id": p["image"]["id"], **p["panoptic"]} for p in parts if "panoptic" in p]
        path = os.path.join(out_dir, "panoptic.json")
        _atomic_json(path, {"images": images, "annotations": annotations, "categories": categories.categories})
        written.append(path)
    if any("instances" in p for p in parts):
        path = os.path.join(out_dir, "instances.json")
        _atomic_json(path, [r for p in parts for r in p.get("instances", [])])
        written.append(path)
    return written


# ----------------------------------------------------------------------------- running
def _part_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, "parts", name + ".json")


def _load_part(out_dir: str, name: str) -> Optional[Dict[str, Any]]:
    path = _part_path(out_dir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _image_units(items: Sequence[Tuple[str, str]]) -> Iterator[Tuple[str, str, Any, bool]]:
    """``(name, source, loader, is_frame)`` per image: an image file, or each frame of a video
    file (named ``<video>/<frame index>``); ``loader()`` reads it (frames are decoded in order)."""
    for name, path in items:
        if _is_video(path):
            for t, frame in enumerate(_read_video(path)):
                yield f"{name}/{t:06d}", f"{path}#{t}", (lambda f=frame: f), True
        else:
            yield name, path, (lambda p=path: read_image(p, format="BGR")), False


def run_images(
    predictor: Predictor, items: Sequence[Tuple[str, str]], out_dir: str, *, batch_size: int, probs: bool,
    overwrite: bool, ids: Optional[Dict[str, Any]] = None,
) -> Tuple[List[Dict[str, Any]], int]:
    """Predicts every image (and video frame), ``batch_size`` per model call; returns the parts
    of all of them and how many were computed (the others were done before)."""
    num_classes = predictor.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    categories = CategoryMap(predictor.metadata, num_classes)
    total = sum(_video_length(p) if _is_video(p) else 1 for _, p in items)
    parts: List[Dict[str, Any]] = []
    computed = 0
    pending: List[Tuple[str, str, np.ndarray, bool]] = []
    progress = tqdm.tqdm(total=total, unit="img", desc="predict", bar_format=_PROGRESS_FORMAT)

    def flush() -> None:
        nonlocal computed
        outputs = predictor([image for _, _, image, _ in pending])
        for (name, source, _, frame), out in zip(pending, outputs):
            part = write_image_results(
                out_dir, name, source, out, categories, probs=probs, frame=frame, ids=ids
            )
            _atomic_json(_part_path(out_dir, name), part)  # last: marks the input as done
            parts.append(part)
        computed += len(pending)
        progress.update(len(pending))
        pending.clear()

    try:
        for name, source, load, frame in _image_units(items):
            done = None if overwrite else _load_part(out_dir, name)
            if done is not None:
                parts.append(done)
                progress.update(1)
                continue
            try:
                image = load()
            except OSError as e:
                raise PredictError(f"{source}: cannot read the image ({e})") from None
            pending.append((name, source, image, frame))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        progress.close()
    write_summaries(out_dir, parts, categories)
    return parts, computed


def _clips(items: Sequence[Tuple[str, str]]) -> List[Tuple[str, str, List[str]]]:
    """``(name, source, frame files)`` of each clip: a video file (no frame files), or the image
    files of one folder in name order (name: the folder)."""
    clips: Dict[str, Tuple[str, List[str]]] = {}
    for name, path in items:
        if _is_video(path):
            clips[name] = (path, [])
        else:
            folder = os.path.dirname(name) or os.path.basename(os.path.dirname(os.path.abspath(path)))
            clips.setdefault(folder, (os.path.dirname(path), []))[1].append(path)
    return [(n, s, sorted(f)) for n, (s, f) in sorted(clips.items())]


def run_videos(
    predictor: Any, items: Sequence[Tuple[str, str]], out_dir: str, *, overwrite: bool,
    ids: Optional[Dict[str, Any]] = None,
) -> Tuple[List[Dict[str, Any]], int]:
    """Predicts each clip with a video model; writes ``ytvis_results.json`` and ``videos.json``."""
    categories = CategoryMap(predictor.metadata, predictor.cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    parts, computed = [], 0
    clips = _clips(items)
    progress = tqdm.tqdm(total=len(clips), unit="video", desc="predict", bar_format=_PROGRESS_FORMAT)
    try:
        for name, source, files in clips:
            done = None if overwrite else _load_part(out_dir, name)
            if done is None:
                frames = [read_image(f, format="BGR") for f in files] if files else list(_read_video(source))
                if not frames:
                    raise PredictError(f"{source}: no frame could be decoded")
                out = predictor(frames)
                vid = (ids or {}).get(os.path.basename(name), image_id(name))
                results = []
                for score, label, masks in zip(out["pred_scores"], out["pred_labels"], out["pred_masks"]):
                    masks = torch.as_tensor(masks).to("cpu", torch.bool).numpy()
                    segms = [_encode(m) if m.any() else None for m in masks]  # (T, H, W): null where absent
                    results.append({"video_id": vid, "category_id": categories(label), "score": float(score),
                                    "segmentations": segms})
                height, width = frames[0].shape[:2]
                done = {"video": {"id": vid, "name": name, "source": source, "length": len(frames),
                                  "height": height, "width": width, "file_names": files},
                        "results": results}
                _atomic_json(_part_path(out_dir, name), done)
                computed += 1
            parts.append(done)
            progress.update(1)
    finally:
        progress.close()
    _atomic_json(os.path.join(out_dir, "videos.json"), [p["video"] for p in parts])
    _atomic_json(os.path.join(out_dir, "ytvis_results.json"), [r for p in parts for r in p["results"]])
    return parts, computed


def _encode(mask: np.ndarray) -> Dict[str, Any]:
    """(H, W) bool -> compressed COCO RLE with a str ``counts`` (JSON-ready)."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="mask2former_d2", abbrev_name="m2f")
    if args.batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1; got {args.batch_size}")
    items = expand_inputs(args.input)
    ids = read_ids(args.ids_from) if args.ids_from else None
    if os.path.isfile(args.output):
        raise PredictError(f"--output {args.output}: is a file; expected a folder")
    try:
        cfg = get_cpu_tool_cfg(args.config_file, args.opts)
        if args.device:
            cfg.defrost()
            cfg.MODEL.DEVICE = args.device
            cfg.freeze()
        validate_cfg(cfg)
    except (ValueError, KeyError, FileNotFoundError) as e:  # the messages name the key or file
        raise PredictError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from None
    os.makedirs(args.output, exist_ok=True)
    video_model = cfg.MODEL.META_ARCHITECTURE.startswith("Video")
    if video_model:
        from mask2former_d2.video_predictor import VideoPredictor

        predictor = VideoPredictor(cfg)
        parts, computed = run_videos(predictor, items, args.output, overwrite=args.overwrite, ids=ids)
    else:
        predictor = Predictor(cfg)
        parts, computed = run_images(
            predictor, items, args.output, batch_size=args.batch_size, probs=args.sem_seg_probs,
            overwrite=args.overwrite, ids=ids,
        )
    logger.info(f"{computed} computed, {len(parts) - computed} already done; results in {args.output}")
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Runs :func:`main`; a user error becomes one line on stderr and exit status 1."""
    run_cli(main, argv, "predict.py", (PredictError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    cli()
