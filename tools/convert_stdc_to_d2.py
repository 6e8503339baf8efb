#!/usr/bin/env python
"""Converts an STDC ImageNet checkpoint into Detectron2 weights for the ``D2STDCnet`` backbone.

The input is the classification checkpoint of STDC-Seg (MichaelFan01/STDC-Seg, the weights PEM
starts from): ``STDCNet813M_73.91.tar`` (STDC1) or ``STDCNet1446_76.47.tar`` (STDC2), a
``torch.save`` file ``{"state_dict": ...}`` of its ``STDCNet813``/``STDCNet1446`` ImageNet model,
possibly with DataParallel's ``module.`` prefix. Its layout:

==========================================  ============================================
STDC-Seg ImageNet                            Detectron2 (``D2STDCnet``)
==========================================  ============================================
``features.{i}.*``                           ``features.{i}.*`` (unchanged)
``x2/x4/x8/x16/x32.0.{i}.*``                 dropped: the same tensors as ``features.{i}.*``
``conv_last.*``                              kept only with ``--conv-last``
                                             (``MODEL.STDC.USE_CONV_LAST True``)
``fc.*``, ``bn.*``, ``linear.*``             dropped (ImageNet classifier)
``*.num_batches_tracked``                    dropped
==========================================  ============================================

The output is a pickle ``{"model": {name: numpy array}, "__author__": "STDC-Seg",
"matching_heuristics": True}``; Detectron2's checkpointer matches the names to ``backbone.*``.
STDC was trained on RGB images normalised with ImageNet statistics, which PEM's configs use::

    MODEL.WEIGHTS stdc1.pkl MODEL.BACKBONE.NAME D2STDCnet MODEL.STDC.LAYERS "[2, 2, 2]"

(``[4, 5, 3]`` for STDC2; the tool logs which one it found).

Usage:
    python tools/convert_stdc_to_d2.py STDCNet813M_73.91.tar stdc1.pkl
"""
import argparse
import logging
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np

from mask2former_d2.weight_conversion import load_checkpoint, to_numpy, unwrap_state_dict, write_d2_weights

__all__ = ["convert_file", "convert_stdc_state_dict", "main"]

logger = logging.getLogger(__name__)

_STAGE = re.compile(r"^x(?:2|4|8|16|32)\.0\.(\d+)\.(.+)$")
_CLASSIFIER = re.compile(r"^(fc|bn|linear)\.")
# Blocks per stage -> model name (the first two `features` entries are the stride-2 stems).
_VARIANTS = {(2, 2, 2): "STDC1", (4, 5, 3): "STDC2"}


def convert_stdc_state_dict(state_dict: Mapping[str, Any], conv_last: bool = False) -> Dict[str, np.ndarray]:
    """Keeps the backbone entries of an STDC-Seg ImageNet state dict under ``D2STDCnet``'s names.

    Args:
        state_dict: tensors (or arrays) of STDC-Seg's ImageNet model, possibly wrapped as
            ``{"state_dict": ...}`` and with a ``module.`` prefix.
        conv_last: keep ``conv_last.*`` (for ``MODEL.STDC.USE_CONV_LAST True``).

    Returns:
        ``{name: numpy array}`` of ``features.*`` (and ``conv_last.*``).

    Raises:
        ValueError: when there are no ``features.*`` entries (not an STDC checkpoint), or a stage
            name holds a tensor different from its ``features`` twin.
    """
    sd = {re.sub(r"^module\.", "", k): v for k, v in unwrap_state_dict(state_dict).items()}
    out: Dict[str, np.ndarray] = {}
    stage_names: Dict[str, Any] = {}
    ignored = []
    for name, value in sd.items():
        if name.endswith("num_batches_tracked") or _CLASSIFIER.match(name):
            continue
        m = _STAGE.match(name)
        if m:
            stage_names[f"features.{m[1]}.{m[2]}"] = value
        elif name.startswith("features.") or (conv_last and name.startswith("conv_last.")):
            out[name] = to_numpy(value)
        elif not name.startswith("conv_last."):
            ignored.append(name)
    if not out and not stage_names:
        raise ValueError(
            f"not an STDC checkpoint: no features.* entries (first keys: {', '.join(list(sd)[:5])})"
        )
    for name, value in stage_names.items():
        value = to_numpy(value)
        if name not in out:
            out[name] = value
        elif not np.array_equal(out[name], value):
            raise ValueError(f"{name} and its stage-name twin hold different tensors")
    if ignored:
        logger.warning("Ignored %d unrecognised keys: %s", len(ignored), ", ".join(ignored[:10]))
    return out


def stage_blocks(weights: Mapping[str, np.ndarray]) -> Optional[tuple]:
    """Blocks per stage (e.g. (2, 2, 2)) from the widths of the converted ``features``, or None."""
    first = {}
    for name, value in weights.items():
        m = re.match(r"^features\.(\d+)\.conv_list\.0\.conv\.weight$", name)
        if m:
            first[int(m[1])] = value.shape[0] * 2  # the first conv has half the block's width
    if not first:
        return None
    widths = [first[i] for i in sorted(first)]
    return tuple(widths.count(w) for w in sorted(set(widths)))


def convert_file(input_path: str, output_path: str, allow_pickle: bool = False,
                 conv_last: bool = False) -> Dict[str, Any]:
    """Reads an STDC-Seg ImageNet checkpoint and writes the Detectron2 pickle; returns it."""
    weights = convert_stdc_state_dict(load_checkpoint(input_path, allow_pickle=allow_pickle), conv_last)
    result = write_d2_weights(weights, output_path, author="STDC-Seg")
    blocks = stage_blocks(weights)
    variant = _VARIANTS.get(blocks, f"an STDC with {blocks} blocks per stage")
    logger.info(
        "%s: use it with MODEL.WEIGHTS %s MODEL.BACKBONE.NAME D2STDCnet MODEL.STDC.LAYERS \"%s\"%s",
        variant, output_path, list(blocks or ()), " MODEL.STDC.USE_CONV_LAST True" if conv_last else "",
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="STDC-Seg ImageNet checkpoint (STDCNet813M_73.91.tar, STDCNet1446_76.47.tar)")
    parser.add_argument("output", help="Detectron2 weight file to write (.pkl)")
    parser.add_argument("--conv-last", action="store_true", help="keep conv_last.* (MODEL.STDC.USE_CONV_LAST True)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle arbitrary objects in the input (only for trusted files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert_file(args.input, args.output, allow_pickle=args.allow_pickle, conv_last=args.conv_last)


if __name__ == "__main__":
    main()
