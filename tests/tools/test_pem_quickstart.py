"""The PEM quick-start, shortened: tools/quickstart.py --config <tiny PEM> end to end with few
iterations (generated dataset, training, the three evaluators, the demo picture).

The run must learn: the training loss (the median of the last 20 iterations, logged every 20)
falls clearly between iterations 20 and 40."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import cv2

from tests.common import ROOT


class TestPEMQuickstart(unittest.TestCase):
    def test_generate_train_evaluate_demo(self):
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "tools", "quickstart.py"), "--output", out,
                 "--config", "pem_STDC1_tiny_coco_panoptic.yaml",
                 "--iters", "40", "--threads", "1", "SOLVER.IMS_PER_BATCH", "2"],
                cwd=ROOT, capture_output=True, text=True, timeout=900,
            )
            self.assertEqual(proc.returncode, 0, (proc.stdout + proc.stderr)[-4000:])
            self.assertIn("== quick-start results", proc.stdout)
            with open(os.path.join(out, "log.txt")) as f:
                self.assertIn("PEMTransformerDecoder", f.read())  # the model the trainer printed
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
            for key in ("PQ", "mask AP", "mIoU"):
                self.assertIsInstance(summary[key], float, key)
            with open(os.path.join(out, "train", "metrics.json")) as f:
                losses = {row["iteration"]: row["total_loss"] for row in map(json.loads, f) if "total_loss" in row}
            self.assertEqual(sorted(losses), [19, 39])
            self.assertLess(losses[39], 0.85 * losses[19], losses)
            image = cv2.imread(summary["demo_image"])
            source = cv2.imread(os.path.join(out, "toy_dataset", "images", "val", "val_00001.jpg"))
            self.assertIsNotNone(image)
            self.assertEqual(image.shape, source.shape)

    def test_unknown_config_is_one_clear_error(self):
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "quickstart.py"), "--config", "no_such.yaml",
             "--output", tempfile.gettempdir() + "/m2f_pem_qs_missing", "--iters", "1"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("--config no_such.yaml: no such file", proc.stderr)


if __name__ == "__main__":
    unittest.main()
