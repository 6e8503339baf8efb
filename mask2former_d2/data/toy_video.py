"""A small generated video dataset in the real YouTube-VIS on-disk format.

The video counterpart of :mod:`mask2former_d2.data.toy`: it lets the video quick-start and the
end-to-end tests train and evaluate with the real loader, mapper and evaluator without
downloading anything. Each video shows one to three shapes of the toy thing categories
(``disc``, ``square``, ``triangle``; ids 1-3, flat category colour with noise) moving over a
static textured background; some tracks appear after the first frame or disappear before the
last, and a later shape hides the earlier ones where they overlap. Written files::

    <root>/{train,valid}/JPEGImages/<video>/<frame>.jpg    RGB frames
    <root>/{train,valid}.json                              YouTube-VIS json (train: uncompressed
                                                           RLE per frame, as the released train
                                                           jsons; valid: compressed RLE)
"""
import os
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .datasets.ytvis import load_ytvis_json, ytvis_metadata
from .toy import TOY_CATEGORIES, _atomic_write, _save_json, _shape_mask

__all__ = ["TOY_YTVIS_CATEGORIES", "make_toy_ytvis_dataset", "register_toy_ytvis", "toy_ytvis_metadata"]

#: The toy thing categories (ids 1-3), as YouTube-VIS categories.
TOY_YTVIS_CATEGORIES: List[Dict] = [
    {k: c[k] for k in ("id", "name", "isthing", "color")} for c in TOY_CATEGORIES if c["isthing"]
]
# (json name, folder) of each split, as in the YouTube-VIS releases.
_SPLITS = {"train": ("train.json", "train"), "val": ("valid.json", "valid")}
# A track covering fewer pixels than this in a frame (hidden or out of view) is absent there.
_MIN_VISIBLE = 12


def toy_ytvis_metadata() -> Dict:
    """``thing_classes``, ``thing_colors`` and the id map of the toy video categories."""
    return ytvis_metadata(TOY_YTVIS_CATEGORIES)


def _uncompressed_rle(mask: np.ndarray) -> Dict:
    """COCO uncompressed RLE (column-major run lengths, starting with zeros)."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": list(mask.shape)}


def _compressed_rle(mask: np.ndarray) -> Dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth two-colour gradient with a soft wave, (h, w, 3) float32."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    t = (yy / h + 0.15 * np.sin(xx / w * rng.uniform(2, 6) + rng.uniform(0, 6)))[..., None]
    return (c0 * (1 - np.clip(t, 0, 1)) + c1 * np.clip(t, 0, 1)).astype(np.float32)


def _video(rng: np.random.Generator, length: int, h: int, w: int):
    """Frames (length, h, w, 3) uint8 and tracks [(category, [length masks or None])]."""
    background = _background(rng, h, w)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        cat = TOY_YTVIS_CATEGORIES[int(rng.integers(0, len(TOY_YTVIS_CATEGORIES)))]
        r = rng.uniform(0.12, 0.22) * min(h, w)
        start = np.array([rng.uniform(r, h - r), rng.uniform(r, w - r)])
        velocity = rng.uniform(-1, 1, 2) * min(h, w) * 0.04
        first, last = 0, length - 1
        kind = rng.random()
        if kind < 0.25:  # appears later
            first = int(rng.integers(1, max(2, length // 2)))
        elif kind < 0.5:  # disappears early
            last = int(rng.integers(length // 2, length - 1))
        shade = rng.uniform(0.8, 1.1)
        objects.append((cat, r, start, velocity, first, last, shade))

    frames = np.zeros((length, h, w, 3), dtype=np.uint8)
    tracks = [(obj[0], [None] * length) for obj in objects]
    for t in range(length):
        img = background.copy()
        visible = []
        occupied = np.zeros((h, w), dtype=bool)
        for cat, r, start, velocity, first, last, shade in reversed(objects):  # last object on top
            if not first <= t <= last:
                visible.append(None)
                continue
            cy, cx = start + velocity * t
            m = _shape_mask(cat["name"], h, w, cy, cx, r) & ~occupied
            occupied |= m
            img[m] = np.array(cat["color"], dtype=np.float32) * shade
            visible.append(m if m.sum() >= _MIN_VISIBLE else None)
        for k, m in enumerate(reversed(visible)):
            tracks[k][1][t] = m
        img += rng.normal(0, 10, size=img.shape)
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames, [tr for tr in tracks if any(m is not None for m in tr[1])]


def make_toy_ytvis_dataset(
    root: str,
    *,
    splits: Optional[Dict[str, int]] = None,
    length: int = 8,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
) -> str:
    """Writes the dataset under ``root`` (a split whose json exists is kept). Returns root.

    Args:
        splits: number of videos per split ("train", "val"); default 24 and 6.
        length: frames per video.
        height, width: frame size.
        seed: seed of the generator (the same arguments always give the same dataset).
    """
    from pycocotools import mask as mask_util

    splits = splits or {"train": 24, "val": 6}
    for split, count in splits.items():
        json_name, folder = _SPLITS[split]
        json_path = os.path.join(root, json_name)
        if os.path.exists(json_path):
            continue
        rng = np.random.default_rng([seed, sorted(_SPLITS).index(split)])
        encode = _uncompressed_rle if split == "train" else _compressed_rle
        videos, annotations = [], []
        for i in range(count):
            video_id = i + 1
            name = f"{split}_{video_id:04d}"
            os.makedirs(os.path.join(root, folder, "JPEGImages", name), exist_ok=True)
            frames, tracks = _video(rng, length, height, width)
            file_names = [f"{name}/{t:05d}.jpg" for t in range(length)]
            for file_name, frame in zip(file_names, frames):
                _atomic_write(
                    os.path.join(root, folder, "JPEGImages", file_name),
                    lambda tmp, a=frame: Image.fromarray(a).save(tmp, quality=95),
                )
            videos.append({"id": video_id, "width": width, "height": height, "length": length,
                           "file_names": file_names})
            for cat, masks in tracks:
                boxes = [None if m is None else mask_util.toBbox(_compressed_rle(m)).tolist() for m in masks]
                annotations.append({
                    "id": len(annotations) + 1, "video_id": video_id, "category_id": cat["id"], "iscrowd": 0,
                    "width": width, "height": height, "length": length,
                    "segmentations": [None if m is None else encode(m) for m in masks],
                    "bboxes": boxes,
                    "areas": [None if m is None else int(m.sum()) for m in masks],
                })
        categories = [{"id": c["id"], "name": c["name"], "supercategory": "toy"} for c in TOY_YTVIS_CATEGORIES]
        # Written last: its presence marks the split as complete.
        _save_json(json_path, {"info": {"description": "mask2former_d2 toy YouTube-VIS"}, "licenses": [],
                               "videos": videos, "annotations": annotations, "categories": categories})
    return root


def _generate_and_load(root: str, split: str, name: str) -> List[Dict]:
    make_toy_ytvis_dataset(root)  # no-op when already written
    json_name, folder = _SPLITS[split]
    return load_ytvis_json(os.path.join(root, json_name), os.path.join(root, folder, "JPEGImages"), name)


def register_toy_ytvis(root: str, prefix: str = "toy_ytvis") -> List[str]:
    """Registers ``<prefix>_train`` and ``<prefix>_val`` (idempotent). Returns the names.

    The files are generated under ``root`` the first time a split is loaded, so the names work
    in any command (``train_net_video.py ... DATASETS.TRAIN "('toy_ytvis_train',)"``). The val
    split has ground truth, so ``YTVISEvaluator`` reports AP on it.
    """
    names = []
    for split, (json_name, folder) in _SPLITS.items():
        name = f"{prefix}_{split}"
        names.append(name)
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda r=root, s=split, n=name: _generate_and_load(r, s, n))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, json_name),
            image_root=os.path.join(root, folder, "JPEGImages"),
            evaluator_type="ytvis",
            **toy_ytvis_metadata(),
        )
    return names
