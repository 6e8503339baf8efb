"""demo/demo_video.py on the shared real clips, and its answers to bad input."""
import os
import subprocess
import sys
import tempfile
import unittest

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import Metadata
from detectron2.modeling import build_model

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.predictor import video_frames
from mask2former_d2.video_predictor import VideoVisualizationDemo
from tests.common import DATA, ROOT

DEMO = os.path.join(ROOT, "demo", "demo_video.py")
CONFIG = os.path.join(ROOT, "configs", "quickstart", "video_maskformer2_R18_tiny_toy_ytvis.yaml")
CLIP = os.path.join(DATA, "video", "mmpose_demo.mp4")


def run_demo(*args, timeout=600):
    return subprocess.run([sys.executable, DEMO, "--config-file", CONFIG, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def read_all(path):
    video = cv2.VideoCapture(path)
    frames = list(video_frames(video))
    fps = video.get(cv2.CAP_PROP_FPS)
    video.release()
    return frames, fps


def reference_frames(frames, weights, *opts, confidence_threshold=0.5):
    """The frames the demo should write, drawn in this process with the same weights."""
    cfg = get_maskformer_cfg(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", weights, *opts])
    demo = VideoVisualizationDemo(cfg, confidence_threshold=confidence_threshold)
    predictions = demo.predict(frames)
    return list(demo.draw(frames, predictions)), predictions


@unittest.skipUnless(os.path.isfile(CLIP), f"shared clip {CLIP} not found")
class TestDemoVideo(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # Fixed random weights, so that the demo's process and this one run the same model.
        cls.tmp = tempfile.TemporaryDirectory()
        cfg = get_maskformer_cfg(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
        torch.manual_seed(0)
        DetectionCheckpointer(build_model(cfg), save_dir=cls.tmp.name).save("weights")
        cls.weights = os.path.join(cls.tmp.name, "weights.pth")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assert_frames_match(self, written, reference, source):
        """The written (lossy-encoded) frames are the reference drawings: much closer to them
        than to the source frames they were drawn on."""
        self.assertEqual(len(written), len(reference))
        for t, (got, ref, src) in enumerate(zip(written, reference, source)):
            self.assertEqual(got.shape, ref.shape)
            to_ref = np.abs(got.astype(int) - ref.astype(int)).mean()
            to_src = np.abs(ref.astype(int) - src.astype(int)).mean()
            self.assertGreater(to_src, 1.0, t)  # something was drawn on this frame
            self.assertLess(to_ref, 0.25 * to_src, (t, to_ref, to_src))

    def test_video_file_keeps_frames_size_and_fps(self):
        source, fps = read_all(CLIP)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "vis", "clip.mp4")
            proc = run_demo("--video-input", CLIP, "--output", out, "--confidence-threshold", "0")
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            drawn, out_fps = read_all(out)
        self.assertEqual(len(drawn), len(source))
        self.assertEqual(drawn[0].shape, source[0].shape)
        self.assertAlmostEqual(out_fps, fps, places=3)
        # With every track drawn (threshold 0) the frames are not the source frames.
        self.assertGreater(np.abs(drawn[0].astype(int) - source[0].astype(int)).mean(), 1.0)

    def test_long_video_mode(self):
        source, _ = read_all(CLIP)
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "windowed.mp4")
            proc = run_demo("--video-input", CLIP, "--output", out, "--window-size", "2", "--window-overlap", "1",
                            "--confidence-threshold", "0", "--opts", "MODEL.WEIGHTS", self.weights)
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            drawn, _ = read_all(out)
        windowed = ("MODEL.MASK_FORMER.TEST.WINDOW_SIZE", 2, "MODEL.MASK_FORMER.TEST.WINDOW_OVERLAP", 1)
        reference, predictions = reference_frames(source, self.weights, *windowed, confidence_threshold=0.0)
        self.assert_frames_match(drawn, reference, source)
        # The windowed mode was used: its tracks are not the whole clip's.
        _, whole = reference_frames(source, self.weights, confidence_threshold=0.0)
        self.assertNotEqual(
            [m.sum().item() for m in predictions["pred_masks"]], [m.sum().item() for m in whole["pred_masks"]]
        )

    def test_folder_of_frames(self):
        source, _ = read_all(CLIP)
        with tempfile.TemporaryDirectory() as d:
            frames_dir = os.path.join(d, "frames")
            os.makedirs(frames_dir)
            for i, frame in enumerate(source[:3]):
                cv2.imwrite(os.path.join(frames_dir, f"{i:05d}.jpg"), frame)
            proc = run_demo("--input", frames_dir, "--output", d + "/", "--fps", "6", "--confidence-threshold", "0",
                            "--opts", "MODEL.WEIGHTS", self.weights)
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            drawn, out_fps = read_all(os.path.join(d, "frames.mp4"))
            # The frames as the demo read them back from the folder (JPEG-compressed), in name order.
            frames = [cv2.imread(os.path.join(frames_dir, f"{i:05d}.jpg")) for i in range(3)]
        self.assertAlmostEqual(out_fps, 6.0, places=3)
        reference, _ = reference_frames(frames, self.weights, confidence_threshold=0.0)
        self.assert_frames_match(drawn, reference, frames)

    def test_bad_input_is_one_line(self):
        with tempfile.TemporaryDirectory() as d:
            corrupt = os.path.join(d, "corrupt.mp4")
            with open(corrupt, "wb") as f:
                f.write(b"not a video" * 100)
            out = os.path.join(d, "out") + "/"
            cases = [
                (["--video-input", os.path.join(d, "missing.mp4"), "--output", out], "missing.mp4: no such file"),
                (["--video-input", corrupt, "--output", out], "corrupt.mp4: OpenCV cannot"),
                (["--video-input", CLIP, "--output", d + "/", "--confidence-threshold", "5"],
                 "--confidence-threshold must be in [0, 1]; got 5.0"),
                (["--video-input", CLIP, "--output", os.path.join(d, "x.gif")], "a video output must end in"),
            ]
            for args, message in cases:
                proc = run_demo(*args, timeout=120)
                self.assertEqual(proc.returncode, 1, args)
                last = proc.stderr.strip().splitlines()[-1]
                self.assertIn(message, last)
                self.assertNotIn("Traceback", proc.stderr)


class TestTrackColours(unittest.TestCase):
    def test_one_colour_per_track_in_every_frame(self):
        demo = VideoVisualizationDemo.__new__(VideoVisualizationDemo)
        demo.metadata = Metadata(name="t", thing_classes=["a", "b"])
        frames = [np.full((40, 60, 3), 128, np.uint8) for _ in range(3)]
        masks = torch.zeros(2, 3, 40, 60, dtype=torch.bool)
        masks[0, :, 5:15, 5:15] = True  # track 0 in every frame
        masks[1, 1:, 25:35, 30:50] = True  # track 1 from frame 1 on
        predictions = {"pred_scores": [0.9, 0.8], "pred_labels": [0, 1], "pred_masks": list(masks)}
        drawn = list(demo.draw(frames, predictions))
        self.assertEqual(len(drawn), 3)
        inside0 = [f[10, 10].tolist() for f in drawn]
        self.assertEqual(inside0[0], inside0[1])
        self.assertEqual(inside0[1], inside0[2])
        self.assertEqual(drawn[0][30, 40].tolist(), [128, 128, 128])  # track 1 absent in frame 0
        self.assertEqual(drawn[1][30, 40].tolist(), drawn[2][30, 40].tolist())
        self.assertNotEqual(drawn[1][30, 40].tolist(), inside0[1])  # two tracks, two colours


if __name__ == "__main__":
    unittest.main()
