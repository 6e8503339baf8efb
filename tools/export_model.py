#!/usr/bin/env python
"""Exports a MaskFormer / Mask2Former network to ONNX or to a torch.export program (.pt2).

The exported graph takes one input ``image``: float32 (B, 3, H, W) in the config's
``INPUT.FORMAT`` channel order and 0-255 range, H and W multiples of 32 (the caller pads:
with the pixel mean, which normalises to the zeros the model pads with). It returns
``pred_logits`` (B, Q, K+1) and ``pred_masks`` (B, Q, H/4, W/4): normalisation, backbone, pixel
decoder and transformer decoder. The post-processing to semantic / panoptic / instance outputs
stays in Python (``Predictor(cfg, backend="onnxruntime", model_file=...)``,
``demo/demo.py --onnx FILE``).

With ``--dynamic`` one file takes any height and width that are multiples of 32; without it,
only the size of the sample image. With ``--dynamic-batch`` it takes any batch size (else 1).
After exporting, the file is run on the sample image and compared with the PyTorch model; the
deviation, the export time and the file size are printed.

Usage:
    python tools/export_model.py \
        --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml \
        --format onnx --output model.onnx --dynamic --sample-image input.jpg \
        MODEL.WEIGHTS model_final.pkl
"""

import argparse
import json
import logging
import os
import time
from typing import Optional, Sequence

import torch

FORMATS = ("onnx", "torch_export")
EXTENSIONS = {"onnx": ".onnx", "torch_export": ".pt2"}


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Config overrides (KEY VALUE ...) come last, as for train_net.py.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="model config")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx or .pt2 file to write")
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="any height/width multiple of 32 (default: the sample's size only)",
    )
    parser.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: 1); not for Swin backbones"
    )
    parser.add_argument(
        "--sample-image",
        metavar="IMG",
        help="image traced and checked (resized as Predictor does, padded to 32); default: a random "
        "INPUT.MIN_SIZE_TEST x INPUT.MIN_SIZE_TEST image",
    )
    parser.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default: %(default)s = the exporter's, >= 17)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config overrides: KEY VALUE ... (may follow --opts, as in the demos)")
    from mask2former_d2.engine.launch import overrides_without_opts

    args = parser.parse_args(overrides_without_opts(argv))
    if not args.output.endswith(EXTENSIONS[args.format]):
        parser.error(f"--output {args.output}: a --format {args.format} file must end in {EXTENSIONS[args.format]}")
    if len(args.opts) % 2:
        parser.error(f"config overrides need KEY VALUE pairs; got an odd number: {args.opts}")
    return args


def _sample(predictor, path: Optional[str], cfg) -> torch.Tensor:
    """(1, 3, H, W) image for tracing: resized as the predictor does, padded with the pixel mean
    to the size the model pads to (a multiple of 32)."""
    from detectron2.data.detection_utils import read_image

    from mask2former_d2.export.onnx_runtime import padded_size
    from mask2former_d2.export.wrapper import EXPORT_DIVISIBILITY

    model = predictor.model
    if path is None:
        side = cfg.INPUT.MIN_SIZE_TEST or 512
        generator = torch.Generator().manual_seed(0)
        image = torch.randint(0, 256, (3, side, side), generator=generator).float()
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--sample-image {path}: no such file")
        try:
            bgr = read_image(path, format="BGR")
        except OSError as e:
            raise ValueError(f"--sample-image {path}: cannot read the image ({e})") from None
        image = predictor.preprocess(bgr)["image"]
    h, w = padded_size(*image.shape[-2:], model.size_divisibility, EXPORT_DIVISIBILITY)
    batch = model.pixel_mean.expand(1, -1, h, w).clone()
    batch[0, :, : image.shape[1], : image.shape[2]] = image
    return batch


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mask2former_d2.config import get_cpu_tool_cfg
    from mask2former_d2.export import ExportableMaskFormer, check_exportable
    from mask2former_d2.export.exporter import export_metadata, export_onnx, export_program, trace
    from mask2former_d2.predictor import Predictor

    cfg = get_cpu_tool_cfg(args.config_file, args.opts)
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise ValueError(f"--format onnx needs the export extra (pip install .[export]): {e}") from None
    predictor = Predictor(cfg)
    model = predictor.model
    check_exportable(model)
    image = _sample(predictor, args.sample_image, cfg)

    start = time.perf_counter()
    program = trace(model, image, dynamic=args.dynamic, dynamic_batch=args.dynamic_batch)
    metadata = export_metadata(model, cfg, tuple(image.shape), args.dynamic, args.dynamic_batch)
    if args.format == "torch_export":
        export_program(program, args.output, metadata)
    else:
        options = {} if args.opset is None else {"opset": args.opset}
        export_onnx(program, args.output, metadata, **options)
    seconds = time.perf_counter() - start

    with torch.no_grad():
        expected = ExportableMaskFormer(model)(image)
        if args.format == "torch_export":
            got = torch.export.load(args.output).module()(image)
        else:
            from mask2former_d2.export.onnx_runtime import OnnxRuntimeNetwork

            got = OnnxRuntimeNetwork(args.output)(image)
    deviation = {
        name: float((g - e).abs().max() / max(float(e.max() - e.min()), 1e-12))
        for name, g, e in zip(("pred_logits", "pred_masks"), got, expected)
    }
    report = {
        "output": args.output,
        "format": args.format,
        "dynamic": args.dynamic,
        "dynamic_batch": args.dynamic_batch,
        "sample_shape": list(image.shape),
        "export_seconds": round(seconds, 1),
        "file_mib": round(os.path.getsize(args.output) / 2**20, 1),
        "max_abs_deviation_relative_to_range": deviation,
    }
    print(json.dumps(report))
    return 0


def cli(argv: Optional[Sequence[str]] = None) -> None:
    """Runs :func:`main`; a bad file, key or value becomes one line on stderr and exit status 1."""
    from mask2former_d2.engine.launch import run_cli

    run_cli(main, argv, "export_model", (ValueError, FileNotFoundError))


if __name__ == "__main__":
    cli()
