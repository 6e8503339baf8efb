#!/usr/bin/env python
"""Counts the parameters, FLOPs and activations of a MaskFormer/Mask2Former model from its config.

The model is built on the CPU without loading weights. FLOPs and activations are measured with
fvcore (``FlopCountAnalysis``, ``ActivationCountAnalysis``; one fused multiply-add counts as one
FLOP, element-wise operations are not counted) for one random image of ``--size H W``,
normalised and zero-padded to the model's size divisibility as in inference. Only the network is
traced: backbone, pixel decoder and transformer decoder, including the auxiliary predictions of
every decoder layer; the post-processing to semantic/panoptic/instance outputs is not counted.

Two operators fvcore does not know are counted like the matrix products they replace:
``scaled_dot_product_attention`` (the attention's two products, as ``bmm`` would be counted) and
``embedding_bag`` with per-sample weights (the weighted sum of the sampled values in the pure
PyTorch multi-scale deformable attention).

Usage:
    python tools/analyze_model.py \
        --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml
    python tools/analyze_model.py --config-file X.yaml --tasks parameter flop --size 800 1216 \
        MODEL.MASK_FORMER.NUM_OBJECT_QUERIES 200
"""

import argparse
import logging
import sys
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["HeadlessMaskFormer", "analyze", "format_report", "main", "module_rows"]

TASKS = ("parameter", "flop", "activation")


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _sdpa_shapes(inputs: List[Any]) -> Tuple[List[int], List[int], List[int]]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(inputs[0]), get_shape(inputs[1]), get_shape(inputs[2])


def _sdpa_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """q (..., L, E), k (..., S, E), v (..., S, Ev): q @ k^T then softmax(.) @ v."""
    q, k, v = _sdpa_shapes(inputs)
    rows = _prod(q[:-1])  # batch * heads * L
    return rows * k[-2] * q[-1] + rows * k[-2] * v[-1]


def _sdpa_activation(inputs: List[Any], outputs: List[Any]) -> int:
    """The (..., L, S) attention logits and the (..., L, Ev) output, as two ``bmm`` would give."""
    q, k, v = _sdpa_shapes(inputs)
    rows = _prod(q[:-1])
    return rows * k[-2] + rows * v[-1]


def _embedding_bag_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """table (R, D), indices (N, n): each output row is a weighted sum of n table rows."""
    from fvcore.nn.jit_handles import get_shape

    table, indices = get_shape(inputs[0]), get_shape(inputs[1])
    return _prod(indices) * table[-1]


FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_flop,
    "aten::embedding_bag": _embedding_bag_flop,
}
ACTIVATION_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_activation}


class HeadlessMaskFormer(nn.Module):
    """The traced part of a MaskFormer: backbone + segmentation head, without pre/post-processing.

    Shares (does not copy) the modules of the model it wraps, so ``by_module`` names such as
    ``backbone`` and ``sem_seg_head.predictor`` are the model's own.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        """
        Args:
            images: (B, 3, Hp, Wp) normalised, padded images.

        Returns:
            ``pred_logits`` and ``pred_masks`` of the final prediction and of every auxiliary
            prediction, flattened into a tuple (tracing needs tensors).
        """
        outputs = self.sem_seg_head(self.backbone(images))
        flat = [outputs["pred_logits"], outputs["pred_masks"]]
        for aux in outputs.get("aux_outputs") or []:
            flat += [aux["pred_logits"], aux["pred_masks"]]
        return tuple(flat)


def module_rows(model: nn.Module) -> List[str]:
    """The rows of the report: the model's top-level modules, with the segmentation head split
    into its own children (``sem_seg_head.pixel_decoder``, ``sem_seg_head.predictor``)."""
    rows = []
    for name, child in model.named_children():
        if name == "sem_seg_head":
            rows += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            rows.append(name)
    return rows


def _parameter_counts(model: nn.Module, rows: List[str]) -> Dict[str, Dict[str, int]]:
    counts = {row: {"parameters": 0, "trainable": 0} for row in rows + ["total"]}
    for name, p in model.named_parameters():
        row = next((r for r in rows if name.startswith(r + ".")), None)
        for key in ([row] if row else []) + ["total"]:
            counts[key]["parameters"] += p.numel()
            counts[key]["trainable"] += p.numel() if p.requires_grad else 0
    return counts


def _example_input(model: nn.Module, height: int, width: int, seed: int = 0) -> Tensor:
    from detectron2.structures import ImageList

    generator = torch.Generator().manual_seed(seed)
    channels = model.pixel_mean.shape[0]
    image = torch.randint(0, 256, (channels, height, width), generator=generator).float()
    image = (image - model.pixel_mean) / model.pixel_std
    return ImageList.from_tensors([image], model.size_divisibility).tensor


def analyze(
    model: nn.Module, tasks: Sequence[str] = TASKS, size: Tuple[int, int] = (512, 512)
) -> Dict[str, Any]:
    """Measures a built MaskFormer.

    Args:
        model: a :class:`MaskFormer` (in eval mode for FLOPs/activations).
        tasks: any of ``"parameter"``, ``"flop"``, ``"activation"``.
        size: (H, W) of the random input image before padding.

    Returns:
        ``{"rows": [...], "input_shape": (1, 3, Hp, Wp), "parameter": {row: {"parameters",
        "trainable"}}, "flop": {row: int}, "flop_by_operator": {op: int}, "activation": {row:
        int}, "activation_by_operator": {op: int}, "uncounted_ops": {op: count}}`` for the
        requested tasks; each per-row dict also has ``"total"``.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    rows = module_rows(model)
    result: Dict[str, Any] = {"rows": rows}
    if "parameter" in tasks:
        result["parameter"] = _parameter_counts(model, rows)
    traced = [t for t in ("flop", "activation") if t in tasks]
    if not traced:
        return result

    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis

    images = _example_input(model, *size)
    result["input_shape"] = tuple(images.shape)
    wrapper = HeadlessMaskFormer(model).eval()
    uncounted: Counter = Counter()
    for task in traced:
        if task == "flop":
            analysis = FlopCountAnalysis(wrapper, (images,)).set_op_handle(**FLOP_HANDLES)
        else:
            analysis = ActivationCountAnalysis(wrapper, (images,)).set_op_handle(
                **ACTIVATION_HANDLES
            )
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
            by_module = analysis.by_module()
        counts = {row: int(by_module.get(row, 0)) for row in rows}
        # MaskFormerHead runs the pixel decoder through forward_features(), not __call__, so
        # fvcore files the decoder's own operators (those outside its sub-modules) under
        # sem_seg_head; the head itself only dispatches, so they go back to the pixel decoder.
        head_rows = [r for r in rows if r.startswith("sem_seg_head.")]
        if "sem_seg_head.pixel_decoder" in counts:
            residual = int(by_module.get("sem_seg_head", 0)) - sum(counts[r] for r in head_rows)
            counts["sem_seg_head.pixel_decoder"] += residual
        counts["total"] = int(analysis.total())
        result[task] = counts
        result[f"{task}_by_operator"] = {k: int(v) for k, v in analysis.by_operator().items()}
        if task == "flop":
            uncounted.update(analysis.unsupported_ops())
    if uncounted:
        result["uncounted_ops"] = dict(uncounted)
    return result


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_report(result: Dict[str, Any]) -> str:
    """Renders :func:`analyze`'s result as a table, exact counts with a readable form."""
    columns = []
    if "parameter" in result:
        columns += [
            ("parameters", lambda r: result["parameter"][r]["parameters"]),
            ("trainable", lambda r: result["parameter"][r]["trainable"]),
        ]
    if "flop" in result:
        columns.append(("FLOPs", lambda r: result["flop"][r]))
    if "activation" in result:
        columns.append(("activations", lambda r: result["activation"][r]))
    # Rows with nothing to report (the criterion: only a buffer) are left out.
    rows = [r for r in result["rows"] if any(get(r) for _, get in columns)] + ["total"]
    cells = [[f"{get(r)} ({_human(get(r))})" for _, get in columns] for r in rows]
    name_w = max(len(r) for r in rows + ["module"])
    widths = [
        max([len(title)] + [len(c[i]) for c in cells]) for i, (title, _) in enumerate(columns)
    ]
    lines = []
    if "input_shape" in result:
        lines.append(f"input: {result['input_shape']} (normalised, padded; no post-processing)")
    header = "module".ljust(name_w) + "".join(
        "  " + title.rjust(w) for (title, _), w in zip(columns, widths)
    )
    lines += [header, "-" * len(header)]
    for r, row_cells in zip(rows, cells):
        if r == "total":
            lines.append("-" * len(header))
        lines.append(
            r.ljust(name_w) + "".join("  " + c.rjust(w) for c, w in zip(row_cells, widths))
        )
    for task, label in (("flop", "FLOPs"), ("activation", "activations")):
        by_op = result.get(f"{task}_by_operator")
        if by_op:
            parts = ", ".join(
                f"{op} {_human(n)}" for op, n in sorted(by_op.items(), key=lambda kv: -kv[1])
            )
            lines.append(f"{label} by operator: {parts}")
    if result.get("uncounted_ops"):
        ops = sorted(result["uncounted_ops"].items(), key=lambda kv: -kv[1])
        lines.append(
            "not counted (element-wise and other operators fvcore ignores): "
            + ", ".join(f"{op.replace('aten::', '')} x{n}" for op, n in ops)
        )
    return "\n".join(lines)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Config overrides (KEY VALUE ...) come last, as for train_net.py.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        metavar="TASK",
        help=f"what to measure, any of {', '.join(TASKS)} (default: all)",
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input image size (default: INPUT.MIN_SIZE_TEST x INPUT.MIN_SIZE_TEST)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)
    # "--tasks flop MODEL.X 1": config keys (which contain dots) after the tasks are overrides.
    first_key = next((i for i, t in enumerate(args.tasks) if "." in t), len(args.tasks))
    args.opts = args.tasks[first_key:] + list(args.opts)
    args.tasks = args.tasks[:first_key]
    bad = [t for t in args.tasks if t not in TASKS]
    if bad or not args.tasks:
        parser.error(f"--tasks: invalid choice(s) {bad}; choose from {', '.join(TASKS)}")
    if args.size is not None and min(args.size) <= 0:
        parser.error(f"--size must be positive, got {args.size}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from detectron2.modeling import build_model

    from mask2former_d2.config import get_cpu_tool_cfg

    try:
        cfg = get_cpu_tool_cfg(args.config_file, args.opts, WEIGHTS="")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"analyze_model: {e}")
    size = tuple(args.size) if args.size else (cfg.INPUT.MIN_SIZE_TEST,) * 2
    model = build_model(cfg).eval()
    result = analyze(model, args.tasks, size)
    print(
        f"config: {args.config_file}"
        + (f" with {' '.join(map(str, args.opts))}" if args.opts else "")
    )
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
