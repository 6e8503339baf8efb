"""ADE20K (SceneParsing, 150 classes): semantic, panoptic and instance segmentation.

- ``ade20k_sem_seg_{train,val}`` are Detectron2 built-ins (``annotations_detectron2`` made by
  ``datasets/prepare_ade20k_sem_seg.py``: 0 -> 255 ignore, 1..150 -> 0..149); colours and an
  identity id map are added here.
- ``ade20k_panoptic_{train,val}``: panoptic json + PNGs made by
  ``datasets/prepare_ade20k_pan_seg.py``; records also carry the semantic PNG of
  ``annotations_detectron2``.
- ``ade20k_instance_{train,val}``: COCO-format json made by ``datasets/prepare_ade20k_ins_seg.py``,
  100 thing classes.

Dataset ids of the 150 classes are their 0-based SceneParsing index, so the id maps are
identities on those ids.
"""

import os
from typing import Any, Dict, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .utils import load_coco_instances_checked, panoptic_metadata, register_lazy, register_panoptic

__all__ = [
    "ADE20K_150_CATEGORIES",
    "ADE20K_INSTANCE_CLASSES",
    "ADE20K_THING_IDS",
    "ade20k_semantic_metadata",
    "ade20k_panoptic_metadata",
    "ade20k_instance_metadata",
    "register_all_ade20k",
]

ADE20K_LAYOUT = (
    "ADEChallengeData2016/images/{training,validation}/*.jpg, "
    "ADEChallengeData2016/annotations/{training,validation}/*.png (raw, 0 = other), "
    "ADEChallengeData2016/annotations_instance/{training,validation}/*.png "
    "(for panoptic and instance), "
    "ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png "
    "(datasets/prepare_ade20k_sem_seg.py), "
    "ADEChallengeData2016/ade20k_panoptic_{train,val}.json + ade20k_panoptic_{train,val}/*.png "
    "(datasets/prepare_ade20k_pan_seg.py), "
    "ADEChallengeData2016/ade20k_instance_{train,val}.json (datasets/prepare_ade20k_ins_seg.py)"
)

# (name, isthing, colour) of the 150 classes; the row index is the dataset id. The names are those
# of Detectron2's ADE20K_SEM_SEG_CATEGORIES (including the trailing space of "window ").
_ADE20K_150: Tuple[Tuple[str, int, Tuple[int, int, int]], ...] = (
    ("wall", 0, (120, 120, 120)),
    ("building", 0, (180, 120, 120)),
    ("sky", 0, (6, 230, 230)),
    ("floor", 0, (80, 50, 50)),
    ("tree", 0, (4, 200, 3)),
    ("ceiling", 0, (120, 120, 80)),
    ("road, route", 0, (140, 140, 140)),
    ("bed", 1, (204, 5, 255)),
    ("window ", 1, (230, 230, 230)),
    ("grass", 0, (4, 250, 7)),
    ("cabinet", 1, (224, 5, 255)),
    ("sidewalk, pavement", 0, (235, 255, 7)),
    ("person", 1, (150, 5, 61)),
    ("earth, ground", 0, (120, 120, 70)),
    ("door", 1, (8, 255, 51)),
    ("table", 1, (255, 6, 82)),
    ("mountain, mount", 0, (143, 255, 140)),
    ("plant", 0, (204, 255, 4)),
    ("curtain", 1, (255, 51, 7)),
    ("chair", 1, (204, 70, 3)),
    ("car", 1, (0, 102, 200)),
    ("water", 0, (61, 230, 250)),
    ("painting, picture", 1, (255, 6, 51)),
    ("sofa", 1, (11, 102, 255)),
    ("shelf", 1, (255, 7, 71)),
    ("house", 0, (255, 9, 224)),
    ("sea", 0, (9, 7, 230)),
    ("mirror", 1, (220, 220, 220)),
    ("rug", 0, (255, 9, 92)),
    ("field", 0, (112, 9, 255)),
    ("armchair", 1, (8, 255, 214)),
    ("seat", 1, (7, 255, 224)),
    ("fence", 1, (255, 184, 6)),
    ("desk", 1, (10, 255, 71)),
    ("rock, stone", 0, (255, 41, 10)),
    ("wardrobe, closet, press", 1, (7, 255, 255)),
    ("lamp", 1, (224, 255, 8)),
    ("tub", 1, (102, 8, 255)),
    ("rail", 1, (255, 61, 6)),
    ("cushion", 1, (255, 194, 7)),
    ("base, pedestal, stand", 0, (255, 122, 8)),
    ("box", 1, (0, 255, 20)),
    ("column, pillar", 1, (255, 8, 41)),
    ("signboard, sign", 1, (255, 5, 153)),
    ("chest of drawers, chest, bureau, dresser", 1, (6, 51, 255)),
    ("counter", 1, (235, 12, 255)),
    ("sand", 0, (160, 150, 20)),
    ("sink", 1, (0, 163, 255)),
    ("skyscraper", 0, (140, 140, 140)),
    ("fireplace", 1, (250, 10, 15)),
    ("refrigerator, icebox", 1, (20, 255, 0)),
    ("grandstand, covered stand", 0, (31, 255, 0)),
    ("path", 0, (255, 31, 0)),
    ("stairs", 1, (255, 224, 0)),
    ("runway", 0, (153, 255, 0)),
    ("case, display case, showcase, vitrine", 1, (0, 0, 255)),
    ("pool table, billiard table, snooker table", 1, (255, 71, 0)),
    ("pillow", 1, (0, 235, 255)),
    ("screen door, screen", 1, (0, 173, 255)),
    ("stairway, staircase", 0, (31, 0, 255)),
    ("river", 0, (11, 200, 200)),
    ("bridge, span", 0, (255, 82, 0)),
    ("bookcase", 1, (0, 255, 245)),
    ("blind, screen", 0, (0, 61, 255)),
    ("coffee table", 1, (0, 255, 112)),
    ("toilet, can, commode, crapper, pot, potty, stool, throne", 1, (0, 255, 133)),
    ("flower", 1, (255, 0, 0)),
    ("book", 1, (255, 163, 0)),
    ("hill", 0, (255, 102, 0)),
    ("bench", 1, (194, 255, 0)),
    ("countertop", 1, (0, 143, 255)),
    ("stove", 1, (51, 255, 0)),
    ("palm, palm tree", 1, (0, 82, 255)),
    ("kitchen island", 1, (0, 255, 41)),
    ("computer", 1, (0, 255, 173)),
    ("swivel chair", 1, (10, 0, 255)),
    ("boat", 1, (173, 255, 0)),
    ("bar", 0, (0, 255, 153)),
    ("arcade machine", 1, (255, 92, 0)),
    ("hovel, hut, hutch, shack, shanty", 0, (255, 0, 255)),
    ("bus", 1, (255, 0, 245)),
    ("towel", 1, (255, 0, 102)),
    ("light", 1, (255, 173, 0)),
    ("truck", 1, (255, 0, 20)),
    ("tower", 0, (255, 184, 184)),
    ("chandelier", 1, (0, 31, 255)),
    ("awning, sunshade, sunblind", 1, (0, 255, 61)),
    ("street lamp", 1, (0, 71, 255)),
    ("booth", 1, (255, 0, 204)),
    ("tv", 1, (0, 255, 194)),
    ("plane", 1, (0, 255, 82)),
    ("dirt track", 0, (0, 10, 255)),
    ("clothes", 1, (0, 112, 255)),
    ("pole", 1, (51, 0, 255)),
    ("land, ground, soil", 0, (0, 194, 255)),
    ("bannister, banister, balustrade, balusters, handrail", 1, (0, 122, 255)),
    ("escalator, moving staircase, moving stairway", 0, (0, 255, 163)),
    ("ottoman, pouf, pouffe, puff, hassock", 1, (255, 153, 0)),
    ("bottle", 1, (0, 255, 10)),
    ("buffet, counter, sideboard", 0, (255, 112, 0)),
    ("poster, posting, placard, notice, bill, card", 0, (143, 255, 0)),
    ("stage", 0, (82, 0, 255)),
    ("van", 1, (163, 255, 0)),
    ("ship", 1, (255, 235, 0)),
    ("fountain", 1, (8, 184, 170)),
    ("conveyer belt, conveyor belt, conveyer, conveyor, transporter", 0, (133, 0, 255)),
    ("canopy", 0, (0, 255, 92)),
    ("washer, automatic washer, washing machine", 1, (184, 0, 255)),
    ("plaything, toy", 1, (255, 0, 31)),
    ("pool", 0, (0, 184, 255)),
    ("stool", 1, (0, 214, 255)),
    ("barrel, cask", 1, (255, 0, 112)),
    ("basket, handbasket", 1, (92, 255, 0)),
    ("falls", 0, (0, 224, 255)),
    ("tent", 0, (112, 224, 255)),
    ("bag", 1, (70, 184, 160)),
    ("minibike, motorbike", 1, (163, 0, 255)),
    ("cradle", 0, (153, 0, 255)),
    ("oven", 1, (71, 255, 0)),
    ("ball", 1, (255, 0, 163)),
    ("food, solid food", 1, (255, 204, 0)),
    ("step, stair", 1, (255, 0, 143)),
    ("tank, storage tank", 0, (0, 255, 235)),
    ("trade name", 1, (133, 255, 0)),
    ("microwave", 1, (255, 0, 235)),
    ("pot", 1, (245, 0, 255)),
    ("animal", 1, (255, 0, 122)),
    ("bicycle", 1, (255, 245, 0)),
    ("lake", 0, (10, 190, 212)),
    ("dishwasher", 1, (214, 255, 0)),
    ("screen", 1, (0, 204, 255)),
    ("blanket, cover", 0, (20, 0, 255)),
    ("sculpture", 1, (255, 255, 0)),
    ("hood, exhaust hood", 1, (0, 153, 255)),
    ("sconce", 1, (0, 41, 255)),
    ("vase", 1, (0, 255, 204)),
    ("traffic light", 1, (41, 0, 255)),
    ("tray", 1, (41, 255, 0)),
    ("trash can", 1, (173, 0, 255)),
    ("fan", 1, (0, 245, 255)),
    ("pier", 0, (71, 0, 255)),
    ("crt screen", 0, (122, 0, 255)),
    ("plate", 1, (0, 255, 184)),
    ("monitor", 1, (0, 92, 255)),
    ("bulletin board", 1, (184, 255, 0)),
    ("shower", 0, (0, 133, 255)),
    ("radiator", 1, (255, 214, 0)),
    ("glass, drinking glass", 1, (25, 194, 194)),
    ("clock", 1, (102, 255, 0)),
    ("flag", 1, (92, 0, 255)),
)

#: The 150 classes as ``{"id", "name", "isthing", "color"}`` dicts (COCO panoptic category style).
ADE20K_150_CATEGORIES: Tuple[Dict[str, Any], ...] = tuple(
    {"id": i, "name": name, "isthing": isthing, "color": list(color)}
    for i, (name, isthing, color) in enumerate(_ADE20K_150)
)
#: Dataset ids of the 100 thing classes, ascending. Instance class ``k`` (1..100) of the
#: SceneParsing instance annotations (R channel of ``annotations_instance``) is thing ``k - 1``.
ADE20K_THING_IDS: Tuple[int, ...] = tuple(c["id"] for c in ADE20K_150_CATEGORIES if c["isthing"])

#: Short names of the 100 thing classes (in ``ADE20K_THING_IDS`` order) used by the instance set.
ADE20K_INSTANCE_CLASSES: Tuple[str, ...] = (
    "bed", "windowpane", "cabinet", "person", "door", "table", "curtain", "chair", "car",
    "painting", "sofa", "shelf", "mirror", "armchair", "seat", "fence", "desk", "wardrobe",
    "lamp", "bathtub", "railing", "cushion", "box", "column", "signboard", "chest of drawers",
    "counter", "sink", "fireplace", "refrigerator", "stairs", "case", "pool table", "pillow",
    "screen door", "bookcase", "coffee table", "toilet", "flower", "book", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat",
    "arcade machine", "bus", "towel", "light", "truck", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "apparel", "pole", "bannister", "ottoman",
    "bottle", "van", "ship", "fountain", "washer", "plaything", "stool", "barrel", "basket",
    "bag", "minibike", "oven", "ball", "food", "step", "trade name", "microwave", "pot",
    "animal", "bicycle", "dishwasher", "screen", "sculpture", "hood", "sconce", "vase",
    "traffic light", "tray", "ashcan", "fan", "plate", "monitor", "bulletin board", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip
assert len(ADE20K_THING_IDS) == len(ADE20K_INSTANCE_CLASSES) == 100


def ade20k_semantic_metadata() -> Dict[str, Any]:
    """Colours and the (identity) id map added to Detectron2's ``ade20k_sem_seg_*``."""
    return {
        "stuff_colors": [c["color"] for c in ADE20K_150_CATEGORIES],
        "stuff_dataset_id_to_contiguous_id": {c["id"]: c["id"] for c in ADE20K_150_CATEGORIES},
    }


def ade20k_panoptic_metadata() -> Dict[str, Any]:
    """Class names, colours and id maps of ``ade20k_panoptic_*`` (150 classes, 100 things)."""
    things = [c for c in ADE20K_150_CATEGORIES if c["isthing"]]
    return panoptic_metadata(
        things,
        ADE20K_150_CATEGORIES,
        {c["id"]: c["id"] for c in things},
        # Things too: semantic evaluation scores all 150 classes.
        {c["id"]: c["id"] for c in ADE20K_150_CATEGORIES},
    )


def ade20k_instance_metadata() -> Dict[str, Any]:
    """Class names, colours and id map of ``ade20k_instance_*`` (100 thing classes)."""
    colors = {c["id"]: c["color"] for c in ADE20K_150_CATEGORIES}
    return {
        "thing_classes": list(ADE20K_INSTANCE_CLASSES),
        "thing_colors": [colors[i] for i in ADE20K_THING_IDS],
        "thing_dataset_id_to_contiguous_id": {d: i for i, d in enumerate(ADE20K_THING_IDS)},
    }


def _add_semantic_metadata(name: str, extra: Dict[str, Any]) -> None:
    """Adds keys to a Detectron2 built-in's metadata (only the keys it does not have yet)."""
    if name not in DatasetCatalog.list():
        return
    meta = MetadataCatalog.get(name)
    meta.set(**{k: v for k, v in extra.items() if not hasattr(meta, k)})


def register_all_ade20k(root: str) -> None:
    """Registers the ADE20K datasets above with paths under ``root`` (lazy and idempotent)."""
    ade = os.path.join(root, "ADEChallengeData2016")
    for split in ("train", "val"):
        _add_semantic_metadata(f"ade20k_sem_seg_{split}", ade20k_semantic_metadata())

    pan_meta = ade20k_panoptic_metadata()
    ins_meta = ade20k_instance_metadata()
    for split, dirname in (("train", "training"), ("val", "validation")):
        name = f"ade20k_panoptic_{split}"
        paths = {
            "image_root": os.path.join(ade, "images", dirname),
            "panoptic_root": os.path.join(ade, f"ade20k_panoptic_{split}"),
            "panoptic_json": os.path.join(ade, f"ade20k_panoptic_{split}.json"),
            "sem_seg_root": os.path.join(ade, "annotations_detectron2", dirname),
            "json_file": os.path.join(ade, f"ade20k_instance_{split}.json"),
        }

        register_panoptic(name, ADE20K_LAYOUT, pan_meta, evaluator_type="ade20k_panoptic_seg", **paths)

        name = f"ade20k_instance_{split}"
        image_root = os.path.join(ade, "images", dirname)
        json_file = os.path.join(ade, f"ade20k_instance_{split}.json")
        register_lazy(
            name,
            lambda n=name, j=json_file, i=image_root: load_coco_instances_checked(
                n, j, i, ADE20K_LAYOUT
            ),
            image_root=image_root,
            json_file=json_file,
            evaluator_type="coco",
            **ins_meta,
        )
