#!/usr/bin/env python3
"""Converts ADE20K SceneParsing (150 classes) annotations to Detectron2's label convention.

Reads ``ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = "other", 1..150 =
classes) and writes ``ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png``
with 255 for "other" (ignored) and 0..149 for the classes, the layout ``ade20k_sem_seg_*`` and
``ade20k_panoptic_*`` read. Outputs that already exist are kept unless ``--overwrite``.

Usage: python datasets/prepare_ade20k_sem_seg.py [--root $DETECTRON2_DATASETS]
"""

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tqdm
from PIL import Image

from mask2former_d2.data.datasets.prepare_utils import convert_splits, run_script, save_image_atomic, script_parser

SPLITS = ("training", "validation")
NUM_CLASSES = 150


def convert_annotation(label: np.ndarray, source: str = "<array>") -> np.ndarray:
    """(H, W) uint8 SceneParsing label -> (H, W) uint8 label with 0 -> 255 and k -> k - 1."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(
            f"{source}: expected an (H, W) uint8 label, got {label.dtype} {label.shape}"
        )
    if label.max(initial=0) > NUM_CLASSES:
        raise ValueError(f"{source}: label value {label.max()} > {NUM_CLASSES}")
    out = label.astype(np.int16) - 1
    out[label == 0] = 255
    return out.astype(np.uint8)


def convert_split(src_dir: str, dst_dir: str, overwrite: bool = False) -> Tuple[int, int]:
    """Converts every PNG of ``src_dir`` into ``dst_dir``. Returns (written, skipped)."""
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(
            f"ADE20K annotation directory not found: {src_dir!r} (see datasets/README.md)"
        )
    names = sorted(f for f in os.listdir(src_dir) if f.endswith(".png"))
    written = skipped = 0
    for name in tqdm.tqdm(names, desc=os.path.basename(src_dir.rstrip("/"))):
        dst = os.path.join(dst_dir, name)
        if os.path.exists(dst) and not overwrite:
            skipped += 1
            continue
        src = os.path.join(src_dir, name)
        with Image.open(src) as im:
            label = np.asarray(im)
        save_image_atomic(convert_annotation(label, src), dst)
        written += 1
    return written, skipped


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
    args = script_parser(__doc__, "ADEChallengeData2016", SPLITS).parse_args(argv)
    base = os.path.join(args.root, "ADEChallengeData2016")

    def convert(split: str) -> Tuple[int, int]:
        src, dst = (os.path.join(base, d, split) for d in ("annotations", "annotations_detectron2"))
        return convert_split(src, dst, overwrite=args.overwrite)

    return convert_splits(args.splits, convert)


if __name__ == "__main__":
    run_script(main)
