"""ModulatedDeformConv (DCNv2) against a naive float64 bilinear reference written from the
definition, with Detectron2's parameter names and interleaved (dy, dx) offsets."""
import itertools
import math
import unittest

import numpy as np
import torch

from mask2former_d2.layers.deform_conv import FORMULATIONS, ModulatedDeformConv, modulated_deform_conv


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    """DCN's sampling: bilinear over the four neighbours, a neighbour outside the image is 0."""
    h, w = img.shape
    y0, x0 = math.floor(y), math.floor(x)
    val = 0.0
    for yy, xx in itertools.product((y0, y0 + 1), (x0, x0 + 1)):
        if 0 <= yy < h and 0 <= xx < w:
            val += (1 - abs(y - yy)) * (1 - abs(x - xx)) * img[yy, xx]
    return val


def naive_dcn(x, offset, mask, weight, bias, stride, padding, dilation, groups):
    """Loops over every output pixel, tap and channel (float64 numpy)."""
    x, offset, mask, weight = (t.detach().double().numpy() for t in (x, offset, mask, weight))
    b, c, h, w = x.shape
    o, cpg, kh, kw = weight.shape
    taps = kh * kw
    dg = offset.shape[1] // (2 * taps)
    ho, wo = offset.shape[-2:]
    out = np.zeros((b, o, ho, wo))
    for n, oc, i, j in itertools.product(range(b), range(o), range(ho), range(wo)):
        g = oc // (o // groups)
        acc = 0.0
        for ci in range(cpg):
            cin = g * cpg + ci
            d = cin // (c // dg)
            for ki, kj in itertools.product(range(kh), range(kw)):
                k = ki * kw + kj
                dy = offset[n, d * 2 * taps + 2 * k, i, j]
                dx = offset[n, d * 2 * taps + 2 * k + 1, i, j]
                y = i * stride - padding + ki * dilation + dy
                xx = j * stride - padding + kj * dilation + dx
                m = mask[n, d * taps + k, i, j]
                acc += weight[oc, ci, ki, kj] * m * _bilinear(x[n, cin], y, xx)
        out[n, oc, i, j] = acc + (0.0 if bias is None else float(bias[oc]))
    return torch.from_numpy(out)


class TestModulatedDeformConv(unittest.TestCase):
    def _case(self, seed, *, c=4, o=6, h=5, w=7, stride=1, padding=1, dilation=1, groups=1, dg=1, bias=True,
              scale=1.5):
        g = torch.Generator().manual_seed(seed)
        ho = (h + 2 * padding - dilation * 2 - 1) // stride + 1
        wo = (w + 2 * padding - dilation * 2 - 1) // stride + 1
        x = torch.randn(2, c, h, w, generator=g, dtype=torch.float64)
        # Offsets of up to a few pixels: many samples fall between pixels and some outside.
        offset = scale * torch.randn(2, 2 * dg * 9, ho, wo, generator=g, dtype=torch.float64)
        mask = torch.rand(2, dg * 9, ho, wo, generator=g, dtype=torch.float64)
        weight = torch.randn(o, c // groups, 3, 3, generator=g, dtype=torch.float64)
        b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
        return x, offset, mask, weight, b, dict(stride=stride, padding=padding, dilation=dilation)

    def test_both_formulations_match_the_naive_reference(self):
        cases = [
            dict(),
            dict(bias=False),
            dict(stride=2, padding=1, h=8, w=9),
            dict(dilation=2, padding=2),
            dict(groups=2),
            dict(dg=2),
            dict(scale=4.0),  # many samples entirely outside the image
        ]
        for i, kw in enumerate(cases):
            with self.subTest(**kw):
                groups = kw.get("groups", 1)
                x, offset, mask, weight, bias, geo = self._case(i, **kw)
                ref = naive_dcn(x, offset, mask, weight, bias, geo["stride"], geo["padding"], geo["dilation"], groups)
                for formulation in FORMULATIONS:
                    got = modulated_deform_conv(x, offset, mask, weight, bias, **geo, formulation=formulation)
                    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=formulation)

    def test_offsets_are_dy_then_dx(self):
        # One tap, offset (dy, dx) = (1, 0): the output is the input shifted by one row.
        x = torch.arange(20.0, dtype=torch.float64).view(1, 1, 4, 5)
        weight = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        offset = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
        offset[:, 0] = 1.0
        mask = torch.ones(1, 1, 4, 5, dtype=torch.float64)
        for formulation in FORMULATIONS:
            out = modulated_deform_conv(x, offset, mask, weight, formulation=formulation)
            torch.testing.assert_close(out[0, 0, :3], x[0, 0, 1:])
            torch.testing.assert_close(out[0, 0, 3], torch.zeros(5, dtype=torch.float64))

    def test_module_names_gradients_and_formulations(self):
        conv = ModulatedDeformConv(4, 6, 3, padding=1, bias=False).double()
        self.assertEqual(sorted(n for n, _ in conv.named_parameters()), ["weight"])
        self.assertIsNone(conv.bias)
        conv_b = ModulatedDeformConv(4, 6, 3, padding=1, bias=True)
        self.assertEqual(sorted(conv_b.state_dict()), ["bias", "weight"])

        x, offset, mask, _, _, _ = self._case(11, scale=0.7)
        x.requires_grad_(True)
        offset.requires_grad_(True)
        mask.requires_grad_(True)
        ref = conv(x, offset, mask)
        conv.export_formulation = True
        got = conv(x, offset, mask)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        # Same gradients through both formulations (samples never sit exactly on a pixel).
        grads = []
        for flag in (False, True):
            conv.export_formulation = flag
            for t in (x, offset, mask, conv.weight):
                t.grad = None
            conv(x, offset, mask).square().sum().backward()
            grads.append([t.grad.clone() for t in (x, offset, mask, conv.weight)])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)

    def test_bad_shapes_raise(self):
        conv = ModulatedDeformConv(4, 6, 3, padding=1)
        x = torch.randn(1, 4, 5, 5)
        with self.assertRaisesRegex(ValueError, "mask has 8 channels"):
            conv(x, torch.zeros(1, 18, 5, 5), torch.zeros(1, 8, 5, 5))
        with self.assertRaisesRegex(ValueError, "offset has 17 channels"):
            conv(x, torch.zeros(1, 17, 5, 5), torch.zeros(1, 9, 5, 5))
        with self.assertRaisesRegex(ValueError, "formulation must be one of .*got 'cuda'"):
            ModulatedDeformConv(4, 6, 3, formulation="cuda")
        with self.assertRaisesRegex(ValueError, "formulation must be one of .*got 'im2col'"):
            modulated_deform_conv(x, torch.zeros(1, 18, 3, 3), torch.zeros(1, 9, 3, 3), conv.weight,
                                  formulation="im2col")


if __name__ == "__main__":
    unittest.main()
