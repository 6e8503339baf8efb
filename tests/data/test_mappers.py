"""Tests of the training dataset mappers (mask2former_d2.data.mappers).

Real samples come from ``tests.common.DATA`` (``$M2F_DATA`` or ``../shared/data``; see
PROVENANCE.md there). Every comparison is against an independent reference computed here
with PIL / numpy / pycocotools: with no-op augmentations the target masks must equal the
annotation exactly, with a flip they must equal the flipped annotation. Bad inputs are
synthetic files in a temporary directory.
"""

import copy
import json
import os
import pickle
import re
import shutil
import tempfile
import unittest
from typing import Dict, List

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from detectron2.projects.deeplab import add_deeplab_config
from detectron2.projects.point_rend.color_augmentation import ColorAugSSDTransform
from PIL import Image
from pycocotools.coco import COCO

from mask2former_d2.config import add_maskformer2_config
from mask2former_d2.data.mappers import (
    MAPPERS,
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
    build_dataset_mapper,
)
from tests.common import DATA

COCO_ROOT = os.path.join(DATA, "coco")
ADE_ROOT = os.path.join(DATA, "ADEChallengeData2016")
CITYSCAPES_ROOT = os.path.join(DATA, "cityscapes")
MAPILLARY_ROOT = os.path.join(DATA, "mapillary_vistas")
# LSJ without rescaling or flipping: the output is the image padded to 640 x 640.
LSJ_UNIT_SCALE = dict(IMAGE_SIZE=640, MIN_SCALE=1.0, MAX_SCALE=1.0, RANDOM_FLIP="none")


def _skip_unless_exists(path: str):
    return unittest.skipUnless(
        os.path.exists(path),
        f"real sample {path} not found (set M2F_DATA; see PROVENANCE.md)",
    )


def _cfg(**input_keys):
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    for key, value in input_keys.items():
        node = cfg.INPUT
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


# ----------------------------------------------------------------- references
def _png_segment_ids(path: str) -> np.ndarray:
    """Naive COCO panoptic decoding: id = R + 256 G + 65536 B."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Naive XYXY boxes: first/last occupied column and row (+1)."""
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m.numpy())
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _uncompressed_rle(mask: np.ndarray) -> Dict:
    """COCO uncompressed RLE (column-major runs, starting with a run of zeros)."""
    flat = mask.astype(np.uint8).flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _coco_panoptic_meta() -> Dict:
    """Mask2Former's COCO panoptic metadata: all 133 categories contiguous, things first."""
    with open(os.path.join(COCO_ROOT, "annotations", "panoptic_coco_categories.json")) as f:
        cats = json.load(f)
    return {
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(cats) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def _assert_valid_instances(test: unittest.TestCase, out: Dict, boxes: bool) -> None:
    """Invariants of every mapper output: dtypes, shapes, no empty masks, tight boxes."""
    image = out["image"]
    inst = out["instances"]
    test.assertEqual(image.dtype, torch.uint8)
    test.assertEqual(image.dim(), 3)
    test.assertEqual(inst.image_size, tuple(image.shape[-2:]))
    test.assertEqual(inst.gt_classes.dtype, torch.int64)
    test.assertEqual(inst.gt_masks.dtype, torch.bool)
    test.assertEqual(tuple(inst.gt_masks.shape), (len(inst), *image.shape[-2:]))
    test.assertTrue(bool(inst.gt_masks.flatten(1).any(1).all()), "empty target mask")
    if boxes:
        torch.testing.assert_close(inst.gt_boxes.tensor, _tight_boxes(inst.gt_masks))
    if "padding_mask" in out:
        test.assertFalse(bool((inst.gt_masks & out["padding_mask"]).any()))
        test.assertTrue(bool((image[:, out["padding_mask"]] == 128).all()))


# ------------------------------------------------------------------- registry
class TestBuild(unittest.TestCase):
    def test_names(self):
        self.assertEqual(
            set(MAPPERS),
            {
                "mask_former_semantic",
                "mask_former_panoptic",
                "mask_former_instance",
                "coco_instance_lsj",
                "coco_panoptic_lsj",
                "detr_panoptic",
                "ytvis",
            },
        )

    def test_build_each_name(self):
        for name, cls in MAPPERS.items():
            for is_train in (True, False):
                mapper = build_dataset_mapper(_cfg(DATASET_MAPPER_NAME=name), is_train)
                self.assertIs(type(mapper), cls)
                self.assertEqual(mapper.is_train, is_train)
                pickle.loads(pickle.dumps(mapper))  # DataLoader workers may pickle it

    def test_unknown_name_lists_valid_names(self):
        with self.assertRaises(KeyError) as ctx:
            build_dataset_mapper(_cfg(DATASET_MAPPER_NAME="detr_panoptc"))
        for name in ["detr_panoptc", *MAPPERS]:
            self.assertIn(name, str(ctx.exception))

    def test_semantic_train_augmentations(self):
        name = "m2f_test_mappers_meta_ignore65"
        MetadataCatalog.get(name).set(ignore_label=65, stuff_classes=[str(i) for i in range(65)])
        cfg = _cfg(
            DATASET_MAPPER_NAME="mask_former_semantic",
            MIN_SIZE_TRAIN=(256, 320),
            MIN_SIZE_TRAIN_SAMPLING="choice",
            CROP__ENABLED=True,
            CROP__TYPE="absolute",
            CROP__SIZE=(128, 96),
            CROP__SINGLE_CATEGORY_MAX_AREA=0.75,
            COLOR_AUG_SSD=True,
            SIZE_DIVISIBILITY=128,
        )
        cfg.DATASETS.TRAIN = (name,)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 65
        mapper = build_dataset_mapper(cfg)
        resize, crop, color, flip = mapper.augmentations
        self.assertIsInstance(resize, T.ResizeShortestEdge)
        self.assertEqual(resize.short_edge_length, (256, 320))
        self.assertIsInstance(crop, T.RandomCrop_CategoryAreaConstraint)
        self.assertEqual((crop.single_category_max_area, crop.ignored_category), (0.75, 65))
        self.assertEqual(crop.crop_aug.crop_size, (128, 96))
        self.assertIsInstance(color, ColorAugSSDTransform)
        self.assertIsInstance(flip, T.RandomFlip)
        self.assertEqual(mapper.ignore_label, 65)  # from the dataset's metadata
        self.assertEqual(mapper.size_divisibility, 128)
        self.assertEqual(mapper.class_ids, frozenset(range(65)))

    def test_instance_train_augmentations_use_plain_crop(self):
        cfg = _cfg(DATASET_MAPPER_NAME="mask_former_instance", CROP__ENABLED=True)
        types = [type(a) for a in build_dataset_mapper(cfg).augmentations]
        self.assertEqual(types, [T.ResizeShortestEdge, T.RandomCrop, T.RandomFlip])

    def test_lsj_augmentations(self):
        for name in ("coco_instance_lsj", "coco_panoptic_lsj"):
            cfg = _cfg(DATASET_MAPPER_NAME=name, IMAGE_SIZE=512, MIN_SCALE=0.5, MAX_SCALE=1.5)
            cfg.INPUT.SIZE_DIVISIBILITY = 32
            mapper = build_dataset_mapper(cfg)
            flip, scale, crop = mapper.augmentations
            self.assertIsInstance(flip, T.RandomFlip)
            self.assertEqual(
                (scale.min_scale, scale.max_scale, scale.target_height, scale.target_width),
                (0.5, 1.5, 512, 512),
            )
            self.assertEqual(tuple(crop.crop_size), (512, 512))
            self.assertEqual(mapper.size_divisibility, -1)  # the crop fixes the size
            cfg.INPUT.RANDOM_FLIP = "none"
            self.assertEqual(len(build_dataset_mapper(cfg).augmentations), 2)

    def test_eval_mappers_resize_for_test(self):
        for name in MAPPERS:
            cfg = _cfg(DATASET_MAPPER_NAME=name, MIN_SIZE_TEST=300, MAX_SIZE_TEST=500)
            cfg.INPUT.SIZE_DIVISIBILITY = 512
            mapper = build_dataset_mapper(cfg, is_train=False)
            (resize,) = mapper.augmentations
            self.assertIsInstance(resize, T.ResizeShortestEdge)
            self.assertEqual((resize.short_edge_length, resize.max_size), ((300, 300), 500))
            self.assertEqual(mapper.size_divisibility, -1)

    def test_class_ids_from_id_maps(self):
        name = "m2f_test_mappers_meta_maps"
        MetadataCatalog.get(name).set(
            thing_dataset_id_to_contiguous_id={1: 0, 3: 1},
            stuff_dataset_id_to_contiguous_id={7: 2},
        )
        cfg = _cfg(DATASET_MAPPER_NAME="mask_former_panoptic")
        cfg.DATASETS.TRAIN = (name,)
        self.assertEqual(build_dataset_mapper(cfg).class_ids, frozenset({0, 1, 2}))


# --------------------------------------------------------------- COCO panoptic
@_skip_unless_exists(os.path.join(COCO_ROOT, "panoptic_val2017"))
class TestPanopticCOCO(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dicts = load_coco_panoptic_json(
            os.path.join(COCO_ROOT, "annotations", "panoptic_val2017.json"),
            os.path.join(COCO_ROOT, "val2017"),
            os.path.join(COCO_ROOT, "panoptic_val2017"),
            _coco_panoptic_meta(),
        )
        cls.ref_ids = [_png_segment_ids(d["pan_seg_file_name"]) for d in cls.dicts]
        cls.tmp = tempfile.mkdtemp()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def _mapper(self, augs, cls=MaskFormerPanopticDatasetMapper, **kw):
        kw.setdefault("class_ids", range(133))
        return cls(augmentations=augs, image_format="RGB", **kw)

    def _reference(self, i, ids=None):
        """(classes, masks) of the non-crowd segments, from the PNG decoded here."""
        ids = self.ref_ids[i] if ids is None else ids
        kept = [s for s in self.dicts[i]["segments_info"] if not s["iscrowd"]]
        classes = torch.tensor([s["category_id"] for s in kept])
        masks = torch.from_numpy(np.stack([ids == s["id"] for s in kept]))
        return classes, masks

    def test_noop_masks_equal_png_and_crowd_dropped(self):
        mapper = self._mapper([])
        for i, d in enumerate(self.dicts):
            before = copy.deepcopy(d)
            out = mapper(d)
            self.assertEqual(d, before)  # the input dict is not modified
            self.assertNotIn("pan_seg_file_name", out)
            self.assertEqual(out["segments_info"], d["segments_info"])
            self.assertEqual((out["height"], out["width"]), self.ref_ids[i].shape)
            torch.testing.assert_close(out["image"], _chw(_rgb(d["file_name"])))
            classes, masks = self._reference(i)
            inst = out["instances"]
            torch.testing.assert_close(inst.gt_classes, classes)
            self.assertTrue(torch.equal(inst.gt_masks, masks))
            _assert_valid_instances(self, out, boxes=False)
            crowd_ids = [s["id"] for s in d["segments_info"] if s["iscrowd"]]
            self.assertTrue(crowd_ids)
            self.assertEqual(len(inst), len(d["segments_info"]) - len(crowd_ids))
        # PROVENANCE: 18 segments with 1 crowd, 32 segments with 2 crowd.
        self.assertEqual([len(mapper(d)["instances"]) for d in self.dicts], [17, 30])

    def test_detr_augmentation_keeps_masks_consistent(self):
        cfg = _cfg(
            DATASET_MAPPER_NAME="detr_panoptic", MIN_SIZE_TRAIN=(320,), MAX_SIZE_TRAIN=480,
            CROP__ENABLED=True, CROP__TYPE="absolute_range", CROP__SIZE=[200, 300],
        )
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
        mapper = build_dataset_mapper(cfg, True)
        mapper.class_ids = frozenset(range(133))
        np.random.seed(0)
        sizes = set()
        for _ in range(6):  # both branches (plain resize / resize-crop-resize) get exercised
            out = mapper(self.dicts[0])
            h, w = out["image"].shape[1:]
            sizes.add((h, w))
            self.assertEqual(min(h, w), 320)
            inst = out["instances"]
            self.assertEqual(inst.gt_masks.shape[1:], (h, w))
            self.assertTrue(bool(inst.gt_masks.flatten(1).any(1).all()))
            self.assertTrue(set(inst.gt_classes.tolist()) <= {s["category_id"] for s in self.dicts[0]["segments_info"]})
        self.assertGreater(len(sizes), 1)

    def test_flip_flips_masks_and_image(self):
        out = self._mapper([T.RandomFlip(prob=1.0)])(self.dicts[0])
        _, masks = self._reference(0)
        self.assertTrue(torch.equal(out["instances"].gt_masks, masks.flip(-1)))
        torch.testing.assert_close(out["image"], _chw(_rgb(self.dicts[0]["file_name"])[:, ::-1]))

    def test_resize_uses_nearest_labels(self):
        out = self._mapper([T.Resize((214, 320))])(self.dicts[1])
        png = Image.open(self.dicts[1]["pan_seg_file_name"]).convert("RGB")
        small = np.asarray(png.resize((320, 214), Image.NEAREST)).astype(np.int64)
        ids = small[..., 0] + 256 * small[..., 1] + 65536 * small[..., 2]
        _, masks = self._reference(1, ids)
        keep = masks.flatten(1).any(1)  # thin segments can vanish when shrinking
        self.assertEqual(tuple(out["image"].shape), (3, 214, 320))
        self.assertTrue(torch.equal(out["instances"].gt_masks, masks[keep]))

    def test_bgr_format(self):
        mapper = MaskFormerPanopticDatasetMapper(augmentations=[], image_format="BGR")
        out = mapper(self.dicts[0])
        torch.testing.assert_close(out["image"], _chw(_rgb(self.dicts[0]["file_name"])[..., ::-1]))

    def test_size_divisibility_pads_image_and_masks(self):
        out = self._mapper([], size_divisibility=32)(self.dicts[0])
        h, w = self.ref_ids[0].shape  # 427 x 640
        self.assertEqual(tuple(out["image"].shape), (3, 448, 640))
        self.assertTrue(bool((out["image"][:, h:] == 128).all()))
        _, masks = self._reference(0)
        gt = out["instances"].gt_masks
        self.assertTrue(torch.equal(gt[:, :h], masks))
        self.assertFalse(bool(gt[:, h:].any()))
        self.assertEqual(out["instances"].image_size, (448, 640))

    def test_sem_seg_file_is_read_and_padded(self):
        d = copy.deepcopy(self.dicts[0])
        sem = np.full(self.ref_ids[0].shape, 255, dtype=np.uint8)
        for s in d["segments_info"]:
            sem[self.ref_ids[0] == s["id"]] = s["category_id"]
        d["sem_seg_file_name"] = os.path.join(self.tmp, "sem_142238.png")
        Image.fromarray(sem).save(d["sem_seg_file_name"])
        out = self._mapper([], size_divisibility=32)(d)
        self.assertNotIn("sem_seg_file_name", out)
        self.assertEqual(out["sem_seg"].dtype, torch.int64)
        self.assertTrue(torch.equal(out["sem_seg"][: sem.shape[0]], torch.from_numpy(sem).long()))
        self.assertTrue(bool((out["sem_seg"][sem.shape[0] :] == 255).all()))
        # The LSJ mapper ignores semantic files, as published.
        self.assertNotIn("sem_seg", self._mapper([], cls=COCOPanopticNewBaselineDatasetMapper)(d))

    def test_category_area_crop_without_sem_seg_file(self):
        crop = T.RandomCrop_CategoryAreaConstraint("absolute", (200, 240), 0.4, 255)
        mapper = self._mapper([crop])
        # Replay the same random draws on an independently derived label map.
        sem = np.full(self.ref_ids[1].shape, 255.0)
        for s in self.dicts[1]["segments_info"]:
            sem[self.ref_ids[1] == s["id"]] = s["category_id"]
        np.random.seed(3)
        out = mapper(self.dicts[1])
        np.random.seed(3)
        tfm = crop.get_transform(None, sem)
        ids = self.ref_ids[1][tfm.y0 : tfm.y0 + 200, tfm.x0 : tfm.x0 + 240]
        _, masks = self._reference(1, ids)
        keep = masks.flatten(1).any(1)
        self.assertEqual(tuple(out["image"].shape), (3, 200, 240))
        self.assertTrue(torch.equal(out["instances"].gt_masks, masks[keep]))
        _assert_valid_instances(self, out, boxes=False)

    def test_lsj_at_unit_scale_pads_to_square(self):
        cfg = _cfg(DATASET_MAPPER_NAME="coco_panoptic_lsj", FORMAT="RGB", **LSJ_UNIT_SCALE)
        mapper = build_dataset_mapper(cfg)
        mapper.class_ids = frozenset(range(133))
        for i, d in enumerate(self.dicts):
            out = mapper(d)
            h = self.ref_ids[i].shape[0]
            self.assertEqual(tuple(out["image"].shape), (3, 640, 640))
            torch.testing.assert_close(out["image"][:, :h], _chw(_rgb(d["file_name"])))
            self.assertFalse(bool(out["padding_mask"][:h].any()))
            self.assertTrue(bool(out["padding_mask"][h:].all()))
            classes, masks = self._reference(i)
            inst = out["instances"]
            torch.testing.assert_close(inst.gt_classes, classes)
            self.assertTrue(torch.equal(inst.gt_masks[:, :h], masks))
            self.assertFalse(bool(inst.gt_masks[:, h:].any()))
            _assert_valid_instances(self, out, boxes=True)

    def test_lsj_random_jitter_invariants(self):
        cfg = _cfg(DATASET_MAPPER_NAME="coco_panoptic_lsj", IMAGE_SIZE=192)
        mapper = build_dataset_mapper(cfg)
        mapper.class_ids = frozenset(range(133))
        for seed in range(6):
            np.random.seed(seed)
            out = mapper(self.dicts[seed % 2])
            self.assertEqual(tuple(out["image"].shape), (3, 192, 192))
            _assert_valid_instances(self, out, boxes=True)
            inst = out["instances"]
            self.assertLessEqual(int(inst.gt_masks.sum(0).max()), 1)  # panoptic: disjoint
            allowed = {s["category_id"] for s in self.dicts[seed % 2]["segments_info"]}
            self.assertTrue(set(inst.gt_classes.tolist()) <= allowed)

    def test_empty_and_all_crowd_segments(self):
        h, w = self.ref_ids[0].shape
        for segments in ([], [dict(s, iscrowd=1) for s in self.dicts[0]["segments_info"]]):
            d = dict(self.dicts[0], segments_info=segments)
            for cls in (MaskFormerPanopticDatasetMapper, COCOPanopticNewBaselineDatasetMapper):
                inst = self._mapper([], cls=cls)(d)["instances"]
                self.assertEqual(len(inst), 0)
                self.assertEqual(tuple(inst.gt_masks.shape), (0, h, w))
                self.assertEqual(inst.gt_classes.dtype, torch.int64)

    def test_eval_mode(self):
        cfg = _cfg(DATASET_MAPPER_NAME="mask_former_panoptic", MIN_SIZE_TEST=200)
        mapper = build_dataset_mapper(cfg, is_train=False)
        mapper.class_ids = frozenset(range(133))
        out = mapper(self.dicts[0])
        self.assertEqual(tuple(out["image"].shape), (3, 200, 300))
        self.assertEqual((out["height"], out["width"]), (427, 640))
        self.assertEqual(tuple(out["instances"].gt_masks.shape[1:]), (200, 300))
        no_gt = {k: v for k, v in self.dicts[0].items() if k not in ("pan_seg_file_name",)}
        out = mapper(no_gt)
        self.assertNotIn("instances", out)
        self.assertEqual(tuple(out["image"].shape), (3, 200, 300))


# -------------------------------------------------------------- COCO instance
@_skip_unless_exists(os.path.join(COCO_ROOT, "annotations", "instances_val2017.json"))
class TestInstanceCOCO(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        ann_dir = os.path.join(COCO_ROOT, "annotations")
        image_dir = os.path.join(COCO_ROOT, "val2017")
        cls.rle_json = os.path.join(ann_dir, "instances_val2017.json")
        cls.poly_json = os.path.join(ann_dir, "person_keypoints_val2017.json")
        cls.rle_name = "m2f_test_mappers_coco_rle"
        cls.rle_dicts = load_coco_json(cls.rle_json, image_dir, cls.rle_name)
        cls.poly_dicts = load_coco_json(cls.poly_json, image_dir, "m2f_test_mappers_coco_poly")
        cls.rle_api = COCO(cls.rle_json)
        cls.poly_api = COCO(cls.poly_json)
        id_map = MetadataCatalog.get(cls.rle_name).thing_dataset_id_to_contiguous_id
        cls.id_map = id_map

    def _reference(self, api, image_id, contiguous):
        """(classes, masks) of the non-crowd annotations, rasterised by pycocotools."""
        anns = [a for a in api.imgToAnns[image_id] if not a["iscrowd"]]
        classes = torch.tensor([contiguous[a["category_id"]] for a in anns])
        masks = torch.from_numpy(np.stack([api.annToMask(a) for a in anns]).astype(bool))
        return classes, masks

    def _mapper(self, augs, cls=MaskFormerInstanceDatasetMapper, **kw):
        return cls(augmentations=augs, image_format="RGB", class_ids=range(80), **kw)

    def test_noop_rle_masks_equal_pycocotools_and_crowd_dropped(self):
        mapper = self._mapper([])
        total = 0
        for d in self.rle_dicts:
            before = copy.deepcopy(d)
            out = mapper(d)
            self.assertEqual(len(d["annotations"]), len(before["annotations"]))
            self.assertNotIn("annotations", out)
            torch.testing.assert_close(out["image"], _chw(_rgb(d["file_name"])))
            classes, masks = self._reference(self.rle_api, d["image_id"], self.id_map)
            inst = out["instances"]
            torch.testing.assert_close(inst.gt_classes, classes)
            self.assertTrue(torch.equal(inst.gt_masks, masks))
            _assert_valid_instances(self, out, boxes=True)
            total += len(inst)
        self.assertEqual(total, 43 - 3)  # PROVENANCE: 43 annotations, 3 crowd

    def test_flip_rle(self):
        out = self._mapper([T.RandomFlip(prob=1.0)])(self.rle_dicts[1])
        _, masks = self._reference(self.rle_api, self.rle_dicts[1]["image_id"], self.id_map)
        self.assertTrue(torch.equal(out["instances"].gt_masks, masks.flip(-1)))

    def test_polygons_equal_pycocotools(self):
        person = {1: 0}
        for d in self.poly_dicts:
            out = self._mapper([])(d)
            classes, masks = self._reference(self.poly_api, d["image_id"], person)
            torch.testing.assert_close(out["instances"].gt_classes, classes)
            self.assertTrue(torch.equal(out["instances"].gt_masks, masks))
            _assert_valid_instances(self, out, boxes=True)

    def test_polygon_flip_close_to_flipped_mask(self):
        d = self.poly_dicts[0]
        out = self._mapper([T.RandomFlip(prob=1.0)])(d)
        _, masks = self._reference(self.poly_api, d["image_id"], {1: 0})
        flipped = masks.flip(-1)
        gt = out["instances"].gt_masks
        self.assertEqual(gt.shape, flipped.shape)
        # Polygons are flipped as coordinates and rasterised again: identical up to edges.
        inter = (gt & flipped).flatten(1).sum(1).float()
        union = (gt | flipped).flatten(1).sum(1).float()
        self.assertGreater(float((inter / union).min()), 0.9)

    def test_bitmask_and_uncompressed_rle_without_bbox(self):
        d = copy.deepcopy(self.rle_dicts[0])
        _, masks = self._reference(self.rle_api, d["image_id"], self.id_map)
        annos = [a for a in d["annotations"] if not a["iscrowd"]]
        for k, (a, m) in enumerate(zip(annos, masks.numpy())):
            a["segmentation"] = m.astype(np.uint8) if k % 2 == 0 else _uncompressed_rle(m)
            del a["bbox"], a["bbox_mode"]
        d["annotations"] = annos
        out = self._mapper([T.RandomFlip(prob=1.0)])(d)
        self.assertTrue(torch.equal(out["instances"].gt_masks, masks.flip(-1)))
        _assert_valid_instances(self, out, boxes=True)

    def test_bad_segmentations_name_the_file(self):
        d = self.rle_dicts[1]  # 360 x 640
        rle = mask_util.encode(np.zeros((360, 640), dtype=np.uint8, order="F"))
        name = os.path.basename(d["file_name"])
        cases = [
            ({"counts": rle["counts"]}, r"RLE segmentation needs 'counts' and 'size', got \['counts'\]"),
            (dict(rle, size=[36, 64]), r"RLE size \(H, W\) = \(36, 64\) does not match the image \(H, W\) = "
             r"\(360, 640\)"),
            (np.zeros((36, 64), np.uint8), r"bitmask segmentation of shape \(36, 64\) does not match"),
            ("polygon", "unsupported segmentation type str"),
        ]
        for segm, message in cases:
            with self.subTest(message=message):
                bad = copy.deepcopy(d)
                bad["annotations"][0]["segmentation"] = segm
                with self.assertRaisesRegex(ValueError, f"{re.escape(name)}.*: {message}"):
                    self._mapper([])(bad)

    def test_size_divisibility(self):
        out = self._mapper([], size_divisibility=64)(self.rle_dicts[1])  # 360 x 640
        self.assertEqual(tuple(out["image"].shape), (3, 384, 640))
        _, masks = self._reference(self.rle_api, self.rle_dicts[1]["image_id"], self.id_map)
        self.assertTrue(torch.equal(out["instances"].gt_masks[:, :360], masks))
        self.assertFalse(bool(out["instances"].gt_masks[:, 360:].any()))
        self.assertTrue(bool((out["image"][:, 360:] == 128).all()))

    def test_lsj_at_unit_scale(self):
        cfg = _cfg(DATASET_MAPPER_NAME="coco_instance_lsj", **LSJ_UNIT_SCALE)
        cfg.DATASETS.TRAIN = (self.rle_name,)
        mapper = build_dataset_mapper(cfg)
        self.assertEqual(mapper.class_ids, frozenset(range(80)))  # from the metadata id map
        d = self.rle_dicts[0]
        out = mapper(d)
        classes, masks = self._reference(self.rle_api, d["image_id"], self.id_map)
        inst = out["instances"]
        self.assertEqual(tuple(inst.gt_masks.shape), (len(classes), 640, 640))
        self.assertTrue(torch.equal(inst.gt_masks[:, :427], masks))
        self.assertTrue(bool(out["padding_mask"][427:].all()))
        self.assertFalse(bool(out["padding_mask"][:427].any()))
        _assert_valid_instances(self, out, boxes=True)

    def test_lsj_random_jitter_invariants(self):
        cfg = _cfg(DATASET_MAPPER_NAME="coco_instance_lsj", IMAGE_SIZE=160)
        mapper = build_dataset_mapper(cfg)
        for seed in range(6):
            np.random.seed(seed)
            dicts = self.rle_dicts if seed % 2 else self.poly_dicts
            out = mapper(dicts[seed % len(dicts)])
            self.assertEqual(tuple(out["image"].shape), (3, 160, 160))
            self.assertEqual(out["padding_mask"].dtype, torch.bool)
            _assert_valid_instances(self, out, boxes=True)

    def test_empty_annotation_list(self):
        d = dict(self.rle_dicts[1], annotations=[])
        for cls in (MaskFormerInstanceDatasetMapper, COCOInstanceNewBaselineDatasetMapper):
            inst = self._mapper([], cls=cls)(d)["instances"]
            self.assertEqual(len(inst), 0)
            self.assertEqual(tuple(inst.gt_masks.shape), (0, 360, 640))
            self.assertEqual(tuple(inst.gt_boxes.tensor.shape), (0, 4))
            self.assertEqual(inst.gt_classes.dtype, torch.int64)


# ------------------------------------------------------------------- semantic
@_skip_unless_exists(os.path.join(ADE_ROOT, "annotations", "validation"))
class TestSemanticADE20K(unittest.TestCase):
    """ADE20K labels are converted as Mask2Former's preparation does: 0 -> 255, v -> v - 1."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp()
        cls.dicts: List[Dict] = []
        cls.labels: List[np.ndarray] = []
        ann_dir = os.path.join(ADE_ROOT, "annotations", "validation")
        for name in sorted(os.listdir(ann_dir)):
            raw = np.asarray(Image.open(os.path.join(ann_dir, name))).astype(np.int64)
            label = np.where(raw == 0, 255, raw - 1).astype(np.uint8)
            path = os.path.join(cls.tmp, name)
            Image.fromarray(label).save(path)
            image = os.path.join(ADE_ROOT, "images", "validation", name.replace(".png", ".jpg"))
            cls.dicts.append({"file_name": image, "sem_seg_file_name": path})
            cls.labels.append(label)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    def _mapper(self, augs, **kw):
        return MaskFormerSemanticDatasetMapper(
            augmentations=augs, image_format="RGB", ignore_label=255, class_ids=range(150), **kw
        )

    def _check(self, out, label):
        label = torch.from_numpy(label.astype(np.int64))
        self.assertEqual(out["sem_seg"].dtype, torch.int64)
        self.assertTrue(torch.equal(out["sem_seg"], label))
        classes = sorted(set(np.unique(label.numpy()).tolist()) - {255})
        inst = out["instances"]
        self.assertEqual(inst.gt_classes.tolist(), classes)
        self.assertTrue(torch.equal(inst.gt_masks, torch.stack([label == c for c in classes])))
        _assert_valid_instances(self, out, boxes=False)

    def test_noop_matches_labels(self):
        for d, label in zip(self.dicts, self.labels):
            out = self._mapper([])(d)
            self.assertNotIn("sem_seg_file_name", out)
            self.assertEqual((out["height"], out["width"]), label.shape)
            torch.testing.assert_close(out["image"], _chw(_rgb(d["file_name"])))
            self._check(out, label)

    def test_flip(self):
        out = self._mapper([T.RandomFlip(prob=1.0)])(self.dicts[0])
        self._check(out, self.labels[0][:, ::-1])

    def test_size_divisibility_pads_with_ignore(self):
        out = self._mapper([], size_divisibility=512)(self.dicts[0])  # 512 x 683
        h, w = self.labels[0].shape
        self.assertEqual(tuple(out["image"].shape), (3, 512, 1024))
        self.assertTrue(bool((out["image"][:, :, w:] == 128).all()))
        padded = np.full((512, 1024), 255, dtype=np.uint8)
        padded[:h, :w] = self.labels[0]
        self._check(out, padded)

    def test_config_pipeline_with_crop(self):
        cfg = _cfg(
            DATASET_MAPPER_NAME="mask_former_semantic", MIN_SIZE_TRAIN=(160, 192), MIN_SIZE_TRAIN_SAMPLING="choice",
            MAX_SIZE_TRAIN=640, CROP__ENABLED=True, CROP__TYPE="absolute", CROP__SIZE=(128, 128),
            CROP__SINGLE_CATEGORY_MAX_AREA=0.9, COLOR_AUG_SSD=True, SIZE_DIVISIBILITY=128,
        )
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
        mapper = build_dataset_mapper(cfg)
        for seed, d in enumerate(self.dicts):
            np.random.seed(seed)
            out = mapper(d)
            self.assertEqual(tuple(out["image"].shape), (3, 128, 128))
            sem = out["sem_seg"]
            classes = sorted(set(torch.unique(sem).tolist()) - {255})
            self.assertEqual(out["instances"].gt_classes.tolist(), classes)
            self.assertTrue(set(classes) <= set(np.unique(self.labels[seed]).tolist()))
            self.assertTrue(
                torch.equal(out["instances"].gt_masks, torch.stack([sem == c for c in classes]))
            )

    def test_eval_mode(self):
        cfg = _cfg(DATASET_MAPPER_NAME="mask_former_semantic", MIN_SIZE_TEST=256)
        cfg.INPUT.SIZE_DIVISIBILITY = 512  # not applied at evaluation
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 150
        mapper = build_dataset_mapper(cfg, is_train=False)
        out = mapper(self.dicts[0])  # 512 x 683 -> 256 x 342
        self.assertEqual(tuple(out["image"].shape), (3, 256, 342))
        self.assertEqual(tuple(out["sem_seg"].shape), (256, 342))
        out = mapper({"file_name": self.dicts[0]["file_name"]})
        self.assertEqual(set(out), {"file_name", "height", "width", "image"})


@_skip_unless_exists(os.path.join(CITYSCAPES_ROOT, "gtFine"))
class TestSemanticCityscapes(unittest.TestCase):
    def test_label_train_ids(self):
        stem = "frankfurt_000000_000294"
        d = {
            "file_name": os.path.join(
                CITYSCAPES_ROOT, "leftImg8bit", "val", "frankfurt", f"{stem}_leftImg8bit.png"
            ),
            "sem_seg_file_name": os.path.join(
                CITYSCAPES_ROOT, "gtFine", "val", "frankfurt", f"{stem}_gtFine_labelTrainIds.png"
            ),
            "height": 128,
            "width": 256,
        }
        label = np.asarray(Image.open(d["sem_seg_file_name"])).astype(np.int64)
        mapper = MaskFormerSemanticDatasetMapper(
            augmentations=[T.RandomFlip(prob=1.0)],
            image_format="BGR",
            ignore_label=255,
            class_ids=range(19),
        )
        out = mapper(d)
        self.assertTrue(torch.equal(out["sem_seg"], torch.from_numpy(label[:, ::-1].copy())))
        torch.testing.assert_close(out["image"], _chw(_rgb(d["file_name"])[:, ::-1, ::-1]))
        inst = out["instances"]
        # PROVENANCE: labelTrainIds values {0,1,2,4,5,7,8,10,11,13,255}.
        self.assertEqual(inst.gt_classes.tolist(), [0, 1, 2, 4, 5, 7, 8, 10, 11, 13])
        for c, m in zip(inst.gt_classes.tolist(), inst.gt_masks):
            self.assertTrue(torch.equal(m, out["sem_seg"] == c))
        _assert_valid_instances(self, out, boxes=False)


@_skip_unless_exists(os.path.join(MAPILLARY_ROOT, "validation", "labels"))
class TestSemanticMapillary(unittest.TestCase):
    def test_v12_palette_labels(self):
        d = {
            "file_name": os.path.join(
                MAPILLARY_ROOT, "validation", "images", "__CRyFzoDOXn6unQ6a3DnQ.jpg"
            ),
            "sem_seg_file_name": os.path.join(
                MAPILLARY_ROOT, "validation", "labels", "__CRyFzoDOXn6unQ6a3DnQ.png"
            ),
        }
        label = np.asarray(Image.open(d["sem_seg_file_name"]))  # palette indices = class ids
        mapper = MaskFormerSemanticDatasetMapper(
            augmentations=[], image_format="RGB", ignore_label=65, class_ids=range(65)
        )
        out = mapper(d)
        self.assertTrue(torch.equal(out["sem_seg"], torch.from_numpy(label.astype(np.int64))))
        self.assertEqual(out["instances"].gt_classes.tolist(), [17, 44, 45])
        for c, m in zip([17, 44, 45], out["instances"].gt_masks):
            self.assertTrue(torch.equal(m, torch.from_numpy(label == c)))
        # Padding uses Mapillary's ignore label 65, which never becomes a target.
        out = MaskFormerSemanticDatasetMapper(
            augmentations=[], image_format="RGB", ignore_label=65, size_divisibility=64
        )(d)
        self.assertTrue(bool((out["sem_seg"][100:] == 65).all()))
        self.assertEqual(out["instances"].gt_classes.tolist(), [17, 44, 45])


# ------------------------------------------------------------------ bad input
class TestBadInput(unittest.TestCase):
    H, W = 30, 40

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        rng = np.random.RandomState(0)
        self.image = os.path.join(self.tmp, "image.jpg")
        Image.fromarray(rng.randint(0, 255, (self.H, self.W, 3), dtype=np.uint8)).save(self.image)
        label = np.full((self.H, self.W), 255, dtype=np.uint8)
        label[:, : self.W // 2] = 3
        label[:10, self.W // 2 :] = 7
        self.label = self._png("label.png", label)
        ids = np.zeros((self.H, self.W, 3), dtype=np.uint8)
        ids[:, : self.W // 2, 0] = 1  # segment 1
        ids[:10, self.W // 2 :, 0] = 2  # segment 2 (crowd)
        self.pan = self._png("pan.png", ids)
        self.segments = [
            {"id": 1, "category_id": 3, "iscrowd": 0},
            {"id": 2, "category_id": 7, "iscrowd": 1},
        ]
        self.mask = np.zeros((self.H, self.W), dtype=np.uint8)
        self.mask[5:20, 5:15] = 1

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def _png(self, name, array):
        path = os.path.join(self.tmp, name)
        Image.fromarray(array).save(path)
        return path

    def _semantic(self, **kw):
        kw.setdefault("class_ids", range(10))
        return MaskFormerSemanticDatasetMapper(augmentations=[], image_format="RGB", **kw)

    def _panoptic(self, cls=MaskFormerPanopticDatasetMapper, **kw):
        return cls(augmentations=[], image_format="RGB", class_ids=range(10), **kw)

    def _instance(self, cls=MaskFormerInstanceDatasetMapper, **kw):
        return cls(augmentations=[], image_format="RGB", class_ids=range(10), **kw)

    def _sem_dict(self, label=None):
        return {"file_name": self.image, "sem_seg_file_name": label or self.label}

    def _pan_dict(self, pan=None, segments=None):
        segs = self.segments if segments is None else segments
        return {
            "file_name": self.image,
            "pan_seg_file_name": pan or self.pan,
            "segments_info": segs,
        }

    def _inst_dict(self, annotations):
        return {"file_name": self.image, "annotations": annotations}

    def _anno(self, category_id=3, **kw):
        return dict({"segmentation": self.mask.copy(), "category_id": category_id}, **kw)

    def test_synthetic_samples_are_valid(self):
        out = self._semantic()(self._sem_dict())
        self.assertEqual(out["instances"].gt_classes.tolist(), [3, 7])
        out = self._panoptic()(self._pan_dict())
        self.assertEqual(out["instances"].gt_classes.tolist(), [3])  # crowd dropped
        self.assertEqual(int(out["instances"].gt_masks.sum()), self.H * self.W // 2)
        out = self._instance()(self._inst_dict([self._anno(), self._anno(5, iscrowd=1)]))
        self.assertEqual(out["instances"].gt_classes.tolist(), [3])
        self.assertEqual(out["instances"].gt_boxes.tensor.tolist(), [[5.0, 5.0, 15.0, 20.0]])

    def test_missing_image(self):
        missing = os.path.join(self.tmp, "no_such_image.jpg")
        cases = [
            (self._semantic(), dict(self._sem_dict(), file_name=missing)),
            (self._panoptic(), dict(self._pan_dict(), file_name=missing)),
            (self._instance(), self._inst_dict([]) | {"file_name": missing}),
        ]
        for mapper, d in cases:
            with self.assertRaises(FileNotFoundError) as ctx:
                mapper(d)
            self.assertIn(missing, str(ctx.exception))

    def test_missing_annotation_png(self):
        missing = os.path.join(self.tmp, "no_such_label.png")
        with self.assertRaisesRegex(FileNotFoundError, missing):
            self._semantic()(self._sem_dict(missing))
        with self.assertRaisesRegex(FileNotFoundError, missing):
            self._panoptic()(self._pan_dict(missing))

    def test_corrupt_files(self):
        garbage = os.path.join(self.tmp, "garbage.png")
        with open(garbage, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\x00\x01corrupt" * 20)
        truncated = os.path.join(self.tmp, "truncated.png")
        with open(self.pan, "rb") as f:
            data = f.read()
        with open(truncated, "wb") as f:
            f.write(data[: len(data) // 2])
        for bad in (garbage, truncated):
            cases = [
                lambda: self._semantic()(self._sem_dict(bad)),
                lambda: self._panoptic()(self._pan_dict(bad)),
                lambda: self._semantic()(dict(self._sem_dict(), file_name=bad)),
            ]
            for run in cases:
                with self.assertRaises(ValueError) as ctx:
                    run()
                self.assertIn(bad, str(ctx.exception))
                self.assertIn("cannot decode", str(ctx.exception))

    def test_annotation_size_mismatch(self):
        wide = self._png("wide.png", np.zeros((self.H, self.W + 10), dtype=np.uint8))
        wide_pan = self._png("wide_pan.png", np.zeros((self.H, self.W + 10, 3), dtype=np.uint8))
        for run, path in [
            (lambda: self._semantic()(self._sem_dict(wide)), wide),
            (lambda: self._panoptic()(self._pan_dict(wide_pan)), wide_pan),
            (
                lambda: self._panoptic(COCOPanopticNewBaselineDatasetMapper)(
                    self._pan_dict(wide_pan)
                ),
                wide_pan,
            ),
        ]:
            with self.assertRaises(ValueError) as ctx:
                run()
            msg = str(ctx.exception)
            self.assertIn(path, msg)
            self.assertIn(f"({self.W + 10}, {self.H})", msg)
            self.assertIn(f"({self.W}, {self.H})", msg)
        bad_rle = {"size": [self.H + 1, self.W], "counts": [0, (self.H + 1) * self.W]}
        for segm in (np.zeros((self.H + 1, self.W), np.uint8), bad_rle):
            with self.assertRaisesRegex(ValueError, "does not match"):
                self._instance()(self._inst_dict([self._anno(segmentation=segm)]))
        # The dict's own height/width are checked against the image too.
        with self.assertRaises(ValueError):
            self._semantic()(dict(self._sem_dict(), height=self.H + 5, width=self.W))

    def test_unknown_category_ids(self):
        with self.assertRaises(ValueError) as ctx:
            self._panoptic()(self._pan_dict(segments=[{"id": 1, "category_id": 184, "iscrowd": 0}]))
        self.assertIn("184", str(ctx.exception))
        self.assertIn(self.pan, str(ctx.exception))
        for cls in (MaskFormerInstanceDatasetMapper, COCOInstanceNewBaselineDatasetMapper):
            with self.assertRaises(ValueError) as ctx:
                self._instance(cls)(self._inst_dict([self._anno(), self._anno(category_id=90)]))
            self.assertIn("90", str(ctx.exception))
            self.assertIn(self.image, str(ctx.exception))
        with self.assertRaises(ValueError) as ctx:  # label 7 is not in 0..4 and not ignore
            self._semantic(class_ids=range(5))(self._sem_dict())
        self.assertIn("[7]", str(ctx.exception))
        self.assertIn(self.label, str(ctx.exception))
        # class_ids=None disables the check.
        self._semantic(class_ids=None)(self._sem_dict())

    def test_empty_ground_truth_gives_zero_instances(self):
        outs = [
            self._instance()(self._inst_dict([])),
            self._instance(COCOInstanceNewBaselineDatasetMapper)(self._inst_dict([])),
            self._instance()(self._inst_dict([self._anno(iscrowd=1)])),
            self._instance()(self._inst_dict([self._anno(segmentation=[[1.0, 1.0, 2.0, 2.0]])])),
            self._panoptic()(self._pan_dict(segments=[])),
            self._semantic()(
                self._sem_dict(self._png("void.png", np.full((self.H, self.W), 255, np.uint8)))
            ),
        ]
        for out in outs:
            inst = out["instances"]
            self.assertEqual(len(inst), 0)
            self.assertEqual(tuple(inst.gt_masks.shape), (0, self.H, self.W))
            self.assertEqual(inst.gt_masks.dtype, torch.bool)
            self.assertEqual(tuple(inst.gt_classes.shape), (0,))

    def test_missing_ground_truth_key(self):
        image_only = {"file_name": self.image}
        for mapper, key in [
            (self._semantic(), "sem_seg_file_name"),
            (self._panoptic(), "pan_seg_file_name"),
            (self._instance(), "annotations"),
        ]:
            with self.assertRaisesRegex(ValueError, key):
                mapper(image_only)
            mapper.is_train = False
            self.assertEqual(tuple(mapper(image_only)["image"].shape), (3, self.H, self.W))
        with self.assertRaisesRegex(ValueError, "segments_info"):
            self._panoptic()({"file_name": self.image, "pan_seg_file_name": self.pan})
        with self.assertRaisesRegex(ValueError, "mask_former_instance"):
            self._semantic()(self._inst_dict([self._anno()]))

    def test_colour_label_map_rejected(self):
        rgb = self._png("rgb_label.png", np.zeros((self.H, self.W, 3), dtype=np.uint8))
        with self.assertRaisesRegex(ValueError, "single-channel"):
            self._semantic()(self._sem_dict(rgb))

    def test_mixed_segmentation_types(self):
        poly = [[5.0, 5.0, 15.0, 5.0, 15.0, 20.0, 5.0, 20.0]]
        rle = _uncompressed_rle(self.mask)
        annos = [self._anno(), self._anno(segmentation=poly), self._anno(segmentation=rle)]
        out = self._instance()(self._inst_dict(annos))
        masks = out["instances"].gt_masks
        self.assertEqual(tuple(masks.shape), (3, self.H, self.W))
        self.assertTrue(torch.equal(masks[0], torch.from_numpy(self.mask.astype(bool))))
        self.assertTrue(torch.equal(masks[2], masks[0]))
        self.assertGreater(int((masks[1] & masks[0]).sum()), 100)


if __name__ == "__main__":
    unittest.main()
