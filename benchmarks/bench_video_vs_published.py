"""Video inference of this project's VideoMaskFormer against the published implementation.

R50 YouTube-VIS 2019 config, random weights saved once by this project's model (a Detectron2
checkpoint ``{"model": state_dict}``, loaded strictly by both: the parameter names are the same,
PARITY_NOTES 17), real frames of a clip resized to a 360-pixel short side (looped if the clip is
shorter than T), outputs at the clip's own size, CPU, ``--threads`` threads.

Each (implementation, T) runs in its own subprocess, so the peak resident memory is per setting,
with a timeout and a memory cap (a run that hits either is reported as "did not finish");
the implementations alternate over ``--rounds``. Reported: seconds per clip and per frame, by
stage (backbone, pixel decoder, transformer decoder, the rest = post-processing/upsampling),
peak RSS and an output digest (sum of scores and labels, mask pixels) to show the outputs agree.

The published implementation is a reference, imported from its own directory in the worker
only. Get it with ``pip download --no-deps maskformer2==0.1 -d /tmp/ref_pub`` and unpack the sdist
(``tar -xzf /tmp/ref_pub/maskformer2-0.1.tar.gz -C /tmp/ref_pub``); pass ``--published DIR``.

    python benchmarks/bench_video_vs_published.py                          # T = 36 and 200, 2 rounds
    python benchmarks/bench_video_vs_published.py --frames 8 --rounds 1    # a quick check
"""

import argparse
import os
import sys
import time
from typing import Dict, List

import _published as pub

CONFIG = os.path.join(pub.REPO, "configs", "youtubevis_2019", "video_maskformer2_R50_bs16_8ep.yaml")
VIDEO = os.path.join(os.path.dirname(pub.REPO), "shared", "data", "video", "bikes.mp4")
STAGES = ("backbone", "pixel_decoder", "transformer_decoder")


def _cfg(impl: str, config: str, opts: List[str]):
    if impl == "ours":
        from mask2former_d2 import get_maskformer_cfg

        cfg = get_maskformer_cfg(config, opts)
    else:
        from mask2former import add_maskformer2_config
        from mask2former_video import add_maskformer2_video_config

        cfg = pub.published_cfg(config, opts, add_maskformer2_config, add_maskformer2_video_config)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    cfg.freeze()
    return cfg


def _frames(video: str, n: int, short_side: int):
    """``n`` RGB frames of ``video`` resized to ``short_side`` (the clip looped if shorter), and
    the clip's own (height, width)."""
    import cv2
    import numpy as np

    from mask2former_d2.predictor import video_frames

    clip = list(video_frames(video, n))
    if not clip:
        raise FileNotFoundError(f"{video}: no frames could be decoded; expected a readable video file")
    h, w = clip[0].shape[:2]
    s = short_side / min(h, w)
    size = (round(w * s), round(h * s))
    resized = [np.ascontiguousarray(cv2.resize(f, size, interpolation=cv2.INTER_LINEAR)[:, :, ::-1]) for f in clip]
    return [resized[i % len(resized)] for i in range(n)], (h, w)


def _timed(stats: Dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stats[name] += time.perf_counter() - t0

    return wrapper


def worker_save(a) -> None:
    import torch
    from detectron2.modeling import build_model

    torch.manual_seed(a.seed)
    model = build_model(_cfg("ours", a.config, a.opts))
    os.makedirs(os.path.dirname(os.path.abspath(a.save_weights)), exist_ok=True)
    torch.save({"model": model.state_dict()}, a.save_weights)
    pub.emit({"saved": a.save_weights, "tensors": len(model.state_dict())})


def worker_run(a) -> None:
    import torch
    from detectron2.modeling import build_model

    torch.set_num_threads(a.threads)
    patches = pub.import_published(a.published) if a.impl == "published" else []
    opts = list(a.opts)
    if a.window:
        opts += ["MODEL.MASK_FORMER.TEST.WINDOW_SIZE", a.window, "MODEL.MASK_FORMER.TEST.WINDOW_OVERLAP", a.overlap]
    cfg = _cfg(a.impl, a.config, opts)
    model = build_model(cfg).eval()
    ckpt = torch.load(a.weights, map_location="cpu", weights_only=False)
    incompatible = model.load_state_dict(ckpt["model"], strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    frames, (h, w) = _frames(a.video, a.frames, a.short_side)
    imgs = [f if cfg.INPUT.FORMAT == "RGB" else f[:, :, ::-1] for f in frames]
    video = {"image": [torch.as_tensor(x.transpose(2, 0, 1).copy()).float() for x in imgs], "height": h, "width": w}
    stats = {k: 0.0 for k in STAGES}
    model.backbone.forward = _timed(stats, "backbone", model.backbone.forward)
    head = model.sem_seg_head
    head.pixel_decoder.forward_features = _timed(stats, "pixel_decoder", head.pixel_decoder.forward_features)
    head.predictor.forward = _timed(stats, "transformer_decoder", head.predictor.forward)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model([video])
    total = time.perf_counter() - t0
    if isinstance(out, list):
        out = out[0]
    masks = [torch.as_tensor(m) for m in out["pred_masks"]]
    pub.emit(
        {
            "status": "ok",
            "total": total,
            **stats,
            "rest": total - sum(stats.values()),
            "peak_rss_mib": pub.peak_rss_mib(),
            "n_pred": len(out["pred_scores"]),
            "score_sum": float(sum(float(s) for s in out["pred_scores"])),
            "label_sum": int(sum(int(c) for c in out["pred_labels"])),
            "mask_pixels": int(sum(int(m.bool().sum()) for m in masks)),
            "out_shape": list(masks[0].shape) if masks else [],
            "patches": patches,
        }
    )


def _row(label: str, impl: str, t: int, rnd: int, r: Dict) -> List[str]:
    if r.get("status") != "ok":
        blank = [""] * 5
        return [label, impl, str(t), str(rnd), r.get("status", "?")] + blank + [pub.fmt(r.get("peak_rss_mib"), 0), ""]
    digest = f"n={r['n_pred']} s={r['score_sum']:.4f} l={r['label_sum']} px={r['mask_pixels']}"
    return [label, impl, str(t), str(rnd), pub.fmt(r["total"]), pub.fmt(r["total"] / t, 3)] + [
        pub.fmt(r[k]) for k in STAGES + ("rest",)
    ] + [pub.fmt(r["peak_rss_mib"], 0), digest]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", default=pub.DEFAULT_PUBLISHED, help="directory of the unpacked published sdist")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--video", default=VIDEO)
    ap.add_argument("--frames", type=int, nargs="+", default=[36, 200], help="clip lengths T")
    ap.add_argument("--short-side", type=int, default=360)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--window", type=int, default=36, help="WINDOW_SIZE of the extra windowed row of ours (0: none)")
    ap.add_argument("--overlap", type=int, default=6, help="WINDOW_OVERLAP of the windowed row")
    ap.add_argument("--window-min-frames", type=int, default=200, help="add the windowed row for T >= this")
    ap.add_argument("--windowed-only", action="store_true", help="only the windowed rows of ours")
    ap.add_argument("--weights", default=os.path.join(pub.REPO, "output", "bench_video_vs_published", "weights.pth"))
    ap.add_argument("--save-weights", default="", metavar="W.pth", help="save our random init to W.pth and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--mem-cap", type=float, default=12000.0, help="MiB of resident memory per run")
    ap.add_argument("--worker", choices=("save", "run"), help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=("ours", "published"), help=argparse.SUPPRESS)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides (both models)")
    a = ap.parse_args(argv)
    if a.worker == "save":
        worker_save(a)
        return 0
    if a.worker == "run":
        a.frames = a.frames[0]
        worker_run(a)
        return 0
    for path, what in ((a.config, "config"), (a.video, "video")):
        if not os.path.isfile(path):
            sys.exit(f"bench_video_vs_published: {what} {path} not found")
    pub.check_published(a.published)
    base = [sys.executable, os.path.abspath(__file__), "--config", a.config, "--video", a.video,
            "--short-side", str(a.short_side), "--threads", str(a.threads), "--published", a.published]
    env = dict(os.environ, PYTHONPATH=pub.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if a.save_weights or not os.path.isfile(a.weights):
        target = a.save_weights or a.weights
        r = pub.run_worker(base + ["--worker", "save", "--save-weights", target, "--seed", str(a.seed)] + a.opts,
                           a.timeout, a.mem_cap, env)
        if "saved" not in r:
            sys.exit(f"bench_video_vs_published: saving the weights failed: {r.get('status')}")
        print(f"saved our random init ({r['tensors']} tensors) to {target}")
        if a.save_weights:
            return 0
    settings = []
    for t in a.frames:
        if not a.windowed_only:
            settings += [("full", "ours", t, 0), ("full", "published", t, 0)]
        if a.window and t >= a.window_min_frames:
            settings.append((f"window {a.window}/{a.overlap}", "ours", t, a.window))
    rows, patches = [], set()
    for rnd in range(1, a.rounds + 1):
        order = settings if rnd % 2 else settings[::-1]  # alternate which implementation runs first
        for label, impl, t, window in order:
            cmd = base + ["--worker", "run", "--impl", impl, "--frames", str(t), "--weights", a.weights,
                          "--window", str(window), "--overlap", str(a.overlap)] + a.opts
            r = pub.run_worker(cmd, a.timeout, a.mem_cap, env)
            patches.update(r.get("patches", []))
            rows.append(((label, impl, t, rnd), r))
            print(f"round {rnd} {label} {impl} T={t}: {r.get('status')} "
                  f"{pub.fmt(r.get('total'))} s, peak {pub.fmt(r.get('peak_rss_mib'), 0)} MiB", flush=True)
    head = ["mode", "impl", "T", "round", "s/clip", "s/frame", "backbone s", "pixel dec s", "transf dec s",
            "rest s", "peak RSS MiB", "output digest"]
    print(f"\nVideo inference, {os.path.basename(a.config)}, {a.short_side}-px short side, CPU, {a.threads} threads\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (label, impl, t, rnd), r in rows:
        print("| " + " | ".join(_row(label, impl, t, rnd, r)) + " |")
    print("\nRatios ours/published (median over rounds of s/clip and peak RSS):\n")
    print("| mode | T | ours s/clip | published s/clip | time ratio | ours MiB | published MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, impl, t, _ in settings:
        if impl != "ours":
            continue
        mine = [r for (lb, im, tt, _), r in rows if (lb, im, tt) == (label, "ours", t) and r.get("status") == "ok"]
        ref = [r for (lb, im, tt, _), r in rows if (lb, im, tt) == ("full", "published", t) and r.get("status") == "ok"]

        def med(rs, k):
            v = sorted(r[k] for r in rs)
            return v[len(v) // 2] if v else None

        m_t, r_t, m_m, r_m = med(mine, "total"), med(ref, "total"), med(mine, "peak_rss_mib"), med(ref, "peak_rss_mib")
        print(f"| {label} | {t} | {pub.fmt(m_t)} | {pub.fmt(r_t) if ref else 'did not finish'} | {pub.ratio(m_t, r_t)} "
              f"| {pub.fmt(m_m, 0)} | {pub.fmt(r_m, 0)} | {pub.ratio(m_m, r_m)} |")
    if patches:
        print("\nPatched in the published worker: " + "; ".join(sorted(patches)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
