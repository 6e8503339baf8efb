"""YTVISDatasetMapper: clip sampling, clip-consistent augmentation, absent tracks, test mode."""
import numpy as np
import pytest
import torch

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.data.datasets.ytvis import load_ytvis_json
from mask2former_d2.data.mappers import YTVISDatasetMapper, build_dataset_mapper
from mask2former_d2.data.mappers.video import select_clip_frames
from mask2former_d2.predictor import video_frames

from .video_fixtures import box_mask, write_ytvis

H, W = 40, 56


def _cfg(*opts):
    return get_maskformer_cfg("", [
        "DATASETS.TRAIN", ("ytvis_2019_train",), "DATASETS.TEST", ("ytvis_2019_val",),
        "INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TRAIN", (40,), "INPUT.MAX_SIZE_TRAIN", 1000,
        "INPUT.MIN_SIZE_TEST", 20, "INPUT.MAX_SIZE_TEST", 1000,
        "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice_by_clip", "INPUT.RANDOM_FLIP", "flip_by_clip",
        *opts,
    ])


def _square_video(tmp_path, length=6, same_frames=False, track_frames=None):
    """Red squares on grey: track 11 (cat 1) moves right; track 12 (cat 2) only in ``track_frames``."""
    images, m11, m12 = {}, [], []
    for t in range(length):
        x = 4 if same_frames else 4 + 3 * t
        a = box_mask(H, W, 6, x, 22, x + 16)
        b = box_mask(H, W, 26, 30, 36, 50) if t in (track_frames or ()) else None
        img = np.full((H, W, 3), 90, dtype=np.uint8)
        img[:, : W // 3] = 40  # asymmetric background: a flip is visible
        img[a] = (250, 10, 10)
        if b is not None:
            img[b] = (10, 10, 250)
        images[f"v/{t:05d}.jpg"] = img
        m11.append(a)
        m12.append(b)
    masks = {11: (1, m11)}
    if track_frames:
        masks[12] = (2, m12)
    json_file = write_ytvis(str(tmp_path), [{"id": 1, "name": "v", "h": H, "w": W, "length": length,
                                             "masks": masks}], frame_images=images)
    (record,) = load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    return record


def test_select_clip_frames_within_range():
    np.random.seed(0)
    for _ in range(300):
        length, num, rng = np.random.randint(1, 40), np.random.randint(1, 6), np.random.randint(0, 8)
        idx = select_clip_frames(length, num, rng, shuffle=False)
        assert len(idx) == num and idx == sorted(idx)
        assert all(0 <= i < length for i in idx)
        # some frame of the clip (the reference) has every other one within the range
        assert any(all(abs(i - ref) <= rng for i in idx) for ref in idx)
    shuffled = [select_clip_frames(30, 5, 10, shuffle=True) for _ in range(50)]
    assert any(s != sorted(s) for s in shuffled)


def test_mapper_samples_frames_in_range(tmp_path):
    record = _square_video(tmp_path, length=12)
    mapper = YTVISDatasetMapper(_cfg("INPUT.SAMPLING_FRAME_NUM", 3, "INPUT.SAMPLING_FRAME_RANGE", 2), is_train=True)
    np.random.seed(1)
    seen = set()
    for _ in range(40):
        out = mapper(record)
        idx = out["frame_idx"]
        assert len(idx) == 3 == len(out["image"]) == len(out["instances"])
        assert any(all(abs(i - ref) <= 2 for i in idx) for ref in idx)
        assert out["file_names"] == [record["file_names"][i] for i in idx]
        seen.update(idx)
    assert len(seen) > 6  # the reference frame varies over the video
    assert "annotations" in record and len(record["file_names"]) == 12  # input untouched


@pytest.mark.parametrize("augs", [[], ["brightness", "contrast", "saturation", "rotation"]])
def test_clip_consistent_augmentation(tmp_path, augs):
    """Identical frames + clip-consistent resize/flip/crop/colour/rotation = identical outputs, and
    the masks follow the image (red pixels)."""
    record = _square_video(tmp_path, same_frames=True)
    cfg = _cfg("INPUT.MIN_SIZE_TRAIN", (24, 32, 48, 64), "INPUT.SAMPLING_FRAME_NUM", 4,
               "INPUT.CROP.ENABLED", True, "INPUT.CROP.TYPE", "relative_range", "INPUT.CROP.SIZE", (0.7, 0.7),
               "INPUT.AUGMENTATIONS", augs)
    mapper = YTVISDatasetMapper(cfg, is_train=True)
    np.random.seed(2)
    sizes, flips = set(), set()
    for _ in range(16):
        out = mapper(record)
        frames = [im.numpy() for im in out["image"]]
        assert all(np.array_equal(frames[0], f) for f in frames[1:])
        sizes.add(frames[0].shape)
        # the dark third of the background ends up on the left unless flipped
        h, w = frames[0].shape[1:]
        left, right = frames[0][1, :, : w // 6].mean(), frames[0][1, :, -w // 6:].mean()
        flips.add(bool(left > right))
        for im, inst in zip(out["image"], out["instances"]):
            red = (im[0] > 170) & (im[1] < 80)
            mask = inst.gt_masks[0]
            assert inst.gt_masks.shape[-2:] == im.shape[-2:]
            inter, union = (red & mask).sum().item(), (red | mask).sum().item()
            assert union > 0 and inter / union > 0.75
    assert len(sizes) > 1 and flips == {True, False}


def test_per_frame_modes_draw_per_frame(tmp_path):
    record = _square_video(tmp_path, same_frames=True)
    cfg = _cfg("INPUT.MIN_SIZE_TRAIN", (24, 32, 48, 64), "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice",
               "INPUT.RANDOM_FLIP", "horizontal", "INPUT.SAMPLING_FRAME_NUM", 4)
    mapper = YTVISDatasetMapper(cfg, is_train=True)
    np.random.seed(3)
    differ = 0
    for _ in range(10):
        out = mapper(record)
        frames = [im.numpy() for im in out["image"]]
        differ += any(f.shape != frames[0].shape or not np.array_equal(f, frames[0]) for f in frames[1:])
    assert differ >= 8


def test_absent_tracks(tmp_path):
    record = _square_video(tmp_path, length=5, track_frames=(1, 2))
    mapper = YTVISDatasetMapper(_cfg("INPUT.SAMPLING_FRAME_NUM", 3, "INPUT.SAMPLING_FRAME_RANGE", 5), is_train=True)
    np.random.seed(4)
    clips_with_12 = 0
    for _ in range(30):
        out = mapper(record)
        idx, insts = out["frame_idx"], out["instances"]
        has_12 = any(i in (1, 2) for i in idx)
        clips_with_12 += has_12
        n = 2 if has_12 else 1
        for i, inst in zip(idx, insts):
            assert len(inst) == n
            assert inst.gt_classes.tolist() == [0, 1][:n]  # contiguous ids of categories 1, 2
            assert inst.gt_ids[0].item() == 11 and inst.gt_masks[0].any()
            assert inst.gt_boxes.tensor.shape == (n, 4) and inst.gt_masks.dtype == torch.bool
            if n == 2:
                present = i in (1, 2)
                assert inst.gt_ids[1].item() == (12 if present else -1)
                assert bool(inst.gt_masks[1].any()) == present
                if not present:
                    assert inst.gt_boxes.tensor[1].abs().sum() == 0
    assert 0 < clips_with_12 < 30


def test_test_mode_all_frames_no_instances(tmp_path):
    record = _square_video(tmp_path, length=7)
    mapper = YTVISDatasetMapper(_cfg(), is_train=False)
    out = mapper(record)
    assert out["frame_idx"] == list(range(7)) and len(out["image"]) == 7
    assert "instances" not in out and "annotations" not in out
    assert out["image"][0].shape == (3, 20, 28)  # MIN_SIZE_TEST 20
    assert (out["height"], out["width"], out["length"]) == (H, W, 7)


def test_build_by_name_and_errors(tmp_path):
    cfg = _cfg("INPUT.DATASET_MAPPER_NAME", "ytvis")
    assert isinstance(build_dataset_mapper(cfg, is_train=True), YTVISDatasetMapper)
    with pytest.raises(ValueError, match="INPUT.AUGMENTATIONS has unknown entries.*'blur'"):
        YTVISDatasetMapper(_cfg("INPUT.AUGMENTATIONS", ["blur"]), is_train=True)
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP='sideways'"):
        YTVISDatasetMapper(_cfg("INPUT.RANDOM_FLIP", "sideways"), is_train=True)
    record = _square_video(tmp_path, length=3)
    record["annotations"][0][0]["category_id"] = 77
    with pytest.raises(ValueError, match=r"category id\(s\) \[77\]"):
        YTVISDatasetMapper(_cfg("INPUT.SAMPLING_FRAME_RANGE", 5, "INPUT.SAMPLING_FRAME_NUM", 6), is_train=True)(record)
    import os
    os.remove(record["file_names"][1])
    with pytest.raises(FileNotFoundError, match="00001.jpg"):
        YTVISDatasetMapper(_cfg(), is_train=False)(record)


def test_real_clip_from_shared_video(tmp_path):
    """Frames of a real clip (../shared/data/video) in a YouTube-VIS layout: train and test mapping."""
    import json
    import os

    import cv2

    from tests.common import SHARED

    path = os.path.join(SHARED, "data", "video", "mmpose_demo.mp4")
    if not os.path.isfile(path):
        pytest.skip(f"shared clip not found: {path}")
    frames = [cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) for frame in video_frames(path, 4)]
    h, w = frames[0].shape[:2]
    track = [box_mask(h, w, h // 4, w // 4 + 10 * t, h // 2, w // 2 + 10 * t) for t in range(len(frames))]
    track[1] = None  # absent from frame 1
    video = {"id": 42, "name": "clip", "h": h, "w": w, "length": len(frames), "kind": "polygon",
             "masks": {5: (2, track)}}
    images = {f"clip/{t:05d}.jpg": f for t, f in enumerate(frames)}
    json_file = write_ytvis(str(tmp_path), [video], frame_images=images)
    (record,) = load_ytvis_json(json_file, str(tmp_path / "JPEGImages"))
    cfg = _cfg("INPUT.MIN_SIZE_TRAIN", (270,), "INPUT.MAX_SIZE_TRAIN", 2000, "INPUT.MIN_SIZE_TEST", 180,
               "INPUT.SAMPLING_FRAME_NUM", len(frames), "INPUT.SAMPLING_FRAME_RANGE", len(frames))
    np.random.seed(5)
    out = YTVISDatasetMapper(cfg, is_train=True)(record)
    scale = 270 / min(h, w)
    for t, im, inst in zip(out["frame_idx"], out["image"], out["instances"]):
        assert im.shape == (3, 270, int(w * scale + 0.5))
        assert inst.gt_ids.tolist() == [-1 if t == 1 else 5]
        area = inst.gt_masks[0].sum().item()
        assert (area == 0) if t == 1 else area == pytest.approx((h // 4) * (w // 4) * scale**2, rel=0.1)
    # the same frames as a test split (no annotations): every frame, test size
    content = json.load(open(json_file))
    del content["annotations"]
    json.dump(content, open(tmp_path / "test.json", "w"))
    (test_record,) = load_ytvis_json(str(tmp_path / "test.json"), str(tmp_path / "JPEGImages"))
    test_out = YTVISDatasetMapper(cfg, is_train=False)(test_record)
    assert [tuple(im.shape) for im in test_out["image"]] == [(3, 180, int(w * 180 / min(h, w) + 0.5))] * len(frames)


def test_size_divisibility_pads_frames_and_masks(tmp_path):
    record = _square_video(tmp_path, length=3)
    cfg = _cfg("INPUT.SIZE_DIVISIBILITY", 32, "INPUT.SAMPLING_FRAME_NUM", 2)  # 40x56 -> 64x64
    out = YTVISDatasetMapper(cfg, is_train=True)(record)
    for im, inst in zip(out["image"], out["instances"]):
        assert im.shape == (3, 64, 64) and inst.image_size == (64, 64) and inst.gt_masks.shape == (1, 64, 64)
        assert (im[:, 40:, :] == 128).all() and (im[:, :, 56:] == 128).all()
        assert not inst.gt_masks[:, 40:].any() and inst.gt_masks[0, :40, :56].sum() == 16 * 16
