"""YouTube-VIS loading: registered names, category data files, the three segmentation encodings
and the errors on a missing frame, a bad json and an unknown category id."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

import mask2former_d2  # noqa: F401  (registration)
from mask2former_d2.data.datasets.ytvis import YTVIS_SPLITS, load_ytvis_json, ytvis_categories
from tests.common import ROOT

from .video_fixtures import box_mask, write_ytvis

H, W, T = 24, 32, 4


def _decode(segm, h=H, w=W):
    if isinstance(segm, list):
        segm = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    return mask_util.decode(segm).astype(bool)


def _video(kind):
    # track 7 (category 5) in frames 0-2, track 8 (category 1) appears in frame 2 only
    m7 = [box_mask(H, W, 2 + t, 3 + t, 10 + t, 12 + t) for t in range(3)] + [None]
    m8 = [None, None, box_mask(H, W, 12, 15, 20, 30), None]
    return {"id": 3, "name": "vid_a", "h": H, "w": W, "length": T, "kind": kind,
            "masks": {7: (5, m7), 8: (1, m8)}}, m7, m8


@pytest.mark.parametrize("kind", ["rle", "uncompressed", "polygon"])
def test_segmentation_encodings_load(tmp_path, kind):
    video, m7, m8 = _video(kind)
    json_file = write_ytvis(str(tmp_path), [video])
    (record,) = load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    assert record["length"] == T and record["video_id"] == 3
    assert (record["height"], record["width"]) == (H, W)
    assert record["file_names"][1] == os.path.join(str(tmp_path / "JPEGImages"), "vid_a/00001.jpg")
    annos = record["annotations"]
    assert [sorted(a["id"] for a in frame) for frame in annos] == [[7], [7], [7, 8], []]
    # contiguous ids from the json's categories sorted by id: 1 -> 0, 2 -> 1, 5 -> 2
    for t, frame in enumerate(annos):
        for a in frame:
            expected = m7[t] if a["id"] == 7 else m8[t]
            assert a["category_id"] == (2 if a["id"] == 7 else 0)
            assert a["iscrowd"] == 0 and a["bbox_mode"] == BoxMode.XYWH_ABS
            assert np.array_equal(_decode(a["segmentation"]), expected)
            ys, xs = np.nonzero(expected)
            assert a["bbox"] == pytest.approx([xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1])


def test_bbox_derived_when_missing(tmp_path):
    video, m7, _ = _video("uncompressed")
    json_file = write_ytvis(str(tmp_path), [video])
    content = json.load(open(json_file))
    for a in content["annotations"]:
        del a["bboxes"]
    json.dump(content, open(json_file, "w"))
    (record,) = load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    assert record["annotations"][0][0]["bbox"] == pytest.approx([3, 2, 9, 8])


def test_test_split_without_annotations(tmp_path):
    video, _, _ = _video("rle")
    json_file = write_ytvis(str(tmp_path), [video], json_name="test.json")
    content = json.load(open(json_file))
    del content["annotations"]
    json.dump(content, open(json_file, "w"))
    (record,) = load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    assert record["annotations"] == [[] for _ in range(T)]


def test_missing_frame_is_named(tmp_path):
    video, _, _ = _video("rle")
    json_file = write_ytvis(str(tmp_path), [video])
    os.remove(tmp_path / "JPEGImages" / "vid_a" / "00002.jpg")
    with pytest.raises(FileNotFoundError, match=r"frame file not found: .*vid_a/00002\.jpg"):
        load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))


def test_bad_json_is_named(tmp_path):
    video, _, _ = _video("rle")
    json_file = write_ytvis(str(tmp_path), [video])
    with open(json_file, "w") as f:
        f.write('{"videos": [')
    with pytest.raises(ValueError, match=r"train\.json: not a valid JSON file"):
        load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    with open(json_file, "w") as f:
        json.dump({"images": []}, f)
    with pytest.raises(ValueError, match=r"train\.json: not a YouTube-VIS json"):
        load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    with pytest.raises(FileNotFoundError, match="YouTube-VIS json not found"):
        load_ytvis_json(str(tmp_path / "nope.json"), str(tmp_path / "JPEGImages"))


def test_unknown_category_is_named(tmp_path):
    video, _, _ = _video("rle")
    video["masks"][8] = (9, video["masks"][8][1])
    json_file = write_ytvis(str(tmp_path), [video])
    with pytest.raises(ValueError, match=r"annotation 8 \(video 3\) has category_id 9, which is not in the categories"):
        load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))


def test_registered_metadata_maps_dataset_ids(tmp_path):
    # A registered name maps with its own metadata (here YouTube-VIS 2019: id 1 person, 40 tennis_racket)
    video, _, _ = _video("rle")
    video["masks"] = {7: (40, video["masks"][7][1])}
    cats = [{"id": c["id"], "name": c["name"]} for c in ytvis_categories("2019")]
    json_file = write_ytvis(str(tmp_path), [video], categories=cats)
    name = "test_ytvis_2019_like"
    MetadataCatalog.get(name).set(**{k: v for k, v in MetadataCatalog.get("ytvis_2019_train").as_dict().items()
                                     if k.startswith("thing")})
    (record,) = load_ytvis_json(json_file, str(tmp_path / "JPEGImages"), name)
    assert record["annotations"][0][0]["category_id"] == 39


def test_registered_names_and_published_categories():
    for year in ("2019", "2021"):
        for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
            name = f"ytvis_{year}_{split}"
            assert name in DatasetCatalog.list()
            meta = MetadataCatalog.get(name)
            assert meta.evaluator_type == "ytvis"
            assert meta.json_file.endswith(f"ytvis_{year}/{folder}.json")
            assert meta.image_root.endswith(f"ytvis_{year}/{folder}/JPEGImages")
            assert len(meta.thing_classes) == len(meta.thing_colors) == 40
            assert meta.thing_dataset_id_to_contiguous_id == {i: i - 1 for i in range(1, 41)}
        assert YTVIS_SPLITS[f"ytvis_{year}_val"] == (f"ytvis_{year}/valid/JPEGImages", f"ytvis_{year}/valid.json")
    # A few entries of the published tables.
    m19, m21 = MetadataCatalog.get("ytvis_2019_train"), MetadataCatalog.get("ytvis_2021_train")
    assert (m19.thing_classes[0], m19.thing_colors[0]) == ("person", [220, 20, 60])
    assert (m19.thing_classes[5], m19.thing_classes[39]) == ("sedan", "tennis_racket")
    assert (m21.thing_classes[0], m21.thing_colors[0]) == ("airplane", [106, 0, 228])
    assert (m21.thing_classes[2], m21.thing_classes[39], m21.thing_colors[39]) == ("bird", "zebra", [199, 100, 0])
    assert all(c["isthing"] == 1 for c in ytvis_categories("2021"))


def test_category_files_are_package_data():
    # setup.py ships every json file of mask2former_d2.data.datasets.
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    assert "*.json" in package_data["mask2former_d2.data.datasets"]
    pkg = os.path.dirname(mask2former_d2.__file__)
    for year in ("2019", "2021"):
        assert os.path.isfile(os.path.join(pkg, "data", "datasets", f"ytvis_{year}_categories.json"))


def test_mask_size_mismatch_is_named(tmp_path):
    video, _, _ = _video("rle")
    json_file = write_ytvis(str(tmp_path), [video])
    content = json.load(open(json_file))
    content["videos"][0]["height"] = H + 1
    json.dump(content, open(json_file, "w"))
    message = r"annotation 7, frame 0\): RLE size \(H, W\) = \(24, 32\) does not match the video"
    with pytest.raises(ValueError, match=message):
        load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
