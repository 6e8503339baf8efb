"""1x1 convolutions and linear + ReLU layers as plain matrix products.

Shapes: B batch, C_in/C_out channels, H/W spatial."""
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .layout import is_channels_last

__all__ = ["linear_relu", "pointwise_conv"]


def pointwise_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1x1, stride-1, unpadded, ungrouped convolution, computed as matrix
    products. A (B, C, H, W) NCHW input is one product per image,
    (C_out, C_in) @ (C_in, H * W), bias added by the same BLAS call; a channels-last input is
    one product over all pixels, (B * H * W, C_in) @ (C_in, C_out), and its output stays
    channels-last. At the FPN's stride-4 sizes this beats oneDNN's CPU convolution, which also
    goes through a layout conversion (see benchmarks/). Other convolutions run ``conv`` itself. A
    Detectron2 ``Conv2d``'s ``norm`` and ``activation`` are applied as its forward would."""
    plain = (
        not torch.compiler.is_exporting()  # the per-image loop needs a concrete batch size
        and x.dim() == 4
        and type(conv).forward in (nn.Conv2d.forward, _d2_conv_forward())
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid")
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and x.numel() > 0
    )
    if not plain:
        return conv(x)
    b, c, h, w = x.shape
    weight = conv.weight.view(conv.out_channels, c)
    if is_channels_last(x):
        y = F.linear(x.permute(0, 2, 3, 1), weight, conv.bias).permute(0, 3, 1, 2)
    else:
        # Image by image: a 2-d @ 3-d matmul would first copy the input transposed.
        x = x.contiguous()
        per_image = [
            torch.mm(weight, xi.view(c, h * w)) if conv.bias is None
            else torch.addmm(conv.bias.view(-1, 1), weight, xi.view(c, h * w))
            for xi in x
        ]
        y = per_image[0].view(1, -1, h, w) if b == 1 else torch.stack(per_image).view(b, -1, h, w)
    norm = getattr(conv, "norm", None)
    if norm is not None:
        y = norm(y)
    activation = getattr(conv, "activation", None)
    if activation is not None:
        y = activation(y)
    return y


def linear_relu(linear: nn.Linear, x: Tensor) -> Tensor:
    """``relu(linear(x))`` as a plain GEMM with the bias and the ReLU applied in place (a
    linear's GEMM starts from a broadcast copy of the bias); the same values and gradients."""
    return torch.matmul(x, linear.weight.t()).add_(linear.bias).relu_()


def _d2_conv_forward():
    from detectron2.layers import Conv2d

    return Conv2d.forward
