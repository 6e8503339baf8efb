"""Detectron2's ``setup(args)`` / ``main(args)`` convention for this project's entry points."""
import os

import torch
import torch.distributed as dist
from detectron2.engine import default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import MaskFormerCheckpointer
from ..config import get_maskformer_cfg
from ..modeling.precision import check_precision

__all__ = ["setup", "main", "launch_main"]


def setup(args):
    """The frozen config of ``args.config_file`` + ``args.opts``; logging and output dir set up."""
    cfg = get_maskformer_cfg(args.config_file, args.opts)
    if cfg.MODEL.DEVICE == "cuda" and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    # An inference precision the device has no units for: one error before any work.
    check_precision(cfg.MODEL.MASK_FORMER.TEST.PRECISION, torch.device(cfg.MODEL.DEVICE).type)
    cfg.freeze()
    procs = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the processes: oversubscribed threads made training ~10x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    default_setup(cfg, args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=rank, name="mask2former_d2")
    return cfg


def main(args, trainer_cls):
    """Trains with ``trainer_cls``, or with ``--eval-only`` evaluates and returns the results."""
    cfg = setup(args)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        MaskFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = trainer_cls.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(trainer_cls.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _main_then_shutdown(main_fn, args):
    """Runs ``main_fn(args)``; in a multi-process run every worker then waits for the others and
    destroys the process group (a gloo worker that exits with the group alive can abort at
    interpreter shutdown). On an exception the group is left alone: waiting in a barrier would
    hang, and the launcher stops the other workers."""
    result = main_fn(args)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def launch_main(args, main_fn):
    """Detectron2's ``launch`` of ``main_fn(args)`` on ``args.num_gpus`` processes per machine."""
    print("Command Line Args:", args)
    launch(
        _main_then_shutdown,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(main_fn, args),
    )
