#!/usr/bin/env python
"""Train and evaluate MaskFormer / Mask2Former with Detectron2.

    python train_net.py --config-file configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pkl
    python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu    # two CPU processes (gloo)
"""
import logging
import os
import weakref

import torch
import torch.distributed as dist
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks, launch
from detectron2.evaluation import verify_results
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils.logger import setup_logger

import mask2former_d2  # noqa: F401  (registers models and datasets)
from mask2former_d2 import get_maskformer_cfg
from mask2former_d2.checkpoint import MaskFormerCheckpointer
from mask2former_d2.data.mappers import build_dataset_mapper
from mask2former_d2.evaluation import build_evaluator
from mask2former_d2.solver import build_optimizer
from mask2former_d2.test_time_augmentation import SemanticSegmentorWithTTA


class Trainer(DefaultTrainer):
    """DefaultTrainer with the MaskFormer data mappers, optimizer, schedule and evaluators."""

    def __init__(self, cfg):
        super().__init__(cfg)
        # Same checkpointables as Detectron2's, but a checkpoint of another architecture is an
        # error rather than a half-loaded model.
        self.checkpointer = MaskFormerCheckpointer(
            self._trainer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        for h in self._hooks:
            if isinstance(h, hooks.PeriodicCheckpointer):
                h.checkpointer = self.checkpointer

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        from detectron2.data import build_detection_train_loader

        return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True))

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # Detectron2's schedules plus DeepLab's "WarmupPolyLR".
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        logging.getLogger("detectron2.trainer").info("Running inference with test-time augmentation")
        model = SemanticSegmentorWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        res = cls.test(cfg, model, evaluators)
        return {k + "_TTA": v for k, v in res.items()}


def setup(args):
    cfg = get_maskformer_cfg(args.config_file, args.opts)
    if cfg.MODEL.DEVICE == "cuda" and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=dist.get_rank() if dist.is_initialized() else 0,
                 name="mask2former_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        MaskFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if dist.is_initialized() is False or dist.get_rank() == 0:
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _main_then_shutdown(args):
    """Runs ``main`` and, in a multi-process run, leaves the process group cleanly: every worker
    waits for the others, then the group is destroyed (a worker that exits with the group
    alive can abort at interpreter shutdown with gloo)."""
    try:
        return main(args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        _main_then_shutdown,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
