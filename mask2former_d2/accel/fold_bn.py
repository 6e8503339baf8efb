"""Inference-time folding of batch norms into the convolutions before them.

Detectron2's ResNets are ``Conv2d`` layers whose ``norm`` is a ``FrozenBatchNorm2d`` (or, in
configs that train the backbone's norms, a ``BatchNorm2d``/``SyncBatchNorm``, which in eval mode
normalises with its running statistics): a fixed per-channel affine map. Without autograd,
``norm(conv(x, w, b))`` equals
``conv(x, w * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``, which saves one
full pass over every activation. Parameters,
buffers and checkpoint keys are untouched: the folded weights are a cache, rebuilt whenever
a parameter or buffer changes (loading a checkpoint, moving devices). For a half-precision
input (low-precision inference) the folded weights are cached in that dtype: folded in the
parameters' precision, then cast once.
"""
from typing import Tuple

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FoldedBNConv2d", "fold_batchnorm"]


def _foldable(norm: nn.Module) -> bool:
    """Whether ``norm`` is a fixed affine map right now: a frozen batch norm, or a batch norm in
    eval mode with running statistics and an affine part (in training mode it normalises with
    the batch's statistics, which no folding can reproduce)."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and not norm.training
        and norm.track_running_stats
        and norm.running_var is not None
        and norm.affine
    )


class FoldedBNConv2d(Conv2d):
    """A Detectron2 ``Conv2d`` + batch norm that runs as one convolution when no gradient is
    being recorded and the norm is a fixed affine map (:func:`_foldable`); otherwise it is the
    plain ``Conv2d``."""

    @classmethod
    def from_conv(cls, conv: Conv2d) -> "FoldedBNConv2d":
        """A folded twin of ``conv`` holding the same parameter and buffer tensors (so the
        state_dict keys and values are unchanged)."""
        folded = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device="meta", norm=conv.norm, activation=conv.activation,
        )
        folded.weight = conv.weight
        folded.bias = conv.bias
        folded.train(conv.training)
        return folded

    def forward(self, x: Tensor) -> Tensor:
        # While torch.export traces, parameters are fake tensors that the cache cannot key on;
        # the exported graph keeps conv + frozen norm (which exporters fold themselves).
        exporting = torch.compiler.is_exporting()
        if torch.is_grad_enabled() or exporting or not _foldable(self.norm):
            return super().forward(x)
        weight, bias = self._folded(x.dtype)
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _folded(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """The folded (weight, bias), in ``dtype`` if that is a half precision."""
        norm = self.norm
        tensors = [self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        if self.bias is not None:
            tensors.append(self.bias)
        half = dtype in (torch.float16, torch.bfloat16)
        key = (tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors), half and dtype)
        cache = self.__dict__.get("_fold_cache")
        if cache is None or cache[0] != key:
            scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
            shift = norm.bias - norm.running_mean * scale
            if self.bias is not None:
                shift = shift + self.bias * scale
            weight = self.weight * scale.to(self.weight.dtype).view(-1, 1, 1, 1)
            if half:  # channels-last too: the layout of the inputs at low-precision inference
                weight = weight.to(dtype, memory_format=torch.channels_last)
            cache = (key, weight, shift.to(weight.dtype))
            self.__dict__["_fold_cache"] = cache
        return cache[1], cache[2]

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_fold_cache", None)  # a cache, not state: never pickled
        return state


def fold_batchnorm(module: nn.Module) -> int:
    """Replaces every Detectron2 ``Conv2d`` in ``module`` whose norm is a batch norm (frozen,
    plain or synchronised) by a :class:`FoldedBNConv2d` sharing its tensors (done once, when the
    model is built; whether a call folds is decided by the norm's mode then). Returns how many."""
    count = 0
    for name, child in list(module.named_modules(remove_duplicate=False)):
        norm = getattr(child, "norm", None)
        if name and type(child) is Conv2d and isinstance(norm, (FrozenBatchNorm2d, nn.modules.batchnorm._BatchNorm)):
            module.set_submodule(name, FoldedBNConv2d.from_conv(child))
            count += 1
    return count
