"""YouTube-VIS evaluation (video instance segmentation AP), on pycocotools' ``COCOeval``.

The protocol is the published YouTube-VIS one: each video plays the part of a COCO image and
each track that of an annotation. The IoU of a predicted and a ground-truth track is
spatio-temporal (sum over the frames of the intersections / sum over the frames of the unions;
a frame where only one of them is present adds its area to the union); the area of a track is
its mean area over the frames where it is present; the area ranges are small < 128²,
medium 128²–256², large > 256²; maxDets 1/10/100 (per video and category, as in COCO) and IoU
thresholds .50:.05:.95. Matching, 101-point interpolated precision and the summary are
``COCOeval``'s own.

Predictions use the format of the YouTube-VIS evaluation server (``results.json``)::

    [{"video_id": int, "category_id": dataset id, "score": float,
      "segmentations": [compressed RLE (counts as str) or None, one per frame]}, ...]
"""

import contextlib
import copy
import io
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..data.datasets.ytvis import segmentation_to_rle

__all__ = [
    "METRIC_NAMES",
    "YTVISeval",
    "YTVISEvaluator",
    "evaluate_ytvis",
    "instances_to_ytvis_json",
    "load_json_file",
]

logger = logging.getLogger(__name__)

#: Summary metrics, in the order of ``COCOeval.stats``.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
#: Area ranges of the published YouTube-VIS evaluation (mean area over the frames).
AREA_RANGES = [[0**2, 1e5**2], [0**2, 128**2], [128**2, 256**2], [256**2, 1e5**2]]


def load_json_file(path: str, what: str) -> Any:
    """Parsed json at ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    if not PathManager.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with PathManager.open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from None


def _track_rles(segms: Sequence[Any], video: Mapping[str, Any], where: str) -> List[Optional[Dict[str, Any]]]:
    """Per-frame compressed RLEs (None where absent) of one track, checked against its video."""
    if not isinstance(segms, (list, tuple)) or len(segms) != video["length"]:
        n = len(segms) if isinstance(segms, (list, tuple)) else type(segms).__name__
        raise ValueError(f"{where}: 'segmentations' must have one entry per frame ({video['length']}), got {n}")
    return [None if not s else segmentation_to_rle(s, video["height"], video["width"], f"{where}, frame {t}")
            for t, s in enumerate(segms)]


def _mean_area(areas: Sequence[Optional[float]]) -> float:
    """Mean of the non-empty per-frame areas (0 when the track is never present)."""
    present = [a for a in areas if a]
    return float(np.mean(present)) if present else 0.0


def spatio_temporal_iou(dts: Sequence[Sequence[Optional[dict]]], gts: Sequence[Sequence[Optional[dict]]]) -> np.ndarray:
    """(D, G) IoUs of tracks given as per-frame RLE lists (None where absent): for each pair,
    sum of the per-frame intersections / sum of the per-frame unions (0 when the union is 0)."""
    num_d, num_g = len(dts), len(gts)
    inter = np.zeros((num_d, num_g))
    union = np.zeros((num_d, num_g))
    num_frames = len(dts[0]) if num_d else 0
    for t in range(num_frames):
        d_idx = [i for i in range(num_d) if dts[i][t] is not None]
        g_idx = [j for j in range(num_g) if gts[j][t] is not None]
        area_d, area_g = np.zeros(num_d), np.zeros(num_g)
        if d_idx:
            area_d[d_idx] = mask_util.area([dts[i][t] for i in d_idx])
        if g_idx:
            area_g[g_idx] = mask_util.area([gts[j][t] for j in g_idx])
        union += area_d[:, None] + area_g[None, :]
        if d_idx and g_idx:
            iou = np.asarray(mask_util.iou([dts[i][t] for i in d_idx], [gts[j][t] for j in g_idx], [0] * len(g_idx)))
            sums = area_d[d_idx][:, None] + area_g[g_idx][None, :]
            # I = IoU * (a + b) / (1 + IoU); areas are integers, so round away the float error.
            inter[np.ix_(d_idx, g_idx)] += np.rint(iou * sums / (1.0 + iou))
    union -= inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class YTVISeval(COCOeval):
    """``COCOeval`` on videos: a video is an image, a track an annotation (see the module doc).

    Args:
        gt: a YouTube-VIS ground-truth json (``videos``, ``categories``, ``annotations``).
        results: predictions in the server format (module docstring).

    Raises:
        ValueError: a prediction names a video or category that is not in ``gt``, or its masks
            do not match the video's length or size.
    """

    def __init__(self, gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> None:
        videos = {v["id"]: {"id": v["id"], "height": int(v["height"]), "width": int(v["width"]),
                            "length": int(v.get("length", len(v.get("file_names", []))))}
                  for v in gt["videos"]}
        cat_ids = {c["id"] for c in gt["categories"]}
        self._segms: Dict[tuple, List[Optional[dict]]] = {}

        gt_anns = []
        for k, ann in enumerate(gt.get("annotations") or []):
            where = f"ground truth annotation {ann.get('id')}"
            if ann.get("video_id") not in videos:
                raise ValueError(f"{where}: video_id {ann.get('video_id')!r} is not one of the videos")
            rles = _track_rles(ann.get("segmentations"), videos[ann["video_id"]], where)
            areas = ann.get("areas") or [None if r is None else float(mask_util.area(r)) for r in rles]
            self._segms[("gt", k + 1)] = rles
            gt_anns.append({"id": k + 1, "image_id": ann["video_id"], "category_id": ann["category_id"],
                            "iscrowd": int(ann.get("iscrowd", 0)), "area": _mean_area(areas),
                            "bbox": [0, 0, 0, 0]})

        dt_anns = []
        for k, res in enumerate(results):
            where = f"result {k}"
            missing = [key for key in ("video_id", "category_id", "score", "segmentations") if key not in res]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}")
            if res["video_id"] not in videos:
                raise ValueError(f"{where}: video_id {res['video_id']!r} is not a video of the ground truth")
            if res["category_id"] not in cat_ids:
                raise ValueError(
                    f"{where}: category_id {res['category_id']!r} is not a category of the ground truth "
                    f"(ids {sorted(cat_ids)}); results must use dataset category ids"
                )
            rles = _track_rles(res["segmentations"], videos[res["video_id"]], where)
            self._segms[("dt", k + 1)] = rles
            area = _mean_area([None if r is None else float(mask_util.area(r)) for r in rles])
            dt_anns.append({"id": k + 1, "image_id": res["video_id"], "category_id": res["category_id"],
                            "score": float(res["score"]), "iscrowd": 0, "area": area, "bbox": [0, 0, 0, 0]})

        images = [{"id": v["id"], "height": v["height"], "width": v["width"]} for v in videos.values()]
        categories = [dict(c) for c in gt["categories"]]
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "annotations": gt_anns, "categories": categories}
        coco_dt.dataset = {"images": images, "annotations": dt_anns, "categories": copy.deepcopy(categories)}
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
            coco_dt.createIndex()
        # "bbox" keeps COCOeval from converting annotations to masks; the IoU is ours.
        super().__init__(coco_gt, coco_dt, iouType="bbox")
        self.params.areaRng = [list(r) for r in AREA_RANGES]

    def computeIoU(self, imgId, catId):  # noqa: N802  (COCOeval's name)
        p = self.params
        gts = self._gts[imgId, catId]
        dts = self._dts[imgId, catId]
        if len(gts) == 0 or len(dts) == 0:
            return []
        # Same order and truncation as COCOeval.computeIoU.
        order = np.argsort([-d["score"] for d in dts], kind="mergesort")
        dts = [dts[i] for i in order][: p.maxDets[-1]]
        return spatio_temporal_iou(
            [self._segms[("dt", d["id"])] for d in dts], [self._segms[("gt", g["id"])] for g in gts]
        )

    def run(self) -> Dict[str, float]:
        """Evaluates, accumulates and summarises (the summary is printed); returns the metrics in
        percent (NaN where no ground truth falls in an area range)."""
        with contextlib.redirect_stdout(io.StringIO()):
            self.evaluate()
            self.accumulate()
        self.summarize()
        return {name: float(s * 100) if s >= 0 else float("nan") for name, s in zip(METRIC_NAMES, self.stats)}


def evaluate_ytvis(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], verbose: bool = False
) -> Dict[str, float]:
    """Metrics (:data:`METRIC_NAMES`, percent) of ``results`` against the ground-truth json ``gt``.

    With ``verbose`` the COCO-style summary table is printed, else it is logged. No results
    follow the same convention as any run: 0 where ground truth exists, NaN where an area range
    has none.
    """
    evaluator = YTVISeval(gt, results)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        metrics = evaluator.run()
    if verbose:
        print(buf.getvalue(), end="")
    else:
        logger.info("YouTube-VIS evaluation:\n" + buf.getvalue())
    return metrics


def instances_to_ytvis_json(
    output: Mapping[str, Any], video_id: Any, contiguous_to_dataset_id: Mapping[int, int], length: Optional[int] = None
) -> List[Dict[str, Any]]:
    """Server-format predictions of one video from the model's per-video output.

    Args:
        output: ``{"image_size", "pred_scores" (K floats), "pred_labels" (K contiguous ids),
            "pred_masks" (K bool (T, h, w) tensors)}``.
        video_id: the video's dataset id.
        contiguous_to_dataset_id: contiguous class id -> dataset category id.
        length: the video's number of frames, checked against the masks when given.
    """
    results = []
    for score, label, masks in zip(output["pred_scores"], output["pred_labels"], output["pred_masks"]):
        masks = torch.as_tensor(masks).to("cpu", torch.uint8)
        if length is not None and masks.shape[0] != length:
            raise ValueError(f"video {video_id}: predicted masks have {masks.shape[0]} frames, the video {length}")
        label = int(label)
        if label not in contiguous_to_dataset_id:
            raise ValueError(f"video {video_id}: predicted label {label} is not a contiguous class id of the dataset")
        rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy()))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        results.append({"video_id": video_id, "category_id": int(contiguous_to_dataset_id[label]),
                        "score": float(score), "segmentations": rles})
    return results


class YTVISEvaluator(DatasetEvaluator):
    """Evaluates a video instance segmentation model on a YouTube-VIS-format dataset.

    Consumes the model's per-video output (:func:`instances_to_ytvis_json`; one dict or a list
    with one dict per input video, whose ``video_id`` / ``length`` come from the inputs), writes
    ``results.json`` (server format) to ``output_dir`` and, when the dataset's json
    (``MetadataCatalog.get(dataset_name).json_file``) has annotations, returns
    ``{"segm": {AP, AP50, ...}}``. Distributed like Detectron2's ``COCOEvaluator``: each process
    collects its predictions and the main process evaluates them all.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Optional[Sequence[str]] = None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        use_fast_impl: bool = True,
    ) -> None:
        """``tasks`` and ``use_fast_impl`` are accepted for the published signature; only masks
        ("segm") are evaluated."""
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._metadata = MetadataCatalog.get(dataset_name)
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if not id_map:
            raise ValueError(f"{dataset_name}: YTVISEvaluator needs thing_dataset_id_to_contiguous_id in the metadata")
        self._reverse_id_map = {int(v): int(k) for k, v in id_map.items()}
        self._json_file = getattr(self._metadata, "json_file", None)
        self._predictions: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs, outputs) -> None:
        if isinstance(outputs, Mapping):  # the published model returns one dict per (single-video) batch
            outputs = [outputs]
        for inp, out in zip(inputs, outputs):
            self._predictions.extend(
                instances_to_ytvis_json(out, inp["video_id"], self._reverse_id_map, inp.get("length"))
            )

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning("[YTVISEvaluator] Did not receive valid predictions.")
            return {}
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, "results.json")
            with PathManager.open(path, "w") as f:
                json.dump(predictions, f)
            logger.info(f"Wrote {len(predictions)} predictions to {path} (YouTube-VIS server format)")
        if not self._json_file:
            logger.warning(f"{self._dataset_name}: no json_file in the metadata; nothing to evaluate against")
            return {}
        gt = load_json_file(self._json_file, f"{self._dataset_name} ground-truth json")
        if not gt.get("annotations"):
            logger.info(f"{self._json_file} has no annotations (e.g. YouTube-VIS valid/test): submit results.json "
                        "to the evaluation server")
            return {}
        metrics = evaluate_ytvis(gt, predictions)
        logger.info("YouTube-VIS segm: " + ", ".join(
            f"{k} {v:.2f}" for k, v in metrics.items() if not math.isnan(v)))
        return OrderedDict(segm=metrics)
