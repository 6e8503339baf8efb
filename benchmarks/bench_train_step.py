"""Training-step time and peak memory: float32 vs AMP (SOLVER.AMP.ENABLED), side by side.

Each setting runs in its own subprocess (so that peak RSS is that of one setting): it builds the
model and optimizer of --config (random weights, MODEL.DEVICE --device) and the training loop
the Trainer would use (Detectron2's SimpleTrainer for fp32, MaskFormerAMPTrainer for AMP:
bfloat16 autocast on the CPU, float16 + GradScaler on CUDA) on a fixed batch of random images
with random ground-truth masks, runs --warmup steps, then reports the fastest of --steps timed
steps (forward, losses, backward, optimizer) and the peak RSS (and peak CUDA memory).

AMP on a CPU without bf16 units (AVX512-BF16 or AMX) trains in float32 (the trainer says so);
the row is then reported as not available.

    python benchmarks/bench_train_step.py [--config FILE] [--size 512] [--batch 2] [--threads 2]
        [--steps 3] [--settings fp32,amp] [--device cpu]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(
    ROOT, "configs", "coco", "panoptic-segmentation", "maskformer2_R50_bs16_50ep.yaml"
)


def _batch(size: int, batch: int, num_classes: int, targets: int = 5):
    import torch
    from detectron2.structures import BitMasks, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        inst = Instances((size, size))
        masks = torch.zeros(targets, size, size, dtype=torch.bool)
        for j in range(targets):
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            masks[j, y0 : y0 + size // 3, x0 : x0 + size // 3] = True
        inst.gt_masks = BitMasks(masks)
        inst.gt_classes = torch.randint(0, num_classes, (targets,), generator=g)
        image = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": image, "instances": inst})
    return out


def _measure(args) -> dict:
    import itertools

    import torch
    from detectron2.engine import SimpleTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from mask2former_d2 import get_maskformer_cfg
    from mask2former_d2.engine.amp import MaskFormerAMPTrainer
    from mask2former_d2.solver import build_optimizer

    torch.set_num_threads(args.threads)
    cfg = get_maskformer_cfg(args.config, ["MODEL.DEVICE", args.device, "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(cfg, model)
    data = itertools.repeat(_batch(args.size, args.batch, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
    if args.setting == "amp":
        trainer = MaskFormerAMPTrainer(model, data, optimizer)
        if trainer.precision is None:
            return {"unavailable": "AMP falls back to float32 on this device (no bf16 units)"}
    else:
        trainer = SimpleTrainer(model, data, optimizer)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = []
    with EventStorage(0) as storage:
        for i in range(args.warmup + args.steps):
            storage.iter = trainer.iter = i
            sync()
            t = time.perf_counter()
            trainer.run_step()
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        loss = storage.history("total_loss").latest()
    out = {
        "step_s": min(times),
        "total_loss": loss,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "precision": str(getattr(trainer, "precision", "torch.float32")),
    }
    if args.device == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--size", type=int, default=512, help="square training images of this side")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (the fastest is reported)")
    ap.add_argument("--settings", default="fp32,amp", help="comma-separated: fp32, amp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--setting", default="fp32", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_measure(args)))
        return

    settings = [s for s in args.settings.split(",") if s]
    bad = [s for s in settings if s not in ("fp32", "amp")]
    if bad:
        sys.exit(f"--settings: {bad} unknown; expected fp32 and/or amp")
    rows = []
    for setting in settings:
        cmd = [sys.executable, __file__, "--child", "--setting", setting, "--config", args.config,
               "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{setting}: benchmark failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{setting}: {json.dumps(result)}", file=sys.stderr, flush=True)
        rows.append((setting, result))

    print(f"\n{os.path.relpath(args.config, ROOT)}, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.threads} threads, {args.device}, seconds per training step (fastest of {args.steps})\n")
    print("| setting | dtype | step (s) | vs fp32 | peak RSS (GB) | total loss |")
    print("|---|---|---|---|---|---|")
    base = dict(rows).get("fp32")
    for setting, r in rows:
        if "unavailable" in r:
            print(f"| {setting} | not available: {r['unavailable']} | | | | |")
            continue
        ratio = f"{base['step_s'] / r['step_s']:.2f}x" if base else ""
        print(f"| {setting} | {r['precision']} | {r['step_s']:.2f} | {ratio} | {r['peak_rss_gb']:.2f} | "
              f"{r['total_loss']:.3f} |")


if __name__ == "__main__":
    main()
