"""`sparse-detr-profile`: what a model config costs, as a Markdown row.

    sparse-detr-profile backbone=resnet50 attention=entmax15 placement=all profile.height=800 profile.width=1066
    sparse-detr-profile -m backbone=resnet50 attention=softmax,sparsemax,entmax15,alpha_entmax placement=all

Any config `sparse-detr-train` takes (backbone, mapping, placement, model sizes) and an image size:
parameters (total, trainable, learned alphas), GFLOPs of one forward, inference images per second,
training steps per second and peak memory, on the CPU or CUDA (see `sparse_detr.bench.costs`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sparse_detr.checks import check_choice, check_range
from sparse_detr.config import TrainConfig, config_dir, exit_on_bad_overrides, reports_config_errors, validate


@dataclass
class ProfileSettings:
    height: int = 512
    width: int = 683
    batch_size: int = 1
    device: str = "auto"                 # auto (CUDA when visible) | cpu | cuda
    warmup: int = 1                      # untimed calls first (the first one compiles the fast solver)
    repeats: int = 5                     # timed calls; the median is reported
    header: bool = True                  # print the table header above the row

    def __post_init__(self):
        for key in ("height", "width"):
            check_range(f"profile.{key}", getattr(self, key), low=32)
        check_range("profile.batch_size", self.batch_size, low=1)
        check_choice("profile.device", self.device, ("auto", "cpu", "cuda"))
        check_range("profile.warmup", self.warmup, low=0)
        check_range("profile.repeats", self.repeats, low=1)


@dataclass
class ProfileRunConfig(TrainConfig):
    profile: ProfileSettings = field(default_factory=ProfileSettings)


ConfigStore.instance().store(name="profile_schema", node=ProfileRunConfig)


def profile(cfg: DictConfig) -> str:
    """Validate, measure, print and return the Markdown row."""
    settings = validate(cfg).profile
    # heavy imports after the config is known good
    from sparse_detr.bench.costs import markdown_header, markdown_row, measure_costs
    from sparse_detr.engine.distributed import choose_device

    device = choose_device(settings.device, 0)
    costs = measure_costs(cfg, settings.batch_size, settings.height, settings.width, device,
                          warmup=settings.warmup, repeats=settings.repeats)
    row = markdown_row(cfg, settings.batch_size, settings.height, settings.width, device, costs)
    print((markdown_header() + "\n" if settings.header else "") + row, flush=True)
    return row


@hydra.main(config_path=str(config_dir()), config_name="profile", version_base="1.3")
@reports_config_errors
def _main(cfg: DictConfig) -> None:
    if HydraConfig.get().mode == RunMode.MULTIRUN and HydraConfig.get().job.num > 0:
        cfg.profile.header = False  # one table for a -m sweep
    profile(cfg)


def main() -> None:
    exit_on_bad_overrides("profile", sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
