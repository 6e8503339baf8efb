"""STDC networks (Short-Term Dense Concatenate; Fan et al., CVPR 2021) as Detectron2 backbones.

STDC1 (``LAYERS [2, 2, 2]``) and STDC2 (``[4, 5, 3]``) are the backbones of PEM's efficient
configs. Parameter names are those of PEM's ``D2STDCnet`` (``features.{i}.*``), so PEM
checkpoints load; PEM's module also lists every parameter a second time under the stage names
``x2``/``x4``/``x8``/``x16``/``x32`` (the same tensors), which are accepted on load.

Shapes: B batch, C channels, H/W input size; ``res{k}`` is (B, C_k, H / 2^k, W / 2^k) with
C = 64, 256, 512, 1024 for ``res2`` .. ``res5`` (base width 64).
"""
import logging
import re
from typing import Any, Dict, List, Sequence

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

__all__ = ["ConvX", "CatBottleneck", "AddBottleneck", "STDCNet", "D2STDCnet"]

logger = logging.getLogger(__name__)


class ConvX(nn.Sequential):
    """Convolution (no bias), norm, ReLU; the unit every STDC block is made of."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 norm: str = "BN") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = get_norm(norm, out_channels)
        self.relu = nn.ReLU(inplace=True)


def _block_convs(in_channels: int, out_channels: int, block_num: int, norm: str) -> nn.ModuleList:
    """The chain of an STDC block: a 1x1 ConvX to half the output width, then 3x3 ConvX whose
    widths halve at each step (the last repeats its predecessor's), so that the concatenated
    outputs add up to ``out_channels``: e.g. 1/2 + 1/4 + 1/8 + 1/8 for 4 convs."""
    if block_num < 2:
        raise ValueError(f"MODEL.STDC.BLOCK_NUM must be >= 2, got {block_num}")
    convs = nn.ModuleList([ConvX(in_channels, out_channels // 2, kernel_size=1, norm=norm)])
    for idx in range(1, block_num):
        c_in = out_channels // 2 ** idx
        c_out = c_in if idx == block_num - 1 else out_channels // 2 ** (idx + 1)
        convs.append(ConvX(c_in, c_out, norm=norm))
    return convs


def _depthwise_down(channels: int, norm: str) -> nn.Sequential:
    """Stride-2 depthwise 3x3 conv + norm (no activation): how a block halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
        get_norm(norm, channels),
    )


class _STDCBlock(nn.Module):
    """What both STDC blocks build: the conv chain and, at stride 2, ``avd_layer``."""

    def __init__(self, in_channels: int, out_channels: int, block_num: int = 4, stride: int = 1,
                 norm: str = "BN") -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"STDC blocks have stride 1 or 2, got {stride}")
        self.stride = stride
        self.conv_list = _block_convs(in_channels, out_channels, block_num, norm)
        if stride == 2:
            self.avd_layer = _depthwise_down(out_channels // 2, norm)


class CatBottleneck(_STDCBlock):
    """STDC block that concatenates the outputs of its conv chain.

    With ``stride`` 2 the first conv's output is downsampled by a depthwise conv
    (``avd_layer``) before the chain continues, and by 3x3 average pooling (``skip``) for its
    own place in the concatenation.
    """

    def __init__(self, in_channels: int, out_channels: int, block_num: int = 4, stride: int = 1,
                 norm: str = "BN") -> None:
        super().__init__(in_channels, out_channels, block_num, stride, norm)
        if stride == 2:
            self.skip = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        first = self.conv_list[0](x)
        out = self.avd_layer(first) if self.stride == 2 else first
        outs = []
        for conv in self.conv_list[1:]:
            out = conv(out)
            outs.append(out)
        if self.stride == 2:
            first = self.skip(first)
        return torch.cat([first] + outs, dim=1)


class AddBottleneck(_STDCBlock):
    """STDC block that concatenates its conv chain and adds the input (``BLOCK_TIPE: add``).

    With ``stride`` 2 the first conv's output goes through ``avd_layer`` and the input through
    ``skip`` (depthwise stride-2 conv + norm, 1x1 conv + norm) to the output width.
    """

    def __init__(self, in_channels: int, out_channels: int, block_num: int = 4, stride: int = 1,
                 norm: str = "BN") -> None:
        super().__init__(in_channels, out_channels, block_num, stride, norm)
        if stride == 2:
            self.skip = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False),
                get_norm(norm, in_channels),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                get_norm(norm, out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""
        outs = []
        out = x
        for idx, conv in enumerate(self.conv_list):
            out = conv(out)
            if idx == 0 and self.stride == 2:
                out = self.avd_layer(out)
            outs.append(out)
        shortcut = self.skip(x) if self.stride == 2 else x
        return torch.cat(outs, dim=1) + shortcut


_BLOCKS = {"cat": CatBottleneck, "add": AddBottleneck}


class STDCNet(nn.Module):
    """The STDC feature extractor, without classifier.

    ``features`` holds two stride-2 ConvX (to 1/2 and 1/4) and then, for each of the three
    stages of ``layers``, one stride-2 block followed by stride-1 blocks; stage widths are
    4, 8 and 16 times ``base``.

    Args:
        base: width of the stride-4 stem output (64 for the published models).
        layers: blocks per stage ([2, 2, 2] STDC1, [4, 5, 3] STDC2).
        block_num: ConvX per block.
        block_type: "cat" or "add".
        use_conv_last: add a 1x1 ConvX (``conv_last``) after the last stage.
        norm: normalization of every ConvX (a Detectron2 norm name).
    """

    def __init__(self, *, base: int = 64, layers: Sequence[int] = (2, 2, 2), block_num: int = 4,
                 block_type: str = "cat", use_conv_last: bool = False, norm: str = "BN") -> None:
        super().__init__()
        if block_type not in _BLOCKS:
            raise ValueError(f"MODEL.STDC.BLOCK_TIPE={block_type!r}: expected one of {sorted(_BLOCKS)}")
        if len(layers) != 3 or min(layers) < 1:
            raise ValueError(f"MODEL.STDC.LAYERS={list(layers)}: expected three positive block counts")
        block = _BLOCKS[block_type]
        modules: List[nn.Module] = [ConvX(3, base // 2, 3, 2, norm=norm), ConvX(base // 2, base, 3, 2, norm=norm)]
        for stage, count in enumerate(layers):
            width = base * 2 ** (stage + 2)
            for j in range(count):
                in_width = (base if stage == 0 else width // 2) if j == 0 else width
                modules.append(block(in_width, width, block_num, 2 if j == 0 else 1, norm))
        self.features = nn.Sequential(*modules)
        # Index ranges of `features` whose outputs are res2 .. res5 (PEM's x4, x8, x16, x32).
        ends = [2, 2 + layers[0], 2 + layers[0] + layers[1], len(modules)]
        self._stage_ranges = [(0, ends[0])] + [(ends[i], ends[i + 1]) for i in range(3)]
        self.use_conv_last = use_conv_last
        if use_conv_last:
            self.conv_last = ConvX(base * 16, max(1024, base * 16), 1, 1, norm=norm)
        self.base = base

    def stage_outputs(self, x: Tensor) -> List[Tensor]:
        """(B, 3, H, W) -> the four stage outputs at strides 4, 8, 16, 32."""
        outs = []
        for start, end in self._stage_ranges:
            for i in range(start, end):
                x = self.features[i](x)
            outs.append(x)
        if self.use_conv_last:
            outs[-1] = self.conv_last(outs[-1])
        return outs


_STAGE_NAME = re.compile(r"x(?:2|4|8|16|32)\.0\.(\d+)\.(.+)")


@BACKBONE_REGISTRY.register()
class D2STDCnet(STDCNet, Backbone):
    """STDC as a Detectron2 backbone: ``res2`` .. ``res5`` at strides 4 .. 32 with 64, 256, 512
    and 1024 channels.

    Built from ``cfg.MODEL.STDC.*`` by ``build_backbone`` (``MODEL.BACKBONE.NAME: "D2STDCnet"``)
    or from keyword arguments. As in PEM, the base width is 64 and every norm is plain
    BatchNorm (PEM's backbone does not read ``MODEL.STDC.NORM``; the key is accepted).

    Args:
        out_features: names of the returned features, a subset of res2 .. res5.
        **kwargs: keyword arguments of :class:`STDCNet`.
    """

    _NAMES = ("res2", "res3", "res4", "res5")

    @configurable
    def __init__(self, *, out_features: Sequence[str] = _NAMES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        unknown = [n for n in out_features if n not in self._NAMES]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.STDC.OUT_FEATURES={list(out_features)}: expected a non-empty subset of {list(self._NAMES)}"
            )
        self._out_features = [n for n in self._NAMES if n in out_features]
        widths = (self.base, self.base * 4, self.base * 8, self.base * 16)
        self._out_feature_channels = dict(zip(self._NAMES, widths))
        self._out_feature_strides = {n: 2 ** (i + 2) for i, n in enumerate(self._NAMES)}

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> Dict[str, Any]:
        stdc = cfg.MODEL.STDC
        if input_shape.channels not in (None, 3):
            raise ValueError(f"D2STDCnet takes 3-channel images; input has {input_shape.channels} channels")
        return {
            "layers": list(stdc.LAYERS),
            "block_num": stdc.BLOCK_NUM,
            "block_type": stdc.BLOCK_TIPE,
            "use_conv_last": stdc.USE_CONV_LAST,
            "out_features": list(stdc.OUT_FEATURES),
        }

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """x: (B, 3, H, W) -> {name: (B, C_name, H / stride, W / stride)} for ``out_features``."""
        return {n: f for n, f in zip(self._NAMES, self.stage_outputs(x)) if n in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and stride of every output feature."""
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        """Inputs padded to a multiple of 32 give outputs of exactly input / stride."""
        return 32

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # PEM's module registers each stage twice (``features`` and the stage Sequentials
        # x2 .. x32 wrapping slices of it), so its checkpoints hold each tensor under both
        # names, or under either one. Stage names map onto ``features``; when both are
        # present they are the same tensor and one copy is dropped.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            m = _STAGE_NAME.fullmatch(key[len(prefix):])
            if m is None:
                continue
            value = state_dict.pop(key)
            state_dict.setdefault(f"{prefix}features.{m[1]}.{m[2]}", value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
