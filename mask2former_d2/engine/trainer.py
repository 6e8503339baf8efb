"""``Trainer``: Detectron2's ``DefaultTrainer`` with the MaskFormer data mappers, optimizer,
schedule, evaluators and checkpointer. Only ``build_*`` class methods are overridden, as in
Detectron2's own projects."""
import logging
import os
import weakref

from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, create_ddp_model
from detectron2.projects.deeplab import build_lr_scheduler

from ..checkpoint import MaskFormerCheckpointer
from ..data.mappers import build_dataset_mapper
from ..evaluation import build_evaluator
from ..solver import build_optimizer
from ..test_time_augmentation import SemanticSegmentorWithTTA
from .amp import MaskFormerAMPTrainer

__all__ = ["Trainer"]


def _create_ddp_model(model, **kwargs):
    # Detectron2 passes the local rank as ``device_ids``, which DDP rejects for a CPU model
    # (``--num-gpus 2 MODEL.DEVICE cpu`` could not start).
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the MaskFormer data mappers, optimizer, schedule and evaluators."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ wraps the model with the module-level ``create_ddp_model``
        # and, with SOLVER.AMP.ENABLED, trains with the module-level ``AMPTrainer`` (CUDA only);
        # both are swapped for the CPU-capable ones while it runs; everything else is
        # Detectron2's.
        from detectron2.engine import defaults

        swaps = {"create_ddp_model": _create_ddp_model, "AMPTrainer": MaskFormerAMPTrainer}
        originals = {name: getattr(defaults, name) for name in swaps}
        for name, value in swaps.items():
            setattr(defaults, name, value)
        try:
            super().__init__(cfg)
        finally:
            for name, value in originals.items():
                setattr(defaults, name, value)

    def build_hooks(self):
        # The hooks (periodic checkpoints, resume) use the strict checkpointer: a checkpoint
        # that does not fit the model is an error naming the keys, not a half-loaded model.
        self.checkpointer = MaskFormerCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
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
