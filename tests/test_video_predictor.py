"""``VideoPredictor`` in this process: its output equals the video model run on the frames
prepared independently here (Detectron2's resize, channel order of ``INPUT.FORMAT``), on real
frames of the shared clip; and its one-line errors."""
import os
import unittest

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T

from mask2former_d2.predictor import video_frames
from mask2former_d2.video_predictor import VideoPredictor
from tests.common import DATA
from tests.modeling.video.common import video_cfg

CLIP = os.path.join(DATA, "video", "mmpose_demo.mp4")



def predictor(*opts):
    torch.manual_seed(0)
    return VideoPredictor(video_cfg("INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 256, *opts))


def reference(pred, frames, channel_order):
    """The model on the clip prepared here: every frame resized (shortest edge to
    MIN_SIZE_TEST, longest at most MAX_SIZE_TEST), in ``channel_order``, outputs at the
    frames' own size."""
    cfg = pred.cfg
    h, w = frames[0].shape[:2]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST).get_transform(frames[0])
    images = []
    for frame in frames:
        image = frame[:, :, ::-1] if channel_order == "RGB" else frame
        images.append(torch.as_tensor(resize.apply_image(np.ascontiguousarray(image))).permute(2, 0, 1))
    with torch.no_grad():
        return pred.model([{"image": images, "height": h, "width": w}])


def assert_same(test, got, expected):
    test.assertEqual(tuple(got["image_size"]), tuple(expected["image_size"]))
    test.assertEqual(list(got["pred_labels"]), list(expected["pred_labels"]))
    torch.testing.assert_close(torch.tensor(got["pred_scores"]), torch.tensor(expected["pred_scores"]))
    test.assertEqual(len(got["pred_masks"]), len(expected["pred_masks"]))
    for a, b in zip(got["pred_masks"], expected["pred_masks"]):
        test.assertTrue(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))


@unittest.skipUnless(os.path.isfile(CLIP), f"shared clip {CLIP} not found (set M2F_DATA)")
class TestVideoPredictor(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.frames = list(video_frames(CLIP, 3))  # (540, 960, 3) BGR
        cls.pred = predictor()

    def test_matches_model_on_prepared_frames(self):
        self.assertEqual(self.pred.cfg.INPUT.FORMAT, "RGB")
        out = self.pred(self.frames)
        self.assertEqual(tuple(out["image_size"]), (540, 960))
        self.assertEqual(tuple(out["pred_masks"][0].shape), (3, 540, 960))
        assert_same(self, out, reference(self.pred, self.frames, "RGB"))
        # The channel order matters: the same frames in BGR give other scores.
        swapped = reference(self.pred, self.frames, "BGR")
        self.assertNotEqual(out["pred_scores"], swapped["pred_scores"])

    def test_bgr_config(self):
        pred = predictor("INPUT.FORMAT", "BGR")
        assert_same(self, pred(self.frames), reference(pred, self.frames, "BGR"))

    def test_no_resize_when_min_size_is_zero(self):
        # INPUT.MIN_SIZE_TEST 0: the frames go in at their own size (odd crops here).
        torch.manual_seed(0)
        pred = VideoPredictor(video_cfg("INPUT.MIN_SIZE_TEST", 0))
        crops = [np.ascontiguousarray(f[201:300, 333:470]) for f in self.frames]  # 99 x 137
        images = [torch.as_tensor(np.ascontiguousarray(c[:, :, ::-1])).permute(2, 0, 1) for c in crops]
        with torch.no_grad():
            expected = pred.model([{"image": images, "height": 99, "width": 137}])
        assert_same(self, pred(crops), expected)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "expected at least one frame"):
            self.pred([])
        small = cv2.resize(self.frames[1], (480, 270))
        with self.assertRaisesRegex(ValueError, "frame 1 is 480x270 but frame 0 is 960x540"):
            self.pred([self.frames[0], small])
        with self.assertRaises(ValueError):
            self.pred([self.frames[0][:, :, 0]])  # grey, not (H, W, 3)
        with self.assertRaises(ValueError):
            self.pred([self.frames[0].astype(np.float32)])


if __name__ == "__main__":
    unittest.main()
