"""Tiny YouTube-VIS layouts written on the fly for the video data tests."""
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image


def box_mask(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def encode(mask: np.ndarray, kind: str):
    """A frame segmentation in one of the YouTube-VIS encodings: "rle", "uncompressed", "polygon"."""
    if kind == "rle":
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        return rle
    if kind == "uncompressed":
        flat = mask.astype(np.uint8).ravel(order="F")
        counts, value, run = [], 0, 0
        for v in flat:
            if v == value:
                run += 1
            else:
                counts.append(run)
                value, run = v, 1
        counts.append(run)
        return {"counts": [int(c) for c in counts], "size": list(mask.shape)}
    if kind == "polygon":  # the mask must be one axis-aligned box
        ys, xs = np.nonzero(mask)
        y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        return [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]
    raise ValueError(kind)


def write_ytvis(
    root: str,
    videos: Sequence[Dict],
    categories: Optional[List[Dict]] = None,
    json_name: str = "train.json",
    frame_images: Optional[Dict[str, np.ndarray]] = None,
) -> str:
    """Writes ``root/JPEGImages/<video>/<t>.jpg`` and ``root/<json_name>``; returns the json path.

    Each video: {"id", "name", "masks": {track_id: (category_id, [mask or None per frame])},
    "kind": encoding, "h", "w", "length"}. Frames are random noise unless ``frame_images`` gives
    arrays by "<video>/<t>".
    """
    categories = categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
    rng = np.random.default_rng(0)
    out_videos, anns = [], []
    for v in videos:
        h, w, length = v["h"], v["w"], v["length"]
        names = [f"{v['name']}/{t:05d}.jpg" for t in range(length)]
        for name in names:
            os.makedirs(os.path.join(root, "JPEGImages", v["name"]), exist_ok=True)
            img = (frame_images or {}).get(name)
            if img is None:
                img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(root, "JPEGImages", name), quality=100)
        out_videos.append({"id": v["id"], "width": w, "height": h, "length": length, "file_names": names})
        for track_id, (cat, masks) in v["masks"].items():
            segs = [None if m is None else encode(m, v.get("kind", "rle")) for m in masks]
            boxes = [None if m is None else list(mask_util.toBbox(mask_util.encode(
                np.asfortranarray(m.astype(np.uint8)))).tolist()) for m in masks]
            areas = [None if m is None else int(m.sum()) for m in masks]
            anns.append({"id": track_id, "video_id": v["id"], "category_id": cat, "iscrowd": 0,
                         "width": w, "height": h, "length": length,
                         "segmentations": segs, "bboxes": boxes, "areas": areas})
    path = os.path.join(root, json_name)
    with open(path, "w") as f:
        json.dump({"videos": out_videos, "annotations": anns, "categories": categories}, f)
    return path
