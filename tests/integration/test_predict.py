"""sparse-detr-predict: a checkpoint and a folder of images give the model's own post-processed
detections, as JSON and drawn PNGs; bad input is one line before any work."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
import torch
from PIL import Image

from sparse_detr.config import ConfigError, config_dir
from sparse_detr.data import as_data_config
from sparse_detr.data.transforms import build_transforms
from sparse_detr.models.detr import PostProcess

NAMES = ["ant", "bee", "cat", "dog", "eel"]
CATEGORY_IDS = [3, 5, 7, 11, 13]  # not the labels: the JSON must carry the data set's own ids


CATEGORIES = [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, NAMES)]


def write_images(folder, sizes):
    folder.mkdir()
    generator = np.random.default_rng(0)
    for index, (height, width) in enumerate(sizes):
        pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pixels[height // 4: height // 2, width // 4: width // 2] = (250, 220, 0)  # an object-like patch
        Image.fromarray(pixels).save(folder / f"img_{index}.png")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


@pytest.fixture
def run(tmp_path, compose, write_checkpoint):
    cfg = compose("placement=cross", "attention=sparsemax", "attention.impl=eager")
    model = write_checkpoint(cfg, tmp_path / "run" / "checkpoint.pth", CATEGORIES)
    write_images(tmp_path / "images", [(48, 64), (70, 40), (64, 64)])
    return cfg, model, tmp_path


def predict_config(*overrides):
    """The composed `sparse-detr-predict` config, as the command line would give it."""
    with initialize_config_dir(config_dir=str(config_dir() / "predict"), version_base="1.3"):
        return compose(config_name="predict", overrides=list(overrides))


def predict_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sparse_detr.predict", *args],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_predict_writes_the_models_post_processed_boxes_and_drawn_pngs(run):
    cfg, model, tmp_path = run
    result = predict_cli(f"checkpoint={tmp_path}/run", f"input={tmp_path}/images", "threshold=0.0",
                         "batch_size=2", "attention=true", "device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "notes.txt" in result.stdout + result.stderr and "broken.png" in result.stdout + result.stderr
    rows = json.loads((tmp_path / "run" / "predictions" / "predictions.json").read_text())

    # The reference: the same images through the run's val transforms, in the same batches of 2.
    transforms = build_transforms(as_data_config(cfg.data), train=False)
    images = [torch.from_numpy(np.array(Image.open(tmp_path / "images" / f"img_{i}.png"))).permute(2, 0, 1)
              for i in range(3)]
    for batch in ([0, 1], [2]):
        inputs = [transforms(images[i], {"boxes": torch.zeros(0, 4)})[0] for i in batch]
        with torch.no_grad():
            outputs = model(inputs)
        sizes = torch.tensor([list(images[i].shape[-2:]) for i in batch])
        for i, expected in zip(batch, PostProcess()(outputs, sizes)):
            got = [r for r in rows if r["image"] == f"img_{i}.png"]
            assert len(got) == cfg.model.num_queries  # threshold 0 keeps every query
            order = expected["scores"].argsort(descending=True, stable=True)
            boxes = expected["boxes"][order]
            assert torch.allclose(torch.tensor([r["score"] for r in got]), expected["scores"][order], atol=1e-5)
            assert torch.allclose(torch.tensor([r["bbox"] for r in got]),
                                  torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1), atol=1e-3)
            labels = expected["labels"][order].tolist()
            assert [r["category_id"] for r in got] == [CATEGORY_IDS[label] for label in labels]
            assert [r["category_name"] for r in got] == [NAMES[label] for label in labels]
    for i in range(3):
        for kind in ("detections", "attention"):
            drawn = np.array(Image.open(tmp_path / "run" / "predictions" / f"img_{i}.png.{kind}.png").convert("RGB"))
            assert drawn.std() > 10 and len(np.unique(drawn.reshape(-1, 3), axis=0)) > 100  # not blank
            assert ((drawn[..., 0] > 200) & (drawn[..., 1] < 60) & (drawn[..., 2] < 60)).any()  # red boxes drawn
    assert not (tmp_path / "run" / "predictions" / "notes.txt.detections.png").exists()


def test_predict_threshold_keeps_only_scores_at_or_above_it(run):
    cfg, model, tmp_path = run
    from sparse_detr.predict import predict

    predict(predict_config(*[f"checkpoint={tmp_path}/run", f"input={tmp_path}/images/img_2.png", "threshold=0.21",
                         f"output={tmp_path}/out", "progress=off"]))
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    transforms = build_transforms(as_data_config(cfg.data), train=False)
    image = torch.from_numpy(np.array(Image.open(tmp_path / "images" / "img_2.png"))).permute(2, 0, 1)
    with torch.no_grad():
        scores = PostProcess()(model([transforms(image, {"boxes": torch.zeros(0, 4)})[0]]), torch.tensor([[64, 64]]))[0]["scores"]
    assert len(rows) == int((scores >= 0.21).sum()) and all(r["score"] >= 0.21 for r in rows)


def test_an_empty_folder_is_a_one_line_error(run):
    _, _, tmp_path = run
    (tmp_path / "empty").mkdir()
    result = predict_cli(f"checkpoint={tmp_path}/run", f"input={tmp_path}/empty", cwd=tmp_path)
    assert result.returncode == 2
    # (the last line: an editable install of another checkout may add a Hydra plugin warning above it)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid configuration: input=") and "is an empty folder" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "predictions").exists()


def test_a_missing_input_or_bad_threshold_is_refused_before_any_work(run):
    _, _, tmp_path = run
    from sparse_detr.config import validate

    with pytest.raises(ConfigError, match="no such file or folder"):
        validate(predict_config(f"checkpoint={tmp_path}/run", f"input={tmp_path}/nowhere"))
    with pytest.raises(ConfigError, match="threshold=1.5"):
        validate(predict_config(f"checkpoint={tmp_path}/run", f"input={tmp_path}/images", "threshold=1.5"))


def test_a_checkpoint_without_class_names_names_classes_by_label(tmp_path, compose, write_checkpoint, caplog):
    from sparse_detr.engine.trained_model import load_trained_model

    write_checkpoint(compose(), tmp_path / "checkpoint.pth")  # as written before names were saved
    trained = load_trained_model(tmp_path / "checkpoint.pth")
    assert trained.categories == [{"id": label, "name": f"class {label}"} for label in range(5)]
    assert "stores no class names" in caplog.text
