"""`sparse-detr-export`: a trained checkpoint as an ONNX or TorchScript file, for every mapping.

    sparse-detr-export checkpoint=outputs/runs/shapes_demo/sparsemax-cross-tiny-shapes/seed_42 format=onnx
    sparse-detr-export checkpoint=RUN/checkpoint.pth format=torchscript output=/tmp/detr.pt

Images of any height and width in (`images` [B, 3, H, W], normalised as the model's input),
`pred_logits` and `pred_boxes` out. The exported file is run once more (onnxruntime / torch.jit)
at two image sizes and compared with PyTorch; the largest difference is printed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sparse_detr.checks import check_choice, check_range
from sparse_detr.config import ConfigError, config_dir, reports_config_errors, validate
from sparse_detr.models.export import FORMATS, SUFFIXES, missing_packages
from sparse_detr.run_folder import checkpoint_file

CHECK_TOLERANCE = 1e-4


@dataclass
class ExportConfig:
    checkpoint: str = MISSING            # a checkpoint.pth, or the run folder holding one
    format: str = "onnx"                 # onnx | torchscript
    output: Optional[str] = None         # the file; None: <run folder>/model.onnx or model.torchscript.pt
    height: Optional[int] = None         # the traced sample's size; None: the run's data.val_size
    width: Optional[int] = None
    overrides: List[str] = field(default_factory=list)  # changes to the run's config

    def __post_init__(self):
        self.checkpoint = checkpoint_file(self.checkpoint)
        check_choice("format", self.format, FORMATS)
        for key in ("height", "width"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), low=32)
        missing = missing_packages(self.format)
        if missing:
            raise ConfigError(f"format={self.format} needs {', '.join(missing)}: pip install -e .[export] "
                              f"(or pip install {' '.join(missing)})")


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def export_checkpoint(cfg: DictConfig) -> Path:
    """Validate, export, check the file against PyTorch at two sizes; returns the file."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is required: sparse-detr-export checkpoint=RUN_FOLDER format=onnx|torchscript")
    args: ExportConfig = validate(cfg)
    # heavy imports after the config is known good
    import torch

    from sparse_detr.engine.trained_model import load_trained_model
    from sparse_detr.models.export import export_model, run_exported

    trained = load_trained_model(args.checkpoint, args.overrides, "cpu", command="sparse-detr-export")
    side = trained.checked.data.val_size  # the validation resize's shorter side
    height, width = args.height or side, args.width or side
    output = Path(args.output) if args.output else Path(args.checkpoint).parent / f"model{SUFFIXES[args.format]}"
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 3, height, width, generator=generator)
    export_model(trained.model, args.format, output, sample)
    batches = [sample, torch.randn(1, 3, height * 3 // 4 + 1, width + 17, generator=generator)]
    differences = []
    for images, (logits, boxes) in zip(batches, run_exported(args.format, output, batches)):
        with torch.no_grad():
            expected = trained.model(images)
        differences += [float((logits - expected["pred_logits"]).abs().max()),
                        float((boxes - expected["pred_boxes"]).abs().max())]
    print(f"{args.format}: {output.resolve()}")
    print(f"largest difference to PyTorch at {height}x{width} and {height * 3 // 4 + 1}x{width + 17}: "
          f"{max(differences):.2e}" + ("" if max(differences) <= CHECK_TOLERANCE else "  (above 1e-4: check the file)"))
    return output


@hydra.main(config_path=str(config_dir() / "export"), config_name="export", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    export_checkpoint(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
