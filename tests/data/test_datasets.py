"""Dataset registration, metadata, loaders and preparation scripts.

Registration and metadata are checked for every dataset name the published configs use. Loaders
and the ``datasets/prepare_*.py`` scripts run on the real samples in ``tests.common.DATA`` (see its
PROVENANCE.md), linked into a temporary ``$DETECTRON2_DATASETS``-style root; those tests are
skipped when the shared folder is absent. ADE20K's instance annotations are not among the
samples, so the panoptic/instance scripts get instance PNGs derived from the real semantic ones
(one instance per connected region of a thing class).
"""

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path
from typing import Callable, Dict, Iterator, Sequence
from unittest import mock

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES, COCO_CATEGORIES
from detectron2.data.datasets.cityscapes import load_cityscapes_semantic
from PIL import Image
from scipy import ndimage

import mask2former_d2.data.datasets  # noqa: F401  (registration)
from mask2former_d2.data.datasets import ade20k, ade20k_full, builtin, coco, mapillary_vistas
from mask2former_d2.data.datasets.prepare_utils import id2rgb, rgb2id
from mask2former_d2.data.datasets.utils import (
    datasets_root,
    load_coco_instances_checked,
    load_panoptic_json,
    load_sem_seg_checked,
    register_lazy,
)
from tests import common

ROOT = Path(common.ROOT)
DATA = Path(common.DATA)
HAVE_DATA = (DATA / "PROVENANCE.md").is_file()
NEEDS_DATA = unittest.skipUnless(HAVE_DATA, f"shared samples not found at {DATA}")


def load_script(name: str):
    """Imports ``datasets/<name>.py`` (not a package) as a module."""
    return common.load_script(f"datasets/{name}.py")


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def read(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def image_hw(path: str):
    with Image.open(path) as im:
        return im.size[1], im.size[0]


@contextlib.contextmanager
def registered_under(
    root: str, names: Sequence[str], register: Callable[[str], None]
) -> Iterator[None]:
    """Re-registers ``names`` with ``register(root)`` for the duration, then restores them."""
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n)) for n in names}
    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
    try:
        register(root)
        yield
    finally:
        for n, (loader, meta) in saved.items():
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
            MetadataCatalog.remove(n)
            DatasetCatalog.register(n, loader)
            MetadataCatalog[n] = meta


# name with "{}" for the split -> (#stuff_classes, #thing_classes, evaluator_type, ignore_label),
# for the splits train and val unless named.
_EXPECTED_BY_SPLIT = [
    ("coco_2017_{}_panoptic_with_sem_seg", (133, 80, "coco_panoptic_seg", 255)),
    ("coco_2017_{}_stuff_10k_sem_seg", (171, 0, "sem_seg", 255), ("train", "test")),
    ("ade20k_sem_seg_{}", (150, 0, "sem_seg", 255)),
    ("ade20k_panoptic_{}", (150, 100, "ade20k_panoptic_seg", 255)),
    ("ade20k_instance_{}", (0, 100, "coco", None)),
    ("ade20k_full_sem_seg_{}", (847, 0, "sem_seg", 65535)),
    ("mapillary_vistas_sem_seg_{}", (65, 0, "sem_seg", 65)),
    ("mapillary_vistas_panoptic_{}", (65, 65, "mapillary_vistas_panoptic_seg", 65)),
    # Detectron2 built-ins used by the published configs.
    ("coco_2017_{}_panoptic", (133, 80, "coco_panoptic_seg", 255)),
    ("coco_2017_{}", (0, 80, "coco", None)),
    ("cityscapes_fine_sem_seg_{}", (19, 8, "cityscapes_sem_seg", 255)),
    ("cityscapes_fine_instance_seg_{}", (19, 8, "cityscapes_instance", None)),
    ("cityscapes_fine_panoptic_{}", (19, 19, "cityscapes_panoptic_seg", 255)),
]
EXPECTED = {
    row[0].format(split): row[1]
    for row in _EXPECTED_BY_SPLIT
    for split in (row[2] if len(row) > 2 else ("train", "val"))
}
# name -> the metadata keys that must name paths under the datasets root.
_PANOPTIC_PATHS = ("image_root", "panoptic_root", "panoptic_json", "sem_seg_root")
PATH_KEYS = {
    "coco_2017_val_panoptic_with_sem_seg": _PANOPTIC_PATHS + ("json_file",),
    "coco_2017_test_stuff_10k_sem_seg": ("image_root", "sem_seg_root"),
    "ade20k_panoptic_val": _PANOPTIC_PATHS + ("json_file",),
    "ade20k_instance_val": ("image_root", "json_file"),
    "ade20k_full_sem_seg_val": ("image_root", "sem_seg_root"),
    "mapillary_vistas_sem_seg_val": ("image_root", "sem_seg_root"),
    "mapillary_vistas_panoptic_val": _PANOPTIC_PATHS,
}


class TestRegistration(unittest.TestCase):
    def test_every_published_name_is_registered(self):
        missing = [n for n in EXPECTED if n not in DatasetCatalog.list()]
        self.assertEqual(missing, [])

    def test_class_counts_evaluators_and_ignore_labels(self):
        for name, (n_stuff, n_thing, evaluator, ignore) in EXPECTED.items():
            with self.subTest(name=name):
                meta = MetadataCatalog.get(name)
                self.assertEqual(len(getattr(meta, "stuff_classes", [])), n_stuff)
                self.assertEqual(len(getattr(meta, "thing_classes", [])), n_thing)
                self.assertEqual(meta.evaluator_type, evaluator)
                self.assertEqual(getattr(meta, "ignore_label", None), ignore)

    def test_id_maps_are_contiguous_and_consistent(self):
        for name, (n_stuff, n_thing, _, _) in EXPECTED.items():
            meta = MetadataCatalog.get(name)
            with self.subTest(name=name, key="stuff"):
                if n_stuff and hasattr(meta, "stuff_dataset_id_to_contiguous_id"):
                    stuff = meta.stuff_dataset_id_to_contiguous_id
                    self.assertTrue(set(stuff.values()) <= set(range(n_stuff)))
                    self.assertEqual(len(set(stuff.values())), len(stuff))
            with self.subTest(name=name, key="thing"):
                if n_thing and hasattr(meta, "thing_dataset_id_to_contiguous_id"):
                    things = meta.thing_dataset_id_to_contiguous_id
                    self.assertEqual(len(set(things.values())), len(things))
                    upper = max(n_stuff, n_thing)
                    self.assertTrue(all(0 <= v < upper for v in things.values()))

    def test_specific_id_maps(self):
        pan = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
        self.assertEqual(len(pan.thing_dataset_id_to_contiguous_id), 80)
        self.assertEqual(len(pan.stuff_dataset_id_to_contiguous_id), 133)  # things included
        self.assertEqual(pan.stuff_dataset_id_to_contiguous_id[200], 132)  # "wall-other-merged"
        self.assertEqual(pan.thing_dataset_id_to_contiguous_id[90], 79)  # "toothbrush"
        self.assertEqual(pan.label_divisor, 1000)

        ade = MetadataCatalog.get("ade20k_panoptic_val")
        self.assertEqual(
            sorted(ade.thing_dataset_id_to_contiguous_id), list(ade20k.ADE20K_THING_IDS)
        )
        self.assertEqual(ade.stuff_dataset_id_to_contiguous_id, {i: i for i in range(150)})
        self.assertEqual(ade.stuff_classes, ADE20K_SEM_SEG_CATEGORIES)
        self.assertEqual(MetadataCatalog.get("ade20k_sem_seg_val").stuff_colors, ade.stuff_colors)

        ins = MetadataCatalog.get("ade20k_instance_val")
        self.assertEqual(ins.thing_dataset_id_to_contiguous_id[7], 0)  # bed
        self.assertEqual(ins.thing_dataset_id_to_contiguous_id[149], 99)  # flag
        self.assertEqual(ins.thing_classes[1], "windowpane")

        full = MetadataCatalog.get("ade20k_full_sem_seg_val")
        self.assertEqual(len(full.stuff_dataset_id_to_contiguous_id), 847)
        self.assertEqual(full.stuff_dataset_id_to_contiguous_id[2978], 0)  # wall
        self.assertEqual(full.stuff_dataset_id_to_contiguous_id[3148], 846)

        stuff10k = MetadataCatalog.get("coco_2017_test_stuff_10k_sem_seg")
        self.assertEqual(stuff10k.stuff_dataset_id_to_contiguous_id[1], 0)
        self.assertEqual(stuff10k.stuff_dataset_id_to_contiguous_id[92], 80)  # banner
        self.assertEqual(stuff10k.stuff_dataset_id_to_contiguous_id[182], 170)  # wood

        vistas = MetadataCatalog.get("mapillary_vistas_panoptic_val")
        self.assertEqual(len(vistas.thing_dataset_id_to_contiguous_id), 37)
        self.assertEqual(vistas.stuff_dataset_id_to_contiguous_id[1], 0)
        self.assertEqual(vistas.stuff_dataset_id_to_contiguous_id[65], 64)

        # Detectron2's built-in COCO panoptic sets list only the 80 things as thing_classes.
        d2_pan = MetadataCatalog.get("coco_2017_val_panoptic")
        self.assertEqual(d2_pan.thing_classes, pan.thing_classes)
        self.assertEqual(len(d2_pan.thing_colors), 80)

    def test_colours_match_classes(self):
        for name, (n_stuff, n_thing, _, _) in EXPECTED.items():
            meta = MetadataCatalog.get(name)
            for key, count in (("stuff_colors", n_stuff), ("thing_colors", n_thing)):
                if not hasattr(meta, key) or name.startswith("cityscapes"):
                    continue
                with self.subTest(name=name, key=key):
                    colors = getattr(meta, key)
                    self.assertEqual(len(colors), count)
                    self.assertTrue(
                        all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colors)
                    )

    def test_paths_are_under_the_datasets_root(self):
        root = datasets_root()
        for name, keys in PATH_KEYS.items():
            meta = MetadataCatalog.get(name)
            for key in keys:
                with self.subTest(name=name, key=key):
                    self.assertTrue(getattr(meta, key).startswith(root), getattr(meta, key))

    def test_datasets_root_reads_the_environment(self):
        with mock.patch.dict(os.environ, {"DETECTRON2_DATASETS": "/data/sets"}):
            self.assertEqual(datasets_root(), "/data/sets")
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual(datasets_root(), "datasets")

    def test_registration_is_idempotent(self):
        before = MetadataCatalog.get("ade20k_panoptic_val").panoptic_json
        loader = DatasetCatalog["ade20k_panoptic_val"]
        builtin.register_all("/somewhere/else")  # already registered: left alone
        importlib.reload(builtin)  # a second import of the registering module
        self.assertEqual(MetadataCatalog.get("ade20k_panoptic_val").panoptic_json, before)
        self.assertIs(DatasetCatalog["ade20k_panoptic_val"], loader)
        self.assertFalse(register_lazy("ade20k_panoptic_val", lambda: [], evaluator_type="x"))

    def test_registration_reads_nothing(self):
        # Registering under a root that does not exist succeeds; the loader then names the path.
        missing = tempfile.mkdtemp()
        shutil.rmtree(missing)
        names = [
            f"mapillary_vistas_{t}_{s}" for t in ("sem_seg", "panoptic") for s in ("train", "val")
        ]
        with registered_under(missing, names, mapillary_vistas.register_all_mapillary_vistas):
            with self.assertRaises(FileNotFoundError) as ctx:
                DatasetCatalog.get("mapillary_vistas_panoptic_val")
            message = str(ctx.exception)
            self.assertIn(os.path.join(missing, "mapillary_vistas", "validation"), message)
            self.assertIn("datasets/README.md", message)

    def test_category_tables(self):
        self.assertEqual(
            [c["name"] for c in ade20k.ADE20K_150_CATEGORIES], ADE20K_SEM_SEG_CATEGORIES
        )
        self.assertEqual(len(ade20k.ADE20K_THING_IDS), 100)
        ids = [i for i, _ in ade20k_full.ADE20K_FULL_CATEGORIES]
        self.assertEqual(len(ids), 847)
        self.assertEqual(len(set(ids)), 847)
        names = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
        self.assertEqual([n for _, n in coco.COCO_STUFF_10K_CLASSES[:80]], names)
        self.assertEqual(
            [c["isthing"] for c in mapillary_vistas.MAPILLARY_VISTAS_CATEGORIES].count(1), 37
        )

    @NEEDS_DATA
    def test_ade20k_full_names_match_the_dataset_index(self):
        # The ADE20K JSON annotations name each object's class and give its index id.
        table = dict(ade20k_full.ADE20K_FULL_CATEGORIES)
        checked = 0
        for path in sorted((DATA / "ADE20K_2021_17_01").rglob("ADE_*.json")):
            with open(path, encoding="utf-8", errors="replace") as f:
                objects = json.load(f)["annotation"]["object"]
            for obj in objects:
                if obj["name_ndx"] in table:
                    self.assertEqual(table[obj["name_ndx"]], obj["name"])
                    checked += 1
        self.assertGreater(checked, 50)


class TestMissingFiles(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)

    def assert_names(self, ctx, path):
        self.assertIn(path, str(ctx.exception))
        self.assertIn("datasets/README.md", str(ctx.exception))

    def test_panoptic_json(self):
        json_file = os.path.join(self.tmp, "panoptic_val2017.json")
        with self.assertRaises(FileNotFoundError) as ctx:
            load_panoptic_json(
                "x", json_file, self.tmp, self.tmp, "layout", thing_ids={}, stuff_ids={}
            )
        self.assert_names(ctx, json_file)

    def test_panoptic_png_of_first_record(self):
        json_file = os.path.join(self.tmp, "p.json")
        with open(json_file, "w") as f:
            json.dump(
                {"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": []}]}, f
            )
        Image.new("RGB", (4, 4)).save(os.path.join(self.tmp, "a.jpg"))
        with self.assertRaises(FileNotFoundError) as ctx:
            load_panoptic_json(
                "x", json_file, self.tmp, self.tmp, "layout", thing_ids={}, stuff_ids={}
            )
        self.assert_names(ctx, os.path.join(self.tmp, "a.png"))

    def test_unknown_category(self):
        json_file = os.path.join(self.tmp, "p.json")
        segments = [{"id": 1, "category_id": 7}]
        with open(json_file, "w") as f:
            json.dump(
                {"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments}]},
                f,
            )
        with self.assertRaisesRegex(ValueError, "category_id 7"):
            load_panoptic_json(
                "x", json_file, self.tmp, self.tmp, "l", thing_ids={1: 0}, stuff_ids={2: 1}
            )

    def test_sem_seg_directories(self):
        image_root = os.path.join(self.tmp, "images")
        with self.assertRaises(FileNotFoundError) as ctx:
            load_sem_seg_checked("x", image_root, self.tmp, "layout")
        self.assert_names(ctx, image_root)
        os.makedirs(image_root)
        with self.assertRaises(FileNotFoundError) as ctx:  # no annotation files
            load_sem_seg_checked("x", image_root, self.tmp, "layout")
        self.assert_names(ctx, self.tmp)

    def test_instance_json(self):
        json_file = os.path.join(self.tmp, "ade20k_instance_val.json")
        with self.assertRaises(FileNotFoundError) as ctx:
            load_coco_instances_checked("ade20k_instance_val", json_file, self.tmp, "layout")
        self.assert_names(ctx, json_file)

    def test_registered_loaders(self):
        # Every registered name of this package raises FileNotFoundError naming a path when its
        # files are absent from the datasets root.
        for name in EXPECTED:
            meta = MetadataCatalog.get(name)
            paths = [getattr(meta, k, None) for k in ("panoptic_json", "json_file", "sem_seg_root")]
            if name.startswith(("coco_2017_train", "coco_2017_val", "cityscapes")) and (
                "with_sem_seg" not in name
            ):
                continue  # Detectron2's own loaders
            if name.startswith("ade20k_sem_seg") or any(p and os.path.exists(p) for p in paths):
                continue
            with self.subTest(name=name):
                with self.assertRaises(FileNotFoundError) as ctx:
                    DatasetCatalog.get(name)
                self.assertIn(datasets_root(), str(ctx.exception))


def _class_data_root(cls, *parts: str) -> str:
    """A temporary dataset root for the test class ``cls`` (removed after its last test) that
    links each of ``parts`` of the shared data at the same relative path."""
    tmp = tempfile.mkdtemp()
    cls.addClassCleanup(shutil.rmtree, tmp)
    for part in parts:
        link(DATA / part, Path(tmp) / part)
    return tmp


@NEEDS_DATA
class TestCocoPanopticWithSemSeg(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = _class_data_root(
            cls, "coco/val2017", "coco/panoptic_val2017", "coco/annotations/panoptic_val2017.json",
            "coco/annotations/instances_val2017.json",
        )
        cls.script = load_script("prepare_coco_semantic_annos_from_panoptic")
        cls.first_run = cls.script.main(["--root", cls.tmp])
        with open(DATA / "coco" / "annotations" / "panoptic_val2017.json") as f:
            cls.panoptic = json.load(f)

    def test_semantic_pngs_follow_the_panoptic_json(self):
        self.assertEqual(self.first_run, [(2, 0)])
        id_map = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
        void_pixels = {"000000142238.png": 2712, "000000439180.png": 7189}  # PROVENANCE.md
        for ann in self.panoptic["annotations"]:
            seg_ids = rgb2id(read(str(DATA / "coco" / "panoptic_val2017" / ann["file_name"])))
            semantic = read(
                os.path.join(self.tmp, "coco", "panoptic_semseg_val2017", ann["file_name"])
            )
            self.assertEqual(semantic.dtype, np.uint8)
            self.assertEqual(semantic.shape, seg_ids.shape)
            for seg in ann["segments_info"]:  # naive per-segment reference
                values = np.unique(semantic[seg_ids == seg["id"]])
                self.assertEqual(values.tolist(), [id_map[seg["category_id"]]])
                self.assertEqual(int((seg_ids == seg["id"]).sum()), seg["area"])
            self.assertEqual(int((semantic == 255).sum()), void_pixels[ann["file_name"]])

    def test_second_run_keeps_outputs(self):
        self.assertEqual(self.script.main(["--root", self.tmp]), [(0, 2)])

    def test_registered_loader_under_a_root(self):
        names = [f"coco_2017_{s}_panoptic_with_sem_seg" for s in ("train", "val")]
        names += [f"coco_2017_{s}_stuff_10k_sem_seg" for s in ("train", "test")]
        with registered_under(self.tmp, names, coco.register_all_coco):
            records = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
            meta = MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg")
            self.assertEqual(
                meta.sem_seg_root, os.path.join(self.tmp, "coco", "panoptic_semseg_val2017")
            )
        self.assertEqual(len(records), 2)
        by_id = {r["image_id"]: r for r in records}
        counts = {142238: (640, 427, 18), 439180: (640, 360, 32)}  # PROVENANCE.md
        things = set(meta.thing_dataset_id_to_contiguous_id.values())
        for image_id, (width, height, n_segments) in counts.items():
            record = by_id[image_id]
            self.assertEqual(
                record["file_name"],
                os.path.join(self.tmp, "coco", "val2017", f"{image_id:012d}.jpg"),
            )
            self.assertEqual((record["height"], record["width"]), (height, width))
            self.assertEqual(image_hw(record["file_name"]), (height, width))
            self.assertEqual(image_hw(record["pan_seg_file_name"]), (height, width))
            self.assertEqual(image_hw(record["sem_seg_file_name"]), (height, width))
            self.assertEqual(len(record["segments_info"]), n_segments)
            for seg in record["segments_info"]:
                self.assertIn(seg["category_id"], range(133))
                self.assertEqual(seg["isthing"], seg["category_id"] in things)
        # Person (dataset id 1, contiguous 0) is in both images, as a thing.
        person = [s for r in records for s in r["segments_info"] if s["category_id"] == 0]
        self.assertTrue(person and all(s["isthing"] for s in person))


@NEEDS_DATA
class TestAde20k(unittest.TestCase):
    """SceneParsing: semantic conversion, panoptic and instance preparation, and loading."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = _class_data_root(
            cls, "ADEChallengeData2016/images/validation", "ADEChallengeData2016/annotations/validation"
        )
        cls.base = Path(cls.tmp) / "ADEChallengeData2016"
        cls.components = cls._derive_instance_annotations(DATA / "ADEChallengeData2016" / "annotations" / "validation")
        cls.sem_script = load_script("prepare_ade20k_sem_seg")
        cls.pan_script = load_script("prepare_ade20k_pan_seg")
        cls.ins_script = load_script("prepare_ade20k_ins_seg")
        cls.sem_run = cls.sem_script.main(["--root", cls.tmp, "--splits", "validation"])
        cls.pan_run = cls.pan_script.main(["--root", cls.tmp, "--splits", "val"])
        cls.ins_run = cls.ins_script.main(["--root", cls.tmp, "--splits", "val"])

    @classmethod
    def _derive_instance_annotations(cls, semantic_dir: Path) -> Dict[str, int]:
        """Writes annotations_instance PNGs (one instance per connected thing region)."""
        out_dir = cls.base / "annotations_instance" / "validation"
        out_dir.mkdir(parents=True)
        instance_class = {d: k + 1 for k, d in enumerate(ade20k.ADE20K_THING_IDS)}
        counts = {}
        for path in sorted(semantic_dir.glob("*.png")):
            semantic = read(str(path)).astype(np.int64) - 1
            rgb = np.zeros(semantic.shape + (3,), dtype=np.uint8)
            n = 0
            for dataset_id in np.unique(semantic):
                if dataset_id not in instance_class:
                    continue
                regions, count = ndimage.label(semantic == dataset_id)
                for r in range(1, count + 1):
                    n += 1
                    rgb[regions == r] = (instance_class[dataset_id], n, 0)
            Image.fromarray(rgb).save(out_dir / path.name)
            counts[path.stem] = n
        return counts

    def test_semantic_conversion(self):
        self.assertEqual(self.sem_run, [(3, 0)])
        for name in ("ADE_val_00000001.png", "ADE_val_00000003.png"):
            raw = read(str(DATA / "ADEChallengeData2016" / "annotations" / "validation" / name))
            out = read(str(self.base / "annotations_detectron2" / "validation" / name))
            expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
            np.testing.assert_array_equal(out, expected)
        self.assertEqual(
            self.sem_script.main(["--root", self.tmp, "--splits", "validation"]), [(0, 3)]
        )
        with self.assertRaisesRegex(ValueError, "151"):
            self.sem_script.convert_annotation(np.full((2, 2), 151, dtype=np.uint8))

    def test_semantic_loader(self):
        records = load_sem_seg_checked(
            "ade20k_sem_seg_val",
            str(self.base / "images" / "validation"),
            str(self.base / "annotations_detectron2" / "validation"),
            "layout",
        )
        self.assertEqual(len(records), 3)
        sizes = {"ADE_val_00000001": (512, 683), "ADE_val_00000002": (364, 500)}  # PROVENANCE.md
        for record in records:
            stem = Path(record["file_name"]).stem
            self.assertEqual(Path(record["sem_seg_file_name"]).stem, stem)
            self.assertEqual(image_hw(record["file_name"]), image_hw(record["sem_seg_file_name"]))
            if stem in sizes:
                self.assertEqual(image_hw(record["file_name"]), sizes[stem])

    def test_panoptic_pngs_reproduce_the_semantic_labels(self):
        self.assertEqual(self.pan_run, [str(self.base / "ade20k_panoptic_val.json")])
        with open(self.base / "ade20k_panoptic_val.json") as f:
            content = json.load(f)
        self.assertEqual(len(content["categories"]), 150)
        self.assertEqual(len(content["images"]), 3)
        for ann in content["annotations"]:
            ids = rgb2id(read(str(self.base / "ade20k_panoptic_val" / ann["file_name"])))
            semantic = read(
                str(DATA / "ADEChallengeData2016" / "annotations" / "validation" / ann["file_name"])
            )
            category = np.full(ids.shape, 255, dtype=np.int64)
            n_things = 0
            for seg in ann["segments_info"]:
                mask = ids == seg["id"]
                self.assertEqual(int(mask.sum()), seg["area"])
                x, y, w, h = seg["bbox"]
                ys, xs = np.nonzero(mask)
                self.assertEqual((x, y, w, h), (xs.min(), ys.min(), xs.ptp() + 1, ys.ptp() + 1))
                category[mask] = seg["category_id"]
                n_things += ade20k.ADE20K_150_CATEGORIES[seg["category_id"]]["isthing"]
            # The derived instances cover every thing pixel, so the panoptic map is the
            # semantic map exactly (void where the semantic label is "other").
            np.testing.assert_array_equal(
                category, np.where(semantic == 0, 255, semantic.astype(np.int64) - 1)
            )
            self.assertEqual(n_things, self.components[Path(ann["file_name"]).stem])
            self.assertEqual(int((ids == 0).sum()), int((semantic == 0).sum()))

    def test_panoptic_loader_under_a_root(self):
        names = [f"ade20k_{t}_{s}" for t in ("panoptic", "instance") for s in ("train", "val")]
        with registered_under(self.tmp, names, ade20k.register_all_ade20k):
            records = DatasetCatalog.get("ade20k_panoptic_val")
        self.assertEqual(
            [r["image_id"] for r in records], [f"ADE_val_0000000{i}" for i in (1, 2, 3)]
        )
        for record in records:
            self.assertEqual((record["height"], record["width"]), image_hw(record["file_name"]))
            self.assertEqual(image_hw(record["pan_seg_file_name"]), image_hw(record["file_name"]))
            self.assertEqual(
                record["sem_seg_file_name"],
                str(
                    self.base
                    / "annotations_detectron2"
                    / "validation"
                    / (record["image_id"] + ".png")
                ),
            )
            for seg in record["segments_info"]:
                self.assertEqual(seg["isthing"], seg["category_id"] in ade20k.ADE20K_THING_IDS)

    def test_instance_json(self):
        self.assertEqual(self.ins_run, [str(self.base / "ade20k_instance_val.json")])
        with open(self.base / "ade20k_instance_val.json") as f:
            content = json.load(f)
        self.assertEqual(len(content["annotations"]), sum(self.components.values()))
        self.assertEqual(
            len({a["id"] for a in content["annotations"]}), len(content["annotations"])
        )
        for ann in content["annotations"]:
            self.assertIn(ann["category_id"], ade20k.ADE20K_THING_IDS)
            self.assertEqual(int(mask_util.decode(ann["segmentation"]).sum()), ann["area"])
        self.assertIsNone(self.ins_script.main(["--root", self.tmp, "--splits", "val"])[0])  # kept

    def test_instance_loader(self):
        records = load_coco_instances_checked(
            "ade20k_instance_val",
            str(self.base / "ade20k_instance_val.json"),
            str(self.base / "images" / "validation"),
            "layout",
        )
        self.assertEqual(len(records), 3)
        annotations = [a for r in records for a in r["annotations"]]
        self.assertEqual(len(annotations), sum(self.components.values()))
        # Detectron2 maps the json's ids with the registered map; it asserts the names agree.
        self.assertTrue(all(0 <= a["category_id"] < 100 for a in annotations))
        for record in records:
            self.assertEqual((record["height"], record["width"]), image_hw(record["file_name"]))


@NEEDS_DATA
class TestAde20kFull(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = _class_data_root(cls, "ADE20K_2021_17_01/images")
        cls.base = Path(cls.tmp) / "ADE20K_2021_17_01"
        cls.script = load_script("prepare_ade20k_full_sem_seg")
        cls.first_run = cls.script.main(["--root", cls.tmp, "--splits", "training"])

    def test_label_decoding_against_a_naive_lookup(self):
        seg_file = next((DATA / "ADE20K_2021_17_01").rglob("ADE_train_00016964_seg.png"))
        rgb = read(str(seg_file))
        classes = self.script.decode_classes(rgb)
        train = dict(
            (ade_id, i) for i, (ade_id, _) in enumerate(ade20k_full.ADE20K_FULL_CATEGORIES)
        )
        rows = np.random.default_rng(0).integers(0, rgb.shape[0], 500)
        cols = np.random.default_rng(1).integers(0, rgb.shape[1], 500)
        lut = self.script.class_lut()
        for r, c in zip(rows, cols):
            ade_id = int(rgb[r, c, 0]) // 10 * 256 + int(rgb[r, c, 1])
            self.assertEqual(classes[r, c], ade_id)
            self.assertEqual(lut[ade_id], train.get(ade_id, 65535))

    def test_outputs_and_loader(self):
        self.assertEqual(self.first_run, [(3, 0)])
        records = load_sem_seg_checked(
            "ade20k_full_sem_seg_train",
            str(self.base / "images_detectron2" / "training"),
            str(self.base / "annotations_detectron2" / "training"),
            "layout",
            gt_ext="tif",
        )
        self.assertEqual(len(records), 3)
        for record in records:
            label = read(record["sem_seg_file_name"])
            self.assertEqual(label.dtype, np.uint16)
            self.assertEqual(label.shape, image_hw(record["file_name"]))
            self.assertEqual(min(label.shape), 512)  # all three samples are larger
            seg_name = Path(record["file_name"]).stem + "_seg.png"
            seg_file = next((DATA / "ADE20K_2021_17_01").rglob(seg_name))
            raw = self.script.decode_classes(read(str(seg_file)))
            expected = set(self.script.class_lut()[np.unique(raw)].tolist())
            self.assertTrue(set(np.unique(label).tolist()) <= expected)
            self.assertIn(65535, expected)  # unevaluated classes and unlabeled pixels
        self.assertEqual(self.script.main(["--root", self.tmp, "--splits", "training"]), [(0, 3)])

    def test_output_size(self):
        self.assertEqual(self.script.output_size(1536, 2048), (512, 683))
        self.assertEqual(self.script.output_size(1650, 2200), (512, 683))
        self.assertEqual(self.script.output_size(2000, 1000), (1024, 512))
        self.assertIsNone(self.script.output_size(400, 300))


@NEEDS_DATA
class TestMapillaryVistas(unittest.TestCase):
    def test_semantic_loader_and_class_table(self):
        with tempfile.TemporaryDirectory() as tmp:
            for sub in ("images", "labels"):
                link(
                    DATA / "mapillary_vistas" / "validation" / sub,
                    Path(tmp) / "mapillary_vistas" / "validation" / sub,
                )
            names = [
                f"mapillary_vistas_{t}_{s}"
                for t in ("sem_seg", "panoptic")
                for s in ("train", "val")
            ]
            with registered_under(tmp, names, mapillary_vistas.register_all_mapillary_vistas):
                records = DatasetCatalog.get("mapillary_vistas_sem_seg_val")
                meta = MetadataCatalog.get("mapillary_vistas_sem_seg_val")
                with self.assertRaises(FileNotFoundError) as ctx:  # no panoptic annotations
                    DatasetCatalog.get("mapillary_vistas_panoptic_val")
                self.assertIn("panoptic_2018.json", str(ctx.exception))
            self.assertEqual(len(records), 1)
            self.assertEqual(Path(records[0]["file_name"]).stem, "__CRyFzoDOXn6unQ6a3DnQ")
            with Image.open(records[0]["sem_seg_file_name"]) as im:
                self.assertEqual(im.mode, "P")
                label, palette = np.asarray(im), im.getpalette()
            self.assertEqual(label.shape, image_hw(records[0]["file_name"]))
        # PROVENANCE.md: 17 building, 44 street light, 45 pole; the PNG palette holds the colours.
        self.assertEqual(np.unique(label).tolist(), [17, 44, 45])
        for value, name in ((17, "Building"), (44, "Street Light"), (45, "Pole")):
            self.assertEqual(meta.stuff_classes[value], name)
            self.assertEqual(list(meta.stuff_colors[value]), palette[3 * value : 3 * value + 3])


@NEEDS_DATA
class TestCityscapesBuiltin(unittest.TestCase):
    def test_detectron2_semantic_loader_on_the_sample(self):
        with tempfile.TemporaryDirectory() as tmp:
            city = Path(tmp) / "cityscapes"
            link(DATA / "cityscapes" / "leftImg8bit", city / "leftImg8bit")
            gt = city / "gtFine" / "val" / "frankfurt"
            gt.mkdir(parents=True)
            for f in (DATA / "cityscapes" / "gtFine" / "val" / "frankfurt").iterdir():
                link(f, gt / f.name)
            # The sample has no *_polygons.json; the semantic loader reads only its image size.
            stem = "frankfurt_000000_000294_gtFine_polygons.json"
            height, width = image_hw(str(gt / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
            (gt / stem).write_text(
                json.dumps({"imgHeight": height, "imgWidth": width, "objects": []})
            )
            records = load_cityscapes_semantic(
                str(city / "leftImg8bit" / "val"), str(city / "gtFine" / "val")
            )
        self.assertEqual(len(records), 1)
        self.assertEqual((records[0]["height"], records[0]["width"]), (128, 256))
        self.assertTrue(records[0]["sem_seg_file_name"].endswith("labelTrainIds.png"))
        self.assertEqual(len(MetadataCatalog.get("cityscapes_fine_sem_seg_val").stuff_classes), 19)


class TestPrepareUtils(unittest.TestCase):
    def test_id_rgb_round_trip(self):
        ids = np.array([[0, 1, 255], [256, 65536, 2**24 - 1]])
        np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)
        self.assertEqual(id2rgb(np.array([[256 + 2]])).tolist(), [[[2, 1, 0]]])
        with self.assertRaises(ValueError):
            id2rgb(np.array([[2**24]]))


if __name__ == "__main__":
    unittest.main()
