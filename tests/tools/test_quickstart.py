"""The README's first command, shortened: tools/quickstart.py end to end with few iterations.

The run must learn: the training loss (Detectron2 logs the median of the last 20 iterations to
``metrics.json`` every 20 iterations) falls clearly between iterations 20 and 40."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import cv2

from tests.common import ROOT


class TestQuickstart(unittest.TestCase):
    def test_generate_train_evaluate_demo(self):
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "tools", "quickstart.py"), "--output", out,
                 "--iters", "40", "--threads", "1", "SOLVER.IMS_PER_BATCH", "2"],
                cwd=ROOT, capture_output=True, text=True, timeout=900,
            )
            self.assertEqual(proc.returncode, 0, (proc.stdout + proc.stderr)[-4000:])
            self.assertIn("== quick-start results", proc.stdout)
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
            # The real evaluators ran and reported PQ, mask AP and mIoU.
            for key in ("PQ", "mask AP", "mIoU"):
                self.assertIsInstance(summary[key], float, key)
            # The model learned: the loss of iterations 20-39 is well below that of 0-19.
            with open(os.path.join(out, "train", "metrics.json")) as f:
                losses = {
                    row["iteration"]: row["total_loss"]
                    for row in map(json.loads, f)
                    if "total_loss" in row
                }
            self.assertEqual(sorted(losses), [19, 39])
            self.assertLess(losses[39], 0.8 * losses[19], losses)
            # The dataset is in the COCO panoptic layout.
            toy = os.path.join(out, "toy_dataset")
            for path in ("panoptic_train.json", "panoptic_val.json", "instances_val.json"):
                self.assertTrue(os.path.isfile(os.path.join(toy, path)), path)
            # The demo picture decodes and has the input's size.
            image = cv2.imread(summary["demo_image"])
            source = cv2.imread(os.path.join(toy, "images", "val", "val_00001.jpg"))
            self.assertIsNotNone(image)
            self.assertEqual(image.shape, source.shape)
            self.assertTrue(os.path.isfile(os.path.join(out, "train", "model_final.pth")))


if __name__ == "__main__":
    unittest.main()
