"""Windowed video inference: window bounds, track association, the model's windowed mode."""
import unittest

import torch

from mask2former_d2.modeling.video.windows import WindowTracks, window_bounds
from tests.modeling.video.common import build_video, make_clip


class TestWindowBounds(unittest.TestCase):
    def test_cover_with_overlap(self):
        self.assertEqual(list(window_bounds(10, 4, 1)), [(0, 4), (3, 7), (6, 10)])
        self.assertEqual(list(window_bounds(9, 4, 1)), [(0, 4), (3, 7), (6, 9)])
        self.assertEqual(list(window_bounds(8, 4, 0)), [(0, 4), (4, 8)])
        self.assertEqual(list(window_bounds(3, 4, 2)), [(0, 3)])

    def test_bad_values(self):
        with self.assertRaisesRegex(ValueError, "overlap < window"):
            list(window_bounds(5, 3, 3))


class TestWindowTracks(unittest.TestCase):
    def _tracks(self, q=3, frames=6, size=8):
        """Q objects, each a distinct square moving one pixel per frame: logits +-6."""
        logits = torch.full((q, frames, size, size), -6.0)
        for i in range(q):
            for t in range(frames):
                y = 2 * i
                logits[i, t, y : y + 2, t : t + 2] = 6.0
        return logits

    def test_permuted_windows_are_reassembled(self):
        truth = self._tracks()
        cls = torch.randn(3, 5)
        for overlap in (2, 0):
            with self.subTest(overlap=overlap):
                tracks = WindowTracks(6, 4, overlap)
                perms = [torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])]
                for k, (start, stop) in enumerate(tracks.windows()):
                    p = perms[k]
                    # Window queries in another order: query j of the window is track p[j].
                    got = tracks.add(start, cls[p], truth[p, start:stop])
                    self.assertEqual(p[got].tolist(), [0, 1, 2])
                for t in range(6):
                    torch.testing.assert_close(tracks.frame_logits(torch.arange(3), t), truth[:, t])
                torch.testing.assert_close(tracks.class_logits().softmax(-1), cls.softmax(-1))

    def test_tracks_are_stored_in_half_precision(self):
        """Long videos: the tracks' logits between windows cost 2 bytes per value, read back as
        float32 with float16 rounding."""
        tracks = WindowTracks(4, 2, 0)
        logits = torch.full((2, 2, 4, 4), 0.1)
        for start, _ in tracks.windows():
            tracks.add(start, torch.zeros(2, 3), logits)
        got = tracks.frame_logits(torch.arange(2), 3)
        self.assertEqual(got.dtype, torch.float32)
        torch.testing.assert_close(got, torch.full((2, 4, 4), 0.1).half().float(), rtol=0, atol=0)
        self.assertNotEqual(float(got[0, 0, 0]), 0.1)

    def test_gap_is_an_error(self):
        tracks = WindowTracks(6, 2, 0)
        tracks.add(0, torch.zeros(2, 3), torch.zeros(2, 2, 4, 4))
        with self.assertRaisesRegex(ValueError, "gap"):
            tracks.add(3, torch.zeros(2, 3), torch.zeros(2, 2, 4, 4))


class TestWindowedModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build_video().eval()
        cls.clip = make_clip(6, 40, 56, seed=3)

    def _run(self, window, overlap):
        self.model.window_size, self.model.window_overlap = window, overlap
        try:
            with torch.no_grad():
                return self.model([self.clip])
        finally:
            self.model.window_size, self.model.window_overlap = 0, 0

    def test_window_as_long_as_clip_is_whole_clip(self):
        whole, windowed = self._run(0, 0), self._run(6, 2)
        self.assertEqual(whole["pred_labels"], windowed["pred_labels"])
        self.assertEqual(whole["pred_scores"], windowed["pred_scores"])

    def test_windowed_output(self):
        out = self._run(3, 1)
        self.assertEqual(len(out["pred_scores"]), 10)
        for m in out["pred_masks"]:
            self.assertEqual((m.dtype, tuple(m.shape)), (torch.bool, (6, 40, 56)))
        self.assertTrue(all(0 < s <= 1 for s in out["pred_scores"]))


if __name__ == "__main__":
    unittest.main()
