"""``VideoTrainer``: the :class:`~mask2former_d2.engine.Trainer` for video instance segmentation
(Mask2Former-VIS). It only swaps the data side: clips from :class:`YTVISDatasetMapper` for
training, whole videos for inference, and :class:`YTVISEvaluator`. Optimizer, schedule,
checkpointing, AMP, hooks and the launch code are the image trainer's."""
import logging
import os

from detectron2.data import build_detection_test_loader, build_detection_train_loader

from ..data.mappers import YTVISDatasetMapper
from ..evaluation import YTVISEvaluator
from .trainer import Trainer, load_train_dicts

__all__ = ["VideoTrainer"]

logger = logging.getLogger(__name__)


def _video_dicts(names):
    """Video records of ``names``. Detectron2's per-image filtering and class histogram do not
    apply to per-frame annotation lists, so they are skipped here."""
    return load_train_dicts(names, filter_empty=False, check_consistency=False)


def _has_instances(record) -> bool:
    """Whether a video record has a non-crowd annotation in some frame."""
    return any(int(a.get("iscrowd", 0)) == 0 for frame in record.get("annotations") or [] for a in frame)


class VideoTrainer(Trainer):
    """Trainer with the YouTube-VIS clip mapper, whole-video test loader and YTVISEvaluator."""

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = _video_dicts(cfg.DATASETS.TRAIN)
        if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
            kept = [d for d in dicts if _has_instances(d)]
            logger.info(f"Removed {len(dicts) - len(kept)} videos without annotations; {len(kept)} left")
            if not kept:
                raise ValueError(f"DATASETS.TRAIN={tuple(cfg.DATASETS.TRAIN)}: no video has annotations")
            dicts = kept
        return build_detection_train_loader(cfg, mapper=YTVISDatasetMapper(cfg, is_train=True), dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            _video_dicts([dataset_name]),
            mapper=YTVISDatasetMapper(cfg, is_train=False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return YTVISEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
