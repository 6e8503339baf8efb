"""Video inference speed and memory of Mask2Former-VIS, stage by stage.

Default: the R50 YouTube-VIS 2019 config, random weights (or --weights), clips of random frames
with a 360-pixel short side (360x640), 36 and 200 frames, float32, 2 CPU threads. Each setting
runs in its own subprocess, so peak RSS is that of one model on one clip. Prints a table: seconds
per clip and per frame for backbone, pixel decoder, transformer decoder, the rest (input
normalisation, top-10 selection, full-resolution masks) and total, the fastest of --repeat runs
after a short warm-up clip; peak RSS.

    python benchmarks/bench_video_inference.py [--config FILE] [--frames 36 200] [--size 360 640]
        [--threads 2] [--repeat 1] [--chunk N] [--window W --overlap O] [--weights W.pth]
        [--reference-cmd "python other_harness.py"]

``--reference-cmd`` runs another implementation's measurement for each frame count (the command
gets ``--frames N --size H W --threads T`` appended and must print one JSON line with the same
keys) alternately with ours, for a same-machine comparison. Timings on a shared machine are noisy.
"""
import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

from _common import time_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "youtubevis_2019", "video_maskformer2_R50_bs16_8ep.yaml")
STAGES = ("backbone", "pixel_decoder", "transformer_decoder", "rest", "total")


def _measure(args) -> dict:
    import torch
    from detectron2.modeling import build_model

    from mask2former_d2 import get_maskformer_cfg

    torch.set_num_threads(args.threads)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    if args.chunk is not None:
        opts += ["MODEL.MASK_FORMER.TEST.FRAME_CHUNK_SIZE", args.chunk]
    if args.window:
        opts += ["MODEL.MASK_FORMER.TEST.WINDOW_SIZE", args.window, "MODEL.MASK_FORMER.TEST.WINDOW_OVERLAP",
                 args.overlap]
    cfg = get_maskformer_cfg(args.config, opts)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.weights:
        from mask2former_d2.checkpoint import MaskFormerCheckpointer

        MaskFormerCheckpointer(model).load(args.weights)
    h, w = args.size
    g = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g).float() for _ in range(args.frames)]

    times = time_stages(model)
    with torch.no_grad():
        model([{"image": frames[:2], "height": h, "width": w}])  # warm-up
        runs = []
        for _ in range(args.repeat):
            times.clear()
            t0 = time.perf_counter()
            out = model([{"image": frames, "height": h, "width": w}])
            run = dict(times, total=time.perf_counter() - t0)
            run["rest"] = run["total"] - sum(run[k] for k in STAGES[:3])
            runs.append(run)
    result = {k: min(r[k] for r in runs) for k in STAGES}
    result["frames"] = args.frames
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    result["mask_pixels"] = int(sum(int(m.sum()) for m in out["pred_masks"]))
    result["score_sum"] = round(float(sum(out["pred_scores"])), 5)
    return result


def _run(cmd, name):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _row(label, r):
    n = r["frames"]
    cells = [f"{r[k]:8.2f} {r[k] / n:6.3f}" for k in STAGES]
    return f"{label:<18}" + " ".join(cells) + f" {r['peak_rss_gb']:7.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--frames", type=int, nargs="+", default=[36, 200])
    ap.add_argument("--size", type=int, nargs=2, default=[360, 640], metavar=("H", "W"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="MODEL.MASK_FORMER.TEST.FRAME_CHUNK_SIZE")
    ap.add_argument("--window", type=int, default=0, help="MODEL.MASK_FORMER.TEST.WINDOW_SIZE (0: whole clip)")
    ap.add_argument("--overlap", type=int, default=0, help="MODEL.MASK_FORMER.TEST.WINDOW_OVERLAP")
    ap.add_argument("--weights", default="")
    ap.add_argument("--reference-cmd", default="")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not os.path.isfile(args.config):
        sys.exit(f"config file not found: {args.config}")
    if args.weights and not os.path.isfile(args.weights):
        sys.exit(f"weights file not found: {args.weights}")
    if args._child:
        args.frames = args.frames[0]
        print(json.dumps(_measure(args)))
        return

    names = {"pixel_decoder": "pixel decoder", "transformer_decoder": "tr. decoder"}
    header = f"{'':<18}" + " ".join(f"{names.get(k, k):>15}" for k in STAGES) + f" {'RSS GB':>7}"
    print(f"config: {os.path.relpath(args.config, ROOT)}, {args.size[0]}x{args.size[1]}, {args.threads} threads, "
          f"chunk {args.chunk if args.chunk is not None else 'default'}, "
          f"{'window %d/%d' % (args.window, args.overlap) if args.window else 'whole clip'}")
    print("seconds per clip and per frame (clip / frame); peak RSS in GB")
    print(header)
    for n in args.frames:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--frames", str(n), "--config", args.config,
               "--size", *map(str, args.size), "--threads", str(args.threads), "--repeat", str(args.repeat),
               "--window", str(args.window), "--overlap", str(args.overlap)]
        if args.chunk is not None:
            cmd += ["--chunk", str(args.chunk)]
        if args.weights:
            cmd += ["--weights", args.weights]
        ours = _run(cmd, "our measurement")
        print(_row(f"ours T={n}", ours), flush=True)
        if args.reference_cmd:
            ref_cmd = shlex.split(args.reference_cmd) + ["--frames", str(n), "--size", *map(str, args.size),
                                                         "--threads", str(args.threads)]
            ref = _run(ref_cmd, "reference")
            ref.setdefault("frames", n)
            print(_row(f"reference T={n}", ref), flush=True)
            print(f"{'ratio':<18}" + " ".join(f"{ours[k] / ref[k]:15.2f}" if ref.get(k) else f"{'-':>15}"
                                              for k in STAGES) + f" {ours['peak_rss_gb'] / ref['peak_rss_gb']:7.2f}")


if __name__ == "__main__":
    main()
