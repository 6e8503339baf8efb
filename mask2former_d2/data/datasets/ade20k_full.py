"""ADE20K-full (ADE20K_2021_17_01) semantic segmentation with 847 classes.

``ade20k_full_sem_seg_{train,val}`` read the images and 16-bit TIFF labels that
``datasets/prepare_ade20k_full_sem_seg.py`` writes (images resized to a shorter side of at most
512, labels holding contiguous ids 0..846 and 65535 for unlabeled pixels, hence
``ignore_label=65535``). ``stuff_dataset_id_to_contiguous_id`` maps the ADE index ids (the
values of the raw ``*_seg.png``) to the contiguous ids.

The class table is the data file ``ade20k_full_categories.json`` shipped with the package: a
list, in training-id order (entry ``i`` is contiguous class ``i``), of ``{"id": <ADE index id>,
"name": <class name>}``. The ADE index id is the value that the dataset's ``*_seg.png`` files
encode as ``R // 10 * 256 + G`` (the ``name_ndx`` of its JSON annotations); the order and the
ids are those of the published MaskFormer/Mask2Former ADE20K-full class list.
"""

import json
import os
from typing import Any, Dict, Tuple

from .utils import load_sem_seg_checked, register_lazy, semantic_metadata

__all__ = ["ADE20K_FULL_CATEGORIES", "ade20k_full_metadata", "register_all_ade20k_full"]

ADE20K_FULL_LAYOUT = (
    "ADE20K_2021_17_01/images/ADE/{training,validation}/<scene>/<name>.jpg + <name>_seg.png "
    "(as released), ADE20K_2021_17_01/images_detectron2/{training,validation}/*.jpg and "
    "ADE20K_2021_17_01/annotations_detectron2/{training,validation}/*.tif "
    "(datasets/prepare_ade20k_full_sem_seg.py)"
)
ADE20K_FULL_IGNORE_LABEL = 65535
_CATEGORIES_FILE = os.path.join(os.path.dirname(__file__), "ade20k_full_categories.json")


def _load_categories(path: str = _CATEGORIES_FILE) -> Tuple[Tuple[int, str], ...]:
    with open(path, encoding="utf-8") as f:
        return tuple((int(c["id"]), str(c["name"])) for c in json.load(f))


#: ``(ade_id, name)`` for each of the 847 classes, indexed by contiguous training id.
ADE20K_FULL_CATEGORIES: Tuple[Tuple[int, str], ...] = _load_categories()


def ade20k_full_metadata() -> Dict[str, Any]:
    """Class names and id map of ADE20K-full (no colours are defined for its 847 classes)."""
    return semantic_metadata(ADE20K_FULL_CATEGORIES)


def register_all_ade20k_full(root: str) -> None:
    """Registers ``ade20k_full_sem_seg_{train,val}`` under ``root`` (lazy and idempotent)."""
    base = os.path.join(root, "ADE20K_2021_17_01")
    meta = ade20k_full_metadata()
    for split, dirname in (("train", "training"), ("val", "validation")):
        name = f"ade20k_full_sem_seg_{split}"
        image_root = os.path.join(base, "images_detectron2", dirname)
        sem_seg_root = os.path.join(base, "annotations_detectron2", dirname)
        register_lazy(
            name,
            lambda n=name, i=image_root, s=sem_seg_root: load_sem_seg_checked(
                n, i, s, ADE20K_FULL_LAYOUT, gt_ext="tif"
            ),
            image_root=image_root,
            sem_seg_root=sem_seg_root,
            evaluator_type="sem_seg",
            ignore_label=ADE20K_FULL_IGNORE_LABEL,
            **meta,
        )
