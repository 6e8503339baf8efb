#!/usr/bin/env python
"""Describes a weight file and, given a config, tells whether and how it loads into that model.

Without a config it prints what the file holds: its format, the number of tensors and values, the
dtypes, the top-level name prefixes and whether PyTorch's per-module version metadata is present.

With ``--config-file`` (and optional ``KEY VALUE`` overrides) it builds the model on the CPU and
loads the file with :class:`mask2former_d2.checkpoint.MaskFormerCheckpointer`, exactly as
training and evaluation do (same file reading, name matching and compatibility rules). It then
lists, grouped by prefix, the model keys the checkpoint lacks, the checkpoint keys the model does
not have and the shape mismatches, explains the usual causes, and ends with one verdict line:

* ``loads fully``;
* ``loads for fine-tuning ...``: only the class-dependent weights differ (another NUM_CLASSES);
* ``loads as backbone initialisation``: a backbone-only (e.g. ImageNet) checkpoint;
* ``loads partially ...``: accepted by the checkpointer, but some weights stay at their
  initial values or are ignored (e.g. another backbone depth or norm);
* ``does not fit: ...``: the checkpointer refuses it, or nothing matches.

``.pkl`` files are unpickled like Detectron2 does, so only inspect files you trust.

Usage:
    python tools/inspect_checkpoint.py model_final.pkl
    python tools/inspect_checkpoint.py R-50.pkl \
        --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml
    python tools/inspect_checkpoint.py output/model_final.pth --config-file X.yaml \
        MODEL.SEM_SEG_HEAD.NUM_CLASSES 5
"""

import argparse
import contextlib
import logging
import os
import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from mask2former_d2.checkpoint import classification_checkpoint, unreadable_reason

__all__ = [
    "CheckpointReadError",
    "LoadReport",
    "check_against_model",
    "format_load_report",
    "format_summary",
    "inspect_file",
    "main",
    "read_checkpoint",
    "summarize",
]

# Names of buffers (not parameters) found in MaskFormer and backbone checkpoints.
_BUFFER_SUFFIXES = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "relative_position_index",
    "attn_mask",
    "empty_weight",
    "pixel_mean",
    "pixel_std",
)
_BN_STATISTICS = ("running_mean", "running_var")


class CheckpointReadError(Exception):
    """The file is missing or cannot be read as a checkpoint."""


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Reads a weight file the way Detectron2's checkpointer does.

    Args:
        path: ``.pkl`` (pickled, Detectron2 model zoo or Caffe2 layout) or any file written by
            ``torch.save`` (read with ``weights_only=True``, as ``torch.load`` does by default).

    Returns:
        The file's top-level object, which must be a dict.

    Raises:
        CheckpointReadError: with a one-line reason.
    """
    if not os.path.isfile(path):
        raise CheckpointReadError(f"{path}: no such file")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and torch.load raise many types (even KeyError) for a bad file
        reason = unreadable_reason(path, e)
        raise CheckpointReadError(f"{path}: not a readable checkpoint ({reason})") from e
    if not isinstance(data, Mapping):
        raise CheckpointReadError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


def _split(data: Mapping[str, Any]) -> Tuple[Mapping[str, Any], str, Dict[str, Any]]:
    """(state dict, layout description, other top-level entries)."""
    if isinstance(data.get("model"), Mapping):
        author = data.get("__author__")
        layout = 'Detectron2 {"model": ...}' + (f" from {author!r}" if author else "")
        if data.get("matching_heuristics"):
            layout += ", name matching by suffix"
        return data["model"], layout, {k: v for k, v in data.items() if k != "model"}
    if isinstance(data.get("state_dict"), Mapping):
        rest = {k: v for k, v in data.items() if k != "state_dict"}
        return data["state_dict"], '{"state_dict": ...} (not a Detectron2 layout)', rest
    if isinstance(data.get("blobs"), Mapping):
        rest = {k: v for k, v in data.items() if k != "blobs"}
        return data["blobs"], "Caffe2/Detectron1 blobs (names converted on load)", rest
    return data, "plain state dict", {}


def _group(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "module" and len(parts) > 1:  # DistributedDataParallel prefix
        parts = parts[1:]
    depth = 2 if parts[0] == "sem_seg_head" and len(parts) > 2 else 1
    return ".".join(parts[:depth])


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _dtype_name(value: Any) -> str:
    return str(value.dtype).replace("torch.", "")


def summarize(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Counts what a state dict holds.

    Returns:
        ``{"tensors", "values", "parameters", "dtypes": Counter, "prefixes": {prefix:
        (tensors, values)}, "non_tensors": [names], "metadata": number of modules with version
        metadata or None}``. ``parameters`` leaves out the values of known buffers
        (BatchNorm statistics, index tables, ``empty_weight``, ...).
    """
    arrays = {k: v for k, v in state_dict.items() if _is_array(v)}
    prefixes: Dict[str, List[int]] = {}
    for name, value in arrays.items():
        count = prefixes.setdefault(_group(name), [0, 0])
        count[0] += 1
        count[1] += int(value.size if isinstance(value, np.ndarray) else value.numel())
    values = {k: int(v.size if isinstance(v, np.ndarray) else v.numel()) for k, v in arrays.items()}
    metadata = getattr(state_dict, "_metadata", None)
    return {
        "tensors": len(arrays),
        "values": sum(values.values()),
        "parameters": sum(n for k, n in values.items() if not k.endswith(_BUFFER_SUFFIXES)),
        "dtypes": Counter(_dtype_name(v) for v in arrays.values()),
        "prefixes": {k: tuple(v) for k, v in prefixes.items()},
        "non_tensors": sorted(k for k in state_dict if k not in arrays),
        "metadata": len(metadata) if metadata is not None else None,
    }


def format_summary(path: str, data: Mapping[str, Any]) -> List[str]:
    """The file description printed without a config."""
    state_dict, layout, extras = _split(data)
    info = summarize(state_dict)
    lines = [f"checkpoint: {path}", f"  format: {layout}"]
    classifier = classification_checkpoint(state_dict, path)
    if classifier:
        lines.append(f"  note: {classifier}")
    if path.endswith(".pkl") and "__author__" not in data:
        lines.append(
            "  note: a .pkl without '__author__' is read by Detectron2 as a Caffe2/Detectron1 "
            "file (its names are converted on load)"
        )
    lines.append(
        f"  tensors: {info['tensors']}  values: {info['values']}  "
        f"parameters (without known buffers): {info['parameters']}"
    )
    dtypes = ", ".join(f"{d} x{n}" for d, n in info["dtypes"].most_common())
    lines.append(f"  dtypes: {dtypes or 'none'}")
    if info["non_tensors"]:
        lines.append(f"  non-tensor entries: {', '.join(info['non_tensors'][:5])}")
    shown = [f"{k}={v}" if isinstance(v, (int, float, str, bool)) else k for k, v in extras.items()]
    if shown:
        lines.append(f"  other entries: {', '.join(shown)}")
    if info["metadata"] is None:
        lines.append(
            "  module version metadata: absent (modules load as their oldest state-dict version, "
            "e.g. BatchNorm fills in num_batches_tracked)"
        )
    else:
        lines.append(f"  module version metadata: present ({info['metadata']} modules)")
    lines.append("  prefixes:")
    width = max([len(p) for p in info["prefixes"]] + [0])
    for prefix, (tensors, values) in sorted(info["prefixes"].items()):
        lines.append(f"    {prefix.ljust(width)}  {tensors:6d} tensors  {values:12d} values")
    return lines


@dataclass
class LoadReport:
    """How a checkpoint loads into a model, as :class:`MaskFormerCheckpointer` sees it."""

    model_keys: int
    loaded: int
    missing: List[str] = field(default_factory=list)  # model keys left at initialisation
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys the model ignores
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    class_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    has_head: bool = False
    error: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    verdict: str = ""


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    # The checkpointer logs the same findings as warnings; the report replaces them.
    if enabled:
        logging.disable(logging.ERROR)
    try:
        yield
    finally:
        if enabled:
            logging.disable(logging.NOTSET)


def check_against_model(
    path: str, model: nn.Module, data: Optional[Mapping[str, Any]] = None, quiet: bool = True
) -> LoadReport:
    """Loads ``path`` into ``model`` with :class:`MaskFormerCheckpointer` and explains the result.

    Args:
        path: the weight file.
        model: a built MaskFormer (its weights are overwritten).
        data: the file's content if already read (:func:`read_checkpoint`); only its key names
            are used, the checkpointer reads the file itself.
        quiet: silence the checkpointer's own logging.

    Returns:
        The :class:`LoadReport`, with notes and a verdict.
    """
    from mask2former_d2.checkpoint import (  # the checkpointer's own rules
        CLASS_DEPENDENT,
        HEAD_PREFIXES,
        MaskFormerCheckpointer,
    )

    ckpt_state, _, _ = _split(read_checkpoint(path) if data is None else data)
    checkpointer = MaskFormerCheckpointer(model)
    error = None
    with _quiet(quiet):
        try:
            checkpointer.load(path, checkpointables=[])
        except ValueError as e:  # refused by the checkpointer (or ambiguous name matching)
            error = str(e)
    incompatible = getattr(checkpointer, "last_incompatible", None)
    model_keys = list(model.state_dict())
    report = LoadReport(model_keys=len(model_keys), loaded=0, error=error)
    report.has_head = any(_group(k).startswith("sem_seg_head") for k in ckpt_state)
    if incompatible is None:
        report.verdict = f"does not fit: {error}"
        return report

    for key, in_ckpt, in_model in incompatible.incorrect_shapes:
        class_dependent = any(p in key for p in CLASS_DEPENDENT)
        target = report.class_shapes if class_dependent else report.shapes
        target.append((key, tuple(in_ckpt), tuple(in_model)))
    skipped = {k for k, _, _ in incompatible.incorrect_shapes}
    report.missing = [k for k in incompatible.missing_keys if k not in skipped]
    report.unexpected = list(incompatible.unexpected_keys)
    report.loaded = len(set(model_keys) - set(incompatible.missing_keys))
    _explain(report, HEAD_PREFIXES)
    return report


def _explain(report: LoadReport, head_prefixes: Tuple[str, ...]) -> None:
    """Fills ``notes`` and ``verdict``."""
    counters = [k for k in report.missing if k.endswith("num_batches_tracked")]
    missing = [k for k in report.missing if k not in counters]
    missing_head = [k for k in missing if k.startswith(head_prefixes)]
    missing_other = [k for k in missing if not k.startswith(head_prefixes)]
    bn_stats = [k for k in report.unexpected if k.endswith(_BN_STATISTICS)]
    notes = report.notes
    if missing_head and not report.has_head:
        notes.append(
            "backbone-only checkpoint: head keys missing is expected "
            "(sem_seg_head.* and criterion.* start from their initialisation)"
        )
    if report.class_shapes:
        notes.append(
            "different NUM_CLASSES: class_embed/empty_weight shapes differ "
            f"(checkpoint: {_num_classes(report.class_shapes, 1)} classes, "
            f"model: {_num_classes(report.class_shapes, 2)}); they are re-initialised, as for "
            "fine-tuning on another dataset"
        )
    if counters:
        notes.append(
            f"{len(counters)} BatchNorm step counters (num_batches_tracked) are not in the "
            "checkpoint: harmless, they are unused by frozen or eval-mode BatchNorm"
        )
    if bn_stats:
        notes.append(
            f"{len(bn_stats)} BatchNorm statistics (running_mean/var) have no place in the model: "
            "its norm layers keep none (e.g. MODEL.RESNETS.NORM 'GN'); use 'FrozenBN' to use them"
        )
    if missing_other and report.loaded:
        notes.append(
            f"{len(missing_other)} model keys outside the head are not in the checkpoint: check "
            "the backbone settings (MODEL.BACKBONE.NAME, MODEL.RESNETS.DEPTH/NORM, MODEL.SWIN.*)"
        )

    if report.error:
        report.verdict = f"does not fit: {report.error}"
    elif report.loaded == 0:
        report.verdict = (
            "does not fit: no checkpoint key matches a model key (checkpoint prefixes: "
            f"{', '.join(sorted({_group(k) for k in report.unexpected})[:6])})"
        )
    elif missing_other or report.unexpected or (missing_head and report.has_head):
        parts = []
        if missing_other:
            parts.append(f"{len(missing_other)} backbone keys stay at their initialisation")
        if missing_head and report.has_head:
            parts.append(f"{len(missing_head)} head keys stay at their initialisation")
        if report.unexpected:
            parts.append(f"{len(report.unexpected)} checkpoint keys are ignored")
        kind = "" if report.has_head else " as backbone initialisation"
        report.verdict = f"loads partially{kind}: " + ", ".join(parts)
    elif missing_head:
        report.verdict = "loads as backbone initialisation"
    elif report.class_shapes:
        report.verdict = (
            "loads for fine-tuning: everything except the class-dependent weights "
            f"({', '.join(k for k, _, _ in report.class_shapes)})"
        )
    else:
        report.verdict = "loads fully"


def _num_classes(shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]], which: int) -> str:
    # class_embed rows and empty_weight entries are K + 1 (the last one is "no object").
    for entry in shapes:
        if entry[which]:
            return str(entry[which][0] - 1)
    return "?"


def _grouped(keys: Sequence[str], examples: int = 3) -> List[str]:
    groups: Dict[str, List[str]] = {}
    for key in keys:
        groups.setdefault(_group(key), []).append(key)
    width = max([len(g) for g in groups] + [0])
    lines = []
    for prefix, members in sorted(groups.items()):
        more = f" (+{len(members) - examples} more)" if len(members) > examples else ""
        lines.append(
            f"    {prefix.ljust(width)}  {len(members):5d}  {', '.join(members[:examples])}{more}"
        )
    return lines


def format_load_report(report: LoadReport) -> List[str]:
    """The part printed with a config, ending with the verdict line."""
    lines = [f"  model: {report.model_keys} keys, {report.loaded} loaded from the checkpoint"]
    if report.missing:
        lines.append(f"  in the model, not in the checkpoint: {len(report.missing)}")
        lines += _grouped(report.missing)
    if report.unexpected:
        lines.append(f"  in the checkpoint, not in the model: {len(report.unexpected)}")
        lines += _grouped(report.unexpected)
    mismatches = report.shapes + report.class_shapes
    if mismatches:
        lines.append(f"  shape mismatches (checkpoint vs model): {len(mismatches)}")
        lines += [f"    {k}: {a} vs {b}" for k, a, b in mismatches[:10]]
        if len(mismatches) > 10:
            lines.append(f"    (+{len(mismatches) - 10} more)")
    lines += [f"  note: {n}" for n in report.notes]
    lines.append(f"verdict: {report.verdict}")
    return lines


def inspect_file(
    path: str,
    model: Optional[nn.Module] = None,
    data: Optional[Mapping[str, Any]] = None,
    quiet: bool = True,
) -> Tuple[str, Optional[LoadReport]]:
    """Describes ``path`` and, with a model, how it loads.

    Args:
        path: the weight file.
        model: a built MaskFormer to check the file against (its weights are overwritten).
        data: the file's content if already read.
        quiet: silence the checkpointer's own logging.

    Returns:
        The printable text and the :class:`LoadReport` (None without a model).

    Raises:
        CheckpointReadError: the file is missing or unreadable.
    """
    data = read_checkpoint(path) if data is None else data
    lines = format_summary(path, data)
    report = None
    if model is not None:
        report = check_against_model(path, model, data=data, quiet=quiet)
        lines += format_load_report(report)
    return "\n".join(lines), report


def _build_model(config_file: str, opts: Sequence[str]) -> nn.Module:
    from detectron2.modeling import build_model

    from mask2former_d2 import get_maskformer_cfg

    cfg = get_maskformer_cfg(config_file, opts)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return build_model(cfg).eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="weight file (.pkl or .pth)")
    parser.add_argument(
        "--config-file", default="", metavar="FILE", help="model config to check against"
    )
    parser.add_argument("--verbose", action="store_true", help="keep the checkpointer's own log")
    parser.add_argument("opts", nargs="*", help="config overrides: KEY VALUE ... (may follow --opts)")
    from mask2former_d2.engine.launch import overrides_without_opts

    args = parser.parse_intermixed_args(overrides_without_opts(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.opts and not args.config_file:
        parser.error("config overrides need --config-file")

    try:
        data = read_checkpoint(args.checkpoint)  # fail early, before building a model
        model = None
        if args.config_file:
            try:
                model = _build_model(args.config_file, args.opts)
            except KeyError as e:  # unknown config key, named with suggestions
                raise CheckpointReadError(e.args[0] if e.args else str(e)) from e
            except (FileNotFoundError, ValueError) as e:
                raise CheckpointReadError(str(e)) from e
        text, _ = inspect_file(args.checkpoint, model, data=data, quiet=not args.verbose)
    except CheckpointReadError as e:
        print(f"inspect_checkpoint: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
