"""COCO datasets added on top of Detectron2's built-ins.

- ``coco_2017_{train,val}_panoptic_with_sem_seg``: COCO panoptic records that also carry the
  semantic PNG made from the panoptic annotation by
  ``datasets/prepare_coco_semantic_annos_from_panoptic.py`` (133 classes, every class — thing or
  stuff — in ``stuff_dataset_id_to_contiguous_id`` so the semantic evaluator sees all of them).
- ``coco_2017_{train,test}_stuff_10k_sem_seg``: COCO-Stuff-10k, 171 classes.

Detectron2 registers ``coco_2017_{train,val}_panoptic`` with all 133 names as
``thing_classes``; as in the published Mask2Former, those are narrowed to the 80 thing names so
COCO instance evaluation lines up with ``thing_dataset_id_to_contiguous_id``.
"""

import os
from typing import Any, Dict

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .utils import load_sem_seg_checked, panoptic_metadata, register_lazy, register_panoptic, semantic_metadata

__all__ = [
    "COCO_STUFF_10K_CLASSES",
    "coco_panoptic_with_sem_seg_metadata",
    "coco_stuff_10k_metadata",
    "register_all_coco",
]

COCO_PANOPTIC_LAYOUT = (
    "coco/{train,val}2017/*.jpg, coco/annotations/panoptic_{train,val}2017.json, "
    "coco/annotations/instances_{train,val}2017.json, coco/panoptic_{train,val}2017/*.png, "
    "coco/panoptic_semseg_{train,val}2017/*.png "
    "(made by datasets/prepare_coco_semantic_annos_from_panoptic.py)"
)
COCO_STUFF_10K_LAYOUT = (
    "coco/coco_stuff_10k/images_detectron2/{train,test}/*.jpg, "
    "coco/coco_stuff_10k/annotations_detectron2/{train,test}/*.png"
)

# COCO-Stuff's 91 stuff classes, dataset ids 92..182 in this order (the 80 things, ids 1..90,
# come from Detectron2's COCO_CATEGORIES).
_COCO_STUFF_NAMES = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood",
)  # fmt: skip
_COCO_THINGS = [c for c in COCO_CATEGORIES if c["isthing"] == 1]

#: ``(dataset_id, name)`` of the 171 COCO-Stuff classes in contiguous order.
COCO_STUFF_10K_CLASSES = tuple((c["id"], c["name"]) for c in _COCO_THINGS) + tuple(
    (92 + i, name) for i, name in enumerate(_COCO_STUFF_NAMES)
)


def coco_panoptic_with_sem_seg_metadata() -> Dict[str, Any]:
    """Class names, colours and id maps of the 133-class COCO panoptic ``_with_sem_seg`` sets."""
    return panoptic_metadata(
        _COCO_THINGS,
        COCO_CATEGORIES,
        {c["id"]: i for i, c in enumerate(COCO_CATEGORIES) if c["isthing"] == 1},
        # Things too: semantic evaluation scores all 133 classes.
        {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)},
    )


def coco_stuff_10k_metadata() -> Dict[str, Any]:
    """Class names and id map of COCO-Stuff-10k (171 classes; stuff classes have no colour)."""
    return semantic_metadata(COCO_STUFF_10K_CLASSES)


def _narrow_panoptic_thing_classes(name: str) -> None:
    """Restricts Detectron2's ``thing_classes``/``thing_colors`` of ``name`` to the 80 things."""
    if name not in DatasetCatalog.list():
        return
    meta = MetadataCatalog.get(name)
    things = [c["name"] for c in _COCO_THINGS]
    if getattr(meta, "thing_classes", None) == things:
        return
    for key in ("thing_classes", "thing_colors"):
        if hasattr(meta, key):
            delattr(meta, key)
    meta.set(thing_classes=things, thing_colors=[c["color"] for c in _COCO_THINGS])


def register_all_coco(root: str) -> None:
    """Registers the COCO datasets above with paths under ``root`` (lazy and idempotent)."""
    coco = os.path.join(root, "coco")
    meta = coco_panoptic_with_sem_seg_metadata()
    for split in ("train", "val"):
        name = f"coco_2017_{split}_panoptic_with_sem_seg"
        paths = {
            "image_root": os.path.join(coco, f"{split}2017"),
            "panoptic_root": os.path.join(coco, f"panoptic_{split}2017"),
            "panoptic_json": os.path.join(coco, "annotations", f"panoptic_{split}2017.json"),
            "sem_seg_root": os.path.join(coco, f"panoptic_semseg_{split}2017"),
            "json_file": os.path.join(coco, "annotations", f"instances_{split}2017.json"),
        }

        register_panoptic(name, COCO_PANOPTIC_LAYOUT, meta, evaluator_type="coco_panoptic_seg", **paths)
        _narrow_panoptic_thing_classes(f"coco_2017_{split}_panoptic")

    stuff_meta = coco_stuff_10k_metadata()
    for split in ("train", "test"):
        name = f"coco_2017_{split}_stuff_10k_sem_seg"
        image_root = os.path.join(coco, "coco_stuff_10k", "images_detectron2", split)
        sem_seg_root = os.path.join(coco, "coco_stuff_10k", "annotations_detectron2", split)
        register_lazy(
            name,
            lambda n=name, i=image_root, s=sem_seg_root: load_sem_seg_checked(
                n, i, s, COCO_STUFF_10K_LAYOUT
            ),
            image_root=image_root, sem_seg_root=sem_seg_root, evaluator_type="sem_seg", ignore_label=255,
            **stuff_meta,
        )
