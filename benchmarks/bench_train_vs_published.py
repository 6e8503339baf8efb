"""fp32 training speed: this project's trainer (as ``train_net.py`` runs it) against the published one.

Ours: :func:`mask2former_d2.engine.setup` + :class:`mask2former_d2.engine.Trainer`, exactly what
``train_net.py`` does. Published: its ``train_net.py`` is not in the sdist, so the worker rebuilds
its trainer from the published package the way that script does: Detectron2's ``DefaultTrainer``
(default hooks) with the published dataset mapper chosen by ``INPUT.DATASET_MAPPER_NAME``,
DeepLab's LR scheduler and the published optimizer setup (one parameter group per parameter,
backbone LR multiplier, no weight decay for norm layers / embeddings / Swin position tables,
AdamW or SGD, full-model gradient-norm clipping in ``step`` or Detectron2's per-parameter
clipping). Both train on the real COCO sample (two val2017 images with panoptic annotations),
same config, same overrides, fp32 (``SOLVER.AMP.ENABLED False``), random init, ``--threads``.

Settings: ``r18``: the shared image parity fixture's R18 config, LSJ at 640 px, batch 2;
``r50``: the R50 COCO panoptic config at 512 px, batch 2. Each (trainer, setting, round) runs in
its own subprocess; the trainers alternate. Reported: seconds per iteration (wall time between
consecutive iterations, the first ``--warmup`` skipped), median and mean, the loss at the last
iteration, peak RSS, and the ratio published/ours (> 1: ours is faster).

``--profile`` profiles ``--profile-iters`` iterations of our trainer (torch.profiler, after the
warm-up) and prints the top ops by self CPU time.

The published implementation is a reference, imported from its own directory in the worker
only. Get it with ``pip download --no-deps maskformer2==0.1 -d /tmp/ref_pub`` and unpack the sdist
(``tar -xzf /tmp/ref_pub/maskformer2-0.1.tar.gz -C /tmp/ref_pub``); pass ``--published DIR``.

    python benchmarks/bench_train_vs_published.py                           # both settings, 20 iterations
    python benchmarks/bench_train_vs_published.py --settings r18 --iters 6 --warmup 2 --rounds 1
    python benchmarks/bench_train_vs_published.py --settings r18 --profile  # ours only, profiled
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import _published as pub

SHARED = os.environ.get("M2F_SHARED", os.path.join(os.path.dirname(pub.REPO), "shared"))
DATASET = "bench_coco_sample_panoptic"
SETTINGS = {
    "r18": {
        "config": os.path.join(SHARED, "fixtures", "parity", "m2f_r18_coco_panoptic", "config.yaml"),
        "size": 640,
    },
    "r50": {
        "config": os.path.join(pub.REPO, "configs", "coco", "panoptic-segmentation", "maskformer2_R50_bs16_50ep.yaml"),
        "size": 512,
    },
}


def _register(coco_root: str) -> None:
    from detectron2.data.datasets import register_coco_panoptic
    from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

    pan_json = os.path.join(coco_root, "annotations", "panoptic_val2017.json")
    if not os.path.isfile(pan_json):
        raise FileNotFoundError(f"{pan_json} not found; expected the COCO sample (see --coco-root)")
    register_coco_panoptic(
        DATASET,
        _get_builtin_metadata("coco_panoptic_standard"),
        os.path.join(coco_root, "val2017"),
        os.path.join(coco_root, "panoptic_val2017"),
        pan_json,
        None,
    )


def _opts(a, size: int, out_dir: str) -> List[str]:
    opts = [
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", "()",
        "INPUT.IMAGE_SIZE", str(size),
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.AMP.ENABLED", "False",
        "SOLVER.MAX_ITER", str(a.iters),
        "SOLVER.CHECKPOINT_PERIOD", "1000000",
        "TEST.EVAL_PERIOD", "0",
        "MODEL.WEIGHTS", "",
        "MODEL.DEVICE", "cpu",
        "SEED", str(a.seed),
        "OUTPUT_DIR", out_dir,
    ]
    if a.num_workers is not None:
        opts += ["DATALOADER.NUM_WORKERS", str(a.num_workers)]
    return opts + list(a.opts)


def _published_trainer():
    """The published ``train_net.py`` Trainer, rebuilt from the published package pieces."""
    import copy
    import itertools

    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.engine import DefaultTrainer
    from detectron2.projects.deeplab import build_lr_scheduler
    from detectron2.solver.build import maybe_add_gradient_clipping
    from mask2former import (
        COCOInstanceNewBaselineDatasetMapper,
        COCOPanopticNewBaselineDatasetMapper,
        MaskFormerInstanceDatasetMapper,
        MaskFormerPanopticDatasetMapper,
        MaskFormerSemanticDatasetMapper,
    )

    mappers = {
        "mask_former_semantic": MaskFormerSemanticDatasetMapper,
        "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
        "mask_former_instance": MaskFormerInstanceDatasetMapper,
        "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
        "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
    }
    norm_types = (
        torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
        torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d,
        torch.nn.LayerNorm, torch.nn.LocalResponseNorm,
    )

    class PublishedTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            kind = mappers.get(cfg.INPUT.DATASET_MAPPER_NAME)
            return build_detection_train_loader(cfg, mapper=kind(cfg, True) if kind else None)

        @classmethod
        def build_lr_scheduler(cls, cfg, optimizer):
            return build_lr_scheduler(cfg, optimizer)

        @classmethod
        def build_optimizer(cls, cfg, model):
            base = {"lr": cfg.SOLVER.BASE_LR, "weight_decay": cfg.SOLVER.WEIGHT_DECAY}
            groups, seen = [], set()
            for module_name, module in model.named_modules():
                for name, p in module.named_parameters(recurse=False):
                    if not p.requires_grad or p in seen:
                        continue
                    seen.add(p)
                    hp = copy.copy(base)
                    if "backbone" in module_name:
                        hp["lr"] = hp["lr"] * cfg.SOLVER.BACKBONE_MULTIPLIER
                    if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                        hp["weight_decay"] = 0.0
                    if isinstance(module, norm_types):
                        hp["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_NORM
                    if isinstance(module, torch.nn.Embedding):
                        hp["weight_decay"] = cfg.SOLVER.WEIGHT_DECAY_EMBED
                    groups.append({"params": [p], **hp})
            clip = cfg.SOLVER.CLIP_GRADIENTS
            full = clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE > 0.0

            def with_full_clipping(optim):
                if not full:
                    return optim

                class FullModelClipping(optim):
                    def step(self, closure=None):
                        params = itertools.chain(*[g["params"] for g in self.param_groups])
                        torch.nn.utils.clip_grad_norm_(params, clip.CLIP_VALUE)
                        super().step(closure=closure)

                return FullModelClipping

            kind = cfg.SOLVER.OPTIMIZER
            if kind == "SGD":
                opt = with_full_clipping(torch.optim.SGD)(groups, cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)
            elif kind == "ADAMW":
                opt = with_full_clipping(torch.optim.AdamW)(groups, cfg.SOLVER.BASE_LR)
            else:
                raise NotImplementedError(f"no optimizer type {kind}")
            if clip.CLIP_TYPE != "full_model":
                opt = maybe_add_gradient_clipping(cfg, opt)
            return opt

    return PublishedTrainer


def _adapt_published_criterion() -> str:
    """The sdist's ``MaskFormer.from_config`` builds ``SetCriterion(..., weight_dict=...)`` while the
    sdist's ``SetCriterion`` takes ``class_weight, mask_weight, dice_weight, num_layers`` and builds
    that dict itself, so its image training fails as shipped. The harness puts an adapter between
    them (same weights, same dict)."""
    import inspect

    from mask2former import maskformer_model
    from mask2former.modeling.criterion import SetCriterion

    if "weight_dict" in inspect.signature(SetCriterion.__init__).parameters:
        return ""

    class WeightDictSetCriterion(SetCriterion):
        def __init__(self, num_classes, matcher, weight_dict, **kwargs):
            aux = sum(1 for k in weight_dict if k.startswith("loss_ce_"))
            super().__init__(
                num_classes, matcher, class_weight=weight_dict["loss_ce"], mask_weight=weight_dict["loss_mask"],
                dice_weight=weight_dict["loss_dice"], num_layers=aux, **kwargs
            )
            assert self.weight_dict == weight_dict

    maskformer_model.SetCriterion = WeightDictSetCriterion
    return ("adapter for mask2former.maskformer_model.SetCriterion: accepts weight_dict= and passes "
            "class/mask/dice weights + num_layers to the sdist's SetCriterion (its own call does not match it)")


def _timing_hook(a, times: List[float], losses: List[float]):
    import torch
    from detectron2.engine import HookBase

    class Timing(HookBase):
        """Wall time between consecutive iterations; the profiler over a window of them."""

        def __init__(self):
            self.last = None
            self.prof = None

        def before_step(self):
            if a.profile and self.trainer.iter == a.warmup:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.prof.__enter__()

        def after_step(self):
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now
            hist = self.trainer.storage.histories()
            if "total_loss" in hist:
                losses.append(hist["total_loss"].latest())
            if self.prof is not None and self.trainer.iter == a.warmup + a.profile_iters - 1:
                self.prof.__exit__(None, None, None)
                print(self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top), flush=True)
                self.prof = None

    return Timing()


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    setting = SETTINGS[a.setting]
    out_dir = tempfile.mkdtemp(prefix=f"bench_train_{a.impl}_")
    opts = _opts(a, setting["size"], out_dir)
    patches = []
    if a.impl == "ours":
        from mask2former_d2 import engine

        _register(a.coco_root)
        args = engine.default_argument_parser().parse_args(["--config-file", setting["config"]] + opts)
        cfg = engine.setup(args)
        trainer_cls = engine.Trainer
    else:
        patches = pub.import_published(a.published)
        patches += [p for p in [_adapt_published_criterion()] if p]
        from detectron2.engine import default_argument_parser, default_setup
        from mask2former import add_maskformer2_config

        _register(a.coco_root)
        args = default_argument_parser().parse_args(["--config-file", setting["config"]] + opts)
        cfg = pub.published_cfg(args.config_file, args.opts, add_maskformer2_config)
        cfg.freeze()
        default_setup(cfg, args)
        trainer_cls = _published_trainer()
    torch.set_num_threads(a.threads)  # default_setup may have changed it
    times: List[float] = []
    losses: List[float] = []
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([_timing_hook(a, times, losses)])
    t0 = time.perf_counter()
    trainer.train()
    measured = times[max(0, a.warmup - 1):]
    pub.emit(
        {
            "status": "ok",
            "median": statistics.median(measured) if measured else None,
            "mean": statistics.mean(measured) if measured else None,
            "times": [round(t, 3) for t in times],
            "last_loss": losses[-1] if losses else None,
            "wall": time.perf_counter() - t0,
            "peak_rss_mib": pub.peak_rss_mib(),
            "num_workers": cfg.DATALOADER.NUM_WORKERS,
            "patches": patches,
        }
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", default=pub.DEFAULT_PUBLISHED, help="directory of the unpacked published sdist")
    ap.add_argument("--coco-root", default=os.path.join(SHARED, "data", "coco"))
    ap.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["r18", "r50"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="iterations not measured")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=None, help="DATALOADER.NUM_WORKERS (default: the config's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--mem-cap", type=float, default=12000.0, help="MiB of resident memory per run")
    ap.add_argument("--profile", action="store_true", help="profile our trainer only (setting: first of --settings)")
    ap.add_argument("--profile-iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=15, help="rows of the profile table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=("ours", "published"), help=argparse.SUPPRESS)
    ap.add_argument("--setting", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides (both trainers)")
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.iters <= a.warmup:
        sys.exit(f"bench_train_vs_published: --iters {a.iters} must be larger than --warmup {a.warmup}")
    if not os.path.isfile(os.path.join(a.coco_root, "annotations", "panoptic_val2017.json")):
        sys.exit(f"bench_train_vs_published: no annotations/panoptic_val2017.json under --coco-root {a.coco_root}")
    for name in a.settings:
        if not os.path.isfile(SETTINGS[name]["config"]):
            sys.exit(f"bench_train_vs_published: config of setting {name} not found: {SETTINGS[name]['config']}")
    env = dict(os.environ, PYTHONPATH=pub.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = [sys.executable, os.path.abspath(__file__), "--worker", "--published", a.published,
            "--coco-root", a.coco_root, "--iters", str(a.iters), "--warmup", str(a.warmup),
            "--threads", str(a.threads), "--seed", str(a.seed)]
    if a.num_workers is not None:
        base += ["--num-workers", str(a.num_workers)]
    if a.profile:
        cmd = base + ["--impl", "ours", "--setting", a.settings[0], "--profile", "--profile-iters",
                      str(a.profile_iters), "--top", str(a.top)]
        os.execve(sys.executable, cmd + a.opts, env)
    pub.check_published(a.published)
    runs: Dict = {}
    patches = set()
    for rnd in range(1, a.rounds + 1):
        for name in a.settings:
            order = ("ours", "published") if rnd % 2 else ("published", "ours")
            for impl in order:
                r = pub.run_worker(base + ["--impl", impl, "--setting", name] + a.opts, a.timeout, a.mem_cap, env)
                patches.update(r.get("patches", []))
                runs.setdefault((name, impl), []).append(r)
                print(f"round {rnd} {name} {impl}: {r.get('status')} median {pub.fmt(r.get('median'))} s/iter, "
                      f"times {r.get('times')}, loss {pub.fmt(r.get('last_loss'))}, "
                      f"peak {pub.fmt(r.get('peak_rss_mib'), 0)} MiB", flush=True)
    print(f"\nfp32 training, COCO sample, batch 2, CPU, {a.threads} threads, {a.iters} iterations "
          f"(first {a.warmup} not measured), rounds {a.rounds}\n")
    print("| setting | round | ours median s/it | ours mean | published median s/it | published mean | "
          "published/ours (median) | ours loss | published loss | ours MiB | published MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.settings:
        for i, (mine, ref) in enumerate(zip(runs[(name, "ours")], runs[(name, "published")]), 1):
            cells = [name, str(i)]
            for r in (mine, ref):
                ok = r.get("status") == "ok"
                cells += [pub.fmt(r.get("median")) if ok else r.get("status"), pub.fmt(r.get("mean")) if ok else "-"]
            cells.insert(6, pub.ratio(ref.get("median"), mine.get("median")))
            cells += [pub.fmt(mine.get("last_loss")), pub.fmt(ref.get("last_loss")),
                      pub.fmt(mine.get("peak_rss_mib"), 0), pub.fmt(ref.get("peak_rss_mib"), 0)]
            print("| " + " | ".join(cells) + " |")
    if patches:
        print("\nPatched in the published worker: " + "; ".join(sorted(patches)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
