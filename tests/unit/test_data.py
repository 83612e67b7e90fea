"""Data sets, transforms and batching: shapes generation, the COCO-format loader, bad data."""
from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.cocoeval import COCOeval

from sparse_detr.config import ConfigError, load_config
from sparse_detr.data import build_dataset, num_classes, shapes
from sparse_detr.data import transforms as T
from sparse_detr.data.coco import CocoDetection, DataError
from sparse_detr.data.collate import collate
from sparse_detr.data.config import DataConfig

TINY_SHAPES = dict(num_train=24, num_val=8, image_size=64, seed=3)


def shapes_cfg(root, **overrides) -> DataConfig:
    return DataConfig(name="shapes", root=str(root), **{**TINY_SHAPES, **overrides})


def write_coco(folder, images, annotations, categories, name="ann.json", image_dir="images"):
    """A COCO-format data set in `folder`: images given as (id, width, height) become solid PNGs."""
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, width, height in images:
        Image.new("RGB", (width, height), (90, 120, 150)).save(folder / image_dir / f"{image_id}.png")
        entries.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "annotations": annotations,
                                "categories": [{"id": c, "name": f"c{c}"} for c in categories]}))
    return folder / image_dir, path


def ann(ann_id, image_id, category_id, bbox, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def coco_format_cfg(images, annotations, **overrides) -> DataConfig:
    return DataConfig(name="coco_format", train_images=str(images), train_annotations=str(annotations),
                      val_images=str(images), val_annotations=str(annotations), **overrides)


def val_set(tmp_path, annotations, images=((1, 40, 30), (2, 40, 30)), categories=(7,)):
    image_dir, ann_file = write_coco(tmp_path, images, annotations, categories)
    return build_dataset(coco_format_cfg(image_dir, ann_file), "val")


# ---------------------------------------------------------------- shapes


def test_shapes_generation_is_deterministic_per_seed(tmp_path, monkeypatch):
    first = shapes.shapes_paths(shapes_cfg(tmp_path / "a"), "train")
    monkeypatch.setattr(shapes, "CHUNK", 5)  # the same data set drawn by several processes
    second = shapes.shapes_paths(shapes_cfg(tmp_path / "b"), "train")
    assert first[1].read_text() == second[1].read_text()
    for name in ("000000.png", "000023.png"):
        assert np.array_equal(np.asarray(Image.open(first[0] / name)), np.asarray(Image.open(second[0] / name)))
    other = shapes.shapes_paths(shapes_cfg(tmp_path / "a", seed=4), "train")
    assert other[0].parent != first[0].parent and other[1].read_text() != first[1].read_text()


def test_shapes_are_generated_once_and_reused(tmp_path, monkeypatch):
    cfg = shapes_cfg(tmp_path)
    ds = build_dataset(cfg, "train")
    monkeypatch.setattr(shapes, "generate", lambda *args: pytest.fail("regenerated a cached data set"))
    again = build_dataset(cfg, "train")
    assert len(ds) == len(again) == 24 and len(build_dataset(cfg, "val")) == 8


def test_shapes_generation_losing_a_race_keeps_the_finished_copy(tmp_path):
    cfg = shapes_cfg(tmp_path)
    folder = shapes.shapes_folder(cfg)
    shapes.generate(cfg, folder)
    before = (folder / "annotations" / "instances_val.json").read_text()
    shapes.generate(cfg, folder)  # a second process finishing later
    assert (folder / "annotations" / "instances_val.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary folders left


def test_shapes_boxes_are_exact():
    cfg = DataConfig(**TINY_SHAPES, max_objects=4, min_objects=3)
    for index in range(20):
        pixels, objects = shapes.render_image(np.random.default_rng([3, 0, index]), cfg)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        for category, mask in objects:
            x, y, w, h = shapes.mask_box(mask)
            inside = np.zeros_like(mask)
            inside[y:y + h, x:x + w] = True
            assert mask.any() and not (mask & ~inside).any()  # every object pixel lies in its box
            assert mask[y, :].any() and mask[y + h - 1, :].any() and mask[:, x].any() and mask[:, x + w - 1].any()
            assert 0 <= category < cfg.num_categories


def test_shapes_json_matches_rendered_objects_and_val_targets(tmp_path):
    cfg = shapes_cfg(tmp_path)
    ds = build_dataset(cfg, "val")
    image, target = ds[0]
    _, objects = shapes.render_image(np.random.default_rng([3, 1, 0]), cfg)
    expected = torch.tensor([shapes.mask_box(mask) for _, mask in objects], dtype=torch.float32)
    expected[:, :2] += expected[:, 2:] / 2  # xywh -> cxcywh
    assert image.shape == (3, 64, 64) and torch.allclose(target["boxes"] * 64, expected)
    assert target["labels"].tolist() == [category for category, _ in objects]
    assert ds.label_to_category == [1, 2, 3, 4] and ds.num_classes == num_classes(cfg) == 4



def test_shapes_images_decoded_once_equal_the_files_on_disk(tmp_path):
    ds = build_dataset(shapes_cfg(tmp_path), "train")
    assert ds.decoded is not None and len(ds.decoded) == len(ds) == 24
    for index in (0, 7, 23):
        info = ds.images[index]
        on_disk = CocoDetection._read(ds.images_dir / info["file_name"], [info["height"], info["width"]])
        assert torch.equal(ds.decoded[index], on_disk)
    ds.decoded[0].zero_()  # every access gets its own copy: a transform cannot change the store
    assert ds.decoded[0].any()
    torch.manual_seed(5)
    augmented = ds[3]
    ds.decoded = None  # read from disk, as any other data set
    torch.manual_seed(5)
    from_disk = ds[3]
    assert torch.equal(augmented[0], from_disk[0]) and torch.equal(augmented[1]["boxes"], from_disk[1]["boxes"])


def test_a_preloaded_image_that_does_not_decode_is_skipped_as_on_disk(tmp_path, caplog):
    image_dir, ann_file = write_coco(tmp_path, [(1, 40, 30), (2, 40, 30)], [], [7])
    (image_dir / "1.png").write_bytes(b"not a png")
    ds = CocoDetection(image_dir, ann_file, [7], T.Normalize(), preload=True)
    with caplog.at_level(logging.WARNING):
        _, target = ds[0]
    assert target["image_id"].item() == 2 and ds.unreadable == 1 and "1.png" in caplog.text
    assert build_dataset(coco_format_cfg(image_dir, ann_file), "val").decoded is None  # user files: read each time

def test_shapes_cannot_be_solved_without_looking(tmp_path):
    """The best image-blind guess (typical training boxes, every class) scores near zero AP50."""
    cfg = shapes_cfg(tmp_path, num_train=200, num_val=40)
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    boxes = np.array([a["bbox"] for a in train.coco.dataset["annotations"]], dtype=float)
    guesses = boxes[np.random.default_rng(0).choice(len(boxes), 20, replace=False)]
    detections = [{"image_id": i, "category_id": c, "bbox": list(b), "score": 1.0}
                  for i in val.coco.getImgIds() for c in val.label_to_category for b in guesses]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(val.coco, val.coco.loadRes(detections), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[1] < 0.05


# ---------------------------------------------------------------- COCO format and COCO


def test_sparse_category_ids_map_to_contiguous_labels_and_back(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [(5, 40, 30)], [
        ann(1, 5, 30, [0, 0, 10, 10]), ann(2, 5, 7, [5, 5, 10, 10]), ann(3, 5, 12, [20, 10, 20, 20])], [30, 7, 12])
    cfg = coco_format_cfg(image_dir, ann_file)
    ds = build_dataset(cfg, "train")
    assert num_classes(cfg) == ds.num_classes == 3 and ds.label_to_category == [7, 12, 30]
    _, target = build_dataset(cfg, "val")[0]
    assert target["labels"].tolist() == [2, 0, 1]
    assert [ds.label_to_category[label] for label in target["labels"]] == [30, 7, 12]
    assert sorted(ds.coco.getCatIds()) == [7, 12, 30]  # evaluation keeps the file's own ids
    assert target["image_id"].item() == 5 and target["orig_size"].tolist() == [30, 40]


def test_val_categories_outside_the_training_file_fail(tmp_path):
    image_dir, train_file = write_coco(tmp_path, [(1, 40, 30)], [ann(1, 1, 7, [0, 0, 5, 5])], [7], "train.json")
    _, val_file = write_coco(tmp_path, [(1, 40, 30)], [ann(1, 1, 8, [0, 0, 5, 5])], [7, 8], "val.json")
    cfg = DataConfig(name="coco_format", train_images=str(image_dir), train_annotations=str(train_file),
                     val_images=str(image_dir), val_annotations=str(val_file))
    with pytest.raises(DataError, match=r"category ids .* \[7\]: \{8: 1\}"):
        build_dataset(cfg, "val")


def test_coco_layout_error_names_the_expected_paths(tmp_path):
    with pytest.raises(DataError) as error:
        build_dataset(DataConfig(name="coco", root=str(tmp_path)), "train")
    for part in ("train2017", "val2017", "annotations/instances_train2017.json", "annotations/instances_val2017.json"):
        assert str(tmp_path / part) in str(error.value)
    with pytest.raises(ConfigError, match="COCO_ROOT"):
        DataConfig(name="coco", root=None)


def test_coco_keeps_category_ids_as_labels(tmp_path):
    for split in ("train", "val"):
        write_coco(tmp_path, [(1, 64, 48)], [ann(1, 1, 90, [4, 4, 20, 20]), ann(2, 1, 1, [30, 20, 10, 10])],
                   [1, 90], f"annotations/instances_{split}2017.json", f"{split}2017")
    cfg = DataConfig(name="coco", root=str(tmp_path))
    ds = build_dataset(cfg, "val")
    image, target = ds[0]
    assert num_classes(cfg) == ds.num_classes == 91 and ds.label_to_category[90] == 90
    assert target["labels"].tolist() == [90, 1] and image.shape == (3, 800, 1066)


def test_hydra_config_selects_each_data_set(tmp_path):
    cfg = load_config(["data=coco_format", f"data.train_images={tmp_path}", f"data.train_annotations={tmp_path}/a.json",
                       f"data.val_images={tmp_path}", f"data.val_annotations={tmp_path}/a.json"])
    assert cfg.data.name == "coco_format" and cfg.data.max_size == 1333
    assert load_config([]).data.name == "shapes"
    assert load_config(["data=coco", "data.root=/x"]).data.train_scales[-1] == 800
    with pytest.raises(ConfigError, match="data.name='voc' is not valid; choose one of: shapes, coco, coco_format"):
        DataConfig(name="voc")
    with pytest.raises(ConfigError, match="data.max_objects"):
        DataConfig(min_objects=3, max_objects=2)
    with pytest.raises(ConfigError, match="data.train_annotations"):
        DataConfig(name="coco_format", train_images="x", val_images="x", val_annotations="x")


def test_build_dataset_accepts_the_composed_config_node(tmp_path):
    cfg = load_config([f"data.root={tmp_path}", "data.num_train=4", "data.num_val=2", "data.image_size=64"])
    assert len(build_dataset(cfg.data, "val")) == 2 and num_classes(cfg.data) == 4
    with pytest.raises(ValueError, match="split='test'"):
        build_dataset(cfg.data, "test")
    with pytest.raises(ConfigError, match="data=coco_format needs data.train_images"):
        num_classes(load_config(["data=coco_format"]).data)


# ---------------------------------------------------------------- bad data


def test_missing_image_files_are_skipped_and_counted(tmp_path, caplog):
    image_dir, ann_file = write_coco(tmp_path, [(1, 40, 30), (2, 40, 30)], [ann(1, 2, 7, [0, 0, 5, 5])], [7])
    (image_dir / "2.png").unlink()
    with caplog.at_level(logging.WARNING):
        ds = build_dataset(coco_format_cfg(image_dir, ann_file), "val")
    assert len(ds) == 1 and ds.issues["images missing on disk (skipped)"] == 1
    assert "1 images missing on disk" in caplog.text and ds.coco.getImgIds() == [1]
    (image_dir / "1.png").unlink()
    with pytest.raises(DataError, match="none of the 2 images listed"):
        build_dataset(coco_format_cfg(image_dir, ann_file), "val")


def test_unreadable_images_are_replaced_by_the_next_one(tmp_path, caplog):
    image_dir, ann_file = write_coco(tmp_path, [(1, 40, 30), (2, 40, 30), (3, 40, 30)], [], [7])
    (image_dir / "1.png").write_bytes(b"not a png")
    Image.new("RGB", (10, 10)).save(image_dir / "2.png")  # not the size the file says
    ds = build_dataset(coco_format_cfg(image_dir, ann_file), "val")
    with caplog.at_level(logging.WARNING):
        _, target = ds[0]
    assert target["image_id"].item() == 3 and ds.unreadable == 2 and "1.png" in caplog.text and "2.png" in caplog.text
    (image_dir / "3.png").write_bytes(b"")
    with pytest.raises(DataError, match="unreadable images in a row"):
        ds[0]


@pytest.mark.parametrize("bbox, issue, kept", [
    ([5, 5, 0, 10], "boxes with zero or negative size (dropped)", None),
    ([5, 5, 10, -3], "boxes with zero or negative size (dropped)", None),
    ([50, 5, 10, 10], "boxes outside the image (dropped)", None),
    ([-5, 20, 10, 20], "boxes partly outside the image (clipped)", [0, 20, 5, 10]),
])
def test_bad_boxes_are_dropped_or_clipped(tmp_path, bbox, issue, kept):
    ds = val_set(tmp_path, [ann(1, 1, 7, bbox), ann(2, 1, 7, [1, 1, 4, 4])])
    assert ds.issues == {issue: 1}
    boxes = [a["bbox"] for a in ds.coco.dataset["annotations"]]
    assert boxes == ([[1, 1, 4, 4]] if kept is None else [kept, [1, 1, 4, 4]])
    _, target = ds[0]
    assert len(target["boxes"]) == len(boxes) and (target["boxes"] >= 0).all() and (target["boxes"] <= 1).all()


def test_unknown_category_ids_fail_before_training(tmp_path):
    with pytest.raises(DataError, match=r"2 annotations have category ids .* \[7\]: \{3: 2\}"):
        val_set(tmp_path, [ann(1, 1, 3, [0, 0, 5, 5]), ann(2, 2, 3, [0, 0, 5, 5]), ann(3, 1, 7, [0, 0, 5, 5])])


def test_images_without_annotations_are_kept_as_negatives(tmp_path):
    ds = val_set(tmp_path, [ann(1, 1, 7, [0, 0, 5, 5])])
    _, target = ds[1]
    assert len(ds) == 2 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert not ds.issues


def test_crowd_boxes_stay_for_evaluation_only(tmp_path):
    ds = val_set(tmp_path, [ann(1, 1, 7, [0, 0, 5, 5], iscrowd=1), ann(2, 1, 7, [10, 10, 5, 5])])
    _, target = ds[0]
    assert len(target["boxes"]) == 1 and len(ds.coco.getAnnIds(imgIds=[1])) == 2


def test_bad_annotation_ids_are_renumbered_from_one(tmp_path):
    ds = val_set(tmp_path, [ann(0, 1, 7, [0, 0, 5, 5]), ann(0, 2, 7, [0, 0, 5, 5]), ann(4, 9, 7, [0, 0, 5, 5])])
    assert sorted(ds.coco.getAnnIds()) == [1, 2]  # COCOeval treats id 0 as "no match"
    assert ds.issues["annotations of image ids not in the file (dropped)"] == 1


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"images": []}), "needs the lists 'images', 'annotations' and 'categories'"),
    (json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}), "malformed image entry"),
    (json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 40, "height": 30}],
                 "annotations": [{"image_id": 1, "category_id": 7, "bbox": [0, 0, "x", 1]}],
                 "categories": [{"id": 7}]}), "malformed annotation"),
])
def test_broken_annotation_files_fail_with_a_clear_message(tmp_path, content, message):
    image_dir, ann_file = write_coco(tmp_path, [(1, 40, 30)], [], [7])
    ann_file.write_text(content)
    with pytest.raises(DataError, match=message):
        CocoDetection(image_dir, ann_file, [7], T.Normalize())
    with pytest.raises(DataError, match="annotation file not found"):
        CocoDetection(image_dir, tmp_path / "nothing.json", [7], T.Normalize())


# ---------------------------------------------------------------- transforms and batching


def sample(height=60, width=80):
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 40.0, 80.0, 60.0]]),
              "labels": torch.tensor([1, 2]), "size": torch.tensor([height, width])}
    return image, target


def test_flip_twice_is_identity():
    image, target = sample()
    flip = T.RandomHorizontalFlip(p=1.0)
    once, flipped = flip(image, target)
    assert flipped["boxes"][0].tolist() == [50.0, 5.0, 70.0, 25.0] and torch.equal(once[..., 0], image[..., -1])
    twice, back = flip(once, flipped)
    assert torch.equal(twice, image) and torch.equal(back["boxes"], target["boxes"])


def test_resize_scales_boxes_and_respects_max_size():
    image, target = sample()
    resized, out = T.RandomResize([120])(image, target)
    assert resized.shape == (3, 120, 160) and out["size"].tolist() == [120, 160]
    assert torch.allclose(out["boxes"], target["boxes"] * 2)
    assert T.resized_shape(480, 640, 800, 1333) == (800, 1066)
    assert T.resized_shape(100, 1000, 800, 1333) == (133, 1330)  # DETR's rule, rounding included
    assert T.resized_shape(1000, 100, 800, 1333) == (1330, 133)


def test_crop_clips_boxes_and_drops_those_left_outside():
    image, target = sample()
    torch.manual_seed(0)
    cropped, out = T.RandomSizeCrop(30, 30)(image, target)
    height, width = cropped.shape[-2:]
    assert (height, width) == (30, 30) and out["size"].tolist() == [30, 30]
    assert len(out["boxes"]) == len(out["labels"]) <= 2
    assert (out["boxes"] >= 0).all() and (out["boxes"][:, 2:] <= 30).all()
    assert ((out["boxes"][:, 2:] - out["boxes"][:, :2]) > 0).all()


def test_normalize_gives_relative_cxcywh_and_imagenet_statistics():
    image, target = sample()
    image = torch.full_like(image, 255)
    out_image, out = T.Normalize()(image, target)
    assert torch.allclose(out["boxes"][0], torch.tensor([20 / 80, 15 / 60, 20 / 80, 20 / 60]))
    assert torch.allclose(out_image[:, 0, 0], (1 - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD))


def test_augmentation_draws_from_torchs_global_rng():
    cfg = DataConfig(name="coco_format", train_images="x", train_annotations="x", val_images="x", val_annotations="x",
                     train_scales=[40, 50, 60, 70], val_size=60,
                     crop=True, crop_scales=[50, 60], crop_min_size=20, crop_max_size=40)
    train = T.build_transforms(cfg, train=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([train(*sample()) for _ in range(10)])
    for (image_a, target_a), (image_b, target_b) in zip(*runs):
        assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    assert len({tuple(image.shape) for image, _ in runs[0]}) > 1
    image, target = T.build_transforms(cfg, train=False)(*sample())
    assert target["size"].tolist() == [60, 80] and ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()


def test_collate_pads_to_the_largest_image_and_masks_the_padding(tmp_path):
    images = [torch.ones(3, 4, 6), torch.ones(3, 5, 3)]
    batch, mask, targets = collate([(images[0], {"id": 0}), (images[1], {"id": 1})])
    assert batch.shape == (2, 3, 5, 6) and [t["id"] for t in targets] == [0, 1]
    assert mask[0, :4, :6].logical_not().all() and mask[0, 4].all()
    assert mask[1, :5, :3].logical_not().all() and mask[1, :, 3:].all()
    assert torch.equal(batch[~mask.unsqueeze(1).expand_as(batch)], torch.ones(4 * 6 * 3 + 5 * 3 * 3))
    loader = torch.utils.data.DataLoader(build_dataset(shapes_cfg(tmp_path), "train"), batch_size=4, collate_fn=collate)
    batch, mask, targets = next(iter(loader))
    assert batch.shape[0] == 4 and mask.shape == (4, *batch.shape[-2:]) and len(targets) == 4


def test_repeated_image_ids_are_an_error_naming_them(tmp_path):
    """Boxes are looked up by image id: a repeated id would train one image with another's boxes."""
    image_dir, ann_file = write_coco(tmp_path, [(1, 40, 30), (2, 40, 30), (3, 40, 30)],
                                     [ann(1, 1, 7, [0, 0, 5, 5])], [7])
    data = json.loads(ann_file.read_text())
    data["images"] += [{**data["images"][0], "file_name": "3.png"}, {**data["images"][1], "file_name": "3.png"}]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"2 image ids are used by more than one image: \[1, 2\]"):
        build_dataset(coco_format_cfg(image_dir, ann_file), "val")


def png_claiming(path, width: int, height: int) -> None:
    """A small PNG whose header says width x height (a decompression bomb to PIL), CRC fixed up."""
    import struct
    import zlib

    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("split", ["train", "val"])
def test_images_that_resize_to_nothing_or_are_decompression_bombs_are_skipped_by_name(tmp_path, caplog, split):
    image_dir, ann_file = write_coco(tmp_path, [(1, 6000, 1), (2, 40, 30), (3, 40, 30)], [], [7])
    data = json.loads(ann_file.read_text())
    data["images"][1].update(width=20000, height=20000)
    ann_file.write_text(json.dumps(data))
    png_claiming(image_dir / "2.png", 20000, 20000)
    ds = build_dataset(coco_format_cfg(image_dir, ann_file), split)
    with caplog.at_level(logging.WARNING):
        image, target = ds[0]
    assert target["image_id"].item() == 3 and ds.unreadable == 2 and image.shape[-2:] == tuple(target["size"])
    assert "1.png (UnusableImage" in caplog.text and "2.png (DecompressionBombError" in caplog.text


def test_a_resize_to_no_pixels_is_refused():
    with pytest.raises(T.UnusableImage, match=r"a 1x6000 \(h x w\) image resizes to 0x0 pixels"):
        T.resized_shape(1, 6000, 800, 1333)
