"""tools/evaluate_ytvis.py on an empty results list: the metrics follow the convention of any
run (0 where ground truth exists, null where an area range has none), not zeros everywhere."""
import contextlib
import io
import json
import os
import tempfile
import unittest

import numpy as np
import pycocotools.mask as mask_util

from tests.common import load_script


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class TestEvaluateEmptyResults(unittest.TestCase):
    def test_empty_results_list(self):
        tool = load_script(os.path.join("tools", "evaluate_ytvis.py"))
        h, w = 30, 40
        small = np.zeros((h, w), bool)
        small[:10, :10] = True  # 100 pixels: a "small" object; no medium or large ground truth
        gt = {
            "videos": [{"id": 1, "height": h, "width": w, "length": 2, "file_names": ["1/0.jpg", "1/1.jpg"]}],
            "categories": [{"id": 1, "name": "c1"}],
            "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentations": [_rle(small)] * 2, "areas": [100, 100]}],
        }
        with tempfile.TemporaryDirectory() as d:
            gt_file, results_file = os.path.join(d, "gt.json"), os.path.join(d, "results.json")
            with open(gt_file, "w") as f:
                json.dump(gt, f)
            with open(results_file, "w") as f:
                json.dump([], f)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                self.assertEqual(tool.main(["--gt", gt_file, "--results", results_file]), 0)
        lines = out.getvalue().strip().splitlines()
        self.assertEqual(
            json.loads(lines[-1]),
            {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": None, "APl": None, "AR1": 0.0, "AR10": 0.0},
        )
        self.assertIn("Average Precision", out.getvalue())  # the summary of a normal run, too


if __name__ == "__main__":
    unittest.main()
