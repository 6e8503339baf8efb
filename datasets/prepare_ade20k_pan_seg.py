#!/usr/bin/env python3
"""Builds ADE20K panoptic annotations (COCO panoptic format) from SceneParsing's semantic and
instance annotations.

Inputs, under ``ADEChallengeData2016/``: ``images/<split>/*.jpg``, ``annotations/<split>/*.png``
(semantic, 0 = other, 1..150) and ``annotations_instance/<split>/*.png`` (R = instance class
1..100, G = instance id, 0 = none). Outputs: ``ade20k_panoptic_{train,val}/*.png`` and
``ade20k_panoptic_{train,val}.json`` with the 150 categories (dataset ids 0..149).

Stuff classes come from the semantic map; things come from the instance map and are painted over
the stuff (the two annotations overlap slightly). Semantic pixels of a thing class that no
instance covers stay void. Segment ids are ``(category_id + 1) * 1000 + instance_id`` (instance id
0 for stuff), so a panoptic PNG alone tells each segment's class; segment areas and boxes are
measured on the final map. A split whose json exists is skipped unless ``--overwrite``; within a
split, existing PNGs are reused.

Usage: python datasets/prepare_ade20k_pan_seg.py [--root $DETECTRON2_DATASETS]
"""

import glob
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tqdm
from PIL import Image

from mask2former_d2.data.datasets.ade20k import (
    ADE20K_150_CATEGORIES,
    ADE20K_THING_IDS,
)
from mask2former_d2.data.datasets.prepare_utils import (
    bbox_xywh,
    id2rgb,
    rgb2id,
    run_per_split,
    run_script,
    save_image_atomic,
    save_json_atomic,
)

logger = logging.getLogger("prepare_ade20k_pan_seg")

SPLITS = {"train": "training", "val": "validation"}
ID_STRIDE = 1000  # segment id = (category_id + 1) * ID_STRIDE + instance id (< 256)
_ISTHING = np.array([c["isthing"] for c in ADE20K_150_CATEGORIES], dtype=bool)


def panoptic_ids(semantic: np.ndarray, instance: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Combines one image's annotations into an (H, W) int64 map of panoptic segment ids.

    Args:
        semantic: (H, W) uint8 SceneParsing label (0 = other, k = class k - 1).
        instance: (H, W, 3) uint8 instance label (R = instance class 1..100, G = instance id).
        source: file name for error messages.
    """
    if semantic.shape != instance.shape[:2]:
        raise ValueError(f"{source}: semantic {semantic.shape} != instance {instance.shape[:2]}")
    if semantic.max(initial=0) > len(ADE20K_150_CATEGORIES):
        raise ValueError(
            f"{source}: semantic label {semantic.max()} > {len(ADE20K_150_CATEGORIES)}"
        )
    ids = np.zeros(semantic.shape, dtype=np.int64)
    category = semantic.astype(np.int64) - 1  # -1 = other
    stuff = (category >= 0) & ~_ISTHING[np.clip(category, 0, None)]
    ids[stuff] = (category[stuff] + 1) * ID_STRIDE

    inst_class, inst_id = instance[..., 0].astype(np.int64), instance[..., 1].astype(np.int64)
    for k in np.unique(inst_id[inst_id > 0]):
        mask = inst_id == k
        classes = np.unique(inst_class[mask])
        if len(classes) != 1 or not 1 <= classes[0] <= len(ADE20K_THING_IDS):
            raise ValueError(f"{source}: instance {k} has instance classes {classes.tolist()}")
        ids[mask] = (ADE20K_THING_IDS[classes[0] - 1] + 1) * ID_STRIDE + k
    return ids


def segments_of(ids: np.ndarray) -> List[Dict[str, Any]]:
    """``segments_info`` of an (H, W) panoptic id map made by :func:`panoptic_ids`."""
    segments = []
    for seg_id in np.unique(ids):
        if seg_id == 0:
            continue
        mask = ids == seg_id
        segments.append(
            {
                "id": int(seg_id),
                "category_id": int(seg_id // ID_STRIDE - 1),
                "area": int(mask.sum()),
                "bbox": bbox_xywh(mask),
                "iscrowd": 0,
            }
        )
    return segments


def convert_split(base: str, split: str, overwrite: bool = False) -> Optional[str]:
    """Writes the panoptic PNGs and json of one split. Returns the json path, or None if kept."""
    dirname = SPLITS[split]
    out_json = os.path.join(base, f"ade20k_panoptic_{split}.json")
    out_dir = os.path.join(base, f"ade20k_panoptic_{split}")
    if os.path.exists(out_json) and not overwrite:
        logger.info("%s exists; skipping split %s", out_json, split)
        return None
    inputs = {
        "image": os.path.join(base, "images", dirname),
        "semantic": os.path.join(base, "annotations", dirname),
        "instance": os.path.join(base, "annotations_instance", dirname),
    }
    for what, path in inputs.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"ADE20K {what} directory not found: {path!r} (see datasets/README.md)"
            )

    images, annotations = [], []
    for image_file in tqdm.tqdm(
        sorted(glob.glob(os.path.join(inputs["image"], "*.jpg"))), desc=split
    ):
        stem = os.path.splitext(os.path.basename(image_file))[0]
        with Image.open(image_file) as im:
            width, height = im.size
        out_png = os.path.join(out_dir, stem + ".png")
        if os.path.exists(out_png) and not overwrite:
            with Image.open(out_png) as im:
                ids = rgb2id(np.asarray(im.convert("RGB")))
        else:
            semantic_file = os.path.join(inputs["semantic"], stem + ".png")
            instance_file = os.path.join(inputs["instance"], stem + ".png")
            with Image.open(semantic_file) as im:
                semantic = np.asarray(im)
            with Image.open(instance_file) as im:
                instance = np.asarray(im.convert("RGB"))
            ids = panoptic_ids(semantic, instance, instance_file)
            save_image_atomic(id2rgb(ids), out_png)
        if ids.shape != (height, width):
            raise ValueError(f"{out_png}: size {ids.shape} != image {(height, width)}")
        images.append(
            {
                "id": stem,
                "file_name": os.path.basename(image_file),
                "width": width,
                "height": height,
            }
        )
        annotations.append(
            {"image_id": stem, "file_name": stem + ".png", "segments_info": segments_of(ids)}
        )

    save_json_atomic(
        {"images": images, "annotations": annotations, "categories": list(ADE20K_150_CATEGORIES)},
        out_json,
    )
    return out_json


def main(argv: Optional[Sequence[str]] = None) -> List[Optional[str]]:
    return run_per_split(__doc__, "ADEChallengeData2016", SPLITS, convert_split, argv)


if __name__ == "__main__":
    run_script(main)
