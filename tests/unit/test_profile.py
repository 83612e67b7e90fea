"""sparse-detr-profile: parameter counts with known answers, FLOPs that follow the image size,
and the command's Markdown row."""
import subprocess
import sys

import torch

from sparse_detr.bench.costs import COLUMNS, forward_gflops, parameter_counts
from sparse_detr.models.detr import build_model


def test_parameter_counts_known_answers(compose):
    model = build_model(compose("attention=alpha_entmax", "placement=all", "attention.learn_alpha=true"))[0]
    total, trainable, alpha = parameter_counts(model)
    assert alpha == 4 * (2 + 2 + 2)  # 4 heads x (2 encoder + 2 decoder self + 2 cross layers)
    assert total == trainable == sum(p.numel() for p in model.parameters())
    resnet = build_model(compose("backbone=resnet18"))[0]
    total, trainable, alpha = parameter_counts(resnet)
    stem, layer1 = 64 * 3 * 7 * 7, 4 * 64 * 64 * 3 * 3  # DETR freezes the stem and layer1 (BatchNorm is frozen: buffers)
    assert alpha == 0 and trainable == total - stem - layer1


def test_gflops_count_the_matrix_products_of_a_linear_model():
    layer = torch.nn.Linear(10, 20, bias=False)
    model = lambda images, mask: layer(images)  # noqa: E731 - the counter sees one [B, 10] x [10, 20] product
    assert forward_gflops(model, torch.randn(3, 10), None) * 1e9 == 2 * 3 * 10 * 20


def test_gflops_of_detr_grow_with_the_image(compose):
    model = build_model(compose())[0].eval()
    small = forward_gflops(model, torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    large = forward_gflops(model, torch.randn(1, 3, 128, 128), torch.zeros(1, 128, 128, dtype=torch.bool))
    assert 3.5 * small < large < 8 * small  # the CNN grows 4x, encoder self-attention 16x


def test_profile_command_prints_a_markdown_row(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_detr.profile", "experiment=smoke", "attention=sparsemax",
                             "placement=cross", "attention.impl=eager", "profile.height=64", "profile.width=96",
                             "profile.batch_size=2", "profile.repeats=1", "profile.warmup=0", "profile.device=cpu"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    header, rule, row = [line for line in result.stdout.splitlines() if line.startswith("|")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == len(COLUMNS) == len(header.strip("|").split("|"))
    assert cells[:5] == ["tiny", "softmax/softmax/sparsemax", "64x96", "2", "cpu"]
    assert float(cells[5]) > 0 and cells[7] == "0" and all(float(c) > 0 for c in cells[8:])
    assert not any(tmp_path.iterdir())  # no run folder


def test_a_bad_image_size_is_one_line_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_detr.profile", "experiment=smoke", "profile.height=8"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # (the last line: an editable install of another checkout may add a Hydra plugin warning above it)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: invalid configuration: profile.height=8 is out of range; valid: [32, inf)")
