#!/usr/bin/env python
"""Converts an ImageNet Swin Transformer checkpoint into Detectron2 weights for D2SwinTransformer.

Accepted inputs (the layout is detected from the key names):

* Microsoft's classification checkpoints (``{"model": state_dict}``), where the patch merging of
  stage i is ``layers.{i}.downsample`` (end of stage i) and the classifier is ``head.*``. Older
  timm versions (< 0.9) save the same layout.
* timm >= 0.9 state dicts, where that patch merging is stored at the start of the next stage,
  ``layers.{i + 1}.downsample``, the classifier is ``head.fc.*`` and the buffers
  ``relative_position_index``/``attn_mask`` are not saved.

The classifier head, the final ``norm`` and the ``attn_mask`` buffers are dropped; missing
``relative_position_index`` buffers are recreated. The output is a pickle
``{"model": {name: numpy array}, "__author__": "third_party", "matching_heuristics": True}``
whose names are the backbone's own (no ``backbone.`` prefix); Detectron2's checkpointer matches
them to ``backbone.*`` by suffix. The per-output norms ``norm{i}`` do not exist in
classification checkpoints and start from their initial values.

Usage:
    python tools/convert_swin_to_d2.py swin_tiny_patch4_window7_224.pth swin_tiny.pkl
"""

import logging
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from mask2former_d2.weight_conversion import (
    converter_main,
    load_checkpoint,
    to_numpy,
    unwrap_state_dict,
    write_d2_weights,
)

__all__ = ["convert_swin_state_dict", "detect_layout", "load_checkpoint", "main"]

logger = logging.getLogger(__name__)

MICROSOFT = "microsoft"
TIMM = "timm"

# Names D2SwinTransformer accepts; anything else is reported and left out.
_BACKBONE_KEY = re.compile(
    r"^(patch_embed\.(proj|norm)\.(weight|bias)"
    r"|absolute_pos_embed"
    r"|layers\.\d+\.blocks\.\d+\.(norm1|norm2|attn\.(qkv|proj)|mlp\.(fc1|fc2))\.(weight|bias)"
    r"|layers\.\d+\.blocks\.\d+\.attn\.relative_position_(bias_table|index)"
    r"|layers\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)"
    r"|norm\d+\.(weight|bias))$"
)
# Classification-only entries, dropped without a warning.
_CLASSIFICATION_KEY = re.compile(r"^(head\..*|norm\.(weight|bias)|.*\.attn_mask)$")
_SWIN_V2_MARKERS = ("logit_scale", "cpb_mlp", "relative_coords_table")


def _normalize_names(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for name, value in state_dict.items():
        name = re.sub(r"^(module\.)", "", name)  # DistributedDataParallel wrapper
        name = re.sub(r"^layers_(\d+)\.", r"layers.\1.", name)  # timm features_only models
        out[name] = value
    return out


def _indices(keys: Iterable[str], pattern: str) -> List[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.match, keys) if m})


def detect_layout(keys: Iterable[str]) -> str:
    """Tells where the patch merging layers are stored.

    Args:
        keys: state dict names (after removing wrapper prefixes).

    Returns:
        ``"microsoft"`` (``layers.{i}.downsample`` ends stage i, for i < S - 1) or ``"timm"``
        (``layers.{i}.downsample`` starts stage i, for i >= 1).
    """
    keys = list(keys)
    stages = _indices(keys, r"^layers\.(\d+)\.blocks\.")
    if not stages:
        raise ValueError("not a Swin Transformer checkpoint: no 'layers.{i}.blocks.*' keys found")
    num_stages = stages[-1] + 1
    merges = _indices(keys, r"^layers\.(\d+)\.downsample\.")
    if merges == list(range(num_stages - 1)):
        return MICROSOFT
    if merges == list(range(1, num_stages)):
        return TIMM
    raise ValueError(
        f"cannot place the patch merging layers: found layers.{{i}}.downsample for i in {merges} "
        f"with {num_stages} stages; expected {list(range(num_stages - 1))} (Microsoft) or "
        f"{list(range(1, num_stages))} (timm)"
    )


def _relative_position_index(window_size: int) -> np.ndarray:
    # offsets (query - key) of every token pair of a window, as rows of the bias table
    rows, cols = np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    dy = rows[:, None] - rows[None, :] + window_size - 1
    dx = cols[:, None] - cols[None, :] + window_size - 1
    return (dy * (2 * window_size - 1) + dx).astype(np.int64)


def _fix_absolute_pos_embed(value: np.ndarray, embed_dim: Optional[int]) -> np.ndarray:
    """Brings the absolute position embedding to (1, C, Gh, Gw)."""
    if value.ndim == 3:  # classification layout (1, Gh * Gw, C) with a square grid
        grid = math.isqrt(value.shape[1])
        if grid * grid != value.shape[1]:
            raise ValueError(f"absolute_pos_embed {value.shape}: {value.shape[1]} is not a square")
        return value.reshape(1, grid, grid, value.shape[2]).transpose(0, 3, 1, 2).copy()
    if value.ndim == 4 and embed_dim is not None and value.shape[1] != embed_dim:
        if value.shape[3] == embed_dim:  # channels-last (1, Gh, Gw, C)
            return value.transpose(0, 3, 1, 2).copy()
    if value.ndim == 4 and value.shape[1] == value.shape[3]:
        logger.warning("absolute_pos_embed %s is ambiguous; kept as (1, C, Gh, Gw)", value.shape)
    return value


def convert_swin_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Converts a classification Swin state dict to D2SwinTransformer names.

    Args:
        state_dict: tensors (or numpy arrays) of a Microsoft or timm Swin Transformer, possibly
            wrapped as ``{"model": ...}``.

    Returns:
        ``{name: numpy array}`` with the names of :class:`D2SwinTransformer` parameters and
        buffers, excluding ``norm{i}``.
    """
    state_dict = _normalize_names(unwrap_state_dict(state_dict))
    v2 = sorted(k for k in state_dict if any(marker in k for marker in _SWIN_V2_MARKERS))
    if v2:
        raise ValueError(f"Swin Transformer V2 checkpoints are not supported (found {v2[0]})")
    layout = detect_layout(state_dict)
    logger.info("Detected the %s layout", layout)

    out: Dict[str, np.ndarray] = {}
    ignored = []
    for name, value in state_dict.items():
        if _CLASSIFICATION_KEY.match(name):
            continue
        if layout == TIMM:
            # timm stores the merging that ends stage i at the start of stage i + 1
            name = re.sub(
                r"^layers\.(\d+)\.downsample\.",
                lambda m: f"layers.{int(m.group(1)) - 1}.downsample.",
                name,
            )
        if not _BACKBONE_KEY.match(name):
            ignored.append(name)
            continue
        out[name] = to_numpy(value)
    if ignored:
        logger.warning("Ignored %d unrecognised keys: %s", len(ignored), ", ".join(ignored))

    # timm does not save this buffer; it only depends on the window size
    for name in [k for k in out if k.endswith(".relative_position_bias_table")]:
        index_name = name.replace("relative_position_bias_table", "relative_position_index")
        if index_name not in out:
            window = (math.isqrt(out[name].shape[0]) + 1) // 2
            if (2 * window - 1) ** 2 != out[name].shape[0]:
                raise ValueError(f"{name}: {out[name].shape[0]} rows do not fit a square window")
            out[index_name] = _relative_position_index(window)

    if "absolute_pos_embed" in out:
        embed = out.get("patch_embed.proj.weight")
        out["absolute_pos_embed"] = _fix_absolute_pos_embed(
            out["absolute_pos_embed"], embed.shape[0] if embed is not None else None
        )
    return out


def convert_file(input_path: str, output_path: str, allow_pickle: bool = False) -> None:
    """Reads a torch checkpoint and writes the Detectron2 pickle."""
    weights = convert_swin_state_dict(load_checkpoint(input_path, allow_pickle=allow_pickle))
    write_d2_weights(weights, output_path, author="third_party")


def main(argv: Optional[Sequence[str]] = None) -> None:
    description = __doc__.split("\n\n")[0]
    converter_main(description, "Swin checkpoint (.pth) from Microsoft or timm", convert_file, argv)


if __name__ == "__main__":
    main()
