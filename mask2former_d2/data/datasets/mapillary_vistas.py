"""Mapillary Vistas (v1.2, 65 evaluated classes): semantic and panoptic segmentation.

- ``mapillary_vistas_sem_seg_{train,val}``: ``{training,validation}/labels/*.png`` hold class
  indices 0..65 where 65 ("unlabeled") is ignored, so ``ignore_label`` is 65.
- ``mapillary_vistas_panoptic_{train,val}``: ``{training,validation}/panoptic/panoptic_2018.json``
  and PNGs as released (category ids 1..65); records also carry the semantic label PNG.

No preprocessing is needed. As in the published Mask2Former, the panoptic sets list all 65 names
under ``thing_classes`` too, because their contiguous thing ids are spread over 0..64.
"""

import os
from typing import Any, Dict, Tuple

from .utils import load_sem_seg_checked, panoptic_metadata, register_lazy, register_panoptic

__all__ = [
    "MAPILLARY_VISTAS_CATEGORIES",
    "mapillary_vistas_semantic_metadata",
    "mapillary_vistas_panoptic_metadata",
    "register_all_mapillary_vistas",
]

VISTAS_LAYOUT = (
    "mapillary_vistas/{training,validation}/images/*.jpg, "
    "mapillary_vistas/{training,validation}/labels/*.png (v1.2 class indices), "
    "mapillary_vistas/{training,validation}/panoptic/*.png + panoptic/panoptic_2018.json"
)

# (readable name, Vistas label, isthing, colour). Row i has label value i in labels/*.png and
# panoptic category id i + 1. The 66th label, 65 "void--unlabeled", is not a class.
_VISTAS: Tuple[Tuple[str, str, int, Tuple[int, int, int]], ...] = (
    ("Bird", "animal--bird", 1, (165, 42, 42)),
    ("Ground Animal", "animal--ground-animal", 1, (0, 192, 0)),
    ("Curb", "construction--barrier--curb", 0, (196, 196, 196)),
    ("Fence", "construction--barrier--fence", 0, (190, 153, 153)),
    ("Guard Rail", "construction--barrier--guard-rail", 0, (180, 165, 180)),
    ("Barrier", "construction--barrier--other-barrier", 0, (90, 120, 150)),
    ("Wall", "construction--barrier--wall", 0, (102, 102, 156)),
    ("Bike Lane", "construction--flat--bike-lane", 0, (128, 64, 255)),
    ("Crosswalk - Plain", "construction--flat--crosswalk-plain", 1, (140, 140, 200)),
    ("Curb Cut", "construction--flat--curb-cut", 0, (170, 170, 170)),
    ("Parking", "construction--flat--parking", 0, (250, 170, 160)),
    ("Pedestrian Area", "construction--flat--pedestrian-area", 0, (96, 96, 96)),
    ("Rail Track", "construction--flat--rail-track", 0, (230, 150, 140)),
    ("Road", "construction--flat--road", 0, (128, 64, 128)),
    ("Service Lane", "construction--flat--service-lane", 0, (110, 110, 110)),
    ("Sidewalk", "construction--flat--sidewalk", 0, (244, 35, 232)),
    ("Bridge", "construction--structure--bridge", 0, (150, 100, 100)),
    ("Building", "construction--structure--building", 0, (70, 70, 70)),
    ("Tunnel", "construction--structure--tunnel", 0, (150, 120, 90)),
    ("Person", "human--person", 1, (220, 20, 60)),
    ("Bicyclist", "human--rider--bicyclist", 1, (255, 0, 0)),
    ("Motorcyclist", "human--rider--motorcyclist", 1, (255, 0, 100)),
    ("Other Rider", "human--rider--other-rider", 1, (255, 0, 200)),
    ("Lane Marking - Crosswalk", "marking--crosswalk-zebra", 1, (200, 128, 128)),
    ("Lane Marking - General", "marking--general", 0, (255, 255, 255)),
    ("Mountain", "nature--mountain", 0, (64, 170, 64)),
    ("Sand", "nature--sand", 0, (230, 160, 50)),
    ("Sky", "nature--sky", 0, (70, 130, 180)),
    ("Snow", "nature--snow", 0, (190, 255, 255)),
    ("Terrain", "nature--terrain", 0, (152, 251, 152)),
    ("Vegetation", "nature--vegetation", 0, (107, 142, 35)),
    ("Water", "nature--water", 0, (0, 170, 30)),
    ("Banner", "object--banner", 1, (255, 255, 128)),
    ("Bench", "object--bench", 1, (250, 0, 30)),
    ("Bike Rack", "object--bike-rack", 1, (100, 140, 180)),
    ("Billboard", "object--billboard", 1, (220, 220, 220)),
    ("Catch Basin", "object--catch-basin", 1, (220, 128, 128)),
    ("CCTV Camera", "object--cctv-camera", 1, (222, 40, 40)),
    ("Fire Hydrant", "object--fire-hydrant", 1, (100, 170, 30)),
    ("Junction Box", "object--junction-box", 1, (40, 40, 40)),
    ("Mailbox", "object--mailbox", 1, (33, 33, 33)),
    ("Manhole", "object--manhole", 1, (100, 128, 160)),
    ("Phone Booth", "object--phone-booth", 1, (142, 0, 0)),
    ("Pothole", "object--pothole", 0, (70, 100, 150)),
    ("Street Light", "object--street-light", 1, (210, 170, 100)),
    ("Pole", "object--support--pole", 1, (153, 153, 153)),
    ("Traffic Sign Frame", "object--support--traffic-sign-frame", 1, (128, 128, 128)),
    ("Utility Pole", "object--support--utility-pole", 1, (0, 0, 80)),
    ("Traffic Light", "object--traffic-light", 1, (250, 170, 30)),
    ("Traffic Sign (Back)", "object--traffic-sign--back", 1, (192, 192, 192)),
    ("Traffic Sign (Front)", "object--traffic-sign--front", 1, (220, 220, 0)),
    ("Trash Can", "object--trash-can", 1, (140, 140, 20)),
    ("Bicycle", "object--vehicle--bicycle", 1, (119, 11, 32)),
    ("Boat", "object--vehicle--boat", 1, (150, 0, 255)),
    ("Bus", "object--vehicle--bus", 1, (0, 60, 100)),
    ("Car", "object--vehicle--car", 1, (0, 0, 142)),
    ("Caravan", "object--vehicle--caravan", 1, (0, 0, 90)),
    ("Motorcycle", "object--vehicle--motorcycle", 1, (0, 0, 230)),
    ("On Rails", "object--vehicle--on-rails", 0, (0, 80, 100)),
    ("Other Vehicle", "object--vehicle--other-vehicle", 1, (128, 64, 64)),
    ("Trailer", "object--vehicle--trailer", 1, (0, 0, 110)),
    ("Truck", "object--vehicle--truck", 1, (0, 0, 70)),
    ("Wheeled Slow", "object--vehicle--wheeled-slow", 1, (0, 0, 192)),
    ("Car Mount", "void--car-mount", 0, (32, 32, 32)),
    ("Ego Vehicle", "void--ego-vehicle", 0, (120, 10, 10)),
)

#: The 65 classes as ``{"id", "name", "label", "isthing", "color"}`` dicts; ``id`` is the
#: panoptic category id (1..65), the row index is the semantic label value.
MAPILLARY_VISTAS_CATEGORIES: Tuple[Dict[str, Any], ...] = tuple(
    {"id": i + 1, "name": name, "label": label, "isthing": isthing, "color": list(color)}
    for i, (name, label, isthing, color) in enumerate(_VISTAS)
)
_IGNORE_LABEL = 65  # "void--unlabeled" in labels/*.png


def mapillary_vistas_semantic_metadata() -> Dict[str, Any]:
    """Class names, colours and the (identity) id map of ``mapillary_vistas_sem_seg_*``."""
    return {
        "stuff_classes": [c["name"] for c in MAPILLARY_VISTAS_CATEGORIES],
        "stuff_colors": [c["color"] for c in MAPILLARY_VISTAS_CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {
            i: i for i in range(len(MAPILLARY_VISTAS_CATEGORIES))
        },
    }


def mapillary_vistas_panoptic_metadata() -> Dict[str, Any]:
    """Class names, colours and id maps of ``mapillary_vistas_panoptic_*``."""
    cats = MAPILLARY_VISTAS_CATEGORIES
    return panoptic_metadata(
        cats,
        cats,
        {c["id"]: i for i, c in enumerate(cats) if c["isthing"]},
        {c["id"]: i for i, c in enumerate(cats)},
    )


def register_all_mapillary_vistas(root: str) -> None:
    """Registers the Mapillary Vistas datasets with paths under ``root`` (lazy and idempotent)."""
    vistas = os.path.join(root, "mapillary_vistas")
    sem_meta = mapillary_vistas_semantic_metadata()
    pan_meta = mapillary_vistas_panoptic_metadata()
    for split, dirname in (("train", "training"), ("val", "validation")):
        image_root = os.path.join(vistas, dirname, "images")
        labels = os.path.join(vistas, dirname, "labels")

        name = f"mapillary_vistas_sem_seg_{split}"
        register_lazy(
            name,
            lambda n=name, i=image_root, s=labels: load_sem_seg_checked(n, i, s, VISTAS_LAYOUT),
            image_root=image_root,
            sem_seg_root=labels,
            evaluator_type="sem_seg",
            ignore_label=_IGNORE_LABEL,
            **sem_meta,
        )

        name = f"mapillary_vistas_panoptic_{split}"
        paths = {
            "image_root": image_root,
            "panoptic_root": os.path.join(vistas, dirname, "panoptic"),
            "panoptic_json": os.path.join(vistas, dirname, "panoptic", "panoptic_2018.json"),
            "sem_seg_root": labels,
        }

        register_panoptic(
            name,
            VISTAS_LAYOUT,
            pan_meta,
            evaluator_type="mapillary_vistas_panoptic_seg",
            ignore_label=_IGNORE_LABEL,
            **paths,
        )
