"""Post-processing against straightforward per-query reference implementations."""
import unittest

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch.nn import functional as F

from mask2former_d2.modeling import postprocessing
from mask2former_d2.modeling.postprocessing import (
    MaskLogitRows,
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    postprocess_masks,
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


def full_resolution(low, padded, image_size, out_size):
    """The published order on whole tensors: upsample to the padded size, crop, resize."""
    up = F.interpolate(low[None], size=padded, mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(up, image_size, *out_size)


class SmallBands:
    """Forces bands of a few rows so that band edges fall everywhere."""

    def __init__(self, elements):
        self.elements = elements

    def __enter__(self):
        self.saved = dict(postprocessing._BAND_ELEMENTS)
        postprocessing._BAND_ELEMENTS["cpu"] = self.elements

    def __exit__(self, *exc):
        postprocessing._BAND_ELEMENTS.clear()
        postprocessing._BAND_ELEMENTS.update(self.saved)


class TestTakeMasks(unittest.TestCase):
    """Instance masks are put in score order plane by plane, in place for a permutation."""

    def test_permutations_and_repeats(self):
        from mask2former_d2.modeling.postprocessing import _take_masks

        g = torch.Generator().manual_seed(5)
        for n in (1, 2, 5, 17):
            x = torch.rand(n, 3, 4, generator=g) > 0.5
            for _ in range(10):
                perm = torch.randperm(n, generator=g)
                self.assertTrue(torch.equal(_take_masks(x.clone(), perm), x[perm]))
                # A query used by several (query, class) pairs: not a permutation.
                index = torch.randint(0, n, (n + 2,), generator=g)
                self.assertTrue(torch.equal(_take_masks(x.clone(), index), x[index]))
        fresh = torch.rand(4, 3, 4, generator=g) > 0.5
        self.assertTrue(torch.equal(_take_masks(fresh.clone(), torch.tensor([3, 0, 2, 1])),
                                    fresh[[3, 0, 2, 1]]))


class TestBandedMasks(unittest.TestCase):
    """Full-resolution logits are made a band of rows at a time; they must equal the
    whole-image resize of the published order."""

    def setUp(self):
        g = torch.Generator().manual_seed(1)
        self.q = 5
        self.low = torch.randn(self.q, 16, 24, generator=g) * 6  # padded 64x96 at stride 4

    def bands(self, rows: MaskLogitRows, step: int):
        """The bands (rows, W, Q) stacked back into (Q, H, W)."""
        h = rows.shape[1]
        bands = [rows.rows(r0, min(h, r0 + step)) for r0 in range(0, h, step)]
        for band in bands:
            self.assertEqual(band.shape[1:], (rows.shape[2], rows.shape[0]))
        return torch.cat(bands, dim=0).permute(2, 0, 1)

    def test_same_size_matches(self):
        for image_size in [(64, 96), (61, 90), (33, 17), (1, 1)]:
            expected = full_resolution(self.low, (64, 96), image_size, image_size)
            rows = MaskLogitRows(self.low, (64, 96), image_size, image_size)
            for step in [1, 2, 3, 5, 7, 64]:
                got = self.bands(rows, step)
                # PyTorch's float32 kernel rounds differently for short inputs: a few ulps.
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=4e-6, msg=str((image_size, step)))

    def test_same_size_float64_is_exact(self):
        """Same source rows and weights as the whole-image resize: equal bit for bit in float64."""
        low = self.low.double()
        expected = full_resolution(low, (64, 96), (61, 90), (61, 90))
        rows = MaskLogitRows(low, (64, 96), (61, 90), (61, 90))
        for step in [1, 3, 7]:
            self.assertTrue(torch.equal(self.bands(rows, step), expected), step)

    def test_resized_output_matches(self):
        for image_size, out_size in [((61, 90), (40, 59)), ((61, 90), (123, 181)),
                                     ((64, 96), (64, 50)), ((50, 96), (77, 96)), ((3, 5), (1, 1))]:
            expected = full_resolution(self.low, (64, 96), image_size, out_size)
            rows = MaskLogitRows(self.low, (64, 96), image_size, out_size)
            for step in [1, 4, 9, 200]:
                got = self.bands(rows, step)
                self.assertEqual(got.shape, expected.shape)
                torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)

    def test_non_power_of_two_factor_falls_back(self):
        low = self.low[:, :15, :20]  # padded 45x60: factor 3
        expected = full_resolution(low, (45, 60), (44, 59), (44, 59))
        rows = MaskLogitRows(low, (45, 60), (44, 59), (44, 59))
        torch.testing.assert_close(self.bands(rows, 4), expected, rtol=0, atol=0)

    def test_all_outputs_equal_whole_image_functions(self):
        g = torch.Generator().manual_seed(2)
        k = 6
        mask_cls = torch.randn(self.q, k + 1, generator=g) * 3
        mask_cls[:, -1] = -5  # every query kept by panoptic inference
        panoptic = dict(num_classes=k, thing_ids=[0, 2, 4], object_mask_threshold=0.1,
                        overlap_threshold=0.5)
        instance = dict(num_classes=k, topk=12, thing_ids=[0, 2, 4], things_only=True)
        for image_size, out_size in [((61, 90), (61, 90)), ((61, 90), (47, 70))]:
            full = full_resolution(self.low, (64, 96), image_size, out_size)
            with SmallBands(self.q * out_size[1] * 3):  # 3 rows per band
                got = postprocess_masks(
                    mask_cls, MaskLogitRows(self.low, (64, 96), image_size, out_size),
                    semantic=True, panoptic=panoptic, instance=instance,
                )
            sem = semantic_inference(mask_cls, full)
            torch.testing.assert_close(got["sem_seg"], sem, rtol=0, atol=1e-5)
            seg, info = panoptic_inference(mask_cls, full, **panoptic)
            self.assertGreater(len(info), 0)
            self.assertEqual(got["panoptic_seg"][1], info)
            self.assertTrue(torch.equal(got["panoptic_seg"][0], seg))
            inst = instance_inference(mask_cls, full, **instance)
            self.assertGreater(len(inst), 0)
            self.assertEqual(got["instances"].pred_classes.tolist(), inst.pred_classes.tolist())
            torch.testing.assert_close(got["instances"].scores, inst.scores)
            self.assertTrue(torch.equal(got["instances"].pred_masks, inst.pred_masks))
            torch.testing.assert_close(got["instances"].pred_boxes.tensor, inst.pred_boxes.tensor)
            torch.testing.assert_close(got["instances"].pred_boxes.tensor,
                                       masks_to_boxes(inst.pred_masks))

    def test_semantic_pixel_blocks_and_band_layout(self):
        """The semantic product runs in pixel blocks inside a band (here 2 rows of a 5-row
        band); blocks and bands tile the output exactly, with the same values as one product."""
        g = torch.Generator().manual_seed(4)
        mask_cls = torch.randn(self.q, 7, generator=g)
        full = full_resolution(self.low, (64, 96), (61, 90), (61, 90))
        expected = torch.einsum("qk,qhw->khw", mask_cls.softmax(-1)[:, :-1], full.sigmoid())
        saved = dict(postprocessing._SEMANTIC_PIXELS)
        try:
            postprocessing._SEMANTIC_PIXELS["cpu"] = 2 * 90
            with SmallBands(self.q * 90 * 5):
                got = postprocess_masks(
                    mask_cls, MaskLogitRows(self.low, (64, 96), (61, 90), (61, 90)), semantic=True
                )["sem_seg"]
        finally:
            postprocessing._SEMANTIC_PIXELS.clear()
            postprocessing._SEMANTIC_PIXELS.update(saved)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # Bands are query-last views; the whole-tensor source gives the same layout.
        band = MaskLogitRows(self.low, (64, 96), (61, 90), (61, 90)).rows(3, 8)
        self.assertEqual(tuple(band.shape), (5, 90, self.q))
        torch.testing.assert_close(band, full[:, 3:8].permute(1, 2, 0), rtol=1e-6, atol=4e-6)

    def test_bands_match_whole_tensor_reference_loops(self):
        """The reference loops of TestPostprocessing, with bands of one row."""
        g = torch.Generator().manual_seed(3)
        k = 4
        mask_cls = torch.randn(self.q, k + 1, generator=g) * 3
        full = full_resolution(self.low, (64, 96), (64, 96), (64, 96))
        with SmallBands(1):
            seg, info = panoptic_inference(mask_cls, full, num_classes=k, thing_ids=[1],
                                           object_mask_threshold=0.0, overlap_threshold=0.3)
            sem = semantic_inference(mask_cls, full)
        ref_seg, ref_info = reference_panoptic(mask_cls, full, k, [1], 0.0, 0.3)
        self.assertEqual(info, ref_info)
        self.assertTrue(torch.equal(seg, ref_seg))
        ref_sem = torch.einsum("qk,qhw->khw", F.softmax(mask_cls, -1)[:, :-1], full.sigmoid())
        torch.testing.assert_close(sem, ref_sem)


if __name__ == "__main__":
    unittest.main()
