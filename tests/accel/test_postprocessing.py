"""The banded post-processing (mask2former_d2.accel.postprocessing) equals the reference
(mask2former_d2.modeling.postprocessing) on whole tensors, for bands and pixel blocks of every
size (the tuning constants are arguments, so band edges can be made to fall everywhere)."""
import unittest

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from torch.nn import functional as F

from mask2former_d2.accel.postprocessing import MaskLogitRows, _take_masks, postprocess_masks
from mask2former_d2.modeling.postprocessing import (
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    semantic_inference,
    upsample_masks,
)
from tests.modeling.test_postprocessing import reference_panoptic


def full_resolution(low, padded, image_size, out_size):
    """The published order on whole tensors: upsample to the padded size, crop, resize."""
    up = F.interpolate(low[None], size=padded, mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(up, image_size, *out_size)


class TestUpsampleMasks(unittest.TestCase):
    def test_reference_resize_chain(self):
        low = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(0))
        for image_size, out_size in [((61, 90), (61, 90)), ((61, 90), (40, 59))]:
            self.assertTrue(torch.equal(upsample_masks(low, (64, 96), image_size, out_size),
                                        full_resolution(low, (64, 96), image_size, out_size)))


class TestTakeMasks(unittest.TestCase):
    """Instance masks are put in score order plane by plane, in place for a permutation."""

    def test_permutations_and_repeats(self):
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
            got = postprocess_masks(
                mask_cls, MaskLogitRows(self.low, (64, 96), image_size, out_size),
                semantic=True, panoptic=panoptic, instance=instance,
                band_elements=self.q * out_size[1] * 3,  # 3 rows per band
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
        got = postprocess_masks(
            mask_cls, MaskLogitRows(self.low, (64, 96), (61, 90), (61, 90)), semantic=True,
            band_elements=self.q * 90 * 5, semantic_pixels=2 * 90,
        )["sem_seg"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        # Bands are query-last views; the whole-tensor source gives the same layout.
        band = MaskLogitRows(self.low, (64, 96), (61, 90), (61, 90)).rows(3, 8)
        self.assertEqual(tuple(band.shape), (5, 90, self.q))
        torch.testing.assert_close(band, full[:, 3:8].permute(1, 2, 0), rtol=1e-6, atol=4e-6)

    def test_bands_match_whole_tensor_reference_loops(self):
        """The per-query loops of the reference tests, with bands of one row."""
        g = torch.Generator().manual_seed(3)
        k = 4
        mask_cls = torch.randn(self.q, k + 1, generator=g) * 3
        full = full_resolution(self.low, (64, 96), (64, 96), (64, 96))
        panoptic = dict(num_classes=k, thing_ids=[1], object_mask_threshold=0.0, overlap_threshold=0.3)
        got = postprocess_masks(mask_cls, full, semantic=True, panoptic=panoptic, band_elements=1)
        seg, info = got["panoptic_seg"]
        sem = got["sem_seg"]
        ref_seg, ref_info = reference_panoptic(mask_cls, full, k, [1], 0.0, 0.3)
        self.assertEqual(info, ref_info)
        self.assertTrue(torch.equal(seg, ref_seg))
        ref_sem = torch.einsum("qk,qhw->khw", F.softmax(mask_cls, -1)[:, :-1], full.sigmoid())
        torch.testing.assert_close(sem, ref_sem)


if __name__ == "__main__":
    unittest.main()
