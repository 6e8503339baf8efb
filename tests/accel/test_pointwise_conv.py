"""pointwise_conv: 1x1 convolutions as matrix products, equal to the convolution itself."""
import unittest

import torch
from detectron2.layers import Conv2d
from torch import nn
from torch.nn import functional as F

from mask2former_d2.accel.pointwise_conv import pointwise_conv


class TestPointwiseConv(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.x = torch.randn(2, 12, 7, 9)

    def check(self, conv, x=None):
        x = self.x if x is None else x
        expected = conv(x)
        got = pointwise_conv(conv, x)
        self.assertEqual(got.shape, expected.shape)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        return got

    def test_plain_and_detectron2_convs(self):
        self.check(nn.Conv2d(12, 5, 1))
        self.check(nn.Conv2d(12, 5, 1, bias=False))
        self.check(Conv2d(12, 8, 1, bias=False, norm=nn.GroupNorm(4, 8), activation=F.relu))
        self.check(Conv2d(12, 8, 1, bias=True))

    def test_channels_last_and_gradients(self):
        conv = nn.Conv2d(12, 5, 1)
        self.check(conv, self.x.contiguous(memory_format=torch.channels_last))
        x = self.x.clone().requires_grad_(True)
        pointwise_conv(conv, x).square().sum().backward()
        grad_x, grad_w = x.grad.clone(), conv.weight.grad.clone()
        x.grad = None
        conv.weight.grad = None
        conv(x).square().sum().backward()
        torch.testing.assert_close(grad_x, x.grad)
        torch.testing.assert_close(grad_w, conv.weight.grad)

    def test_output_layout_follows_the_input(self):
        conv = Conv2d(12, 8, 1, bias=True)
        for b in (1, 3):
            x = torch.randn(b, 12, 7, 9)
            self.assertTrue(self.check(conv, x).is_contiguous())
            got = self.check(conv, x.contiguous(memory_format=torch.channels_last))
            self.assertTrue(got.is_contiguous(memory_format=torch.channels_last))
            self.assertFalse(got.is_contiguous())
        # Neither layout (a transposed view): made contiguous first, same values.
        self.check(conv, torch.randn(2, 12, 9, 7).transpose(2, 3))

    def test_other_convolutions_run_themselves(self):
        for conv in (nn.Conv2d(12, 5, 3, padding=1), nn.Conv2d(12, 5, 1, stride=2),
                     nn.Conv2d(12, 6, 1, groups=2)):
            self.check(conv)


if __name__ == "__main__":
    unittest.main()
