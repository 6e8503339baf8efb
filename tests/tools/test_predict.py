"""tools/predict.py and batched ``Predictor`` calls.

* ``Predictor([...])``: images of different sizes give, batched, the outputs each gives alone
  (those padded to one size share a model call; the padding is cropped off);
* the writers, fed the ground truth of the real COCO sample as the prediction, produce files
  that panopticapi scores PQ 100 and pycocotools scores as it scores the ground truth itself;
* the command over a nested folder and a video file writes what the model outputs for each
  image (compared with ``Predictor`` run image by image), resumes, and for a video model writes
  YouTube-VIS results equal to ``VideoPredictor``'s tracks.
"""
import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from PIL import Image

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.predictor import Predictor, video_frames
from tests.common import DATA, ROOT, load_script, save_checkpoint, tiny_cfg
from tests.data.test_custom_datasets import (
    COCO,
    VIDEO_CONFIG,
    _instances_gt_outputs,
    _panoptic_gt_outputs,
    _pycocotools_ap_of_ground_truth,
    coco_instances_spec,
    coco_panoptic_spec,
)

predict = load_script("tools/predict.py")
VIDEO = os.path.join(DATA, "video", "mmpose_demo.mp4")
# Thresholds at 0: a randomly initialised model then outputs panoptic segments to compare.
SMALL = [
    "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 192, "TEST.DETECTIONS_PER_IMAGE", 5,
    "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", 0.0, "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD", 0.0,
]


def _have_data() -> bool:
    return os.path.isdir(COCO) and os.path.isfile(VIDEO)


def _assert_same_outputs(test, alone, batched):
    """Equal up to float rounding: a batched convolution sums in another order (differences
    ~1e-7), which can flip a thresholded mask where its logit is ~0: at most 1e-4 of the pixels."""
    test.assertEqual(set(alone), set(batched))
    torch.testing.assert_close(batched["sem_seg"], alone["sem_seg"], atol=1e-5, rtol=0)
    flipped = (batched["panoptic_seg"][0] != alone["panoptic_seg"][0]).float().mean().item()
    test.assertLessEqual(flipped, 1e-4)
    test.assertEqual(batched["panoptic_seg"][1], alone["panoptic_seg"][1])
    a, b = alone["instances"], batched["instances"]
    test.assertTrue(torch.equal(b.pred_classes, a.pred_classes))
    torch.testing.assert_close(b.scores, a.scores, atol=1e-5, rtol=0)
    test.assertLessEqual((b.pred_masks != a.pred_masks).float().mean().item(), 1e-4)


class TestPredictorBatch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.predictor = Predictor(tiny_cfg("INPUT.MIN_SIZE_TEST", 0))
        rng = np.random.default_rng(0)
        # The first two pad to 128x160 (one model call), the third to 64x224.
        cls.sizes = [(100, 130), (97, 140), (64, 200)]
        cls.images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in cls.sizes]

    def test_batched_outputs_equal_alone(self):
        calls = []
        forward = self.predictor.model.forward

        def spy(batched_inputs):
            calls.append([tuple(x["image"].shape[-2:]) for x in batched_inputs])
            return forward(batched_inputs)

        self.predictor.model.forward = spy
        try:
            batched = self.predictor(self.images)
            alone = [self.predictor(image) for image in self.images]
        finally:
            del self.predictor.model.forward
        self.assertEqual(calls[0], [(100, 130), (97, 140)])
        self.assertEqual(calls[1], [(64, 200)])
        for size, a, b in zip(self.sizes, alone, batched):
            self.assertEqual(tuple(b["sem_seg"].shape[-2:]), size)
            _assert_same_outputs(self, a, b)

    def test_bad_image_in_list_is_named(self):
        with self.assertRaises(ValueError) as ctx:
            self.predictor([self.images[0], np.zeros((4, 4), dtype=np.uint8)])
        self.assertIn("images[1]", str(ctx.exception))


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestWritersReadBack(unittest.TestCase):
    """The ground truth written as predictions, read back by panopticapi and pycocotools."""

    def test_panoptic_png_and_json(self):
        from panopticapi.evaluation import pq_compute

        name = "t_pred_gt_panoptic"
        get_maskformer_cfg("", ["DATASETS.CUSTOM", str([coco_panoptic_spec(name)])])
        meta = MetadataCatalog.get(name)
        categories = predict.CategoryMap(meta, len(meta.stuff_classes))
        with tempfile.TemporaryDirectory() as out:
            parts = []
            for record in DatasetCatalog.get(name):
                stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
                parts.append(predict.write_image_results(
                    out, stem, record["file_name"], _panoptic_gt_outputs(record), categories, probs=False
                ))
            predict.write_summaries(out, parts, categories)
            with contextlib.redirect_stdout(io.StringIO()):
                result = pq_compute(
                    f"{COCO}/annotations/panoptic_val2017.json", os.path.join(out, "panoptic.json"),
                    f"{COCO}/panoptic_val2017", os.path.join(out, "panoptic"),
                )
        self.assertAlmostEqual(result["All"]["pq"], 1.0)
        used = {s["category_id"] for p in parts for s in p["panoptic"]["segments_info"]}
        self.assertEqual(result["All"]["n"], len(used))

    def test_instances_json(self):
        from pycocotools.coco import COCO as CocoApi
        from pycocotools.cocoeval import COCOeval

        name = "t_pred_gt_instances"
        get_maskformer_cfg("", ["DATASETS.CUSTOM", str([coco_instances_spec(name)])])
        meta = MetadataCatalog.get(name)
        categories = predict.CategoryMap(meta, len(meta.thing_classes))
        gt_json = f"{COCO}/annotations/instances_val2017.json"
        with tempfile.TemporaryDirectory() as out:
            parts = [
                predict.write_image_results(out, os.path.basename(r["file_name"])[:-4], r["file_name"],
                                            _instances_gt_outputs(r), categories, probs=False)
                for r in DatasetCatalog.get(name)
            ]
            predict.write_summaries(out, parts, categories)
            with contextlib.redirect_stdout(io.StringIO()):
                gt = CocoApi(gt_json)
                coco_eval = COCOeval(gt, gt.loadRes(os.path.join(out, "instances.json")), "segm")
                coco_eval.evaluate()
                coco_eval.accumulate()
                coco_eval.summarize()
                reference = _pycocotools_ap_of_ground_truth(gt_json)
        self.assertAlmostEqual(coco_eval.stats[0] * 100, reference)


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestPredictCommand(unittest.TestCase):
    """The command on a nested folder and a video, with a saved random tiny model."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="m2f_predict_")
        cls.inputs = os.path.join(cls.tmp, "inputs")
        os.makedirs(os.path.join(cls.inputs, "sub"))
        shutil.copy(os.path.join(COCO, "val2017", "000000142238.jpg"), cls.inputs)
        shutil.copy(os.path.join(DATA, "ADEChallengeData2016", "images", "validation", "ADE_val_00000003.jpg"),
                    os.path.join(cls.inputs, "sub"))
        cls.name = "t_predict_cli"
        cls.opts = ["DATASETS.TEST", f"('{cls.name}',)", *map(str, SMALL)]
        cfg = tiny_cfg("DATASETS.CUSTOM", str([coco_panoptic_spec(cls.name)]), *cls.opts)
        torch.manual_seed(0)
        cls.weights = save_checkpoint(build_model(cfg), cls.tmp, "pth")
        cfg.defrost()
        cfg.MODEL.WEIGHTS = cls.weights
        cls.cfg = cfg
        cls.predictor = Predictor(cfg)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def run_cli(self, out, *extra):
        opts = [
            "MODEL.WEIGHTS", self.weights, "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
            "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8",
            "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True", *self.opts,
        ]
        argv = ["--config-file", os.path.join(ROOT, "configs/quickstart/maskformer2_R18_tiny_coco_panoptic.yaml"),
                "--input", self.inputs, VIDEO, "--output", out, "--dataset", coco_panoptic_spec(self.name),
                *extra, "--opts", *opts]
        with self.assertLogs("mask2former_d2.predict", "INFO") as logs:
            self.assertEqual(predict.main(argv), 0)
        return logs.output[-1]

    def expected_names(self):
        frames = [f"mmpose_demo/{t:06d}" for t in range(5)]
        return ["000000142238", *frames, "sub/ADE_val_00000003"]

    def check_against_predictor(self, out):
        images = {"000000142238": cv2.imread(os.path.join(self.inputs, "000000142238.jpg")),
                  "sub/ADE_val_00000003": cv2.imread(os.path.join(self.inputs, "sub", "ADE_val_00000003.jpg"))}
        for t, frame in enumerate(video_frames(VIDEO, 5)):
            images[f"mmpose_demo/{t:06d}"] = frame
        with open(os.path.join(out, "panoptic.json")) as f:
            panoptic = {a["file_name"][:-4]: a for a in json.load(f)["annotations"]}
        with open(os.path.join(out, "instances.json")) as f:
            instances = json.load(f)
        with open(os.path.join(out, "images.json")) as f:
            ids = {im["name"]: im["id"] for im in json.load(f)}
        meta = MetadataCatalog.get(self.name)
        reverse = {c: d for d, c in meta.stuff_dataset_id_to_contiguous_id.items()}
        self.assertEqual(sorted(panoptic), sorted(images))
        self.assertEqual(ids["000000142238"], 142238)  # COCO's names give COCO's ids
        self.assertEqual(ids["mmpose_demo/000000"], "mmpose_demo/000000")
        for name, image in images.items():
            with self.subTest(name=name):
                expected = self.predictor(image)
                rgb = np.asarray(Image.open(os.path.join(out, "panoptic", name + ".png")), dtype=np.int64)
                seg = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
                # Frames of the video share a model call: equal up to rounding (see above).
                self.assertLessEqual(np.mean(seg != expected["panoptic_seg"][0].numpy()), 1e-4)
                self.assertEqual(
                    [(s["id"], s["category_id"]) for s in panoptic[name]["segments_info"]],
                    [(s["id"], reverse[s["category_id"]]) for s in expected["panoptic_seg"][1]],
                )
                labels = np.asarray(Image.open(os.path.join(out, "sem_seg", name + ".png")))
                self.assertLessEqual(np.mean(labels != expected["sem_seg"].argmax(0).numpy()), 1e-4)
                mine = [r for r in instances if r["image_id"] == ids[name]]
                self.assertEqual(len(mine), len(expected["instances"]))
                for r, mask in zip(mine, expected["instances"].pred_masks.numpy()):
                    self.assertLessEqual(np.mean(mask_util.decode(r["segmentation"]).astype(bool) != mask), 1e-4)

    def test_images_folder_and_video_then_resume(self):
        out = os.path.join(self.tmp, "out")
        line = self.run_cli(out, "--batch-size", "3", "--sem-seg-probs")
        self.assertIn("7 computed, 0 already done", line)
        self.check_against_predictor(out)
        with np.load(os.path.join(out, "sem_seg_probs", "sub", "ADE_val_00000003.npz")) as probs:
            self.assertEqual(probs["probs"].shape, (133, 300, 400))
            self.assertEqual(probs["probs"].dtype, np.float16)
        # Resumed: nothing is redone; a removed result is redone alone.
        self.assertIn("0 computed, 7 already done", self.run_cli(out))
        os.remove(os.path.join(out, "parts", "mmpose_demo", "000002.json"))
        self.assertIn("1 computed, 6 already done", self.run_cli(out))
        self.check_against_predictor(out)

    def test_ids_from_coco_json(self):
        ids = predict.read_ids(f"{COCO}/annotations/panoptic_val2017.json")
        self.assertEqual(ids, {"000000142238.jpg": 142238, "000000439180.jpg": 439180})

    def test_bad_input_is_one_line(self):
        with self.assertRaises(predict.PredictError) as ctx:
            predict.expand_inputs([os.path.join(self.tmp, "nothing_here")])
        self.assertIn("nothing_here: no such file or folder", str(ctx.exception))


@unittest.skipUnless(_have_data(), "needs the real samples (tests/common.py DATA)")
class TestPredictVideoModel(unittest.TestCase):
    def test_ytvis_results_equal_video_predictor(self):
        from mask2former_d2.video_predictor import VideoPredictor

        with tempfile.TemporaryDirectory() as tmp:
            opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 192,
                    "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
            cfg = get_maskformer_cfg(VIDEO_CONFIG, opts)
            torch.manual_seed(0)
            weights = save_checkpoint(build_model(cfg), tmp, "pth")
            frames_dir = os.path.join(tmp, "frames", "clip_a")
            os.makedirs(frames_dir)
            for t, frame in enumerate(video_frames(VIDEO, 3)):
                cv2.imwrite(os.path.join(frames_dir, f"{t:05d}.jpg"), frame)
            out = os.path.join(tmp, "out")
            ytvis_json = os.path.join(tmp, "ytvis.json")  # the id of clip_a in a YouTube-VIS json
            with open(ytvis_json, "w") as f:
                json.dump({"videos": [{"id": 7, "file_names": ["clip_a/00000.jpg"]}]}, f)
            argv = ["--config-file", VIDEO_CONFIG, "--input", VIDEO, os.path.join(tmp, "frames"), "--output", out,
                    "--ids-from", ytvis_json, "--opts", *map(str, opts), "MODEL.WEIGHTS", weights]
            self.assertEqual(predict.main(argv), 0)
            with open(os.path.join(out, "ytvis_results.json")) as f:
                results = json.load(f)
            with open(os.path.join(out, "videos.json")) as f:
                videos = {v["name"]: v for v in json.load(f)}
            self.assertEqual(sorted(videos), ["clip_a", "mmpose_demo"])
            self.assertEqual(videos["clip_a"]["id"], 7)
            self.assertEqual(videos["clip_a"]["length"], 3)
            self.assertEqual(videos["mmpose_demo"]["id"], "mmpose_demo")
            cfg.defrost()
            cfg.MODEL.WEIGHTS = weights
            predictor = VideoPredictor(cfg)
            frames = list(video_frames(VIDEO, 5))
            expected = predictor(frames)
            mine = [r for r in results if r["video_id"] == videos["mmpose_demo"]["id"]]
            self.assertEqual(videos["mmpose_demo"]["length"], 5)
            self.assertEqual(len(mine), len(expected["pred_scores"]))
            for r, score, label, masks in zip(mine, expected["pred_scores"], expected["pred_labels"],
                                              expected["pred_masks"]):
                self.assertAlmostEqual(r["score"], float(score), places=5)
                self.assertEqual(r["category_id"], int(label))  # no dataset: the model's class ids
                self.assertEqual(len(r["segmentations"]), 5)
                for rle, mask in zip(r["segmentations"], torch.as_tensor(masks).numpy()):
                    decoded = np.zeros_like(mask) if rle is None else mask_util.decode(rle).astype(bool)
                    np.testing.assert_array_equal(decoded, mask)


if __name__ == "__main__":
    unittest.main()
