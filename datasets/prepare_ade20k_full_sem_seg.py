#!/usr/bin/env python3
"""Prepares ADE20K-full (ADE20K_2021_17_01) for 847-class semantic segmentation.

Walks ``ADE20K_2021_17_01/images/ADE/{training,validation}/**/<name>.jpg`` (each with its
``<name>_seg.png``, whose pixel class is ``R // 10 * 256 + G``) and writes, per image,
``images_detectron2/<split>/<name>.jpg`` and ``annotations_detectron2/<split>/<name>.tif``: a
16-bit label holding the contiguous id (0..846) of each of the 847 evaluated classes and 65535
for every other pixel. Images whose shorter side exceeds 512 are resized to 512 (bilinear for
the image, nearest for the label); smaller images are copied. Images whose two outputs exist are
skipped unless ``--overwrite``.

Usage: python datasets/prepare_ade20k_full_sem_seg.py [--root $DETECTRON2_DATASETS]
"""

import os
import shutil
from typing import Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import tqdm
from PIL import Image

from mask2former_d2.data.datasets.ade20k_full import (
    ADE20K_FULL_CATEGORIES,
    ADE20K_FULL_IGNORE_LABEL,
)
from mask2former_d2.data.datasets.prepare_utils import convert_splits, run_script, save_image_atomic, script_parser

SPLITS = ("training", "validation")
MAX_SHORT_SIDE = 512


def class_lut() -> np.ndarray:
    """Lookup table ADE index id (0..65535) -> contiguous id, 65535 for unevaluated classes."""
    lut = np.full(1 << 16, ADE20K_FULL_IGNORE_LABEL, dtype=np.uint16)
    for train_id, (ade_id, _) in enumerate(ADE20K_FULL_CATEGORIES):
        lut[ade_id] = train_id
    return lut


def decode_classes(seg_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 ``*_seg.png`` -> (H, W) int64 ADE index ids (0 = unlabeled)."""
    if seg_rgb.ndim != 3 or seg_rgb.shape[2] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB *_seg.png, got shape {seg_rgb.shape}")
    return (seg_rgb[..., 0].astype(np.int64) // 10) * 256 + seg_rgb[..., 1].astype(np.int64)


def output_size(height: int, width: int) -> Optional[Tuple[int, int]]:
    """(new_height, new_width) when the shorter side exceeds 512, else None."""
    if width >= height > MAX_SHORT_SIDE:
        return MAX_SHORT_SIDE, round(width / height * MAX_SHORT_SIDE)
    if height >= width > MAX_SHORT_SIDE:
        return round(height / width * MAX_SHORT_SIDE), MAX_SHORT_SIDE
    return None


def find_images(ade_root: str, split: str) -> Iterator[str]:
    """The ``*.jpg`` under ``images/ADE/<split>`` that have a ``*_seg.png`` beside them, sorted."""
    split_dir = os.path.join(ade_root, "images", "ADE", split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"ADE20K-full directory not found: {split_dir!r} (see datasets/README.md)"
        )
    for folder, _, files in sorted(os.walk(split_dir)):
        for name in sorted(files):
            if name.endswith(".jpg") and os.path.isfile(
                os.path.join(folder, name[:-4] + "_seg.png")
            ):
                yield os.path.join(folder, name)


def convert_image(image_file: str, out_image: str, out_label: str, lut: np.ndarray) -> None:
    """Writes the (resized) image and its contiguous-id uint16 TIFF label."""
    with Image.open(image_file[:-4] + "_seg.png") as im:
        label = lut[decode_classes(np.asarray(im.convert("RGB")))]
    with Image.open(image_file) as im:
        width, height = im.size
    if label.shape != (height, width):
        raise ValueError(f"{image_file}: label {label.shape} != image {(height, width)}")
    size = output_size(height, width)
    if size is None:
        os.makedirs(os.path.dirname(out_image), exist_ok=True)
        shutil.copyfile(image_file, out_image)
    else:
        with Image.open(image_file) as im:
            image = np.asarray(im.convert("RGB"))
        new_hw = (size[1], size[0])  # cv2 takes (width, height)
        save_image_atomic(cv2.resize(image, new_hw, interpolation=cv2.INTER_LINEAR), out_image)
        # A lookup commutes with nearest-neighbour resampling, so map first, resize second.
        label = cv2.resize(label, new_hw, interpolation=cv2.INTER_NEAREST)
    save_image_atomic(np.ascontiguousarray(label, dtype=np.uint16), out_label)


def convert_split(ade_root: str, split: str, overwrite: bool = False) -> Tuple[int, int]:
    """Converts every image of one split. Returns (written, skipped)."""
    lut = class_lut()
    written = skipped = 0
    for image_file in tqdm.tqdm(list(find_images(ade_root, split)), desc=split):
        name = os.path.basename(image_file)
        out_image = os.path.join(ade_root, "images_detectron2", split, name)
        out_label = os.path.join(ade_root, "annotations_detectron2", split, name[:-4] + ".tif")
        if os.path.exists(out_image) and os.path.exists(out_label) and not overwrite:
            skipped += 1
            continue
        convert_image(image_file, out_image, out_label, lut)
        written += 1
    return written, skipped


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
    args = script_parser(__doc__, "ADE20K_2021_17_01", SPLITS).parse_args(argv)
    ade_root = os.path.join(args.root, "ADE20K_2021_17_01")
    return convert_splits(args.splits, lambda split: convert_split(ade_root, split, args.overwrite))


if __name__ == "__main__":
    run_script(main)
