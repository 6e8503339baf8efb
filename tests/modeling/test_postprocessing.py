"""The reference post-processing against straightforward per-query loops."""
import unittest

import torch
from torch.nn import functional as F

from mask2former_d2.modeling.postprocessing import (
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    semantic_inference,
)


def reference_panoptic(mask_cls, mask_pred, num_classes, thing_ids, obj_thr, overlap_thr):
    """The published algorithm written as a plain loop over queries."""
    scores, labels = F.softmax(mask_cls, -1).max(-1)
    keep = (labels != num_classes) & (scores > obj_thr)
    masks = mask_pred[keep].sigmoid()
    cls, sc = labels[keep], scores[keep]
    seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
    info, stuff, next_id = [], {}, 0
    if masks.shape[0] == 0:
        return seg, info
    ids = (sc.view(-1, 1, 1) * masks).argmax(0)
    for k in range(masks.shape[0]):
        c = int(cls[k])
        isthing = c in thing_ids
        won = int((ids == k).sum())
        own = int((masks[k] >= 0.5).sum())
        m = (ids == k) & (masks[k] >= 0.5)
        if won > 0 and own > 0 and int(m.sum()) > 0:
            if won / own < overlap_thr:
                continue
            if not isthing:
                if c in stuff:
                    seg[m] = stuff[c]
                    continue
                stuff[c] = next_id + 1
            next_id += 1
            seg[m] = next_id
            info.append({"id": next_id, "isthing": isthing, "category_id": c})
    return seg, info


class TestPostprocessing(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.k = 7
        self.q = 12
        self.mask_cls = torch.randn(self.q, self.k + 1, generator=g) * 3
        # Smooth blobs so that segments have real extent and overlaps.
        low = torch.randn(self.q, 1, 6, 8, generator=g) * 4 - 5
        self.mask_pred = F.interpolate(low, size=(37, 51), mode="bilinear", align_corners=False)[:, 0]

    def test_semantic_is_weighted_sum(self):
        out = semantic_inference(self.mask_cls, self.mask_pred)
        self.assertEqual(out.shape, (self.k, 37, 51))
        p = F.softmax(self.mask_cls, -1)[:, :-1]
        ref = sum(p[q].view(-1, 1, 1) * self.mask_pred[q].sigmoid() for q in range(self.q))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    def test_panoptic_matches_loop(self):
        for obj_thr, ov_thr, things in [(0.0, 0.0, {0, 1, 2}), (0.3, 0.8, {0, 3}), (0.5, 0.5, set())]:
            seg, info = panoptic_inference(
                self.mask_cls,
                self.mask_pred,
                num_classes=self.k,
                thing_ids=sorted(things),
                object_mask_threshold=obj_thr,
                overlap_threshold=ov_thr,
            )
            ref_seg, ref_info = reference_panoptic(
                self.mask_cls, self.mask_pred, self.k, things, obj_thr, ov_thr
            )
            self.assertEqual(info, ref_info)
            self.assertTrue(torch.equal(seg, ref_seg))
            self.assertEqual(seg.dtype, torch.int32)
            self.assertTrue(len(info) > 0)
            # Ids are 1..N and every listed segment is present.
            self.assertEqual([d["id"] for d in info], list(range(1, len(info) + 1)))
            self.assertEqual(set(seg.unique().tolist()) - {0}, {d["id"] for d in info})

    def test_panoptic_stuff_merges(self):
        # Two queries of the same stuff class on disjoint halves: one segment.
        cls = torch.full((2, 3), -10.0)
        cls[:, 1] = 10.0
        pred = torch.full((2, 4, 6), -10.0)
        pred[0, :, :3] = 10.0
        pred[1, :, 3:] = 10.0
        seg, info = panoptic_inference(
            cls, pred, num_classes=2, thing_ids=[0], object_mask_threshold=0.5, overlap_threshold=0.5
        )
        self.assertEqual(info, [{"id": 1, "isthing": False, "category_id": 1}])
        self.assertTrue(bool((seg == 1).all()))

    def test_panoptic_nothing_kept(self):
        cls = torch.zeros(3, 4)
        cls[:, -1] = 10.0  # all no-object
        seg, info = panoptic_inference(
            cls, torch.randn(3, 5, 5), num_classes=3, thing_ids=[0],
            object_mask_threshold=0.0, overlap_threshold=0.0,
        )
        self.assertEqual(info, [])
        self.assertEqual(int(seg.abs().sum()), 0)

    def test_instance_matches_reference(self):
        topk = 15
        res = instance_inference(self.mask_cls, self.mask_pred, num_classes=self.k, topk=topk)
        p = F.softmax(self.mask_cls, -1)[:, :-1].flatten()
        s, idx = p.topk(topk)
        expected = []
        for score, i in zip(s.tolist(), idx.tolist()):
            q, c = divmod(i, self.k)
            m = self.mask_pred[q] > 0
            ms = float((self.mask_pred[q].sigmoid() * m).sum() / (m.sum() + 1e-6))
            expected.append((score * ms, c, m))
        expected.sort(key=lambda t: -t[0])
        self.assertEqual(len(res), topk)
        torch.testing.assert_close(res.scores, torch.tensor([e[0] for e in expected]))
        self.assertEqual(res.pred_classes.tolist(), [e[1] for e in expected])
        for got, e in zip(res.pred_masks, expected):
            self.assertTrue(torch.equal(got, e[2]))
        self.assertEqual(res.pred_masks.dtype, torch.bool)
        self.assertEqual(res.image_size, (37, 51))
        self.assertTrue(torch.all(res.scores[:-1] >= res.scores[1:]))

    def test_instance_things_only(self):
        res = instance_inference(
            self.mask_cls, self.mask_pred, num_classes=self.k, topk=30, thing_ids=[1, 4],
            things_only=True,
        )
        self.assertTrue(set(res.pred_classes.tolist()) <= {1, 4})
        self.assertGreater(len(res), 0)

    def test_boxes_from_masks(self):
        m = torch.zeros(3, 10, 12, dtype=torch.bool)
        m[0, 2:5, 3:9] = True
        m[1, 0, 0] = True
        boxes = masks_to_boxes(m)
        self.assertEqual(boxes.tolist(), [[3, 2, 9, 5], [0, 0, 1, 1], [0, 0, 0, 0]])
        from detectron2.structures import BitMasks

        torch.testing.assert_close(boxes, BitMasks(m).get_bounding_boxes().tensor)


if __name__ == "__main__":
    unittest.main()
