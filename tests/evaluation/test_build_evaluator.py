"""build_evaluator on a panoptic dataset registered with Detectron2's own ``register_coco_panoptic``
(no semantic PNGs, no instance json) and the published default SEMANTIC_ON / INSTANCE_ON: PQ is
evaluated, the others are skipped with one warning naming the missing metadata, and a run that
could evaluate nothing stops before the trainer is built."""
import argparse
import logging
import os
import tempfile
import unittest

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.evaluation import COCOPanopticEvaluator
from panopticapi.utils import rgb2id
from PIL import Image

from mask2former_d2 import engine, evaluation
from mask2former_d2.data.toy import make_toy_panoptic_dataset, toy_metadata
from mask2former_d2.evaluation import build_evaluator, check_evaluation

from ..common import TINY_CONFIG, tiny_cfg

NAME = "__test_d2_registered_toy_panoptic_val"


class TestEvaluatorFromMetadata(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = make_toy_panoptic_dataset(os.path.join(cls.tmp.name, "toy"), splits={"val": 3})
        if NAME not in DatasetCatalog.list():
            register_coco_panoptic(
                NAME,
                toy_metadata(),
                os.path.join(root, "images", "val"),
                os.path.join(root, "panoptic", "val"),
                os.path.join(root, "panoptic_val.json"),
            )

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def cfg(self, *opts):
        return tiny_cfg("DATASETS.TEST", (NAME,), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5, *opts)

    def test_panoptic_only_with_one_warning(self):
        evaluation._warned.discard(NAME)  # a fresh process: not warned yet
        cfg = self.cfg()
        self.assertTrue(cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON and cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON)
        with self.assertLogs("mask2former_d2.evaluation", logging.WARNING) as logs:
            evaluator = build_evaluator(cfg, NAME, os.path.join(self.tmp.name, "eval"))
            build_evaluator(cfg, NAME, os.path.join(self.tmp.name, "eval"))  # warned once only
        self.assertIsInstance(evaluator, COCOPanopticEvaluator)
        self.assertEqual(len(logs.records), 1, logs.output)
        message = logs.records[0].getMessage()
        self.assertIn(NAME, message)
        self.assertIn("semantic (no sem_seg_root)", message)
        self.assertIn("instance (no json_file)", message)
        self.assertIn("evaluating panoptic only", message)

    def test_reports_pq(self):
        # The ground truth as predictions: PQ 100 (an independent fact, not this code's output).
        evaluator = build_evaluator(self.cfg(), NAME, os.path.join(self.tmp.name, "eval_pq"))
        evaluator.reset()
        for record in DatasetCatalog.get(NAME):
            ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
            segments = [
                {"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                for s in record["segments_info"]
            ]
            evaluator.process([record], [{"panoptic_seg": (torch.as_tensor(ids.astype(np.int32)), segments)}])
        results = evaluator.evaluate()
        self.assertAlmostEqual(results["panoptic_seg"]["PQ"], 100.0, places=3)

    def test_nothing_to_evaluate_stops_before_training(self):
        args = argparse.Namespace(
            config_file=TINY_CONFIG,
            opts=[
                "DATASETS.TEST", f"('{NAME}',)",
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
                "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True",
                "OUTPUT_DIR", os.path.join(self.tmp.name, "run"),
            ],
            eval_only=False, resume=False, num_gpus=1, num_machines=1, machine_rank=0,
        )

        class NoTrainer:
            def __init__(self, cfg):
                raise AssertionError("the trainer must not be built")

        with self.assertRaises(ValueError) as ctx:
            engine.main(args, NoTrainer)
        message = str(ctx.exception)
        self.assertIn(f"no evaluator for dataset {NAME!r}", message)
        self.assertIn("skipped for missing ground truth: semantic (no sem_seg_root), instance (no json_file)",
                      message)

    def test_own_registration_keeps_every_evaluation(self):
        name = "coco_2017_val_panoptic_with_sem_seg"
        self.assertEqual(check_evaluation(tiny_cfg("DATASETS.TEST", (name,)), name),
                         ["semantic", "panoptic", "instance"])
        self.assertTrue(MetadataCatalog.get(name).sem_seg_root)


if __name__ == "__main__":
    unittest.main()
