"""The generated toy YouTube-VIS dataset: real format, moving / appearing / disappearing tracks."""
import json
import os

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import mask2former_d2  # noqa: F401  (registration)
from mask2former_d2.data.toy_video import TOY_YTVIS_CATEGORIES, make_toy_ytvis_dataset, register_toy_ytvis


def test_files_in_youtube_vis_format(tmp_path):
    root = make_toy_ytvis_dataset(str(tmp_path), splits={"train": 6, "val": 2}, length=6, height=48, width=64)
    train = json.load(open(os.path.join(root, "train.json")))
    val = json.load(open(os.path.join(root, "valid.json")))
    assert {"videos", "annotations", "categories"} <= set(train)
    assert [c["id"] for c in train["categories"]] == [1, 2, 3]
    assert len(train["videos"]) == 6 and len(val["videos"]) == 2
    partial = 0
    for split, content in (("train", train), ("valid", val)):
        videos = {v["id"]: v for v in content["videos"]}
        for v in videos.values():
            assert v["length"] == len(v["file_names"]) == 6
            for name in v["file_names"]:
                img = np.array(Image.open(os.path.join(root, split, "JPEGImages", name)))
                assert img.shape == (48, 64, 3)
        for ann in content["annotations"]:
            v = videos[ann["video_id"]]
            assert len(ann["segmentations"]) == len(ann["bboxes"]) == len(ann["areas"]) == v["length"]
            present = [s is not None for s in ann["segmentations"]]
            assert any(present)
            partial += not all(present)
            for s, area in zip(ann["segmentations"], ann["areas"]):
                if s is None:
                    continue
                # released train jsons store uncompressed RLE; the val json here compressed RLE
                assert isinstance(s["counts"], list if split == "train" else str)
                rle = mask_util.frPyObjects(s, *s["size"]) if split == "train" else s
                assert int(mask_util.area(rle)) == area > 0
    assert partial > 0  # some tracks appear late or leave early


def test_tracks_move_and_frames_show_them(tmp_path):
    root = make_toy_ytvis_dataset(str(tmp_path), splits={"train": 4}, length=6, height=48, width=64)
    content = json.load(open(os.path.join(root, "train.json")))
    colors = {c["id"]: np.array(c["color"]) for c in TOY_YTVIS_CATEGORIES}
    moved = 0
    videos = {v["id"]: v for v in content["videos"]}
    for ann in content["annotations"]:
        centres = []
        for t, s in enumerate(ann["segmentations"]):
            if s is None:
                continue
            m = mask_util.decode(mask_util.frPyObjects(s, *s["size"])).astype(bool)
            img = np.array(Image.open(os.path.join(root, "train", "JPEGImages", videos[ann["video_id"]]
                                                   ["file_names"][t]))).astype(float)
            # the object's pixels carry its category colour (up to shading and noise)
            assert np.abs(img[m].mean(0) - colors[ann["category_id"]] * img[m].mean() /
                          colors[ann["category_id"]].mean()).max() < 40
            centres.append(np.argwhere(m).mean(0))
        moved += len(centres) > 1 and np.abs(np.diff(centres, axis=0)).sum() > 1
    assert moved > 0


def test_registration_generates_on_load(tmp_path):
    names = register_toy_ytvis(str(tmp_path / "toy"), prefix="test_toy_ytvis_reg")
    assert names == ["test_toy_ytvis_reg_train", "test_toy_ytvis_reg_val"]
    assert not (tmp_path / "toy").exists()  # registering reads and writes nothing
    meta = MetadataCatalog.get("test_toy_ytvis_reg_val")
    assert meta.evaluator_type == "ytvis" and meta.thing_classes == ["disc", "square", "triangle"]
    records = DatasetCatalog.get("test_toy_ytvis_reg_val")
    assert len(records) == 6 and all(r["length"] == 8 for r in records)
    assert os.path.isfile(meta.json_file)
    assert {a["category_id"] for r in records for f in r["annotations"] for a in f} <= {0, 1, 2}
    assert "toy_ytvis_train" in DatasetCatalog.list()  # the built-in registration
