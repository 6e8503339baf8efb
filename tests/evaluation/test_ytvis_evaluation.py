"""YouTube-VIS evaluation against a naive reference (greedy matching per video and category,
101-point interpolated AP) on hand-made cases, YTVISEvaluator and tools/evaluate_ytvis.py."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import MetadataCatalog

from mask2former_d2.evaluation import YTVISEvaluator
from mask2former_d2.evaluation.ytvis_evaluation import evaluate_ytvis, spatio_temporal_iou
from tests.common import ROOT

THRESHOLDS = np.linspace(0.5, 0.95, 10)
AREAS = {"all": (0, 1e10), "s": (0, 128**2), "m": (128**2, 256**2), "l": (256**2, 1e10)}


def rle(mask):
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")
    return r


def box(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- naive reference
def _naive_iou(d, g):
    inter = sum(int((a & b).sum()) for a, b in zip(d, g))
    union = sum(int((a | b).sum()) for a, b in zip(d, g))
    return inter / union if union else 0.0


def _mean_area(track):
    areas = [int(m.sum()) for m in track if m.any()]
    return float(np.mean(areas)) if areas else 0.0


def naive_metrics(videos, gts, dts):
    """videos: {vid: T}; gts: [(vid, cat, [T bool masks])]; dts: [(vid, cat, score, [T bool masks])]."""
    cats = sorted({g[1] for g in gts})

    def run(cat, area, thr, max_dets):
        lo, hi = AREAS[area]
        scored, n_pos = [], 0
        for vid in sorted(videos):
            g_list = [g for g in gts if g[0] == vid and g[1] == cat]
            g_ign = [not (lo <= _mean_area(g[2]) <= hi) for g in g_list]
            n_pos += g_ign.count(False)
            d_list = sorted([d for d in dts if d[0] == vid and d[1] == cat], key=lambda d: -d[2])[:max_dets]
            matched = [False] * len(g_list)
            for d in d_list:
                best, best_iou = None, -1.0
                for prefer_ignored in (False, True):  # a non-ignored match wins
                    for j, g in enumerate(g_list):
                        if matched[j] or g_ign[j] != prefer_ignored:
                            continue
                        iou = _naive_iou(d[3], g[2])
                        if iou >= thr and iou > best_iou:
                            best, best_iou = j, iou
                    if best is not None:
                        break
                if best is not None:
                    matched[best] = True
                    if not g_ign[best]:
                        scored.append((d[2], True))
                elif lo <= _mean_area(d[3]) <= hi:
                    scored.append((d[2], False))
        if n_pos == 0:
            return None
        scored.sort(key=lambda s: -s[0])
        tp = np.cumsum([s[1] for s in scored])
        fp = np.cumsum([not s[1] for s in scored])
        recall = tp / n_pos if len(scored) else np.zeros(0)
        precision = tp / np.maximum(tp + fp, 1) if len(scored) else np.zeros(0)
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        points = []
        for r in np.linspace(0, 1, 101):
            above = np.nonzero(recall >= r)[0]
            points.append(precision[above[0]] if len(above) else 0.0)
        return float(np.mean(points)), (float(recall[-1]) if len(recall) else 0.0)

    def average(area, thrs, max_dets, which):
        vals = [run(c, area, t, max_dets) for c in cats for t in thrs]
        vals = [v[which] for v in vals if v is not None]
        return 100 * float(np.mean(vals)) if vals else float("nan")

    return {
        "AP": average("all", THRESHOLDS, 100, 0), "AP50": average("all", [0.5], 100, 0),
        "AP75": average("all", [0.75], 100, 0), "APs": average("s", THRESHOLDS, 100, 0),
        "APm": average("m", THRESHOLDS, 100, 0), "APl": average("l", THRESHOLDS, 100, 0),
        "AR1": average("all", THRESHOLDS, 1, 1), "AR10": average("all", THRESHOLDS, 10, 1),
    }


def to_json(videos, sizes, gts, dts, cat_ids):
    gt = {
        "videos": [{"id": v, "height": sizes[v][0], "width": sizes[v][1], "length": t,
                    "file_names": [f"{v}/{i:05d}.jpg" for i in range(t)]} for v, t in videos.items()],
        "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids],
        "annotations": [{"id": k + 1, "video_id": v, "category_id": c, "iscrowd": 0,
                         "segmentations": [rle(m) if m.any() else None for m in masks],
                         "areas": [int(m.sum()) if m.any() else None for m in masks]}
                        for k, (v, c, masks) in enumerate(gts)],
    }
    results = [{"video_id": v, "category_id": c, "score": s, "segmentations": [rle(m) for m in masks]}
               for v, c, s, masks in dts]
    return gt, results


def assert_close(ours, ref):
    for k, v in ref.items():
        if np.isnan(v):
            assert np.isnan(ours[k]), k
        else:
            assert ours[k] == pytest.approx(v, abs=1e-6), (k, ours[k], v)


# ----------------------------------------------------------------------------- cases
def test_spatio_temporal_iou_with_missing_frames():
    h, w = 10, 10
    g = [box(h, w, 0, 0, 2, 5), box(h, w, 0, 0, 2, 5), None]  # area 10 in frames 0, 1
    d = [None, box(h, w, 0, 0, 1, 10), box(h, w, 5, 0, 6, 10)]  # area 10 in frames 1, 2
    g_rle = [None if m is None else mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in g]
    d_rle = [None if m is None else mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in d]
    # I = 5 (frame 1); U = 10 (frame 0) + 15 (frame 1) + 10 (frame 2)
    assert spatio_temporal_iou([d_rle], [g_rle])[0, 0] == pytest.approx(5 / 35)
    assert spatio_temporal_iou([g_rle], [g_rle])[0, 0] == 1.0


def test_perfect_predictions():
    h, w = 60, 80
    videos, sizes = {1: 3, 2: 4}, {1: (h, w), 2: (h, w)}
    gts = [(1, 1, [box(h, w, 0, 0, 20, 20)] * 3), (1, 2, [box(h, w, 30, 30, 50, 70)] * 2 + [box(h, w, 0, 0, 0, 0)]),
           (2, 1, [box(h, w, 0, 0, 0, 0), box(h, w, 10, 10, 40, 40), box(h, w, 12, 12, 40, 40),
                   box(h, w, 0, 0, 0, 0)])]
    dts = [(v, c, 0.9 - 0.1 * k, m) for k, (v, c, m) in enumerate(gts)]
    metrics = evaluate_ytvis(*to_json(videos, sizes, gts, dts, [1, 2]))
    for k in ("AP", "AP50", "AP75", "APs", "AR1", "AR10"):
        assert metrics[k] == pytest.approx(100.0), k
    assert np.isnan(metrics["APm"]) and np.isnan(metrics["APl"])  # no ground truth that large


def test_known_partial_case():
    """Two tracks; d1 (0.9) overlaps g1 with IoU 5/8, d2 (0.8) is a false positive, d3 (0.7) = g2."""
    h, w = 40, 40
    g1 = [box(h, w, 0, 0, 8, 10)] * 2  # 80 px per frame
    d1 = [box(h, w, 0, 0, 5, 10), box(h, w, 0, 0, 5, 10)]  # inside g1: I = 100, U = 160
    g2 = [box(h, w, 20, 20, 30, 30), None]
    d2 = [box(h, w, 30, 0, 40, 10)] * 2
    gts = [(1, 1, g1), (1, 1, [m if m is not None else np.zeros((h, w), bool) for m in g2])]
    dts = [(1, 1, 0.9, d1), (1, 1, 0.8, d2), (1, 1, 0.7, gts[1][2])]
    metrics = evaluate_ytvis(*to_json({1: 2}, {1: (h, w)}, gts, dts, [1]))
    # thresholds .5, .55, .6 (IoU .625 passes): TP FP TP -> precision (1, 2/3, 2/3) over recall (.5, .5, 1)
    ap_low = (51 * 1 + 50 * 2 / 3) / 101
    # the 7 higher thresholds: FP FP TP -> precision 1/3 up to recall .5, then nothing
    ap_high = 51 * (1 / 3) / 101
    assert metrics["AP"] == pytest.approx(100 * (3 * ap_low + 7 * ap_high) / 10)
    assert metrics["AP50"] == pytest.approx(100 * ap_low)
    assert metrics["AP75"] == pytest.approx(100 * ap_high)
    assert metrics["AR1"] == pytest.approx(100 * (3 * 0.5 + 7 * 0) / 10)  # top-1 is d1
    assert metrics["AR10"] == pytest.approx(100 * (3 * 1.0 + 7 * 0.5) / 10)
    assert_close(metrics, naive_metrics({1: 2}, gts, dts))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_naive_reference(seed):
    """Tracks that move, appear and disappear, of all sizes; noisy, missing and spurious predictions."""
    rng = np.random.default_rng(seed)
    h, w = 300, 400
    videos = {int(v): int(rng.integers(2, 5)) for v in rng.choice(100, 3, replace=False)}
    sizes = {v: (h, w) for v in videos}
    gts, dts = [], []
    score = iter(rng.permutation(1000) / 1000.0)  # distinct scores: the ranking has no ties
    for v, length in videos.items():
        for _ in range(int(rng.integers(1, 5))):
            cat = int(rng.integers(1, 4))
            side = int(rng.choice([40, 150, 290]))
            y, x = int(rng.integers(0, h - side // 2)), int(rng.integers(0, w - side))
            present = rng.random(length) < 0.8
            present[rng.integers(length)] = True
            track = [box(h, w, y, x + 3 * t, y + side, x + side + 3 * t) if p else np.zeros((h, w), bool)
                     for t, p in enumerate(present)]
            gts.append((v, cat, track))
            for _ in range(int(rng.integers(0, 3))):  # noisy copies
                dy, dx = rng.integers(-side // 3, side // 3 + 1, size=2)
                noisy = [np.roll(m, (int(dy), int(dx)), axis=(0, 1)) if rng.random() < 0.9 else
                         np.zeros((h, w), bool) for m in track]
                dts.append((v, cat if rng.random() < 0.8 else int(rng.integers(1, 4)), next(score), noisy))
        for _ in range(int(rng.integers(0, 3))):  # spurious
            s = int(rng.integers(10, 200))
            dts.append((v, int(rng.integers(1, 4)), next(score), [box(h, w, 0, 0, s, s)] * length))
    gt, results = to_json(videos, sizes, gts, dts, [1, 2, 3])
    assert_close(evaluate_ytvis(gt, results), naive_metrics(videos, gts, dts))


def test_result_errors():
    h, w = 20, 20
    gt, results = to_json({5: 2}, {5: (h, w)}, [(5, 1, [box(h, w, 0, 0, 5, 5)] * 2)],
                          [(5, 1, 0.5, [box(h, w, 0, 0, 5, 5)] * 2)], [1])
    with pytest.raises(ValueError, match="video_id 6 is not a video"):
        evaluate_ytvis(gt, [{**results[0], "video_id": 6}])
    with pytest.raises(ValueError, match="category_id 0 is not a category.*dataset category ids"):
        evaluate_ytvis(gt, [{**results[0], "category_id": 0}])
    with pytest.raises(ValueError, match="one entry per frame \\(2\\), got 1"):
        evaluate_ytvis(gt, [{**results[0], "segmentations": results[0]["segmentations"][:1]}])
    small = rle(box(10, 10, 0, 0, 2, 2))
    size_error = r"RLE size \(H, W\) = \(10, 10\) does not match the video \(H, W\) = \(20, 20\)"
    with pytest.raises(ValueError, match=size_error):
        evaluate_ytvis(gt, [{**results[0], "segmentations": [small, small]}])


def test_evaluator_writes_server_results(tmp_path):
    h, w = 30, 40
    g = [box(h, w, 2, 2, 20, 30), box(h, w, 4, 4, 22, 32), np.zeros((h, w), bool)]
    gt, _ = to_json({7: 3}, {7: (h, w)}, [(7, 12, g)], [], [3, 12])
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(gt))
    name = "test_ytvis_evaluator_ds"
    MetadataCatalog.get(name).set(json_file=str(json_file), thing_dataset_id_to_contiguous_id={3: 0, 12: 1})
    evaluator = YTVISEvaluator(name, output_dir=str(tmp_path / "out"))
    evaluator.reset()
    masks = torch.from_numpy(np.stack(g))
    output = {"image_size": (h, w), "pred_scores": [0.9, 0.2], "pred_labels": [1, 0],
              "pred_masks": [masks, torch.zeros_like(masks)]}
    evaluator.process([{"video_id": 7, "length": 3}], output)  # one dict, as the published model returns
    res = evaluator.evaluate()
    assert res["segm"]["AP"] == pytest.approx(100.0)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["video_id"], r["category_id"], r["score"]) for r in written] == [(7, 12, 0.9), (7, 3, 0.2)]
    assert len(written[0]["segmentations"]) == 3 and isinstance(written[0]["segmentations"][0]["counts"], str)
    assert np.array_equal(mask_util.decode(written[0]["segmentations"][1]).astype(bool), g[1])
    with pytest.raises(ValueError, match="predicted masks have 3 frames, the video 4"):
        evaluator.process([{"video_id": 7, "length": 4}], [output])


def test_evaluate_ytvis_tool(tmp_path):
    h, w = 30, 40
    gts = [(1, 1, [box(h, w, 0, 0, 10, 10), box(h, w, 0, 0, 12, 12)]), (1, 2, [box(h, w, 15, 15, 30, 40)] * 2)]
    dts = [(1, 1, 0.8, gts[0][2]), (1, 2, 0.6, [box(h, w, 15, 15, 30, 30)] * 2)]
    gt, results = to_json({1: 2}, {1: (h, w)}, gts, dts, [1, 2])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    tool = os.path.join(ROOT, "tools", "evaluate_ytvis.py")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, tool, "--gt", str(tmp_path / "gt.json"), "--results",
                           str(tmp_path / "res.json")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(last) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10"]
    ref = naive_metrics({1: 2}, gts, dts)
    for k in ("AP", "AP50", "AP75", "APs", "AR1", "AR10"):
        assert last[k] == pytest.approx(ref[k], abs=1e-3), k
    assert last["AP50"] == pytest.approx(100.0) and last["AP75"] == pytest.approx(50.0)
    assert last["APm"] is None and "Average Precision" in proc.stdout
    # Bad input: one line naming the file, non-zero exit (in-process: importing torch again is slow).
    spec = importlib.util.spec_from_file_location("evaluate_ytvis_tool", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "bad.json").write_text("[{")
    for argv, needle in (
        (["--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "bad.json")], "bad.json: results json is not"),
        (["--gt", str(tmp_path / "nope.json"), "--results", str(tmp_path / "res.json")], "not found"),
    ):
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        message = str(exc.value.code)
        assert message.startswith("evaluate_ytvis: ") and needle in message and "\n" not in message


_DISTRIBUTED_SCRIPT = r'''
import json, sys
import numpy as np, torch
from detectron2.data import MetadataCatalog
from detectron2.engine import launch
from detectron2.utils import comm
from mask2former_d2.evaluation import YTVISEvaluator

def work(gt_file, out_dir, result_file):
    MetadataCatalog.get("dist_ytvis").set(json_file=gt_file, thing_dataset_id_to_contiguous_id={1: 0})
    gt = json.load(open(gt_file))
    ev = YTVISEvaluator("dist_ytvis", output_dir=out_dir)
    ev.reset()
    import pycocotools.mask as mu
    for video, ann in zip(gt["videos"], gt["annotations"]):
        if video["id"] % 2 != comm.get_rank():
            continue  # each process sees half of the videos
        masks = torch.from_numpy(np.stack([mu.decode(s) for s in ann["segmentations"]]).astype(bool))
        ev.process([{"video_id": video["id"], "length": video["length"]}],
                   [{"pred_scores": [0.9], "pred_labels": [0], "pred_masks": [masks]}])
    res = ev.evaluate()
    if comm.is_main_process():
        json.dump(res, open(result_file, "w"))
    else:
        assert res == {}

if __name__ == "__main__":
    launch(work, 2, dist_url="auto", args=tuple(sys.argv[1:]))
'''


@pytest.mark.skipif(not os.environ.get("M2F_SLOW"), reason="3 processes, ~1-2 min; M2F_SLOW=1")
def test_evaluator_gathers_across_processes(tmp_path):
    """Two gloo processes, each with half of the videos: the main process scores all of them."""
    h, w = 20, 20
    gts = [(v, 1, [box(h, w, v, v, v + 8, v + 8)] * 2) for v in (1, 2, 3, 4)]
    gt, _ = to_json({v: 2 for v in (1, 2, 3, 4)}, {v: (h, w) for v in (1, 2, 3, 4)}, gts, [], [1])
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    script = tmp_path / "dist_eval.py"
    script.write_text(_DISTRIBUTED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "gt.json"), str(tmp_path / "out"),
                           str(tmp_path / "res.json")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["segm"]["AP"] == pytest.approx(100.0)  # would be 50 with one process's videos only
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(r["video_id"] for r in written) == [1, 2, 3, 4]


def test_evaluator_without_ground_truth_only_writes_results(tmp_path):
    """YouTube-VIS valid/test jsons have no annotations: results.json is for the server."""
    h, w = 12, 16
    gt, _ = to_json({3: 2}, {3: (h, w)}, [], [], [1, 2])
    del gt["annotations"]
    (tmp_path / "valid.json").write_text(json.dumps(gt))
    name = "test_ytvis_evaluator_no_gt"
    MetadataCatalog.get(name).set(json_file=str(tmp_path / "valid.json"),
                                  thing_dataset_id_to_contiguous_id={1: 0, 2: 1})
    evaluator = YTVISEvaluator(name, output_dir=str(tmp_path / "out"))
    evaluator.reset()
    masks = torch.zeros((2, h, w), dtype=torch.bool)
    evaluator.process([{"video_id": 3, "length": 2}],
                      [{"pred_scores": [0.5], "pred_labels": [1], "pred_masks": [masks]}])
    assert evaluator.evaluate() == {}
    (written,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (written["video_id"], written["category_id"], len(written["segmentations"])) == (3, 2, 2)
