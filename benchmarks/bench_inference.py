"""Inference speed and memory of a Mask2Former model, stage by stage.

Default: the R50 COCO panoptic Mask2Former (semantic + instance + panoptic outputs), one
800x1333 image, 2 CPU threads, random weights, one row per inference precision
(``--precisions fp32,bf16,fp16``, MODEL.MASK_FORMER.TEST.PRECISION); a precision the device
has no units for is reported as not available (``--emulate`` measures its deviation from fp32
anyway, through ``emulate_low_precision``, with meaningless timings). Timings do not depend on the values,
except post-processing through the number of kept queries: the class head is set so that every
query is a confident thing, all kept by panoptic and used by instance inference (the slowest
case). Each setting runs in its own subprocess, so that peak RSS is that of one model.

Prints a table: seconds per image for backbone, pixel decoder, transformer decoder,
post-processing and total, each the fastest of --repeat runs after a warm-up (on a shared
machine noise only adds time); peak RSS; parameters and GFLOPs (fvcore); the time ratio of each
precision to fp32 and the deviation of its outputs from fp32 (semantic argmax agreement,
panoptic pixel agreement and segment counts, instance mask IoU in matched order; see
``mask2former_d2.evaluation.agreement.output_agreement``). With a GPU, the same rows on it.

    python benchmarks/bench_inference.py [--config FILE] [--size 800 1333] [--threads 2]
        [--repeat 5] [--precisions fp32,bf16] [--emulate] [--rounds 3 --save-weights W.pth
        --reference-cmd "python my_published_harness.py --weights W.pth"]
    python benchmarks/bench_inference.py --onnx [--config FILE] [--size H W] [--weights W]

The published implementation's figures stated in the model issue (11.5 s/image, peak RSS
4.2 GB; backbone 1.1 s, pixel decoder 5.0 s, transformer decoder 1.3 s, post-processing 4.5 s)
are printed for reference, but this machine's speed drifts by tens of percent over a day, so
the fair comparison is a same-machine one: ``--reference-cmd`` runs another implementation's
measurement (a harness of your own that prints the same JSON keys; see README, "Speed")
alternately with ours, ``--rounds`` times, and prints the per-stage ratios. With
``--save-weights W.pth`` our first run writes the exact weights it measured; a reference harness
that loads W.pth computes the same outputs, and the last line compares digests of both
(segments, instances, score and mask sums, mean of the semantic output).
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

from _common import output_digest, time_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(
    ROOT, "configs", "coco", "panoptic-segmentation", "maskformer2_R50_bs16_50ep.yaml"
)
PUBLISHED = {"backbone": 1.1, "pixel_decoder": 5.0, "transformer_decoder": 1.3,
             "postprocess": 4.5, "total": 11.5, "peak_rss_gb": 4.2}


def _measure(args) -> dict:
    import torch
    from detectron2.modeling import build_model

    from mask2former_d2 import get_maskformer_cfg

    torch.set_num_threads(args.threads)
    cfg = get_maskformer_cfg(
        args.config,
        ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", "", "MODEL.MASK_FORMER.TEST.PRECISION", args.precision],
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights:
        from mask2former_d2.checkpoint import MaskFormerCheckpointer

        MaskFormerCheckpointer(model).load(args.weights)
    with torch.no_grad():
        # Every query confidently "person" (a thing class): all kept by panoptic inference and
        # all used by instance inference, the slowest post-processing. (Random weights spread
        # the class probability over 133 classes: no query would pass OBJECT_MASK_THRESHOLD.)
        head = model.sem_seg_head.predictor.class_embed
        head.weight.zero_()
        head.bias.zero_()
        head.bias[0] = 10.0
    h, w = args.size
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float()
    inputs = [{"image": image, "height": h, "width": w}]

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = time_stages(model, sync)
    runs = []
    with torch.no_grad():
        warm = model(inputs)[0]  # warm-up
    out_counts = output_digest(warm)
    if args.save_outputs:  # for the deviation of this precision from fp32
        torch.save(warm, args.save_outputs)
    if args.save_weights:  # the weights measured here, for another implementation to load
        torch.save({"model": model.state_dict()}, args.save_weights)
    with torch.no_grad():
        for _ in range(args.repeat):
            times.clear()
            sync()
            t0 = time.perf_counter()
            model(inputs)
            sync()
            run = dict(times, total=time.perf_counter() - t0)
            run["postprocess"] = run["total"] - sum(
                run[k] for k in ("backbone", "pixel_decoder", "transformer_decoder")
            )
            runs.append(run)
    # The fastest of the repeats, stage by stage: on a shared machine the noise only ever adds.
    out = {k: min(r[k] for r in runs) for k in runs[0]}
    out.update(out_counts)
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    if args.device == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    if args.flops:
        from fvcore.nn import FlopCountAnalysis

        flops = FlopCountAnalysis(_Forward(model), (image.unsqueeze(0),))
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        out["gflops"] = flops.total() / 1e9
        out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


class _Forward:
    """Backbone + head on a normalised, padded batch (what fvcore can trace)."""

    def __new__(cls, model):
        import torch

        class F(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = model

            def forward(self, x):
                x = (x - self.m.pixel_mean) / self.m.pixel_std
                out = self.m.sem_seg_head(self.m.backbone(x))
                return out["pred_logits"], out["pred_masks"]

        return F()


def _measure_onnx(args) -> None:
    """``--onnx``: ONNX Runtime (CPU) against eager PyTorch fp32, same weights, same padded image:
    export time and file size of a dynamic-size ONNX file, then seconds per image of the network
    alone (image -> pred_logits, pred_masks) and end to end (with the post-processing, which is
    the same Python code for both), each the fastest of --repeat runs after a warm-up."""
    import tempfile

    import torch
    from detectron2.modeling import build_model

    from mask2former_d2 import get_maskformer_cfg
    from mask2former_d2.export import ExportableMaskFormer
    from mask2former_d2.export.exporter import export_metadata, export_onnx, trace
    from mask2former_d2.export.onnx_runtime import OnnxRuntimeMaskFormer, padded_size

    torch.set_num_threads(args.threads)
    cfg = get_maskformer_cfg(args.config, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", args.weights])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights:
        from mask2former_d2.checkpoint import MaskFormerCheckpointer

        MaskFormerCheckpointer(model).load(args.weights)
    h, w = args.size
    hp, wp = padded_size(h, w, model.size_divisibility, 32)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8).float()
    batch = model.pixel_mean.expand(1, -1, hp, wp).clone()
    batch[0, :, :h, :w] = image
    inputs = [{"image": image, "height": h, "width": w}]

    def fastest(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t = time.perf_counter()
        program = trace(model, batch, dynamic=True)
        export_onnx(program, path, export_metadata(model, cfg, tuple(batch.shape), dynamic=True))
        export_s = time.perf_counter() - t
        size_mb = os.path.getsize(path) / 2**20
        ort_model = OnnxRuntimeMaskFormer(cfg, path, num_threads=args.threads)
        network = ExportableMaskFormer(model)
        with torch.no_grad():
            rows = {
                "eager fp32": (fastest(lambda: network(batch)), fastest(lambda: model(inputs))),
                "onnxruntime cpu": (fastest(lambda: ort_model.network(batch)), fastest(lambda: ort_model(inputs))),
            }
            deviation = max(
                float((g - e).abs().max() / (e.max() - e.min()))
                for g, e in zip(ort_model.network(batch), network(batch))
            )
    print(f"\n{os.path.relpath(args.config, ROOT)}, {h}x{w} (padded {hp}x{wp}), {args.threads} threads, "
          f"seconds per image (fastest of {args.repeat} runs)\n")
    print("| setting | network | end to end (with post-processing) |")
    print("|---|---|---|")
    for name, (net, total) in rows.items():
        print(f"| {name} | {net:.3f} | {total:.3f} |")
    print(f"\nONNX export (dynamic height/width): {export_s:.1f} s, {size_mb:.1f} MiB; max-abs deviation "
          f"of ONNX Runtime from eager, relative to the output range: {deviation:.2e}")


def _run(cmd, name):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name}: benchmark failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def _combine(runs):
    """Fastest time per stage over rounds; largest peak memory."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, float):
            values = [r[k] for r in runs if k in r]
            out[k] = max(values) if k.startswith("peak") else min(values)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--size", type=int, nargs=2, default=[800, 1333])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per process (after a warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--flops", action="store_true")

    weights = ap.add_argument_group("weights", "default: seeded random; the class head is set as above")
    weights.add_argument("--weights", default="", help="a Detectron2 checkpoint to load")
    weights.add_argument("--save-weights", default="", help="write the measured weights to this .pth")

    reference = ap.add_argument_group(
        "comparison",
        "--reference-cmd runs another implementation's measurement, which prints a JSON "
        "object with this table's keys as its last line, alternately with ours, --rounds times"
    )
    reference.add_argument("--reference-cmd", default="")
    reference.add_argument("--rounds", type=int, default=1)

    precision = ap.add_argument_group(
        "precision",
        "deviations are from fp32, always measured; --emulate measures precisions the device has "
        "no units for through emulate_low_precision: right deviations, meaningless times",
    )
    precision.add_argument("--precisions", default="fp32,bf16,fp16", help="MODEL.MASK_FORMER.TEST.PRECISION values")
    precision.add_argument("--emulate", action="store_true")

    ap.add_argument("--onnx", action="store_true",
                    help="instead: ONNX Runtime (CPU) vs eager fp32, same weights, with export time "
                    "and file size (needs the export extra: pip install .[export])")

    # Set by the parent process for the measuring child.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--save-outputs", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.onnx:
        _measure_onnx(args)
        return
    if args.child:
        import contextlib

        from mask2former_d2.accel.precision import emulate_low_precision

        with emulate_low_precision() if args.emulate else contextlib.nullcontext():
            print(json.dumps(_measure(args)))
        return

    import tempfile

    import torch

    from mask2former_d2.accel.precision import precision_dtype, unsupported_reason
    from mask2former_d2.evaluation.agreement import output_agreement

    precisions = ["fp32"] + [p for p in args.precisions.split(",") if p and p != "fp32"]
    for p in precisions:
        try:
            precision_dtype(p)
        except ValueError as e:
            sys.exit(f"--precisions: {e}")
    tmp = tempfile.mkdtemp(prefix="bench_inference_")

    def child(device, precision, *extra):
        return [sys.executable, __file__, "--child", "--config", args.config,
                "--size", *map(str, args.size), "--threads", str(args.threads),
                "--repeat", str(args.repeat), *(["--weights", args.weights] if args.weights else []),
                "--device", device, "--precision", precision,
                "--save-outputs", os.path.join(tmp, f"{device}_{precision}.pth"), *extra]

    def measure(device, precision, first=()):
        name = f"{device} {precision}"
        reason = unsupported_reason(precision, device)
        if reason is not None and not args.emulate:
            print(f"{name}: not available ({reason})", file=sys.stderr, flush=True)
            return name, None, reason
        r = _run(child(device, precision, *first, *(["--emulate"] if reason else [])), name)
        return name + (" (emulated)" if reason else ""), r, None

    ours, reference, others = [], [], []
    for i in range(args.rounds):  # alternate, so that both see the same machine
        first = ["--flops", *(["--save-weights", args.save_weights] if args.save_weights else [])]
        ours.append(measure("cpu", "fp32", first if i == 0 else ())[1])
        if args.reference_cmd:
            reference.append(_run(shlex.split(args.reference_cmd), "reference"))
    rows = [("mask2former_d2 (cpu fp32)", _combine(ours), "cpu", "fp32")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for p in precisions:
            if device == "cpu" and p == "fp32":
                continue
            name, r, reason = measure(device, p)
            if r is None:
                others.append((name, reason))
            else:
                rows.append((f"mask2former_d2 ({name})", r, device, p))

    cols = ["backbone", "pixel_decoder", "transformer_decoder", "postprocess", "total", "peak_rss_gb"]
    print(f"\n{os.path.relpath(args.config, ROOT)}, {args.size[0]}x{args.size[1]}, "
          f"{args.threads} threads, seconds per image (fastest of {args.repeat} runs x "
          f"{args.rounds} process(es))\n")
    print(f"| setting | {' | '.join(cols)} | vs fp32 |")
    print("|" + "---|" * (len(cols) + 2))
    print(f"| published (cpu fp32, stated in the issue) | {' | '.join(f'{PUBLISHED[c]:.2f}' for c in cols)} | |")
    if reference:
        ref = _combine(reference)
        print(f"| reference (cpu fp32, measured now) | {' | '.join(f'{ref[c]:.2f}' for c in cols)} | |")
    base = {d: r for _, r, d, p in rows if p == "fp32"}
    for name, r, device, p in rows:
        speedup = f"{base[device]['total'] / r['total']:.2f}x" if device in base else ""
        if "emulated" in name:
            speedup = "(emulated: not a timing)"
        print(f"| {name} | {' | '.join(f'{r[c]:.2f}' for c in cols)} | {speedup} |")
    for name, reason in others:
        print(f"| {name}: not available ({reason}) |")
    deviations = []
    for name, r, device, p in rows:
        if p == "fp32":
            continue
        d = output_agreement(*(torch.load(os.path.join(tmp, f"{device}_{q}.pth"), weights_only=False)
                               for q in ("fp32", p)))
        deviations.append(f"{name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in d.items()))
    if deviations:
        print("\ndeviation from fp32 on the same device:\n" + "\n".join(deviations))
    cpu = rows[0][1]
    print(f"\noutputs per image: {cpu['segments']} panoptic segments, {cpu['instances']} instances; "
          f"{cpu['params_m']:.1f} M parameters, {cpu['gflops']:.0f} GFLOPs (fvcore, forward without "
          "post-processing)")
    print(f"vs the stated published figures: {cpu['total'] / PUBLISHED['total'] * 100:.0f}% of the "
          f"time, peak RSS {cpu['peak_rss_gb']:.2f} GB vs {PUBLISHED['peak_rss_gb']} GB")
    if reference:
        ratios = ", ".join(f"{c} {cpu[c] / ref[c] * 100:.0f}%" for c in cols[:5])
        print(f"vs the reference measured alternately on this machine: {ratios}; peak RSS "
              f"{cpu['peak_rss_gb']:.2f} GB vs {ref['peak_rss_gb']:.2f} GB")
        digest = [k for k in ("segments", "instances", "instance_score_sum", "instance_mask_pixels",
                              "sem_seg_mean") if k in ref]
        print("outputs, ours vs reference: " + ", ".join(f"{k} {cpu.get(k)} vs {ref[k]}" for k in digest))


if __name__ == "__main__":
    main()
