"""Peak memory of the mask losses: point-sampled (Mask2Former) vs full-resolution (MaskFormer).

Shapes: B batch, Q queries, K classes (+1 no-object), T targets per image, H/W image size;
predicted masks are at H/4 x W/4, targets at H x W.

Each (loss type, image size) runs in a fresh subprocess, which builds random inputs, records
its peak resident memory, runs one criterion forward + backward (matching included, one decoder
layer, no auxiliary outputs) and reports the growth of the peak. On CUDA it reports
``torch.cuda.max_memory_allocated`` instead.

Usage::

    python benchmarks/bench_train_memory.py                      # sizes 256 512 1024, CPU
    python benchmarks/bench_train_memory.py --sizes 256 512 --device cuda
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import torch

logger = logging.getLogger("bench_train_memory")

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 133


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(loss_type: str, size: int, queries: int, targets: int, device: str) -> Dict:
    """One measurement, inside the worker process."""
    from mask2former_d2.modeling.criterion import SetCriterion
    from mask2former_d2.modeling.matcher import HungarianMatcher

    torch.manual_seed(0)
    dev = torch.device(device)
    point = loss_type == "point"
    matcher = HungarianMatcher(
        cost_class=2.0,
        cost_mask=5.0,
        cost_dice=5.0,
        num_points=12544 if point else 0,
        mask_cost="bce" if point else "focal",
    )
    criterion = SetCriterion(
        NUM_CLASSES,
        matcher,
        {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0},
        0.1,
        ["labels", "masks"],
        12544,
        3.0,
        0.75,
        mask_loss_type=loss_type,
    ).to(dev)
    outputs = {
        "pred_logits": torch.randn(1, queries, NUM_CLASSES + 1, device=dev, requires_grad=True),
        "pred_masks": torch.randn(1, queries, size // 4, size // 4, device=dev, requires_grad=True),
    }
    gt = [
        {
            "labels": torch.randint(0, NUM_CLASSES, (targets,), device=dev),
            # Made from uint8 so no large float temporary inflates the baseline peak.
            "masks": torch.randint(
                0, 2, (targets, size, size), dtype=torch.uint8, device=dev
            ).bool(),
        }
    ]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = _peak_rss_mib()
    start = time.perf_counter()
    losses = criterion(outputs, gt)
    sum(losses.values()).backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        after = torch.cuda.max_memory_allocated() / 2**20
    else:
        after = _peak_rss_mib()
    return {
        "loss_type": loss_type,
        "size": size,
        "seconds": time.perf_counter() - start,
        "baseline_mib": before,
        "peak_mib": after,
        "delta_mib": after - before,
    }


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--worker", nargs=2, metavar=("LOSS_TYPE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker:
        result = run_one(
            args.worker[0], int(args.worker[1]), args.queries, args.targets, args.device
        )
        sys.stdout.write(json.dumps(result) + "\n")
        return

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
    rows = []
    for size in args.sizes:
        for loss_type in ("point", "full"):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", loss_type, str(size)]
            cmd += ["--queries", str(args.queries), "--targets", str(args.targets)]
            cmd += ["--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                logger.error("%s %d failed:\n%s", loss_type, size, done.stderr[-2000:])
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    lines = [
        f"Mask-loss forward+backward, Q={args.queries}, T={args.targets}, K={NUM_CLASSES}, "
        f"device={args.device}, {unit} growth during the step (MiB)",
        f"{'image':>6} {'pred':>5} | {'point MiB':>10} {'point s':>8} | "
        f"{'full MiB':>10} {'full s':>8} | {'full/point':>10}",
    ]
    by_key = {(r["loss_type"], r["size"]): r for r in rows}
    for size in args.sizes:
        p, f = by_key.get(("point", size)), by_key.get(("full", size))
        cells = []
        for r in (p, f):
            cells.append(
                f"{r['delta_mib']:>10.1f} {r['seconds']:>8.2f}" if r else f"{'-':>10} {'-':>8}"
            )
        ratio = f"{f['delta_mib'] / max(p['delta_mib'], 1e-6):>10.1f}" if p and f else f"{'-':>10}"
        lines.append(f"{size:>6} {size // 4:>5} | {cells[0]} | {cells[1]} | {ratio}")
    logger.info("\n".join(lines))


if __name__ == "__main__":
    main()
