"""Inference speed and memory of PEM against this plugin's Mask2Former, side by side in one run.

Rows (CPU, fp32, random weights, panoptic + semantic outputs, the same random image per size):

* Cityscapes size, 1024x2048: Mask2Former R50 (configs/cityscapes/.../maskformer2_R50_bs16_90k)
  and PEM R50, STDC1, STDC2 (configs/pem/cityscapes/panoptic-segmentation/);
* ADE20K size, 512 short side (512x683): Mask2Former R50 and PEM R50 (ADE20K panoptic configs).

Each row runs in its own subprocess, so that the peak RSS printed beside it is that of one model;
times are seconds per image, the fastest of --repeat runs after a warm-up (noise on a shared
machine only adds time), split into backbone, pixel decoder, transformer decoder and the rest
(post-processing). The last column is Mask2Former R50's total time divided by the row's, at the
same size. The class heads are set so that every query is a confident thing: panoptic inference
keeps them all (the slowest post-processing), as in bench_inference.py.

    python benchmarks/bench_pem.py [--threads 2] [--repeat 3] [--scale 1.0] [--rows pem_r50_city,...]

``--scale 0.125`` shrinks every image (a smoke run that the script works, not a measurement).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _common import time_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITY, ADE = (1024, 2048), (512, 683)
# name -> (label, config relative to configs/, (H, W), Mask2Former row it is compared with)
ROWS = {
    "m2f_r50_city": ("Mask2Former R50", "cityscapes/panoptic-segmentation/maskformer2_R50_bs16_90k.yaml", CITY, None),
    "pem_r50_city": ("PEM R50", "pem/cityscapes/panoptic-segmentation/pem_R50_bs32_90k.yaml", CITY, "m2f_r50_city"),
    "pem_stdc1_city": ("PEM STDC1", "pem/cityscapes/panoptic-segmentation/pem_STDC1_bs32_90k.yaml", CITY,
                       "m2f_r50_city"),
    "pem_stdc2_city": ("PEM STDC2", "pem/cityscapes/panoptic-segmentation/pem_STDC2_bs32_90k.yaml", CITY,
                       "m2f_r50_city"),
    "m2f_r50_ade": ("Mask2Former R50", "ade20k/panoptic-segmentation/maskformer2_R50_bs16_160k.yaml", ADE, None),
    "pem_r50_ade": ("PEM R50", "pem/ade20k/panoptic-segmentation/pem_R50_bs32_160k.yaml", ADE, "m2f_r50_ade"),
}
STAGES = ("backbone", "pixel_decoder", "transformer_decoder", "postprocess", "total")


def _measure(args) -> dict:
    """One row, in this process: builds the model, times --repeat runs, reports peak RSS."""
    import torch
    from detectron2.modeling import build_model

    from mask2former_d2 import get_maskformer_cfg

    torch.set_num_threads(args.threads)
    label, rel, size, _ = ROWS[args._row]
    cfg = get_maskformer_cfg(os.path.join(ROOT, "configs", rel), [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
    ])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        # Every query a confident "thing" (Cityscapes/ADE20K class 11 / 7 are things).
        head = model.sem_seg_head.predictor.class_embed
        head.weight.zero_()
        head.bias.zero_()
        head.bias[11 if "city" in args._row else 7] = 10.0
    h, w = (max(32, round(s * args.scale)) for s in size)
    image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).float()
    inputs = [{"image": image, "height": h, "width": w}]
    best = {}
    with torch.no_grad():
        model(inputs)  # warm-up
        for _ in range(args.repeat):
            times = time_stages(model)
            start = time.perf_counter()
            model(inputs)
            total = time.perf_counter() - start
            run = {**times, "total": total}
            run["postprocess"] = total - sum(times.values())
            best = {k: min(v, best.get(k, v)) for k, v in run.items()}
            for name in ("backbone", "sem_seg_head.pixel_decoder", "sem_seg_head.predictor"):
                module = model.get_submodule(name)
                module.__dict__.pop("forward", None)
                module.__dict__.pop("forward_features", None)
    return {
        **best,
        "row": args._row, "label": label, "size": [h, w],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def _run_row(row: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_row", row, "--threads", str(args.threads),
           "--repeat", str(args.repeat), "--scale", str(args.scale)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"row {row} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="image size factor (< 1: smoke run)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    ap.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._row:
        print(json.dumps(_measure(args)))
        return 0
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; expected names from {list(ROWS)}")
    results = {}
    for row in rows:
        results[row] = _run_row(row, args)
        print(f"measured {row}", file=sys.stderr)
    header = f"{'model':<16} {'size':>10} " + " ".join(f"{c:>19}" for c in STAGES)
    header += f" {'peak RSS GB':>11} {'params M':>8} {'M2F R50 / this':>14}"
    print(f"CPU, {args.threads} threads, fp32, seconds per image (fastest of {args.repeat})")
    print(header)
    for row in rows:
        r = results[row]
        ref = ROWS[row][3]
        ratio = f"{results[ref]['total'] / r['total']:.2f}x" if ref in results else "-"
        size = "x".join(map(str, r["size"]))
        print(f"{r['label']:<16} {size:>10} " + " ".join(f"{r[c]:>19.3f}" for c in STAGES)
              + f" {r['peak_rss_gb']:>11.2f} {r['params_m']:>8.1f} {ratio:>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
