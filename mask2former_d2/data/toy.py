"""A small generated dataset in the real COCO panoptic on-disk format.

It lets the quick-start and end-to-end tests train and evaluate with the real mappers and
evaluators without downloading anything. Each image is a textured scene: two stuff classes
(``sky`` above a wavy horizon, ``ground`` below) and up to four things (``disc``, ``square``,
``triangle``), each thing a flat colour with noise. Written files:

    <root>/images/<split>/<id>.jpg            RGB images
    <root>/panoptic/<split>/<id>.png          COCO panoptic PNGs (id = R + 256 G + 256^2 B)
    <root>/panoptic_<split>.json              COCO panoptic json
    <root>/instances_<split>.json             COCO instance json (RLE masks) for instance AP
    <root>/sem_seg/<split>/<id>.png           semantic labels (contiguous ids, 255 = void)
"""
import json
import os
from typing import Dict, List

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .datasets.utils import panoptic_metadata

__all__ = ["TOY_CATEGORIES", "make_toy_panoptic_dataset", "register_toy_panoptic", "toy_metadata"]

# COCO-style categories: things first, then stuff (contiguous ids follow this order).
TOY_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "disc", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 130, 200]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [250, 190, 20]},
    {"id": 10, "name": "sky", "isthing": 0, "color": [135, 190, 235]},
    {"id": 11, "name": "ground", "isthing": 0, "color": [90, 120, 60]},
]


def toy_metadata() -> Dict:
    """Metadata in Detectron2's panoptic convention (contiguous ids over all classes)."""
    things = [c for c in TOY_CATEGORIES if c["isthing"]]
    return panoptic_metadata(
        things,
        TOY_CATEGORIES,
        {c["id"]: i for i, c in enumerate(TOY_CATEGORIES) if c["isthing"]},
        # Every class, things included: the semantic evaluator scores them all.
        {c["id"]: i for i, c in enumerate(TOY_CATEGORIES)},
    )


def _shape_mask(kind: str, h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # Upward triangle: apex at (cy - r), base at (cy + r).
    t = (yy - (cy - r)) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * r)


def _scene(rng: np.random.Generator, h: int, w: int):
    """Returns the RGB image and a list of (category, bool mask) segments, non-overlapping."""
    by_name = {c["name"]: c for c in TOY_CATEGORIES}
    cols = np.arange(w, dtype=np.float32)
    horizon = h * rng.uniform(0.35, 0.6) + h * 0.06 * np.sin(cols / w * rng.uniform(3, 9) + rng.uniform(0, 6))
    sky = np.arange(h, dtype=np.float32)[:, None] < horizon[None, :]
    owner = np.where(sky, by_name["sky"]["id"], by_name["ground"]["id"]).astype(np.int32)
    segments = []  # (category, mask) for things, painted over stuff
    occupied = np.zeros((h, w), dtype=bool)
    for _ in range(int(rng.integers(1, 5))):
        kind = ["disc", "square", "triangle"][int(rng.integers(0, 3))]
        r = rng.uniform(0.08, 0.18) * min(h, w)
        cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
        m = _shape_mask(kind, h, w, cy, cx, r) & ~occupied
        if m.sum() < 0.3 * np.pi * r * r:  # mostly hidden: skip
            continue
        occupied |= m
        segments.append((by_name[kind], m))
    for cat in (by_name["sky"], by_name["ground"]):
        m = (owner == cat["id"]) & ~occupied
        if m.any():
            segments.insert(0, (cat, m))
    img = np.zeros((h, w, 3), dtype=np.float32)
    for cat, m in segments:
        base = np.array(cat["color"], dtype=np.float32) * rng.uniform(0.8, 1.1)
        img[m] = base
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), segments


def _atomic_write(path: str, write) -> None:
    """Writes through a temporary file in the same folder, then renames it into place, so that
    a concurrent reader (another worker generating the same files) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    write(tmp)
    os.replace(tmp, path)


def _save_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f)

    _atomic_write(path, write)


def make_toy_panoptic_dataset(
    root: str, *, splits: Dict[str, int] = None, height: int = 160, width: int = 224, seed: int = 0
) -> str:
    """Writes the dataset under ``root`` (skipped when it is already complete). Returns root."""
    from pycocotools import mask as mask_util

    splits = splits or {"train": 48, "val": 8}
    rng = np.random.default_rng(seed)
    for split, count in splits.items():
        pan_json = os.path.join(root, f"panoptic_{split}.json")
        if os.path.exists(pan_json):
            continue
        for sub in ("images", "panoptic", "sem_seg"):
            os.makedirs(os.path.join(root, sub, split), exist_ok=True)
        contiguous = {c["id"]: i for i, c in enumerate(TOY_CATEGORIES)}
        images, annotations, instances = [], [], []
        for i in range(count):
            image_id = i + 1
            name = f"{split}_{image_id:05d}"
            img, segments = _scene(rng, height, width)
            _atomic_write(
                os.path.join(root, "images", split, name + ".jpg"),
                lambda t, a=img: Image.fromarray(a).save(t, quality=95),
            )
            pan = np.zeros((height, width, 3), dtype=np.uint8)
            sem = np.full((height, width), 255, dtype=np.uint8)
            infos = []
            for k, (cat, m) in enumerate(segments):
                seg_id = k + 1 + 1000 * cat["id"]
                pan[m] = [seg_id % 256, (seg_id // 256) % 256, seg_id // 65536]
                sem[m] = contiguous[cat["id"]]
                ys, xs = np.nonzero(m)
                bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
                infos.append({"id": seg_id, "category_id": cat["id"], "iscrowd": 0,
                              "area": int(m.sum()), "bbox": bbox})
                if cat["isthing"]:
                    rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode("ascii")
                    instances.append({"id": len(instances) + 1, "image_id": image_id,
                                      "category_id": cat["id"], "segmentation": rle,
                                      "area": int(m.sum()), "bbox": bbox, "iscrowd": 0})
            _atomic_write(
                os.path.join(root, "panoptic", split, name + ".png"),
                lambda t, a=pan: Image.fromarray(a).save(t),
            )
            _atomic_write(
                os.path.join(root, "sem_seg", split, name + ".png"),
                lambda t, a=sem: Image.fromarray(a).save(t),
            )
            images.append({"id": image_id, "file_name": name + ".jpg", "height": height, "width": width})
            annotations.append({"image_id": image_id, "file_name": name + ".png", "segments_info": infos})
        cats = [{k: c[k] for k in ("id", "name", "isthing", "color")} | {"supercategory": "toy"}
                for c in TOY_CATEGORIES]
        _save_json(
            os.path.join(root, f"instances_{split}.json"),
            {"images": images, "annotations": instances,
             "categories": [c for c in cats if c["isthing"]]},
        )
        # Written last: its presence marks the split as complete.
        _save_json(pan_json, {"images": images, "annotations": annotations, "categories": cats})
    return root


def _load_split(root: str, split: str) -> List[Dict]:
    with open(os.path.join(root, f"panoptic_{split}.json")) as f:
        data = json.load(f)
    meta = toy_metadata()
    things, every = meta["thing_dataset_id_to_contiguous_id"], meta["stuff_dataset_id_to_contiguous_id"]
    images = {im["id"]: im for im in data["images"]}
    records = []
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        segments = []
        for s in ann["segments_info"]:
            s = dict(s)
            s["isthing"] = s["category_id"] in things
            s["category_id"] = every[s["category_id"]]
            segments.append(s)
        stem = os.path.splitext(im["file_name"])[0]
        records.append({
            "file_name": os.path.join(root, "images", split, im["file_name"]),
            "image_id": im["id"],
            "height": im["height"],
            "width": im["width"],
            "pan_seg_file_name": os.path.join(root, "panoptic", split, ann["file_name"]),
            "sem_seg_file_name": os.path.join(root, "sem_seg", split, stem + ".png"),
            "segments_info": segments,
        })
    return records


def _generate_and_load(root: str, split: str) -> List[Dict]:
    make_toy_panoptic_dataset(root)  # no-op when already written
    return _load_split(root, split)


def register_toy_panoptic(root: str, prefix: str = "toy_panoptic") -> List[str]:
    """Registers ``<prefix>_train`` and ``<prefix>_val`` (idempotent). Returns the names.

    The files are generated under ``root`` the first time the dataset is loaded, so the names
    work in any command (``train_net.py ... DATASETS.TRAIN "('toy_panoptic_train',)"``).
    """
    names = []
    for split in ("train", "val"):
        name = f"{prefix}_{split}"
        names.append(name)
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda r=root, s=split: _generate_and_load(r, s))
        MetadataCatalog.get(name).set(
            image_root=os.path.join(root, "images", split),
            panoptic_root=os.path.join(root, "panoptic", split),
            panoptic_json=os.path.join(root, f"panoptic_{split}.json"),
            sem_seg_root=os.path.join(root, "sem_seg", split),
            json_file=os.path.join(root, f"instances_{split}.json"),
            evaluator_type="coco_panoptic_seg",
            ignore_label=255,
            label_divisor=1000,
            **toy_metadata(),
        )
    return names
