#!/usr/bin/env python3
"""Builds ADE20K instance-segmentation annotations (COCO format, RLE masks, 100 thing classes)
from SceneParsing's instance annotations.

Inputs, under ``ADEChallengeData2016/``: ``images/<split>/*.jpg`` and
``annotations_instance/<split>/*.png`` (R = instance class 1..100, G = instance id, 0 = none).
Output: ``ade20k_instance_{train,val}.json``, whose category ids are the classes' ADE20K-150
dataset ids (the ids of ``ade20k_panoptic_*``) and whose names are those of
``ade20k_instance_*``'s ``thing_classes``. A split whose json exists is skipped unless
``--overwrite``.

Usage: python datasets/prepare_ade20k_ins_seg.py [--root $DETECTRON2_DATASETS]
"""

import glob
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import tqdm
from PIL import Image

from mask2former_d2.data.datasets.ade20k import (
    ADE20K_INSTANCE_CLASSES,
    ADE20K_THING_IDS,
)
from mask2former_d2.data.datasets.prepare_utils import bbox_xywh, run_per_split, run_script, save_json_atomic

logger = logging.getLogger("prepare_ade20k_ins_seg")

SPLITS = {"train": "training", "val": "validation"}
CATEGORIES = [{"id": i, "name": n} for i, n in zip(ADE20K_THING_IDS, ADE20K_INSTANCE_CLASSES)]


def instances_of(
    instance: np.ndarray, image_id: str, source: str = "<array>"
) -> List[Dict[str, Any]]:
    """COCO annotations (without ``id``) of one (H, W, 3) instance label, by instance id."""
    inst_class, inst_id = instance[..., 0].astype(np.int64), instance[..., 1].astype(np.int64)
    annotations = []
    for k in np.unique(inst_id[inst_id > 0]):
        mask = inst_id == k
        classes = np.unique(inst_class[mask])
        if len(classes) != 1 or not 1 <= classes[0] <= len(ADE20K_THING_IDS):
            raise ValueError(f"{source}: instance {k} has instance classes {classes.tolist()}")
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "image_id": image_id,
                "category_id": int(ADE20K_THING_IDS[classes[0] - 1]),
                "iscrowd": 0,
                "area": int(mask.sum()),
                "bbox": bbox_xywh(mask),
                "segmentation": rle,
            }
        )
    return annotations


def convert_split(base: str, split: str, overwrite: bool = False) -> Optional[str]:
    """Writes the instance json of one split. Returns its path, or None if it was kept."""
    dirname = SPLITS[split]
    out_json = os.path.join(base, f"ade20k_instance_{split}.json")
    if os.path.exists(out_json) and not overwrite:
        logger.info("%s exists; skipping split %s", out_json, split)
        return None
    image_dir = os.path.join(base, "images", dirname)
    instance_dir = os.path.join(base, "annotations_instance", dirname)
    for path in (image_dir, instance_dir):
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"ADE20K directory not found: {path!r} (see datasets/README.md)"
            )

    images, annotations = [], []
    for image_file in tqdm.tqdm(sorted(glob.glob(os.path.join(image_dir, "*.jpg"))), desc=split):
        stem = os.path.splitext(os.path.basename(image_file))[0]
        with Image.open(image_file) as im:
            width, height = im.size
        instance_file = os.path.join(instance_dir, stem + ".png")
        with Image.open(instance_file) as im:
            instance = np.asarray(im.convert("RGB"))
        if instance.shape[:2] != (height, width):
            raise ValueError(
                f"{instance_file}: size {instance.shape[:2]} != image {(height, width)}"
            )
        images.append(
            {
                "id": stem,
                "file_name": os.path.basename(image_file),
                "width": width,
                "height": height,
            }
        )
        for ann in instances_of(instance, stem, instance_file):
            annotations.append({"id": len(annotations) + 1, **ann})

    save_json_atomic(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}, out_json
    )
    return out_json


def main(argv: Optional[Sequence[str]] = None) -> List[Optional[str]]:
    return run_per_split(__doc__, "ADEChallengeData2016", SPLITS, convert_split, argv)


if __name__ == "__main__":
    run_script(main)
