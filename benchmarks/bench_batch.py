"""Images per second of ``Predictor`` at batch sizes 1, 2, 4 (``Predictor([...])``).

Default: the R50 COCO panoptic Mask2Former (semantic + instance + panoptic outputs), random
weights, 8 random images of one size (800x1200: one padded size, so each call is one batch),
2 CPU threads. Every batch size runs the same images; each row is the fastest of ``--repeat``
passes after a warm-up pass (on a shared machine noise only adds time). Prints one row per batch
size: seconds per pass, images/s and the speed-up over batch 1.

    python benchmarks/bench_batch.py [--config FILE] [--size 800 1200] [--images 8]
        [--batch-sizes 1,2,4] [--threads 2] [--repeat 3] [--opts KEY VALUE ...]

Smoke run (tiny model, small images; checks the script, not the speed)::

    python benchmarks/bench_batch.py --config configs/quickstart/maskformer2_R18_tiny_coco_panoptic.yaml \
        --size 96 128 --images 4 --repeat 1 --opts INPUT.MIN_SIZE_TEST 96 INPUT.MAX_SIZE_TEST 128
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "coco", "panoptic-segmentation", "maskformer2_R50_bs16_50ep.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1200), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-sizes", default="1,2,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()

    import numpy as np
    import torch

    from mask2former_d2.config import get_cpu_tool_cfg
    from mask2former_d2.predictor import Predictor

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_cpu_tool_cfg(args.config, [
        "MODEL.WEIGHTS", "", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", "True",
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "True", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "True",
        *args.opts,
    ])
    predictor = Predictor(cfg)
    rng = np.random.default_rng(0)
    h, w = args.size
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(args.images)]

    def one_pass(batch_size: int) -> float:
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            predictor(images[i : i + batch_size])
        return time.perf_counter() - start

    print(f"config {os.path.relpath(args.config, ROOT)}, {args.images} images of {h}x{w}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"{'batch':>5}  {'s/pass':>8}  {'images/s':>8}  {'speed-up':>8}")
    base = None
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        one_pass(batch_size)  # warm-up: allocator, oneDNN kernel choice
        best = min(one_pass(batch_size) for _ in range(args.repeat))
        rate = args.images / best
        base = base or rate
        print(f"{batch_size:>5}  {best:>8.2f}  {rate:>8.2f}  {rate / base:>7.2f}x")


if __name__ == "__main__":
    main()
