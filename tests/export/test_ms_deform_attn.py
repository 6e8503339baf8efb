"""The export formulation of deformable attention computes what the eager module computes."""
import unittest

import torch

from mask2former_d2.export.ms_deform_attn import GridSampleMSDeformAttn, grid_sample_ms_deform_attn
from mask2former_d2.layers import MSDeformAttn
from tests.layers.test_ms_deform_attn import naive_ms_deform_attn

SIZES = [(5, 7), (3, 4), (2, 2)]


def _inputs(batch=2, queries=6, channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SIZES)
    return (
        torch.randn(batch, queries, channels, generator=g),
        torch.rand(batch, queries, len(SIZES), 2, generator=g),
        torch.randn(batch, s, channels, generator=g),
        torch.tensor(SIZES),
    )


class TestGridSampleMSDeformAttn(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.attn = MSDeformAttn(16, len(SIZES), 4, 3)
        with torch.no_grad():  # offsets large enough to leave the levels sometimes
            self.attn.sampling_offsets.weight.normal_(0, 0.5)
            self.attn.attention_weights.weight.normal_(0, 0.5)

    def test_same_values_as_the_eager_module(self):
        query, ref, flat, shapes = _inputs()
        starts = torch.tensor([0, 35, 47])
        for ref_points in (ref, torch.cat((ref, 0.1 + torch.rand_like(ref)), -1)):  # points, boxes
            with self.subTest(reference=ref_points.shape[-1]), torch.no_grad():
                expected = self.attn(query, ref_points, flat, shapes, starts)
                with grid_sample_ms_deform_attn(self.attn):
                    self.assertIs(type(self.attn), GridSampleMSDeformAttn)
                    got = self.attn(query, ref_points, flat, shapes, starts)
                    # The level sizes may also come as plain pairs (as under torch.export).
                    values = self.attn.project_value(flat, SIZES)
                    again = self.attn.attend(query, ref_points, values)
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)
        self.assertIs(type(self.attn), MSDeformAttn)

    def test_against_the_definition(self):
        """The sampled sum, before the output projection, from one bilinear sample at a time."""
        query, ref, flat, shapes = _inputs(batch=1, queries=3)
        m, d = self.attn.num_heads, self.attn.head_dim
        with torch.no_grad(), grid_sample_ms_deform_attn(self.attn):
            self.attn.output_proj = torch.nn.Identity()
            got = self.attn(query, ref, flat, shapes, None)
            offsets = self.attn.sampling_offsets(query).view(1, 3, m, len(SIZES), 3, 2)
            weights = self.attn.attention_weights(query).view(1, 3, m, -1).softmax(-1).view(1, 3, m, len(SIZES), 3)
            normaliser = torch.tensor([(w, h) for h, w in SIZES], dtype=torch.float32)
            locations = ref[:, :, None, :, None] + offsets / normaliser[None, None, None, :, None]
            value = self.attn.value_proj(flat).view(1, -1, m, d)
            expected = naive_ms_deform_attn(value, shapes, locations, weights)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    def test_swap_restores_on_error(self):
        decoder_attn = [MSDeformAttn(16, 2, 4, 2), MSDeformAttn(16, 2, 4, 2)]
        model = torch.nn.Sequential(*decoder_attn)
        with self.assertRaises(RuntimeError):
            with grid_sample_ms_deform_attn(model):
                self.assertTrue(all(type(m) is GridSampleMSDeformAttn for m in decoder_attn))
                raise RuntimeError("boom")
        self.assertTrue(all(type(m) is MSDeformAttn for m in decoder_attn))


if __name__ == "__main__":
    unittest.main()
