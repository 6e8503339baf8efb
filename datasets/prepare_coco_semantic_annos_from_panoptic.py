#!/usr/bin/env python3
"""Makes COCO semantic-segmentation PNGs from the COCO panoptic annotations.

For each split, reads ``coco/annotations/panoptic_<split>.json`` and ``coco/panoptic_<split>/*.png``
and writes ``coco/panoptic_semseg_<split>/*.png``: each pixel holds the contiguous id (0..132, in
Detectron2's ``COCO_CATEGORIES`` order) of the segment that covers it, things and stuff alike
(crowd regions included), and 255 where no segment does. These PNGs are the semantic ground
truth of ``coco_2017_{train,val}_panoptic_with_sem_seg``. Existing outputs are kept unless
``--overwrite``.

Usage: python datasets/prepare_coco_semantic_annos_from_panoptic.py [--root DIR] [--workers N]
"""

import functools
import json
import multiprocessing as mp
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tqdm
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from PIL import Image

from mask2former_d2.data.datasets.prepare_utils import (
    convert_splits,
    rgb2id,
    run_script,
    save_image_atomic,
    script_parser,
)

SPLITS = ("train2017", "val2017")
IGNORE = 255


def contiguous_id_map() -> Dict[int, int]:
    """COCO panoptic category id -> contiguous id in [0, 133)."""
    return {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def panoptic_to_semantic(
    panoptic_rgb: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
    id_map: Mapping[int, int],
    source: str = "<array>",
) -> np.ndarray:
    """(H, W, 3) panoptic PNG + its segments -> (H, W) uint8 semantic label (255 = void)."""
    seg_ids = rgb2id(panoptic_rgb)
    seg_class = {}
    for seg in segments_info:
        if seg["category_id"] not in id_map:
            raise ValueError(
                f"{source}: segment {seg['id']} has unknown category {seg['category_id']}"
            )
        seg_class[seg["id"]] = id_map[seg["category_id"]]
    if max(seg_class.values(), default=0) >= IGNORE:
        raise ValueError(f"{source}: more classes than fit below the ignore value {IGNORE}")
    unique, inverse = np.unique(seg_ids, return_inverse=True)
    lut = np.array([seg_class.get(int(u), IGNORE) for u in unique], dtype=np.uint8)
    return lut[inverse].reshape(seg_ids.shape)


def _convert_one(job: Tuple[str, str, List[Dict[str, Any]]], id_map: Mapping[int, int]) -> None:
    src, dst, segments = job
    with Image.open(src) as im:
        rgb = np.asarray(im.convert("RGB"))
    save_image_atomic(panoptic_to_semantic(rgb, segments, id_map, src), dst)


def convert_split(
    panoptic_json: str,
    panoptic_root: str,
    sem_seg_root: str,
    *,
    workers: int = 1,
    overwrite: bool = False,
) -> Tuple[int, int]:
    """Writes one semantic PNG per annotation of ``panoptic_json``. Returns (written, skipped)."""
    for path, is_dir in ((panoptic_json, False), (panoptic_root, True)):
        if not (os.path.isdir(path) if is_dir else os.path.isfile(path)):
            raise FileNotFoundError(
                f"COCO panoptic input not found: {path!r} (see datasets/README.md)"
            )
    with open(panoptic_json) as f:
        annotations = json.load(f)["annotations"]
    jobs, skipped = [], 0
    for ann in annotations:
        dst = os.path.join(sem_seg_root, ann["file_name"])
        if os.path.exists(dst) and not overwrite:
            skipped += 1
            continue
        jobs.append((os.path.join(panoptic_root, ann["file_name"]), dst, ann["segments_info"]))

    convert = functools.partial(_convert_one, id_map=contiguous_id_map())
    desc = os.path.basename(sem_seg_root.rstrip("/"))
    if workers > 1 and len(jobs) > 1:
        with mp.Pool(workers) as pool:
            for _ in tqdm.tqdm(
                pool.imap_unordered(convert, jobs, chunksize=16), total=len(jobs), desc=desc
            ):
                pass
    else:
        for job in tqdm.tqdm(jobs, desc=desc):
            convert(job)
    return len(jobs), skipped


def main(argv: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
    splits_help = "splits to convert (default: every split whose panoptic json exists)"
    parser = script_parser(__doc__, "coco", SPLITS, splits_help=splits_help)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")

    coco = os.path.join(args.root, "coco")

    def json_of(split: str) -> str:
        return os.path.join(coco, "annotations", f"panoptic_{split}.json")

    splits = args.splits or [s for s in SPLITS if os.path.isfile(json_of(s))]
    if not splits:
        raise FileNotFoundError(
            f"no COCO panoptic json found: expected {json_of('{train,val}2017')!r} "
            "(see datasets/README.md)"
        )

    def convert(split: str) -> Tuple[int, int]:
        pan_dir, sem_dir = (os.path.join(coco, f"{d}_{split}") for d in ("panoptic", "panoptic_semseg"))
        return convert_split(
            json_of(split), pan_dir, sem_dir, workers=args.workers, overwrite=args.overwrite
        )

    return convert_splits(splits, convert)


if __name__ == "__main__":
    run_script(main)
