"""Tests of the Hungarian matcher and its pairwise costs.

Shapes: Q queries, T targets, K classes (+1 no-object), P points, H/W mask size.
"""

import itertools
import logging
import unittest

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample

from mask2former_d2.modeling.matcher import (
    HungarianMatcher,
    pad_masks,
    pairwise_dice_cost,
    pairwise_sigmoid_bce_cost,
    pairwise_sigmoid_focal_cost,
)


def _blob_masks(num: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """`num` distinct rectangular masks (num, size, size) of bool."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(num, size, size, dtype=torch.bool)
    for i in range(num):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
        masks[i, y0 : y0 + h, x0 : x0 + w] = True
    return masks


def _naive_costs(logits: torch.Tensor, labels: torch.Tensor, alpha=0.25, gamma=2.0):
    """Pairwise BCE, focal and dice costs (Q, T) by looping over pairs."""
    q_n, t_n = logits.shape[0], labels.shape[0]
    bce = torch.zeros(q_n, t_n, dtype=torch.float64)
    focal = torch.zeros(q_n, t_n, dtype=torch.float64)
    dice = torch.zeros(q_n, t_n, dtype=torch.float64)
    for q in range(q_n):
        x = logits[q].double()
        p = x.sigmoid()
        for t in range(t_n):
            y = labels[t].double()
            ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
            bce[q, t] = ce.mean()
            p_t = p * y + (1 - p) * (1 - y)
            a_t = alpha * y + (1 - alpha) * (1 - y)
            focal[q, t] = (a_t * (1 - p_t) ** gamma * ce).mean()
            dice[q, t] = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    return bce, focal, dice


class TestPairwiseCosts(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.logits = torch.randn(5, 37) * 3
        self.labels = (torch.rand(3, 37) > 0.5).float()
        self.labels[1] = torch.rand(37)  # soft labels, as bilinear point sampling produces

    def test_against_naive_loops(self):
        bce, focal, dice = _naive_costs(self.logits, self.labels)
        torch.testing.assert_close(
            pairwise_sigmoid_bce_cost(self.logits, self.labels).double(), bce, rtol=1e-5, atol=1e-6
        )
        # The focal loss is not linear in the label: the pairwise form is exact for 0/1 labels.
        binary = [0, 2]
        torch.testing.assert_close(
            pairwise_sigmoid_focal_cost(self.logits, self.labels[binary]).double(),
            focal[:, binary],
            rtol=1e-5,
            atol=1e-6,
        )
        torch.testing.assert_close(
            pairwise_dice_cost(self.logits, self.labels).double(), dice, rtol=1e-5, atol=1e-6
        )

    def test_bce_cost_finite_for_large_logits(self):
        logits = torch.tensor([[200.0, -200.0]])
        labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        cost = pairwise_sigmoid_bce_cost(logits, labels)
        self.assertTrue(torch.isfinite(cost).all())
        self.assertAlmostEqual(cost[0, 0].item(), 0.0, places=6)
        self.assertAlmostEqual(cost[0, 1].item(), 200.0, places=3)

    def test_pad_masks(self):
        m = torch.ones(2, 3, 4, dtype=torch.bool)
        out = pad_masks(m, (5, 6))
        self.assertEqual(tuple(out.shape), (2, 5, 6))
        self.assertEqual(out.dtype, torch.bool)
        self.assertEqual(int(out.sum()), 24)
        self.assertTrue(out[:, :3, :4].all())
        self.assertIs(pad_masks(m, (3, 4)), m)


class TestHungarianMatcher(unittest.TestCase):
    def _permuted_outputs(self, perm, num_queries=6, num_classes=4):
        """Predictions that reproduce the targets: query perm[t] predicts target t exactly."""
        torch.manual_seed(1)
        masks = _blob_masks(len(perm))
        labels = torch.tensor([(3 * t + 1) % num_classes for t in range(len(perm))])
        pred_logits = torch.full((1, num_queries, num_classes + 1), -5.0)
        pred_logits[0, :, -1] = 5.0  # unmatched queries say no-object
        pred_masks = torch.full((1, num_queries, 16, 16), -10.0)
        for t, q in enumerate(perm):
            pred_logits[0, q] = -5.0
            pred_logits[0, q, labels[t]] = 5.0
            pred_masks[0, q] = masks[t].float() * 20.0 - 10.0
        outputs = {"pred_logits": pred_logits, "pred_masks": pred_masks}
        return outputs, [{"labels": labels, "masks": masks}]

    def test_recovers_permutation(self):
        perm = [4, 0, 5, 2]  # target t is predicted by query perm[t]
        outputs, targets = self._permuted_outputs(perm)
        for num_points in (0, 64, 12544):
            for mask_cost in ("bce", "focal"):
                matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points, mask_cost=mask_cost)
                ((pred_idx, tgt_idx),) = matcher(outputs, targets)
                self.assertEqual(pred_idx.dtype, torch.int64)
                self.assertEqual(tgt_idx.dtype, torch.int64)
                self.assertEqual(pred_idx.tolist(), sorted(perm))
                got = {int(t): int(q) for q, t in zip(pred_idx, tgt_idx)}
                self.assertEqual(got, dict(enumerate(perm)))

    def test_mask_costs_alone_recover_permutation(self):
        perm = [3, 1, 0]
        outputs, targets = self._permuted_outputs(perm)
        outputs["pred_logits"].zero_()  # class cost gives no information
        matcher = HungarianMatcher(cost_class=0.0, cost_mask=1.0, cost_dice=1.0, num_points=500)
        ((pred_idx, tgt_idx),) = matcher(outputs, targets)
        self.assertEqual({int(t): int(q) for q, t in zip(pred_idx, tgt_idx)}, dict(enumerate(perm)))

    def test_class_cost_alone(self):
        # Query q is confident in class (q + 1) % 3; targets of classes 2, 0 -> queries 1, 2.
        logits = torch.full((1, 3, 4), -4.0)
        for q in range(3):
            logits[0, q, (q + 1) % 3] = 4.0
        outputs = {"pred_logits": logits, "pred_masks": torch.zeros(1, 3, 4, 4)}
        targets = [{"labels": torch.tensor([2, 0]), "masks": torch.zeros(2, 8, 8)}]
        matcher = HungarianMatcher(cost_class=1.0, cost_mask=0.0, cost_dice=0.0, num_points=10)
        ((pred_idx, tgt_idx),) = matcher(outputs, targets)
        self.assertEqual(pred_idx.tolist(), [1, 2])
        self.assertEqual(tgt_idx.tolist(), [0, 1])

    def test_dense_matching_is_optimal(self):
        """With num_points=0 the costs are deterministic: compare with brute force."""
        torch.manual_seed(3)
        q_n, t_n, k = 5, 3, 4
        logits = torch.randn(1, q_n, k + 1)
        pred_masks = torch.randn(1, q_n, 6, 6) * 2
        masks = torch.rand(t_n, 6, 6) > 0.5
        labels = torch.tensor([0, 3, 1])
        matcher = HungarianMatcher(2.0, 5.0, 1.0, num_points=0, mask_cost="focal")
        ((pred_idx, tgt_idx),) = matcher(
            {"pred_logits": logits, "pred_masks": pred_masks}, [{"labels": labels, "masks": masks}]
        )
        _, focal, dice = _naive_costs(pred_masks[0].flatten(1), masks.flatten(1).float())
        cost = -2.0 * logits[0].double().softmax(-1)[:, labels] + 5.0 * focal + dice
        best = min(
            sum(cost[q, t].item() for t, q in enumerate(qs))
            for qs in itertools.permutations(range(q_n), t_n)
        )
        got = sum(cost[q, t].item() for q, t in zip(pred_idx, tgt_idx))
        self.assertAlmostEqual(got, best, places=5)
        self.assertEqual(len(pred_idx), t_n)

    def test_cost_matrix_on_shared_points(self):
        """The costs read every query and target at the same P random points."""
        torch.manual_seed(4)
        logits = torch.randn(4, 3)
        pred_masks = torch.randn(4, 8, 8) * 3
        pred_masks[3], logits[3] = pred_masks[1], logits[1]  # identical queries: identical rows
        tgt_masks = _blob_masks(3, 16).float()
        tgt_masks[2] = tgt_masks[0]
        labels = torch.tensor([0, 1, 0])
        matcher = HungarianMatcher(2.0, 5.0, 3.0, num_points=40)
        torch.manual_seed(11)
        cost = matcher.cost_matrix(logits, pred_masks, labels, tgt_masks)
        self.assertEqual((tuple(cost.shape), cost.dtype), ((4, 3), torch.float32))
        torch.testing.assert_close(cost[3], cost[1])
        torch.testing.assert_close(cost[:, 2], cost[:, 0])
        # Naive: the same coordinates, each mask sampled on its own, costs by loops.
        torch.manual_seed(11)
        coords = torch.rand(1, 40, 2)
        x = torch.stack(
            [point_sample(m[None, None], coords, align_corners=False)[0, 0] for m in pred_masks]
        )
        y = torch.stack(
            [point_sample(m[None, None], coords, align_corners=False)[0, 0] for m in tgt_masks]
        )
        bce, _, dice = _naive_costs(x, y)
        expected = -2.0 * logits.double().softmax(-1)[:, labels] + 5.0 * bce + 3.0 * dice
        torch.testing.assert_close(cost.double(), expected, rtol=1e-5, atol=1e-5)

    def test_no_targets_gives_empty_indices(self):
        outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_masks": torch.randn(2, 4, 8, 8)}
        targets = [
            {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 16, 16)},
            {"labels": torch.tensor([1]), "masks": torch.ones(1, 16, 16)},
        ]
        (p0, t0), (p1, t1) = HungarianMatcher(num_points=50)(outputs, targets)
        for idx in (p0, t0):
            self.assertEqual(idx.dtype, torch.int64)
            self.assertEqual(idx.numel(), 0)
        self.assertEqual((len(p1), len(t1)), (1, 1))
        self.assertEqual(t1.tolist(), [0])

    def test_more_targets_than_queries(self):
        outputs = {"pred_logits": torch.randn(1, 2, 3), "pred_masks": torch.randn(1, 2, 8, 8)}
        targets = [{"labels": torch.tensor([0, 1, 1]), "masks": _blob_masks(3, 8)}]
        ((pred_idx, tgt_idx),) = HungarianMatcher(num_points=50)(outputs, targets)
        self.assertEqual(len(pred_idx), 2)
        self.assertEqual(len(set(tgt_idx.tolist())), 2)

    def test_nonfinite_costs_warn_once_and_match(self):
        logits = torch.randn(1, 4, 3)
        logits[0, 1] = float("nan")
        pred_masks = torch.randn(1, 4, 8, 8)
        pred_masks[0, 2] = float("inf")
        pred_masks[0, 3, 0, 0] = float("-inf")
        targets = [{"labels": torch.tensor([0, 1]), "masks": _blob_masks(2, 8)}]
        matcher = HungarianMatcher(num_points=30)
        outputs = {"pred_logits": logits, "pred_masks": pred_masks}
        with self.assertLogs("mask2former_d2.modeling.matcher", level=logging.WARNING) as logs:
            ((pred_idx, tgt_idx),) = matcher(outputs, targets)
        self.assertEqual(len(logs.records), 1)
        self.assertIn("non-finite", logs.output[0])
        self.assertEqual((len(pred_idx), sorted(tgt_idx.tolist())), (2, [0, 1]))
        with self.assertNoLogs("mask2former_d2.modeling.matcher", level=logging.WARNING):
            matcher(outputs, targets)

    def test_all_nan_outputs(self):
        outputs = {
            "pred_logits": torch.full((1, 3, 3), float("nan")),
            "pred_masks": torch.full((1, 3, 4, 4), float("nan")),
        }
        targets = [{"labels": torch.tensor([0, 1]), "masks": torch.ones(2, 4, 4)}]
        with self.assertLogs("mask2former_d2.modeling.matcher", level=logging.WARNING):
            ((pred_idx, tgt_idx),) = HungarianMatcher(num_points=10)(outputs, targets)
        self.assertEqual(len(pred_idx), 2)

    def test_targets_of_different_sizes_are_padded(self):
        """A target smaller than the batch is read as if zero-padded at the bottom/right."""
        torch.manual_seed(5)
        outputs = {"pred_logits": torch.randn(2, 5, 3), "pred_masks": torch.randn(2, 5, 8, 8)}
        small = _blob_masks(2, 12, seed=1)
        targets = [
            {"labels": torch.tensor([0, 2]), "masks": small},
            {"labels": torch.tensor([1]), "masks": _blob_masks(1, 16, seed=2)},
        ]
        padded = [dict(targets[0], masks=pad_masks(small, (16, 16))), targets[1]]
        matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points=0)
        a = matcher(outputs, targets)
        b = matcher(outputs, padded)
        for (pa, ta), (pb, tb) in zip(a, b):
            self.assertTrue(torch.equal(pa, pb) and torch.equal(ta, tb))

    def test_no_grad_and_autocast(self):
        perm = [2, 5, 1]
        outputs, targets = self._permuted_outputs(perm)
        outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
        matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points=200)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
            ((pred_idx, tgt_idx),) = matcher(low, targets)
        self.assertEqual({int(t): int(q) for q, t in zip(pred_idx, tgt_idx)}, dict(enumerate(perm)))
        self.assertFalse(pred_idx.requires_grad)

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "all 0"):
            HungarianMatcher(0, 0, 0)
        with self.assertRaisesRegex(ValueError, "num_points"):
            HungarianMatcher(num_points=-1)
        with self.assertRaisesRegex(ValueError, "'dice'"):
            HungarianMatcher(mask_cost="dice")
        matcher = HungarianMatcher(num_points=4)
        with self.assertRaisesRegex(ValueError, "batch of 2"):
            matcher(
                {"pred_logits": torch.randn(2, 3, 3), "pred_masks": torch.randn(2, 3, 4, 4)}, []
            )

    def test_images_are_matched_independently(self):
        """Matching a batch gives, for each image, the matching of that image alone."""
        perms = ([4, 0, 5, 2], [1, 3])
        singles = [self._permuted_outputs(perm) for perm in perms]
        outputs = {
            k: torch.cat([out[k] for out, _ in singles]) for k in ("pred_logits", "pred_masks")
        }
        targets = [tgt[0] for _, tgt in singles]
        matcher = HungarianMatcher(1.0, 20.0, 1.0, num_points=0)
        batched = matcher(outputs, targets)
        self.assertEqual(len(batched), 2)
        for (pred_idx, tgt_idx), (out, tgt), perm in zip(batched, singles, perms):
            ((alone_pred, alone_tgt),) = matcher(out, tgt)
            self.assertTrue(torch.equal(pred_idx, alone_pred) and torch.equal(tgt_idx, alone_tgt))
            self.assertEqual({int(t): int(q) for q, t in zip(pred_idx, tgt_idx)}, dict(enumerate(perm)))


if __name__ == "__main__":
    unittest.main()
