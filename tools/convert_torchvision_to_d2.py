#!/usr/bin/env python
"""Converts a torchvision ResNet checkpoint into Detectron2 weights for its ResNet backbone.

The input is a ``.pth`` file holding a torchvision ``ResNet`` state dict (ResNet-18/34/50/101/152,
ResNeXt and wide ResNets share the layout), either plain or wrapped as ``{"state_dict": ...}`` /
``{"model": ...}``, possibly with the ``module.`` prefix of DistributedDataParallel. Names follow
Detectron2's convention:

======================================  ======================================
torchvision                             Detectron2
======================================  ======================================
``conv1.*`` / ``bn1.*``                 ``stem.conv1.*`` / ``stem.conv1.norm.*``
``layer{i}.{j}.conv{k}.*``              ``res{i+1}.{j}.conv{k}.*``
``layer{i}.{j}.bn{k}.*``                ``res{i+1}.{j}.conv{k}.norm.*``
``layer{i}.{j}.downsample.0.*``         ``res{i+1}.{j}.shortcut.*``
``layer{i}.{j}.downsample.1.*``         ``res{i+1}.{j}.shortcut.norm.*``
======================================  ======================================

The classifier ``fc.*`` and the BatchNorm ``num_batches_tracked`` counters are dropped; the running
statistics are kept (``FrozenBN`` uses them). The output is a pickle
``{"model": {name: numpy array}, "__author__": "torchvision", "matching_heuristics": True}``;
Detectron2's checkpointer matches the names to ``backbone.*`` by suffix.

torchvision models expect RGB input normalised with ImageNet statistics and put the stride of a
bottleneck block in its 3x3 convolution, so use the weights with::

    MODEL.WEIGHTS r50.pkl MODEL.RESNETS.DEPTH 50 MODEL.RESNETS.STRIDE_IN_1X1 False
    MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]" MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"
    INPUT.FORMAT RGB

(and ``MODEL.RESNETS.RES2_OUT_CHANNELS 64`` for ResNet-18/34). The tool logs these settings for
the depth it finds.

Usage:
    python tools/convert_torchvision_to_d2.py resnet50-0676ba61.pth r50.pkl
"""

import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mask2former_d2.weight_conversion import (
    converter_main,
    load_checkpoint,
    to_numpy,
    unwrap_state_dict,
    write_d2_weights,
)

__all__ = [
    "convert_torchvision_state_dict",
    "convert_file",
    "infer_resnet_depth",
    "load_checkpoint",
    "main",
    "rename_key",
]

logger = logging.getLogger(__name__)

# ImageNet statistics torchvision's ResNets were trained with, in RGB order and 0-255 units.
TORCHVISION_PIXEL_MEAN = (123.675, 116.28, 103.53)
TORCHVISION_PIXEL_STD = (58.395, 57.12, 57.375)

_BLOCKS_PER_STAGE = {
    (2, 2, 2, 2): {"basic": 18},
    (3, 4, 6, 3): {"basic": 34, "bottleneck": 50},
    (3, 4, 23, 3): {"bottleneck": 101},
    (3, 8, 36, 3): {"bottleneck": 152},
}
_NORM_FIELD = r"(weight|bias|running_mean|running_var)"
# torchvision name pattern -> Detectron2 name; torchvision's layer{i} is Detectron2's res{i+1}.
_RENAMES = (
    (re.compile(r"^conv1\.weight$"), lambda m: "stem.conv1.weight"),
    (re.compile(rf"^bn1\.{_NORM_FIELD}$"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (
        re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight",
    ),
    (
        re.compile(rf"^layer(\d)\.(\d+)\.bn(\d)\.{_NORM_FIELD}$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}",
    ),
    (
        re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight",
    ),
    (
        re.compile(rf"^layer(\d)\.(\d+)\.downsample\.1\.{_NORM_FIELD}$"),
        lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}",
    ),
)
_DROPPED = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")


def rename_key(name: str) -> Optional[str]:
    """Returns the Detectron2 name of a torchvision ResNet parameter or buffer.

    Args:
        name: torchvision name, without wrapper prefixes.

    Returns:
        The Detectron2 name, or None when the entry is not part of the backbone (``fc``,
        ``num_batches_tracked``) or is not a ResNet name.
    """
    if _DROPPED.search(name):
        return None
    for pattern, new_name in _RENAMES:
        m = pattern.match(name)
        if m:
            return new_name(m)
    return None


def infer_resnet_depth(state_dict: Mapping[str, Any]) -> Optional[int]:
    """Guesses the ResNet depth from the number of blocks per stage and the block type.

    Args:
        state_dict: a torchvision ResNet state dict.

    Returns:
        18, 34, 50, 101 or 152, or None for another layout.
    """
    blocks = []
    for stage in range(1, 5):
        ids = {
            int(m[1]) for m in map(re.compile(rf"^layer{stage}\.(\d+)\.").match, state_dict) if m
        }
        blocks.append(max(ids) + 1 if ids else 0)
    kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state_dict) else "basic"
    return _BLOCKS_PER_STAGE.get(tuple(blocks), {}).get(kind)


def convert_torchvision_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Renames a torchvision ResNet state dict to Detectron2's ResNet names.

    Args:
        state_dict: tensors (or numpy arrays) of a torchvision ResNet, possibly wrapped as
            ``{"state_dict": ...}``/``{"model": ...}`` and with a ``module.`` prefix.

    Returns:
        ``{Detectron2 name: numpy array}`` without ``fc`` and ``num_batches_tracked``.

    Raises:
        ValueError: when the input is not a torchvision ResNet (no name converts, or it already
            uses Detectron2 names).
    """
    state_dict = {re.sub(r"^module\.", "", k): v for k, v in unwrap_state_dict(state_dict).items()}
    if any(k.startswith(("stem.", "res2.")) for k in state_dict):
        raise ValueError("the checkpoint already uses Detectron2 names (stem.*, res2.*)")
    out: Dict[str, np.ndarray] = {}
    unknown: List[str] = []
    for name, value in state_dict.items():
        new_name = rename_key(name)
        if new_name is not None:
            out[new_name] = to_numpy(value)
        elif not _DROPPED.search(name):
            unknown.append(name)
    if not out:
        raise ValueError(
            "not a torchvision ResNet checkpoint: no conv1/bn1/layer{i}.* names found "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    if unknown:
        logger.warning("Ignored %d unrecognised keys: %s", len(unknown), ", ".join(unknown))
    return out


def convert_file(input_path: str, output_path: str, allow_pickle: bool = False) -> Dict[str, Any]:
    """Reads a torchvision checkpoint and writes the Detectron2 pickle.

    Returns:
        The dict written to ``output_path``.
    """
    state_dict = load_checkpoint(input_path, allow_pickle=allow_pickle)
    weights = convert_torchvision_state_dict(state_dict)
    result = write_d2_weights(weights, output_path, author="torchvision")

    depth = infer_resnet_depth({re.sub(r"^module\.", "", k): v for k, v in state_dict.items()})
    settings = [f"MODEL.WEIGHTS {output_path}"]
    if depth is not None:
        settings.append(f"MODEL.RESNETS.DEPTH {depth}")
        if depth in (18, 34):
            settings.append("MODEL.RESNETS.RES2_OUT_CHANNELS 64")
    settings += [
        "MODEL.RESNETS.STRIDE_IN_1X1 False",
        f'MODEL.PIXEL_MEAN "{list(TORCHVISION_PIXEL_MEAN)}"',
        f'MODEL.PIXEL_STD "{list(TORCHVISION_PIXEL_STD)}"',
        "INPUT.FORMAT RGB",
    ]
    logger.info("Use it with these config options: %s", " ".join(settings))
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    description = __doc__.split("\n\n")[0]
    converter_main(description, "torchvision ResNet checkpoint (.pth)", convert_file, argv)


if __name__ == "__main__":
    main()
