"""sparse-detr-export: for every mapping, the ONNX file run by onnxruntime and the TorchScript
file run by torch give PyTorch's outputs within 1e-4, at two image sizes other than the traced one."""
import sys

import pytest
import torch
from hydra import compose as hydra_compose, initialize_config_dir

from sparse_detr.config import ConfigError, config_dir, validate
from sparse_detr.models.export import missing_packages

MAPPINGS = {
    "softmax": ["placement=none"],
    "sparsemax": ["attention=sparsemax"],
    "entmax15": ["attention=entmax15"],
    "alpha_fixed": ["attention=alpha_entmax", "attention.alpha=1.3"],
    "alpha_learned": ["attention=alpha_entmax", "attention.learn_alpha=true"],
}
# One encoder and one decoder layer, every site sparse: exporting takes seconds per attention
# module (alpha-entmax unrolls its bisection), and three modules cover every kind of site.
SMALL = ["model.enc_layers=1", "model.dec_layers=1", "placement=all"]


def export_config(*overrides):
    with initialize_config_dir(config_dir=str(config_dir() / "export"), version_base="1.3"):
        return hydra_compose(config_name="export", overrides=list(overrides))


# ONNX export takes 15-35 s per model on 2 cores; the default suite exports the sort-based
# (sparsemax) and the bisection-based (learned alpha-entmax) formulations, `-m slow` the rest.
CASES = [pytest.param(name, fmt, marks=pytest.mark.slow if fmt == "onnx" and name not in ("sparsemax", "alpha_learned")
                      else ()) for name in MAPPINGS for fmt in ("onnx", "torchscript")]


def trained_run(name, tmp_path, compose, write_checkpoint):
    cfg = compose(*SMALL, *MAPPINGS[name], "attention.impl=eager")
    model = write_checkpoint(cfg, tmp_path / "run" / "checkpoint.pth")
    if name == "alpha_learned":  # alphas that differ per head, as after training
        for module in model.modules():
            if hasattr(module, "pre_alpha"):
                with torch.no_grad():
                    module.pre_alpha.copy_(torch.linspace(-2.0, 2.0, len(module.pre_alpha)))
        torch.save({**torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True), "model": model.state_dict()},
                   tmp_path / "run" / "checkpoint.pth")
    return model, tmp_path


@pytest.mark.parametrize("name, fmt", CASES)
def test_exported_model_equals_pytorch_at_other_image_sizes(name, fmt, tmp_path, compose, write_checkpoint, capsys):
    from sparse_detr.export import export_checkpoint
    from sparse_detr.models.export import run_exported

    if missing_packages(fmt):
        pytest.skip(f"format={fmt} needs {missing_packages(fmt)}: pip install -e .[export]")
    model, tmp_path = trained_run(name, tmp_path, compose, write_checkpoint)
    path = export_checkpoint(export_config(f"checkpoint={tmp_path}/run", f"format={fmt}", "height=64", "width=64"))
    assert path.parent == tmp_path / "run" and path.stat().st_size > 10_000
    assert "largest difference to PyTorch" in capsys.readouterr().out
    torch.manual_seed(3)
    batches = [torch.randn(2, 3, 48, 80), torch.randn(2, 3, 96, 40)]
    for images, (logits, boxes) in zip(batches, run_exported(fmt, path, batches)):
        with torch.no_grad():
            expected = model(images)
        assert torch.allclose(logits, expected["pred_logits"], atol=1e-4), (logits - expected["pred_logits"]).abs().max()
        assert torch.allclose(boxes, expected["pred_boxes"], atol=1e-4)


def test_missing_export_packages_are_named_with_what_to_install(tmp_path, compose, write_checkpoint, monkeypatch):
    write_checkpoint(compose(), tmp_path / "checkpoint.pth")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"format=onnx needs onnxscript: pip install -e \.\[export\]"):
        validate(export_config(f"checkpoint={tmp_path}", "format=onnx"))
    with pytest.raises(ConfigError, match="format='tflite' is not valid; choose one of: onnx, torchscript"):
        validate(export_config(f"checkpoint={tmp_path}", "format=tflite"))
