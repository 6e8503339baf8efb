"""The video quick-start (tools/quickstart.py --video) end to end with a few iterations: generate,
train, evaluate, demo video.
Its in-process AP must equal the standalone evaluator's on the results file it wrote."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

from mask2former_d2.predictor import video_frames
from tests.common import ROOT


def _run(args, timeout):
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


class TestQuickstartVideo(unittest.TestCase):
    def test_generate_train_evaluate_demo(self):
        with tempfile.TemporaryDirectory() as out:
            stdout = _run([os.path.join(ROOT, "tools", "quickstart.py"), "--video", "--output", out, "--iters", "4",
                           "SOLVER.IMS_PER_BATCH", "2"], timeout=900)
            self.assertIn("== video quick-start results", stdout)
            with open(os.path.join(out, "summary.json")) as f:
                summary = json.load(f)
            # The server-format results file, scored again by tools/evaluate_ytvis.py against the
            # generated ground truth, gives the metrics the trainer's YTVISEvaluator reported.
            results = os.path.join(out, "train", "inference", "results.json")
            with open(results) as f:
                self.assertIsInstance(json.load(f), list)
            last = _run([os.path.join(ROOT, "tools", "evaluate_ytvis.py"), "--gt",
                         os.path.join(out, "toy_ytvis", "valid.json"), "--results", results],
                        timeout=300).strip().splitlines()[-1]
            standalone = json.loads(last)
            for key in ("AP", "AP50", "AP75", "AR1", "AR10"):
                self.assertAlmostEqual(summary[key], standalone[key], places=3, msg=key)
            # The demo video decodes, frame for frame, at the clip's size.
            sizes = [frame.shape[:2] for frame in video_frames(summary["demo_video"])]
            self.assertEqual(sizes, [(96, 128)] * 8)
            self.assertTrue(os.path.isfile(os.path.join(out, "train", "model_final.pth")))


if __name__ == "__main__":
    unittest.main()
