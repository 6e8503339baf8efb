"""Pieces shared by the inference benchmarks (image and video)."""
import time
from collections import defaultdict
from typing import Callable, DefaultDict


def time_stages(model, sync: Callable[[], None] = lambda: None) -> DefaultDict[str, float]:
    """Wraps the backbone, pixel decoder and transformer decoder of a MaskFormer-style ``model``
    (image or video) so that each call adds its wall time to the returned dict under
    ``"backbone"``, ``"pixel_decoder"`` and ``"transformer_decoder"``. ``sync`` runs before and
    after each timed call (``torch.cuda.synchronize`` on a GPU)."""
    times = defaultdict(float)

    def timed(name, obj, method):
        inner = getattr(obj, method)

        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = inner(*a, **k)
            sync()
            times[name] += time.perf_counter() - t
            return out

        setattr(obj, method, wrapper)  # instance attribute: shadows the bound method

    timed("backbone", model.backbone, "forward")
    # The head calls the pixel decoder's forward_features, not its forward.
    timed("pixel_decoder", model.sem_seg_head.pixel_decoder, "forward_features")
    timed("transformer_decoder", model.sem_seg_head.predictor, "forward")
    return times


def output_digest(output: dict) -> dict:
    """A few numbers of one image's outputs that tell whether two implementations computed the
    same: panoptic segment count, the sum of their categories and the void pixels; instance count,
    score sum and mask pixels; the mean of the semantic output."""
    out = {"segments": 0, "instances": 0}
    if "panoptic_seg" in output:
        seg, info = output["panoptic_seg"]
        out["segments"] = len(info)
        out["segment_category_sum"] = int(sum(s["category_id"] for s in info))
        out["void_pixels"] = int((seg == 0).sum())
    if "instances" in output:
        inst = output["instances"]
        out["instances"] = len(inst)
        out["instance_score_sum"] = float(inst.scores.sum())
        out["instance_mask_pixels"] = int(inst.pred_masks.sum())
    if "sem_seg" in output:
        out["sem_seg_mean"] = float(output["sem_seg"].double().mean())
    return out
