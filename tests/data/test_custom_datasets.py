"""Datasets registered without code (``DATASETS.CUSTOM`` / ``--dataset``), on the real samples.

For each format (COCO instances, COCO panoptic, semantic, YouTube-VIS):
* registered from the config, the dataset trains the tiny model for two iterations and is
  evaluated by the evaluator its metadata selects;
* that evaluator, fed the ground truth itself as the prediction, scores 100 (PQ / AP / mIoU /
  YouTube-VIS AP): the class names, thing/stuff split and id maps derived from the files are
  consistent with the annotations.
Plus: spec and file errors are one line naming the spec or file; ``NUM_CLASSES`` is checked or
set; and ``train_net.py --dataset ... --num-gpus 2`` registers the dataset in both spawned workers.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.data.datasets.custom import ENV_VAR, parse_spec
from mask2former_d2.evaluation import build_evaluator
from mask2former_d2.predictor import video_frames
from tests.common import DATA, ROOT, TINY_CONFIG, load_script

VIDEO_CONFIG = os.path.join(ROOT, "configs", "quickstart", "video_maskformer2_R18_tiny_toy_ytvis.yaml")
COCO = os.path.join(DATA, "coco")
CITYSCAPES_CLASSES = (
    "road sidewalk building wall fence pole traffic_light traffic_sign vegetation terrain sky person rider "
    "car truck bus train motorcycle bicycle"
).split()
# The tiny model shrunk further, two training iterations on small images.
FAST = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
    "MODEL.MASK_FORMER.HIDDEN_DIM", 32, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64, "MODEL.MASK_FORMER.DEC_LAYERS", 3,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256,
    "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 1000,
    "TEST.EVAL_PERIOD", 0, "DATALOADER.NUM_WORKERS", 0,
]


def _have_data() -> bool:
    return os.path.isdir(COCO) and os.path.isdir(os.path.join(DATA, "cityscapes"))


def write_cityscapes_classes(folder: str) -> str:
    path = os.path.join(folder, "cityscapes_classes.txt")
    with open(path, "w") as f:
        f.write("\n".join(CITYSCAPES_CLASSES) + "\n")
    return path


def cityscapes_spec(name: str, classes_file: str) -> str:
    cs = os.path.join(DATA, "cityscapes")
    return (
        f"{name}:sem_seg:{cs}/leftImg8bit/val,{cs}/gtFine/val,{classes_file},"
        "image_suffix=_leftImg8bit.png,label_suffix=_gtFine_labelTrainIds.png"
    )


def coco_instances_spec(name: str) -> str:
    return f"{name}:coco_instances:{COCO}/annotations/instances_val2017.json,{COCO}/val2017"


def coco_panoptic_spec(name: str) -> str:
    return (
        f"{name}:coco_panoptic:{COCO}/annotations/panoptic_val2017.json,{COCO}/panoptic_val2017,"
        f"{COCO}/val2017,instances={COCO}/annotations/instances_val2017.json"
    )


def write_ytvis_from_video(root: str) -> str:
    """A YouTube-VIS layout from the first 5 frames of the real clip ``video/mmpose_demo.mp4``
    (downscaled to 240x136) with two box tracks (the frames are real; the tracks are drawn here,
    as no annotated YouTube-VIS sample is available)."""
    import cv2

    from tests.data.video_fixtures import box_mask, write_ytvis

    frames = {
        f"clip/{t:05d}.jpg": cv2.resize(frame, (240, 136))[:, :, ::-1].copy()
        for t, frame in enumerate(video_frames(os.path.join(DATA, "video", "mmpose_demo.mp4"), 5))
    }
    assert len(frames) == 5, "cannot decode 5 frames of video/mmpose_demo.mp4"
    h, w = 136, 240
    tracks = {
        1: (7, [box_mask(h, w, 20, 10 + 5 * t, 90, 60 + 5 * t) for t in range(5)]),
        2: (3, [None] + [box_mask(h, w, 60, 150, 120, 200) for _ in range(4)]),
    }
    cats = [{"id": 3, "name": "car"}, {"id": 7, "name": "person"}]
    return write_ytvis(
        root, [{"id": 1, "name": "clip", "h": h, "w": w, "length": 5, "masks": tracks, "kind": "rle"}],
        categories=cats, json_name="train.json", frame_images=frames,
    )


class _ClassesFolderCase:
    """A temporary folder for the class (named with ``prefix``) holding the Cityscapes class list."""

    prefix = "m2f_"

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix=cls.prefix)
        cls.classes = write_cityscapes_classes(cls.tmp)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestSpecs(_ClassesFolderCase, unittest.TestCase):
    prefix = "m2f_custom_"

    def cfg(self, *specs, **kw):
        opts = ["DATASETS.CUSTOM", str(list(specs))]
        for key, value in kw.items():
            opts += [key.replace("__", "."), value]
        return get_maskformer_cfg(TINY_CONFIG, opts)

    def test_bad_specs_name_the_spec(self):
        for text, words in [
            ("x:coco:a,b", "unknown format 'coco'"),
            ("x:coco_instances:a.json", "1 paths; expected NAME:coco_instances:JSON,IMAGE_DIR"),
            ("x:sem_seg:a,b,c,colour=1", "unknown option 'colour'"),
            ("x:sem_seg:a,b,c,ignore_label=no", "ignore_label must be an integer"),
            ("nocolon", "expected NAME:FORMAT:ARG"),
        ]:
            with self.subTest(text=text), self.assertRaises(ValueError) as ctx:
                parse_spec(text)
            self.assertIn(words, str(ctx.exception))
            self.assertEqual(len(str(ctx.exception).splitlines()), 1)

    def test_missing_path_is_named(self):
        missing = os.path.join(self.tmp, "no_such_images")
        spec = f"t_missing:coco_instances:{COCO}/annotations/instances_val2017.json,{missing}"
        with self.assertRaises(FileNotFoundError) as ctx:
            self.cfg(spec)
        self.assertIn(repr(missing), str(ctx.exception))
        self.assertIn("t_missing", str(ctx.exception))
        self.assertNotIn("t_missing", DatasetCatalog.list())

    def test_malformed_files_are_named(self):
        bad_json = os.path.join(self.tmp, "bad.json")
        with open(bad_json, "w") as f:
            f.write("{not json")
        no_isthing = os.path.join(self.tmp, "no_isthing.json")
        with open(no_isthing, "w") as f:
            json.dump({"annotations": [], "categories": [{"id": 1, "name": "a"}]}, f)
        empty_line = os.path.join(self.tmp, "classes_gap.txt")
        with open(empty_line, "w") as f:
            f.write("road\n\nsky\n")
        cases = [
            (f"t_bad:coco_instances:{bad_json},{COCO}/val2017", f"{bad_json}: not a valid JSON file"),
            (f"t_noth:coco_panoptic:{no_isthing},{COCO}/panoptic_val2017,{COCO}/val2017", "lacks 'isthing'"),
            (cityscapes_spec("t_gap", empty_line), "line 2 is empty"),
            (cityscapes_spec("t_ign", self.classes).replace("image_suffix", "ignore_label=3,image_suffix"),
             "ignore_label=3 is also the label of class 'wall'"),
        ]
        for spec, words in cases:
            with self.subTest(spec=spec), self.assertRaises(ValueError) as ctx:
                self.cfg(spec)
            self.assertIn(words, str(ctx.exception))

    def test_no_matching_labels_is_one_line(self):
        spec = cityscapes_spec("t_nolabels", self.classes).replace("_gtFine_labelTrainIds", "_gtFine_color")
        self.cfg(spec)  # metadata registers; records are read when the dataset is first loaded
        with self.assertRaises(ValueError) as ctx:
            DatasetCatalog.get("t_nolabels")
        self.assertIn("found 1 images and 0 labels", str(ctx.exception))

    def test_labels_beyond_the_class_list_are_named(self):
        # ADE20K labels (values up to 18 in the first file) with a list of 10 classes.
        ade = os.path.join(DATA, "ADEChallengeData2016")
        classes = os.path.join(self.tmp, "ten_classes.txt")
        with open(classes, "w") as f:
            f.write("".join(f"class{i}\n" for i in range(10)))
        self.cfg(f"t_ten:sem_seg:{ade}/images/validation,{ade}/annotations/validation,{classes}")
        with self.assertRaises(ValueError) as ctx:
            DatasetCatalog.get("t_ten")
        self.assertIn("ADE_val_00000001.png has label value 18", str(ctx.exception))
        self.assertIn("lists 10 classes", str(ctx.exception))

    def test_num_classes_checked_or_set(self):
        spec = cityscapes_spec("t_ncls", self.classes)
        with self.assertRaises(ValueError) as ctx:
            self.cfg(spec, DATASETS__TRAIN="('t_ncls',)")
        self.assertIn("MODEL.SEM_SEG_HEAD.NUM_CLASSES is 133, but dataset t_ncls has 19 classes", str(ctx.exception))
        cfg = self.cfg(spec, DATASETS__TRAIN="('t_ncls',)", DATASETS__SET_NUM_CLASSES="True")
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 19)
        cfg = self.cfg(spec, DATASETS__TEST="('t_ncls',)", MODEL__SEM_SEG_HEAD__NUM_CLASSES="19")
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 19)

    def test_same_name_other_files_refused(self):
        self.cfg(coco_instances_spec("t_twice"))
        self.cfg(coco_instances_spec("t_twice"))  # the same spec again: nothing to do
        with self.assertRaises(ValueError) as ctx:
            self.cfg(coco_panoptic_spec("t_twice"))
        self.assertIn("given twice", str(ctx.exception))
        with self.assertRaises(ValueError) as ctx:
            self.cfg(coco_instances_spec("coco_2017_val"))
        self.assertIn("taken by a registered dataset", str(ctx.exception))

    def test_flag_specs_from_environment_join_the_config(self):
        spec = coco_instances_spec("t_env")
        os.environ[ENV_VAR] = json.dumps([spec])
        try:
            cfg = self.cfg()
        finally:
            del os.environ[ENV_VAR]
        self.assertEqual(list(cfg.DATASETS.CUSTOM), [spec])
        self.assertIn("t_env", DatasetCatalog.list())


def _panoptic_gt_outputs(record):
    """The ground truth of a panoptic record as the model's outputs (crowd segments left void)."""
    rgb = np.asarray(Image.open(record["pan_seg_file_name"]), dtype=np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    seg = np.zeros_like(ids)
    infos = []
    for k, s in enumerate(s for s in record["segments_info"] if not s.get("iscrowd")):
        seg[ids == s["id"]] = k + 1
        infos.append({"id": k + 1, "category_id": s["category_id"], "isthing": s["isthing"]})
    return {"panoptic_seg": (torch.as_tensor(seg, dtype=torch.int32), infos)}


def _instances_gt_outputs(record):
    h, w = record["height"], record["width"]
    anns = [a for a in record["annotations"] if not a.get("iscrowd")]
    inst = Instances((h, w))
    masks = [mask_util.decode(a["segmentation"]) if isinstance(a["segmentation"], dict) else
             mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))) for a in anns]
    inst.pred_masks = torch.as_tensor(np.stack(masks), dtype=torch.bool)
    inst.pred_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]))
    inst.scores = torch.ones(len(anns))
    inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
    return {"instances": inst}


def _pycocotools_ap_of_ground_truth(json_file):
    """Mask AP (in %) pycocotools gives the non-crowd annotations of ``json_file`` taken as
    detections (score 1). Not 100 on the COCO sample: its annotation ids start at 0, and
    pycocotools records a match by the ground truth's id, so the match to id 0 reads as a miss;
    the evaluator must agree with pycocotools on it."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(json_file)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
             "score": 1.0} for a in gt.dataset["annotations"] if not a["iscrowd"]]
    coco_eval = COCOeval(gt, gt.loadRes(dets), "segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats[0] * 100


def _semantic_gt_outputs(record, num_classes):
    label = torch.as_tensor(np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64))
    # Ignored pixels (255) get any class: the evaluator leaves them out.
    label = torch.where(label < num_classes, label, torch.zeros_like(label))
    probs = torch.nn.functional.one_hot(label, num_classes).permute(2, 0, 1).float()  # (K, H, W)
    return {"sem_seg": probs}


def _video_gt_outputs(record):
    h, w, length = record["height"], record["width"], record["length"]
    tracks = {}
    for t, frame in enumerate(record["annotations"]):
        for a in frame:
            tracks.setdefault(a["id"], (a["category_id"], torch.zeros(length, h, w, dtype=torch.bool)))
            tracks[a["id"]][1][t] = torch.as_tensor(mask_util.decode(a["segmentation"]), dtype=torch.bool)
    return {
        "image_size": (h, w),
        "pred_scores": [1.0] * len(tracks),
        "pred_labels": [c for c, _ in tracks.values()],
        "pred_masks": [m for _, m in tracks.values()],
    }


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestEndToEnd(_ClassesFolderCase, unittest.TestCase):
    """Each format: register from the config, train two iterations, evaluate; and the evaluator
    scores the ground truth 100."""

    prefix = "m2f_custom_e2e_"

    def train_and_evaluate(self, config_file, trainer_cls, name, spec, *opts):
        out = tempfile.mkdtemp(dir=self.tmp)
        cfg = get_maskformer_cfg(config_file, FAST + [
            "DATASETS.CUSTOM", str([spec]), "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
            "DATASETS.SET_NUM_CLASSES", "True", "OUTPUT_DIR", out, *opts,
        ])
        cfg.freeze()
        trainer = trainer_cls(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        # DefaultTrainer evaluates DATASETS.TEST after the last iteration and keeps the results.
        results = trainer._last_eval_results
        self.assertEqual(trainer.iter, cfg.SOLVER.MAX_ITER)
        self.assertTrue(os.path.isfile(os.path.join(out, "model_final.pth")))
        return cfg, results

    def evaluate_ground_truth(self, cfg, name, to_outputs, trainer_cls=None):
        out = tempfile.mkdtemp(dir=self.tmp)
        evaluator = trainer_cls.build_evaluator(cfg, name, out) if trainer_cls else build_evaluator(cfg, name, out)
        evaluator.reset()
        for record in DatasetCatalog.get(name):
            evaluator.process([record], [to_outputs(record)])
        return evaluator.evaluate()

    def test_coco_panoptic(self):
        from mask2former_d2.engine import Trainer

        name = "t_e2e_coco_panoptic"
        cfg, results = self.train_and_evaluate(
            TINY_CONFIG, Trainer, name, coco_panoptic_spec(name),
            "INPUT.IMAGE_SIZE", 128, "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 256,
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
        )
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 133)
        self.assertIn("PQ", results["panoptic_seg"])
        self.assertIn("AP", results["segm"])
        meta = MetadataCatalog.get(name)
        self.assertEqual(len(meta.thing_dataset_id_to_contiguous_id), 80)
        self.assertEqual(meta.stuff_classes[meta.stuff_dataset_id_to_contiguous_id[184]], "tree-merged")
        self.assertEqual(meta.thing_classes[meta.thing_dataset_id_to_contiguous_id[19]], "horse")
        gt = self.evaluate_ground_truth(cfg, name, _panoptic_gt_outputs)
        self.assertAlmostEqual(gt["panoptic_seg"]["PQ"], 100.0, places=3)

    def test_coco_instances(self):
        from mask2former_d2.engine import Trainer

        name = "t_e2e_coco_instances"
        cfg, results = self.train_and_evaluate(
            TINY_CONFIG, Trainer, name, coco_instances_spec(name),
            "INPUT.DATASET_MAPPER_NAME", "coco_instance_lsj", "INPUT.IMAGE_SIZE", 128,
            "INPUT.MIN_SIZE_TEST", 128, "INPUT.MAX_SIZE_TEST", 256,
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "False", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
        )
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 80)
        self.assertIn("AP", results["segm"])
        gt = self.evaluate_ground_truth(cfg, name, _instances_gt_outputs)
        reference = _pycocotools_ap_of_ground_truth(f"{COCO}/annotations/instances_val2017.json")
        self.assertAlmostEqual(gt["segm"]["AP"], reference)

    def test_semantic_cityscapes_and_ade20k(self):
        from mask2former_d2.engine import Trainer

        name = "t_e2e_cityscapes"
        cfg, results = self.train_and_evaluate(
            TINY_CONFIG, Trainer, name, cityscapes_spec(name, self.classes),
            "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic", "INPUT.MIN_SIZE_TRAIN", "(128,)",
            "INPUT.MAX_SIZE_TRAIN", 256, "INPUT.CROP.ENABLED", "False", "INPUT.MIN_SIZE_TEST", 128,
            "INPUT.MAX_SIZE_TEST", 256, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
        )
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 19)
        self.assertIn("mIoU", results["sem_seg"])
        gt = self.evaluate_ground_truth(cfg, name, lambda r: _semantic_gt_outputs(r, 19))
        self.assertAlmostEqual(gt["sem_seg"]["mIoU"], 100.0, places=3)

        # ADE20K's raw labels (0 = other) converted by the repository's script, class names
        # from objectInfo150.txt: the walk-through of docs/custom_datasets.md.
        ade = os.path.join(DATA, "ADEChallengeData2016")
        labels = os.path.join(self.tmp, "ade_labels")
        load_script("datasets/prepare_ade20k_sem_seg.py").convert_split(
            os.path.join(ade, "annotations", "validation"), labels
        )
        classes = os.path.join(self.tmp, "ade_classes.txt")
        with open(os.path.join(ade, "objectInfo150.txt")) as f, open(classes, "w") as out:
            out.writelines(line.rstrip("\n").split("\t")[-1] + "\n" for line in list(f)[1:])
        name = "t_e2e_ade"
        cfg = get_maskformer_cfg(TINY_CONFIG, [
            "DATASETS.CUSTOM", str([f"{name}:sem_seg:{ade}/images/validation,{labels},{classes}"]),
            "DATASETS.TEST", f"('{name}',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 150,
        ])
        self.assertEqual(len(DatasetCatalog.get(name)), 3)
        self.assertEqual(MetadataCatalog.get(name).stuff_classes[2], "sky")
        gt = self.evaluate_ground_truth(cfg, name, lambda r: _semantic_gt_outputs(r, 150))
        self.assertAlmostEqual(gt["sem_seg"]["mIoU"], 100.0, places=3)

    def test_ytvis(self):
        from mask2former_d2.engine import VideoTrainer

        root = os.path.join(self.tmp, "ytvis")
        json_file = write_ytvis_from_video(root)
        name = "t_e2e_ytvis"
        cfg, results = self.train_and_evaluate(
            VIDEO_CONFIG, VideoTrainer, name, f"{name}:ytvis:{json_file},{root}/JPEGImages",
            "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", 192, "INPUT.MIN_SIZE_TEST", 96,
            "INPUT.MAX_SIZE_TEST", 192, "INPUT.SAMPLING_FRAME_NUM", 2, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8,
        )
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 2)
        self.assertIn("AP", results["segm"])
        self.assertEqual(MetadataCatalog.get(name).thing_classes, ["car", "person"])
        gt = self.evaluate_ground_truth(cfg, name, _video_gt_outputs, VideoTrainer)
        self.assertAlmostEqual(gt["segm"]["AP"], 100.0, places=3)


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestFlagInWorkers(unittest.TestCase):
    """``train_net.py --dataset`` with two spawned CPU workers: each registers the dataset,
    trains, and the evaluation gathers both workers' predictions; the run's config names it."""

    def test_two_workers(self):
        with tempfile.TemporaryDirectory() as tmp:
            classes = write_cityscapes_classes(tmp)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS="1")
            env.pop(ENV_VAR, None)
            out = os.path.join(tmp, "out")
            cmd = [
                sys.executable, os.path.join(ROOT, "train_net.py"), "--config-file", TINY_CONFIG,
                "--num-gpus", "2", "--dataset", cityscapes_spec("cs_flag", classes),
                *map(str, FAST), "SOLVER.MAX_ITER", "1",
                "DATASETS.TRAIN", "('cs_flag',)", "DATASETS.TEST", "('cs_flag',)",
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "19", "INPUT.DATASET_MAPPER_NAME", "mask_former_semantic",
                "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.CROP.ENABLED", "False",
                "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256",
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
                "OUTPUT_DIR", out,
            ]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            log = proc.stdout + proc.stderr
            self.assertEqual(proc.returncode, 0, log[-4000:])
            self.assertIn("mIoU", log)
            with open(os.path.join(out, "config.yaml")) as f:
                saved = f.read()
            self.assertIn("cs_flag:sem_seg:", saved)


if __name__ == "__main__":
    unittest.main()


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestDemoLabels(unittest.TestCase):
    """demo.py --dataset: the drawing is labelled with the dataset's class names."""

    def test_demo_uses_the_dataset_class_names(self):
        from detectron2.utils.visualizer import Visualizer

        demo = load_script("demo/demo.py")
        drawn = []
        draw_sem_seg = Visualizer.draw_sem_seg

        def spy(visualizer, sem_seg, **kwargs):
            drawn.append(list(visualizer.metadata.stuff_classes))
            return draw_sem_seg(visualizer, sem_seg, **kwargs)

        with tempfile.TemporaryDirectory() as tmp:
            classes = write_cityscapes_classes(tmp)
            image = os.path.join(DATA, "cityscapes", "leftImg8bit", "val", "frankfurt",
                                 "frankfurt_000000_000294_leftImg8bit.png")
            argv = ["--config-file", TINY_CONFIG, "--input", image, "--output", os.path.join(tmp, "vis.png"),
                    "--dataset", cityscapes_spec("cs_demo", classes), "--opts", "MODEL.WEIGHTS", "",
                    "DATASETS.TEST", "('cs_demo',)", "DATASETS.SET_NUM_CLASSES", "True",
                    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
                    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "256"]
            Visualizer.draw_sem_seg = spy
            try:
                self.assertEqual(demo.main(argv), 0)
            finally:
                Visualizer.draw_sem_seg = draw_sem_seg
                os.environ.pop(ENV_VAR, None)
            self.assertTrue(os.path.isfile(os.path.join(tmp, "vis.png")))
        self.assertEqual(drawn, [CITYSCAPES_CLASSES])
