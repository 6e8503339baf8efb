"""Multi-scale deformable attention: the op against naive references, gradients, dtypes, module.

``TestMSDeformAttnOp`` checks the reference op; tests/accel runs the same checks on the fast op."""

import itertools
import math
import unittest

import torch
import torch.nn.functional as F

from mask2former_d2.layers import MSDeformAttn, ms_deform_attn


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """One bilinear sample at a time, straight from the definition (zero padding,
    align_corners=False). value (B, S, M, D) -> (B, Q, M * D)."""
    b, _, m, d = value.shape
    _, q, _, num_levels, num_points, _ = sampling_locations.shape
    out = value.new_zeros(b, q, m, d)
    starts = [0]
    for h, w in spatial_shapes.tolist()[:-1]:
        starts.append(starts[-1] + h * w)
    for bi, qi, mi, li, pi in itertools.product(
        range(b), range(q), range(m), range(num_levels), range(num_points)
    ):
        h, w = spatial_shapes[li].tolist()
        x, y = sampling_locations[bi, qi, mi, li, pi].tolist()
        px, py = x * w - 0.5, y * h - 0.5  # pixel i has its centre at i
        x0, y0 = math.floor(px), math.floor(py)
        sample = value.new_zeros(d)
        for cy, cx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= cy < h and 0 <= cx < w:
                weight = (1 - abs(px - cx)) * (1 - abs(py - cy))
                sample += weight * value[bi, starts[li] + cy * w + cx, mi]
        out[bi, qi, mi] += attention_weights[bi, qi, mi, li, pi] * sample
    return out.view(b, q, m * d)


def grid_sample_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """The published PyTorch formulation: one grid_sample per level on (B * M, D, H, W)."""
    b, _, m, d = value.shape
    _, q, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = spatial_shapes.tolist()
    per_level = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(sizes):
        v = per_level[level].permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(b * m, q, num_points, 2)
        samples.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B * M, D, Q, P)
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B * M, D, Q, L * P)
    weights = attention_weights.transpose(1, 2).reshape(b * m, 1, q, num_levels * num_points)
    out = (stacked * weights).sum(-1).view(b, m * d, q)
    return out.transpose(1, 2)


def make_inputs(shapes, b=2, q=5, m=2, d=3, num_points=3, lo=-0.3, hi=1.3, dtype=torch.float64):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    level_start_index = torch.cat(
        (spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1])
    )
    s = int(spatial_shapes.prod(1).sum())
    num_levels = len(shapes)
    value = torch.randn(b, s, m, d, dtype=dtype)
    locations = torch.rand(b, q, m, num_levels, num_points, 2, dtype=dtype) * (hi - lo) + lo
    weights = torch.rand(b, q, m, num_levels, num_points, dtype=dtype)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    return value, spatial_shapes, level_start_index, locations, weights


class TestMSDeformAttnOp(unittest.TestCase):
    op = staticmethod(ms_deform_attn)  # (value, spatial_shapes, level_start_index, locations, weights)

    def setUp(self):
        torch.manual_seed(0)

    def test_matches_naive_loop(self):
        # Odd sizes, a 1-pixel level, and locations well outside [0, 1].
        value, shapes, starts, loc, attn = make_inputs([(5, 7), (3, 2), (1, 1)], lo=-0.5, hi=1.5)
        out = self.op(value, shapes, starts, loc, attn)
        expected = naive_ms_deform_attn(value, shapes, loc, attn)
        self.assertEqual(out.shape, (2, 5, 2 * 3))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    def test_special_locations(self):
        # Pixel centres, pixel corners, the level's border and far-away points.
        value, shapes, starts, _, _ = make_inputs([(4, 6), (3, 5)], b=1, q=1, m=1, num_points=1)
        specials = [0.0, 1.0, 0.5, 1 / 6, 0.25 / 6, -1e-7, 1 + 1e-7, -0.1, 1.1, -5.0, 7.0]
        pairs = torch.tensor(list(itertools.product(specials, specials)), dtype=torch.float64)
        n = pairs.shape[0]
        loc = pairs.view(1, n, 1, 1, 1, 2).expand(1, n, 1, 2, 1, 2).contiguous()
        attn = torch.full((1, n, 1, 2, 1), 0.5, dtype=torch.float64)
        out = self.op(value, shapes, starts, loc, attn)
        expected = naive_ms_deform_attn(value, shapes, loc, attn)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        # Entirely outside every level: exactly zero.
        far = torch.tensor([[-5.0, -5.0], [7.0, 0.5], [0.5, 7.0]], dtype=torch.float64)
        far_loc = far.view(1, 3, 1, 1, 1, 2).expand(1, 3, 1, 2, 1, 2).contiguous()
        far_attn = torch.full((1, 3, 1, 2, 1), 0.5, dtype=torch.float64)
        self.assertEqual(self.op(value, shapes, starts, far_loc, far_attn).abs().max(), 0)

    def test_matches_grid_sample_formulation_fp32(self):
        value, shapes, starts, loc, attn = make_inputs(
            [(13, 17), (7, 9), (4, 5)], b=2, q=11, m=4, d=8, num_points=4, dtype=torch.float32
        )
        out = self.op(value, shapes, starts, loc, attn)
        expected = grid_sample_ms_deform_attn(value, shapes, loc, attn)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)

    def test_gradcheck_float64(self):
        value, shapes, starts, loc, attn = make_inputs(
            [(3, 4), (2, 3)], b=1, q=3, m=2, d=2, num_points=2, lo=-0.2, hi=1.2
        )
        value.requires_grad_(True)
        loc.requires_grad_(True)
        attn.requires_grad_(True)

        def fn(v, loc_, a):
            return self.op(v, shapes, starts, loc_, a)

        self.assertTrue(torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-5))

    def assert_same_gradients_as_grid_sample(self, value, shapes, starts, loc, attn):
        """Gradients of a fixed linear function of the output w.r.t. value, locations and
        weights equal those through the grid_sample formulation."""
        grads = []
        for fn in (
            lambda v, x, a: self.op(v, shapes, starts, x, a),
            lambda v, x, a: grid_sample_ms_deform_attn(v, shapes, x, a),
        ):
            leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
            out = fn(*leaves)
            (
                out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            ).sum().backward()
            grads.append([t.grad for t in leaves])
        for ours, ref in zip(*grads):
            torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)

    def test_gradients_match_grid_sample_formulation(self):
        inputs = make_inputs([(6, 5), (3, 3)], b=2, q=4, m=2, d=4, num_points=2)
        value, shapes, starts, loc, attn = inputs
        self.assert_same_gradients_as_grid_sample(value, shapes, starts, loc, attn)

    def test_gradients_at_pixel_centres(self):
        # At initialisation, samples sit exactly on pixel centres (reference point plus an
        # integer offset), where bilinear sampling has a kink: both must take the same side.
        # Power-of-2 sizes keep every coordinate exact in binary.
        value, shapes, starts, _, _ = make_inputs([(4, 8), (2, 4)], b=1, q=6, m=2, num_points=2)
        cx = (torch.randint(-1, 9, (1, 6, 2, 2, 2)) + 0.5) / shapes[:, 1].view(1, 1, 1, 2, 1)
        cy = (torch.randint(-1, 5, (1, 6, 2, 2, 2)) + 0.5) / shapes[:, 0].view(1, 1, 1, 2, 1)
        loc = torch.stack((cx, cy), -1).double()
        attn = torch.rand(1, 6, 2, 2, 2, dtype=torch.float64)
        self.assert_same_gradients_as_grid_sample(value, shapes, starts, loc, attn)

    def test_half_precision_values(self):
        value, shapes, starts, loc, attn = make_inputs(
            [(9, 11), (5, 6)], q=7, m=2, d=8, dtype=torch.float32
        )
        expected = self.op(value, shapes, starts, loc, attn)
        for dtype in (torch.float16, torch.bfloat16):
            with self.subTest(dtype=dtype):
                # Half-precision values with float32 locations, and everything in half.
                out = self.op(value.to(dtype), shapes, starts, loc, attn)
                self.assertEqual(out.dtype, dtype)
                torch.testing.assert_close(out.float(), expected, rtol=0, atol=3e-2)
                out = self.op(value.to(dtype), shapes, starts, loc.to(dtype), attn.to(dtype))
                self.assertEqual(out.dtype, dtype)
                torch.testing.assert_close(out.float(), expected, rtol=0, atol=6e-2)

    def test_nan_location_does_not_crash(self):
        value, shapes, starts, loc, attn = make_inputs([(3, 4)], b=1, q=2, m=1, num_points=1)
        loc[0, 0, 0, 0, 0, 0] = float("nan")
        out = self.op(value, shapes, starts, loc, attn)
        # The other query is untouched by the NaN of query 0.
        expected = naive_ms_deform_attn(value, shapes, loc[:, 1:], attn[:, 1:])
        torch.testing.assert_close(out[:, 1:], expected, rtol=0, atol=1e-12)

    def test_bad_inputs(self):
        value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2)])
        with self.assertRaisesRegex(ValueError, "cover 16 positions, but value has S=15"):
            self.op(value[:, :-1].contiguous(), shapes, starts, loc, attn)
        with self.assertRaisesRegex(ValueError, "attention_weights"):
            self.op(value, shapes, starts, loc, attn[..., :1])
        with self.assertRaisesRegex(ValueError, "sampling_locations"):
            self.op(value, shapes, starts, loc[..., :1], attn)
        with self.assertRaisesRegex(ValueError, "spatial_shapes"):
            self.op(value, shapes.float(), starts, loc, attn)
        with self.assertRaisesRegex(ValueError, "level_start_index"):
            self.op(value, shapes, torch.tensor([0, 4]), loc, attn)


class TestMSDeformAttnModule(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.shapes = torch.tensor([[6, 7], [3, 4]])
        self.starts = torch.tensor([0, 42])
        self.s = 42 + 12

    def _inputs(self, b=2, q=5, c=16, ref_dim=2):
        query = torch.randn(b, q, c)
        ref = torch.rand(b, q, 2, ref_dim)
        src = torch.randn(b, self.s, c)
        return query, ref, src

    def test_init(self):
        attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=4, num_points=3)
        self.assertEqual(attn.sampling_offsets.weight.abs().max(), 0)
        self.assertEqual(attn.attention_weights.weight.abs().max(), 0)
        self.assertEqual(attn.attention_weights.bias.abs().max(), 0)
        bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
        # Head 0 looks right, head 1 (90 degrees) down; point p sits p + 1 pixels away.
        torch.testing.assert_close(bias[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
        torch.testing.assert_close(bias[0, :, :, 1], torch.zeros(2, 3))
        torch.testing.assert_close(bias[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
        self.assertLess(bias[1, 0, :, 0].abs().max(), 1e-6)
        self.assertEqual(attn.value_proj.bias.abs().max(), 0)

    def test_forward_matches_naive_composition(self):
        attn = MSDeformAttn(embed_dim=8, num_levels=2, num_heads=2, num_points=2).double()
        for p in attn.parameters():  # non-trivial offsets and weights
            torch.nn.init.normal_(p, std=0.5)
        query, ref, src = (t.double() for t in self._inputs(b=1, q=3, c=8))
        mask = torch.zeros(1, self.s, dtype=torch.bool)
        mask[0, 40:45] = True
        out = attn(query, ref, src, self.shapes, self.starts, mask)

        value = attn.value_proj(src).masked_fill(mask[..., None], 0).view(1, self.s, 2, 4)
        offsets = attn.sampling_offsets(query).view(1, 3, 2, 2, 2, 2)
        weights = attn.attention_weights(query).view(1, 3, 2, 4).softmax(-1).view(1, 3, 2, 2, 2)
        normalizer = torch.stack((self.shapes[:, 1], self.shapes[:, 0]), -1).double()
        loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        expected = attn.output_proj(naive_ms_deform_attn(value, self.shapes, loc, weights))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)

    def test_box_reference_points_and_grads(self):
        # Box references (cx, cy, w, h): offsets are in units of half the box per point count,
        # location = centre + offset / num_points * size / 2 (Deformable DETR's two-stage form).
        attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=4, num_points=2)
        with torch.no_grad():
            attn.sampling_offsets.weight.normal_(std=0.3)  # query-dependent offsets
            attn.attention_weights.weight.normal_(std=0.3)
        query, ref, src = self._inputs(ref_dim=4)
        out = attn(query, ref, src, self.shapes, self.starts)
        with torch.no_grad():
            value = attn.value_proj(src).view(2, self.s, 4, 4)
            offsets = attn.sampling_offsets(query).view(2, 5, 4, 2, 2, 2)
            weights = attn.attention_weights(query).view(2, 5, 4, 4).softmax(-1).view(2, 5, 4, 2, 2)
            box = ref[:, :, None, :, None, :]  # (B, Q, 1, L, 1, 4)
            loc = box[..., :2] + offsets / 2 * box[..., 2:] * 0.5
            expected = attn.output_proj(
                naive_ms_deform_attn(value.double(), self.shapes, loc.double(), weights.double()).float()
            )
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        out.square().sum().backward()
        missing = [n for n, p in attn.named_parameters() if p.grad is None or not p.grad.any()]
        self.assertEqual(missing, [])

    def test_autocast_cpu(self):
        attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=4, num_points=2)
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.2)
        query, ref, src = self._inputs()
        expected = attn(query, ref, src, self.shapes, self.starts)
        for dtype in (torch.bfloat16, torch.float16):
            with self.subTest(dtype=dtype), torch.autocast("cpu", dtype=dtype):
                out = attn(query, ref, src, self.shapes, self.starts)
                out.float().sum().backward()
            self.assertTrue(torch.isfinite(out).all())
            scale = expected.abs().max().item()
            torch.testing.assert_close(out.float(), expected, rtol=0, atol=5e-2 * scale)

    def test_value_errors(self):
        with self.assertRaisesRegex(ValueError, "divisible"):
            MSDeformAttn(embed_dim=30, num_heads=4)
        with self.assertRaisesRegex(ValueError, "num_points"):
            MSDeformAttn(embed_dim=16, num_heads=4, num_points=0)
        attn = MSDeformAttn(embed_dim=16, num_levels=2, num_heads=4, num_points=2)
        query, ref, src = self._inputs()
        with self.assertRaisesRegex(
            ValueError, "sum of H\\*W .* is 54, but input_flatten has S=53"
        ):
            attn(query, ref, src[:, :-1], self.shapes, self.starts)
        with self.assertRaisesRegex(ValueError, "last dim of reference_points"):
            attn(query, torch.rand(2, 5, 2, 3), src, self.shapes, self.starts)
        with self.assertRaisesRegex(ValueError, "reference_points"):
            attn(query, torch.rand(2, 5, 3, 2), src, self.shapes, self.starts)
        with self.assertRaisesRegex(ValueError, "query"):
            attn(query[..., :8], ref, src, self.shapes, self.starts)
        with self.assertRaisesRegex(ValueError, "input_spatial_shapes"):
            attn(query, ref, src, self.shapes[:1], self.starts[:1])
        with self.assertRaisesRegex(ValueError, "input_padding_mask"):
            attn(query, ref, src, self.shapes, self.starts, torch.zeros(2, 3, dtype=torch.bool))


if __name__ == "__main__":
    unittest.main()
