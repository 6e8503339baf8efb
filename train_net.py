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
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, launch
from detectron2.engine import create_ddp_model, default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils import comm
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
        # DefaultTrainer.__init__ with two changes: the strict checkpointer, and on CPU no
        # ``device_ids`` for DistributedDataParallel (Detectron2 passes the local rank, which DDP
        # rejects for a CPU model, so ``--num-gpus 2 MODEL.DEVICE cpu`` could not start).
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        ddp_kwargs = {"device_ids": None} if on_cpu else {}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        loop = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = loop(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = MaskFormerCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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
    procs = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the processes: oversubscribed threads made training ~10x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
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
    """Runs ``main``; in a multi-process run every worker then waits for the others and destroys
    the process group (a gloo worker that exits with the group alive can abort at interpreter
    shutdown). On an exception the group is left alone: waiting in a barrier would hang, and
    the launcher stops the other workers."""
    result = main(args)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


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
