"""sparse-detr-eval: a checkpoint and a split give the COCO metrics the training run reported,
and a confusion matrix that accounts for every box; predict runs on the same trained run."""
import json
import subprocess
import sys

import torch

from sparse_detr.data import build_dataset
from sparse_detr.data.shapes import SHAPE_NAMES
from sparse_detr.engine.trained_model import load_trained_model


def test_eval_reproduces_the_training_runs_own_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "sparse_detr.train", "experiment=smoke", "schedule.epochs=1",
                    "train.progress=off", f"output_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra"],
                   check=True, capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, "-m", "sparse_detr.evaluate", f"checkpoint={run_dir}", "batch_size=3"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((run_dir / "eval_val.json").read_text())
    trained = json.loads((run_dir / "eval_metrics.json").read_text())
    assert written["split"] == "val" and written["global_step"] == trained["global_step"] == 8
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert abs(written[key] - trained[key]) < 1e-9, key
    assert not (tmp_path / "outputs").exists()

    # The confusion matrix: every non-crowd ground-truth box is in a ground-truth row, every
    # detection at or above the threshold in a predicted column.
    trained = load_trained_model(run_dir / "checkpoint.pth")
    assert [c["name"] for c in trained.categories] == list(SHAPE_NAMES[:trained.cfg.data.num_categories])
    confusion = json.loads((run_dir / "eval_val_confusion.json").read_text())
    assert (run_dir / "eval_val_confusion.png").stat().st_size > 1000
    matrix = torch.tensor(confusion["matrix"])
    assert confusion["classes"][-1] == "background" and matrix[-1, -1] == 0
    dataset = build_dataset(trained.cfg.data, "val")
    boxes = sum(not a["iscrowd"] for a in dataset.coco.dataset["annotations"])
    assert int(matrix[:-1].sum()) == boxes
    with torch.no_grad():  # scores do not depend on the sizes the boxes are scaled to
        outputs = trained.model([dataset[i][0] for i in range(len(dataset))])
    scores = trained.postprocessor(outputs, torch.ones(len(dataset), 2))
    scores = torch.cat([r["scores"] for r in scores])
    assert int(matrix[:, :-1].sum()) == int((scores >= 0.5).sum())

    # The README's predict command on the same run: the JSON names the data set's classes.
    result = subprocess.run([sys.executable, "-m", "sparse_detr.predict", f"checkpoint={run_dir}",
                             f"input={dataset.images_dir}/{dataset.images[0]['file_name']}", "threshold=0.0"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((run_dir / "predictions" / "predictions.json").read_text())
    assert len(rows) == trained.cfg.model.num_queries
    assert {r["category_name"] for r in rows} <= set(SHAPE_NAMES) and all(r["category_id"] >= 1 for r in rows)


def test_eval_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_detr.evaluate", f"checkpoint={tmp_path}/nothing"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such file" in result.stderr and "nothing" in result.stderr


def test_a_weights_only_checkpoint_is_refused_by_name_of_eval(tmp_path):
    import torch

    torch.save({"model": {}}, tmp_path / "weights.pth")
    result = subprocess.run([sys.executable, "-m", "sparse_detr.evaluate", f"checkpoint={tmp_path}/weights.pth"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sparse-detr-eval needs a checkpoint written by sparse-detr-train" in result.stderr


def test_the_overrides_lines_of_the_readme_and_the_docstrings_parse():
    """Each `'overrides=[...]'` shown to users, taken verbatim, composes to a list of overrides."""
    import re
    import shlex
    from pathlib import Path

    from sparse_detr import analyze, evaluate
    from sparse_detr.config import load_config

    repo = Path(__file__).resolve().parents[2]
    texts = {"evaluate": evaluate.__doc__, "analyze": analyze.__doc__ + (repo / "README.md").read_text()}
    found = 0
    for config_name, text in texts.items():
        for line in text.splitlines():
            if "'overrides=[" not in line:   # (not train_overrides=, the study's)
                continue
            quoted = re.search(r"'overrides=\[.*?\]'", line).group(0)
            (token,) = shlex.split(quoted)
            assert list(load_config([token], config_name=config_name).overrides) == ["data.root=/data/coco"], line
            found += 1
    assert found >= 4
