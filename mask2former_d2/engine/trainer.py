"""``Trainer``: Detectron2's ``DefaultTrainer`` with the MaskFormer data mappers, optimizer,
schedule, evaluators and checkpointer, through its ``build_*`` class methods as in Detectron2's
own projects. The constructor repeats ``DefaultTrainer.__init__``'s steps with a CPU-capable DDP
wrapper and AMP loop (no module of Detectron2 is patched); ``train`` turns a non-finite loss into
one line; the training set is checked before the first iteration (empty, missing fields, missing
files)."""
import json
import logging
import os
import re
import weakref
from typing import List, Optional

import torch
from detectron2.data import (
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from ..checkpoint import MaskFormerCheckpointer
from ..data.mappers import build_dataset_mapper
from ..evaluation import build_evaluator
from ..solver import build_optimizer
from ..test_time_augmentation import SemanticSegmentorWithTTA
from .amp import MaskFormerAMPTrainer

__all__ = ["Trainer", "all_reduce_batchnorm", "dataset_files", "load_train_dicts", "share_main_process_buffers"]

# Metadata fields that name a dataset's files, for messages about its content.
_FILE_FIELDS = ("json_file", "panoptic_json", "sem_seg_root", "image_root")


def dataset_files(name: str) -> str:
    """The files registered dataset ``name`` is read from (its metadata), for messages."""
    meta = MetadataCatalog.get(name)
    files = [f"{f} {meta.get(f)}" for f in _FILE_FIELDS if meta.get(f)]
    return "; ".join(files) if files else "no file recorded in its metadata"


def _json_problem(names: List[str]) -> Optional[ValueError]:
    """What is wrong with the COCO json(s) of datasets ``names`` (a missing list or field,
    naming the record), or None when their structure is fine or they have no json."""
    from ..data.datasets.utils import check_coco_json

    for name in names:
        meta = MetadataCatalog.get(name)
        for field, panoptic in (("json_file", False), ("panoptic_json", True)):
            path = meta.get(field)
            if path and os.path.isfile(path):
                with open(path) as f:
                    try:
                        check_coco_json(path, json.load(f), panoptic=panoptic)
                    except ValueError as precise:
                        return precise
    return None


def _explain_key_error(names: List[str], error: KeyError) -> ValueError:
    """A loader (Detectron2's ``load_coco_json``, pycocotools) failed on a missing field: the
    COCO json of the dataset is checked to name the record; else the dataset and the field."""
    return _json_problem(names) or ValueError(
        f"{', '.join(names)}: a record of the dataset has no field {error.args[0]!r} "
        f"({'; '.join(dataset_files(n) for n in names)})"
    )


def check_files_exist(dicts: list, names: List[str]) -> None:
    """Raises ``FileNotFoundError`` naming the first record whose image (or annotation PNG)
    does not exist, before training starts rather than when the loader reaches it."""
    for i, record in enumerate(dicts):
        for field in ("file_name", "sem_seg_file_name", "pan_seg_file_name", "file_names"):
            paths = record.get(field)
            for path in [paths] if isinstance(paths, str) else paths or []:
                if "://" not in path and not os.path.isfile(path):
                    ident = record.get("image_id", record.get("video_id", i))
                    raise FileNotFoundError(
                        f"{', '.join(names)}: record {i} (id {ident}) lists {field} {path}, which does "
                        "not exist; fix the dataset's paths or remove the record"
                    )


def load_train_dicts(names: List[str], **kwargs) -> list:
    """Detectron2's ``get_detection_dataset_dicts(names, **kwargs)``, with its assertions on an
    empty dataset and a loader's missing-field ``KeyError`` turned into one ``ValueError``
    naming the dataset, its files and the record; every listed file must exist."""
    try:
        dicts = get_detection_dataset_dicts(names, **kwargs)
    except KeyError as e:
        raise _explain_key_error(list(names), e) from None
    except AssertionError as e:
        empty = re.search(r"Dataset '(.+)' is empty", str(e))
        if empty:
            name = empty.group(1)
            raise _json_problem([name]) or ValueError(
                f"dataset {name!r} has no images ({dataset_files(name)}); check that the json "
                "lists its images and that the paths point at the right split"
            ) from None
        if "No valid data found" in str(e):
            raise ValueError(
                f"DATASETS.TRAIN {tuple(names)}: no image has a usable (non-crowd) annotation "
                f"({'; '.join(dataset_files(n) for n in names)}); check the annotations, or set "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS False to train on images without any"
            ) from None
        raise
    check_files_exist(dicts, list(names))
    return dicts


def _non_finite_message(error: FloatingPointError, lr: float, base_lr: float) -> str:
    """One line from Detectron2's "Loss became infinite or NaN" error: the iteration, the loss
    terms that are not finite and the learning rate."""
    text = str(error)
    iteration = re.search(r"iteration=(\d+)", text)
    terms = re.findall(r"'(\w+)': (?:tensor\()?(-?inf|nan)", text)
    names = ", ".join(f"{k}={v}" for k, v in terms[:4]) or "the total"
    if len(terms) > 4:
        names += f" and {len(terms) - 4} more"
    return (
        f"the loss became infinite or NaN at iteration {iteration.group(1) if iteration else '?'} "
        f"({names}) with learning rate {lr:g} (SOLVER.BASE_LR {base_lr:g}); lower SOLVER.BASE_LR, "
        "lengthen SOLVER.WARMUP_ITERS or enable SOLVER.CLIP_GRADIENTS"
    )


def all_reduce_batchnorm(module: nn.Module) -> int:
    """Replaces every ``nn.SyncBatchNorm`` in ``module`` with Detectron2's ``NaiveSyncBatchNorm``
    (statistics of all processes through ``all_reduce``, weighted by their batch sizes), with
    the same state. Returns how many were replaced.

    Why: ``nn.SyncBatchNorm`` needs CUDA, so a multi-process CPU run (gloo) could not train a
    model that synchronises BatchNorm (PEM's decoder and ``NORM: "SyncBN"`` configs). With the
    same crop size in every process the statistics are those ``nn.SyncBatchNorm`` computes.
    """
    count = 0
    for name, child in list(module.named_modules(remove_duplicate=False)):
        if name and isinstance(child, nn.SyncBatchNorm):
            replacement = NaiveSyncBatchNorm(
                child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                track_running_stats=child.track_running_stats, stats_mode="N",
            )
            like = child.weight if child.weight is not None else child.running_mean
            if like is not None:  # the same dtype (and device) as the module replaced
                replacement.to(device=like.device, dtype=like.dtype)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            module.set_submodule(name, replacement)
            count += 1
    return count


def share_main_process_buffers(model: nn.Module) -> None:
    """Copies the main process's buffers (BatchNorm statistics, ...) into ``model`` in every
    process of a multi-process run; nothing in a single process. Every process must call it."""
    if comm.get_world_size() > 1:
        for buffer in getattr(model, "module", model).buffers():
            torch.distributed.broadcast(buffer, src=0)


def _create_ddp_model(model, **kwargs):
    # Detectron2 passes the local rank as ``device_ids``, which DDP rejects for a CPU model
    # (``--num-gpus 2 MODEL.DEVICE cpu`` could not start).
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


class Trainer(DefaultTrainer):
    """DefaultTrainer with the MaskFormer data mappers, optimizer, schedule and evaluators."""

    def __init__(self, cfg):
        # The steps of DefaultTrainer.__init__, with three of its fixed choices replaced: the
        # DDP wrapper also takes a CPU model, AMP also runs on the CPU (MaskFormerAMPTrainer),
        # and checkpoints go through MaskFormerCheckpointer (atomic saves; a checkpoint that
        # does not fit the model is an error naming the keys, not a half-loaded model).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = _create_ddp_model(model, broadcast_buffers=False)
        loop = MaskFormerAMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = loop(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = MaskFormerCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg):
        """Detectron2's model; in a multi-process CPU run its synchronised BatchNorms go through
        :func:`all_reduce_batchnorm`."""
        model = super().build_model(cfg)
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            count = all_reduce_batchnorm(model)
            if count:
                logging.getLogger(__name__).info(
                    f"{count} SyncBatchNorm layers synchronise through all_reduce (NaiveSyncBatchNorm): "
                    "nn.SyncBatchNorm needs CUDA"
                )
        return model

    def train(self):
        """Detectron2's training; a loss that became infinite or NaN is one ``ValueError``
        naming the iteration, the loss terms and the learning rate."""
        try:
            return super().train()
        except FloatingPointError as e:
            lr = max(group["lr"] for group in self._trainer.optimizer.param_groups)
            raise ValueError(_non_finite_message(e, lr, self.cfg.SOLVER.BASE_LR)) from e

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation, after every process has taken the main process's buffers
        (:func:`share_main_process_buffers`).

        Why: DDP runs with ``broadcast_buffers=False``, so BatchNorm statistics that are not
        synchronised (PEM's STDC backbone) differ between processes after training; each process
        evaluates its share of the images, and the metrics are then those of a mixture of models.
        With the main process's buffers they are those of the checkpoint it saves.
        """
        share_main_process_buffers(model)
        return super().test(cfg, model, evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        dicts = load_train_dicts(cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        return build_detection_train_loader(cfg, mapper=build_dataset_mapper(cfg, is_train=True), dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # Detectron2's test loader, on records checked as the training set's are.
        dicts = load_train_dicts([dataset_name], filter_empty=False)
        return build_detection_test_loader(
            dicts, mapper=DatasetMapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS
        )

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
