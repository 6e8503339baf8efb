"""The image matcher and criterion on video clips: (Q, T, H, W) predictions, (N, T, H, W) tracks."""
import unittest

import torch

from mask2former_d2.modeling.criterion import SetCriterion
from mask2former_d2.modeling.matcher import HungarianMatcher


def _box(t_frames, size, boxes):
    """(T, size, size) bool: one rectangle (y0, x0, y1, x1) per frame (None = absent)."""
    m = torch.zeros(t_frames, size, size, dtype=torch.bool)
    for t, b in enumerate(boxes):
        if b is not None:
            m[t, b[0] : b[2], b[1] : b[3]] = True
    return m


class TestVideoMatcher(unittest.TestCase):
    def test_matches_whole_tracks(self):
        # Two tracks that coincide in frame 0 and separate in frame 1: only the time axis tells
        # which query follows which track.
        size = 16
        a = _box(2, size, [(0, 0, 8, 8), (0, 0, 8, 8)])
        b = _box(2, size, [(0, 0, 8, 8), (8, 8, 16, 16)])
        targets = [{"labels": torch.tensor([3, 3]), "masks": torch.stack([a, b])}]
        # Query 0 predicts b, query 1 a, query 2 nothing; identical class scores.
        pred = torch.full((3, 2, size, size), -8.0)
        pred[0][b] = 8.0
        pred[1][a] = 8.0
        logits = torch.zeros(1, 3, 5)
        outputs = {"pred_logits": logits, "pred_masks": pred[None]}
        for num_points in (0, 4096):
            with self.subTest(num_points=num_points):
                torch.manual_seed(0)
                matcher = HungarianMatcher(1.0, 1.0, 1.0, num_points=num_points)
                ((rows, cols),) = matcher(outputs, targets)
                self.assertEqual(dict(zip(rows.tolist(), cols.tolist())), {0: 1, 1: 0})

    def test_points_shared_by_frames(self):
        # Predictions proportional to the targets: sampled values stay proportional only if
        # every frame of both is read at the same points (bilinear sampling is linear).
        torch.manual_seed(0)
        masks = (torch.rand(2, 3, 12, 12) > 0.5).float()
        pred = masks * 5.0
        matcher = HungarianMatcher(0.0, 1.0, 0.0, num_points=64)
        torch.manual_seed(1)
        pred_v, tgt_v = matcher._mask_values(pred, masks)
        self.assertEqual(tuple(pred_v.shape), (2, 3 * 64))
        # Frame-major rows, and the target read at the same points as the prediction.
        torch.testing.assert_close(pred_v, tgt_v * 5.0)
        # Frame-major: the first 64 values of a row are frame 0's.
        self.assertEqual(matcher._mask_values(pred[:, :1], masks[:, :1])[0].shape, (2, 64))


class _FixedMatcher(torch.nn.Module):
    def __init__(self, pairs):
        super().__init__()
        self.pairs = pairs

    def forward(self, outputs, targets):
        return [self.pairs]


class TestVideoCriterion(unittest.TestCase):
    def _criterion(self, **kw):
        matcher = HungarianMatcher(1.0, 1.0, 1.0, num_points=0)
        return SetCriterion(
            5, matcher, {"loss_ce": 1, "loss_mask": 1, "loss_dice": 1}, 0.1, ["labels", "masks"],
            num_points=32, **kw,
        )

    def test_losses_per_frame_normalised_by_tracks(self):
        # A clip's matched pair = F per-frame masks, each with its own sampled points, summed and
        # divided by the number of tracks N: F times the image loss of the N*F frame masks as
        # separate segments (normalised by N*F), given the same random draws.
        torch.manual_seed(0)
        q, frames, n = 4, 3, 2
        pred = torch.randn(1, q, frames, 8, 8)
        masks = torch.rand(n, frames, 8, 8) > 0.5
        logits = torch.randn(1, q, 6)
        pairs = (torch.tensor([1, 3]), torch.tensor([1, 0]))
        video = self._criterion()
        video.matcher = _FixedMatcher(pairs)
        torch.manual_seed(7)
        got = video({"pred_logits": logits, "pred_masks": pred}, [{"labels": torch.tensor([0, 4]), "masks": masks}])
        src = torch.tensor([int(i) * frames + f for i in pairs[0] for f in range(frames)])
        tgt = torch.tensor([int(j) * frames + f for j in pairs[1] for f in range(frames)])
        image = self._criterion()
        image.matcher = _FixedMatcher((src, tgt))
        torch.manual_seed(7)
        ref = image(
            {"pred_logits": logits.repeat_interleave(frames, 1), "pred_masks": pred.flatten(1, 2)},
            [{"labels": torch.tensor([0, 4]).repeat_interleave(frames), "masks": masks.flatten(0, 1)}],
        )
        for k in ("loss_mask", "loss_dice"):
            torch.testing.assert_close(got[k], frames * ref[k], msg=k)

    def test_one_frame_clip_equals_image(self):
        torch.manual_seed(0)
        pred = torch.randn(1, 4, 1, 8, 8, requires_grad=True)
        masks = torch.rand(2, 1, 8, 8) > 0.5
        logits = torch.randn(1, 4, 6)
        crit = self._criterion()
        torch.manual_seed(5)
        video = crit({"pred_logits": logits, "pred_masks": pred}, [{"labels": torch.tensor([0, 3]), "masks": masks}])
        torch.manual_seed(5)
        image = crit(
            {"pred_logits": logits, "pred_masks": pred[:, :, 0]},
            [{"labels": torch.tensor([0, 3]), "masks": masks[:, 0]}],
        )
        for k in image:
            torch.testing.assert_close(video[k], image[k], msg=k)
        sum(video.values()).backward()
        self.assertTrue(torch.isfinite(pred.grad).all())


if __name__ == "__main__":
    unittest.main()
