#!/usr/bin/env python
"""Scores YouTube-VIS predictions against a ground-truth json (video instance segmentation AP).

The protocol is the published YouTube-VIS one (spatio-temporal mask IoU, mean areas over the
frames, area ranges 128² / 256², maxDets 1/10/100, IoU .50:.05:.95); see
``mask2former_d2/evaluation/ytvis_evaluation.py``. ``RESULTS.json`` is in the format of the
evaluation server (what ``YTVISEvaluator`` writes as ``results.json``). The COCO-style summary is
printed, then, as the last line, a JSON object with AP, AP50, AP75, APs, APm, APl, AR1, AR10
(percent; null where no ground truth falls in an area range).

Usage:
    python tools/evaluate_ytvis.py --gt datasets/ytvis_2019/train.json --results output/inference/results.json
"""

import argparse
import json
import math
import sys
from typing import Optional, Sequence

from mask2former_d2.evaluation.ytvis_evaluation import evaluate_ytvis, load_json_file

REPORTED = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gt", required=True, help="YouTube-VIS json with annotations")
    parser.add_argument("--results", required=True, help="predictions in the YouTube-VIS server format")
    args = parser.parse_args(argv)
    try:
        gt = load_json_file(args.gt, "ground-truth json")
        results = load_json_file(args.results, "results json")
        if not isinstance(gt, dict) or not isinstance(gt.get("videos"), list) or "categories" not in gt:
            raise ValueError(f"{args.gt}: not a YouTube-VIS json (expected 'videos', 'categories', 'annotations')")
        if not gt.get("annotations"):
            raise ValueError(f"{args.gt}: has no annotations to evaluate against")
        if not isinstance(results, list):
            raise ValueError(f"{args.results}: expected a list of predictions, got {type(results).__name__}")
        metrics = evaluate_ytvis(gt, results, verbose=True)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"evaluate_ytvis: {e}")
    print(json.dumps({k: None if math.isnan(metrics[k]) else round(metrics[k], 4) for k in REPORTED}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
