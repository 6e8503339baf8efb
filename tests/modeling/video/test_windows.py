"""Windowed video inference: window bounds, track association, the model's windowed mode."""
import itertools
import unittest

import torch
from torch.nn import functional as F

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


def decode_window(model, frames, padded_size):
    """(Q, K+1) class logits and (Q, W, Hm, Wm) mask logits of ``frames`` decoded as one clip,
    as the model decodes each window."""
    mask_cls, embed, mask_features = model._decode_clip(frames, padded_size)
    return mask_cls, torch.einsum("qe,tehw->qthw", embed, mask_features)


def naive_windowed(model, clip, window, overlap, topk=10):
    """Windowed inference written out plainly, in float32 throughout: windows of ``window``
    frames sharing ``overlap``; each new window's queries assigned to the tracks by the best
    permutation (tried exhaustively) of the soft dice of mask probabilities on the shared frames
    (last/first frame without overlap); shared frames' logits averaged; class probabilities
    averaged over the windows; then the published per-video output.

    Returns (scores, labels, masks (N, T, H, W) bool, logits (N, T, H, W) at the output size)."""
    frames = clip["image"]
    num, (h, w) = len(frames), frames[0].shape[-2:]
    padded = (-(-h // 32) * 32, -(-w // 32) * 32)
    tracks = probs = None
    filled, windows, start = 0, 0, 0
    while True:
        stop = min(start + window, num)
        mask_cls, logits = decode_window(model, frames[start:stop], padded)
        p = mask_cls.softmax(-1)
        if tracks is None:
            tracks = torch.zeros((logits.shape[0], num) + logits.shape[2:])
            probs = torch.zeros_like(p)
        else:
            shared = filled - start
            prev = tracks[:, start:filled] if shared else tracks[:, filled - 1 : filled]
            cur = logits[:, :shared] if shared else logits[:, :1]
            a, b = prev.sigmoid().flatten(1), cur.sigmoid().flatten(1)
            dice = 2 * a @ b.t() / (a.sum(1)[:, None] + b.sum(1)[None, :] + 1e-6)  # (tracks, queries)
            q = dice.shape[0]
            perm = max(itertools.permutations(range(q)), key=lambda pm: float(dice[range(q), list(pm)].sum()))
            logits, p = logits[list(perm)], p[list(perm)]
            if shared:
                tracks[:, start:filled] = (tracks[:, start:filled] + logits[:, :shared]) / 2
        tracks[:, filled:stop] = logits[:, filled - start :]
        probs += p
        windows += 1
        filled = stop
        if stop == num:
            break
        start = stop - overlap

    scores = (probs / windows)[:, :-1]  # (Q, K)
    top, index = scores.flatten().topk(topk)
    k = scores.shape[1]
    labels, queries = index % k, index // k
    up = F.interpolate(tracks[queries].flatten(0, 1)[:, None], size=padded, mode="bilinear", align_corners=False)
    up = F.interpolate(up[:, :, :h, :w], size=(clip["height"], clip["width"]), mode="bilinear", align_corners=False)
    up = up.view(topk, num, clip["height"], clip["width"])
    return top.tolist(), labels.tolist(), up > 0, up


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
        for a, b in zip(whole["pred_masks"], windowed["pred_masks"]):
            self.assertTrue(torch.equal(a, b))

    def test_windowed_output_matches_naive(self):
        for window, overlap in ((3, 1), (4, 2), (2, 0)):
            with self.subTest(window=window, overlap=overlap):
                out = self._run(window, overlap)
                with torch.no_grad():
                    scores, labels, masks, logits = naive_windowed(self.model, self.clip, window, overlap)
                self.assertEqual(out["pred_labels"], labels)
                torch.testing.assert_close(torch.tensor(out["pred_scores"]), torch.tensor(scores), atol=1e-6, rtol=1e-5)
                got = torch.stack(out["pred_masks"])  # (10, T, H, W)
                self.assertEqual((got.dtype, tuple(got.shape)), (torch.bool, (10, 6, 40, 56)))
                # The tracks are kept in float16 between windows: only pixels whose logit is
                # within that rounding of 0 may differ.
                clear = logits.abs() > 2e-2
                self.assertTrue(torch.equal(got[clear], masks[clear]))
                self.assertGreater(float(clear.float().mean()), 0.95)


if __name__ == "__main__":
    unittest.main()
