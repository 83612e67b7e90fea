"""Structured configs for every entry point, and the checks that run before any work.

The dataclasses are registered in Hydra's ConfigStore as the schema of `conf/train.yaml`, so
Hydra rejects unknown keys and wrongly typed values while composing; a key added with `+`, which
Hydra lets through, is rejected by `validate`. Range and choice checks live in `__post_init__`
and run when `validate(cfg)` turns the composed config into objects. Every error is a
`ConfigError` (sparse_detr/errors.py): one `error:` line and exit status 2 at the entry points.
"""
from __future__ import annotations

import math
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from sparse_detr.data.config import DataConfig
from sparse_detr.checks import check_choice, check_range
from sparse_detr.errors import EXIT_USER_ERROR, ConfigError, UserError, one_line
from sparse_detr.hf_folder import is_hf_detr_folder
from sparse_detr.run_folder import checkpoint_path
from sparse_detr.signals import signal_names
from sparse_detr.sites import SITE_BY_NAME, SITES
from sparse_detr.tracking import LoggerConfig

# The mapping names of conf/attention/*.yaml, in the order messages list them; the registry
# `sparse_detr.models.mappings.MAPPINGS` has exactly these keys (a test holds the three equal).
MAPPING_NAMES = ("softmax", "sparsemax", "entmax15", "alpha_entmax", "tvmax")
# Mappings over the image grid: valid only at sites whose keys are the feature map (the registry's
# kinds with `needs_grid`; the same test holds them equal).
GRID_MAPPINGS = ("tvmax",)
MAPPING_IMPLS = ("fast", "eager", "reference")
ALPHA_FLOOR = 1.01  # learned alpha lives in (ALPHA_FLOOR, 2]: entmax_bisect breaks at alpha = 1
ALPHA_INITS = ("value", "random")                        # learned alpha starts at attention.alpha | pre_alpha ~ N(0, 1)
ALPHA_PARAMS = ("scaled_sigmoid", "clamped_sigmoid")     # pre_alpha -> alpha (sparse_detr/models/mappings/entmax.py)
BACKBONE_NAMES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101")
DILATED_BACKBONES = ("resnet50", "resnet101")   # DETR's DC5: bottleneck ResNets only
POSITION_EMBEDDINGS = ("sine", "learned")
MAX_SEED = 2**63 - 1  # with the rank added, still a valid torch seed (< 2**64)


@dataclass
class BackboneConfig:
    name: str = "resnet50"
    dilation: bool = False            # dilate the last stage (DETR's DC5 variants)
    pretrained: bool = False          # ImageNet weights; needs `weights` (nothing is downloaded)
    weights: Optional[str] = None     # local file of torchvision ResNet weights
    channels: int = 64                # width of the first stage of the `tiny` CNN

    def __post_init__(self):
        check_choice("backbone.name", self.name, BACKBONE_NAMES)
        check_range("backbone.channels", self.channels, low=1)
        if self.dilation:  # torchvision's BasicBlock (resnet18/34) has no dilated form; tiny has no stages
            check_choice("backbone.name (with backbone.dilation=true)", self.name, DILATED_BACKBONES)


@dataclass
class ModelConfig:
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    pre_norm: bool = False
    aux_loss: bool = True
    position_embedding: str = "sine"
    position_temperature: float = 10000.0  # sine: longest wavelength / 2 pi; a few tens suits a map of ~8x8 cells
    num_classes: Optional[int] = None  # None: taken from the data set

    def __post_init__(self):
        for key in ("hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries"):
            check_range(f"model.{key}", getattr(self, key), low=1)
        if self.hidden_dim % self.nheads:
            raise ConfigError(f"model.hidden_dim={self.hidden_dim} must be divisible by model.nheads={self.nheads}")
        check_range("model.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_choice("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
        check_range("model.position_temperature", self.position_temperature, low=1.0, low_open=True)
        if self.num_classes is not None:
            check_range("model.num_classes", self.num_classes, low=1)


@dataclass
class AttentionConfig:
    """The mapping that the sites chosen by `placement` use, and its parameters."""
    name: str = "softmax"
    alpha: float = 1.5                # alpha_entmax: fixed alpha, or the initial one when learned
    learn_alpha: bool = False         # alpha_entmax: one learned alpha per head and layer
    alpha_init: str = "value"         # learned alpha: start at `alpha` | random (pre_alpha ~ N(0, 1), the thesis)
    alpha_param: str = "scaled_sigmoid"  # learned alpha: scaled_sigmoid | clamped_sigmoid (the thesis)
    tv_lambda: float = 0.1            # tvmax: weight of the total variation (initial value when learned)
    learn_lambda: bool = False        # tvmax: one learned lambda per head and layer
    impl: str = "fast"                # fast | eager | reference (the entmax package)

    def __post_init__(self):
        check_choice("attention.name", self.name, MAPPING_NAMES)
        check_choice("attention.impl", self.impl, MAPPING_IMPLS)
        check_choice("attention.alpha_init", self.alpha_init, ALPHA_INITS)
        check_choice("attention.alpha_param", self.alpha_param, ALPHA_PARAMS)
        check_range("attention.alpha", self.alpha, low=1.0, high=2.0, low_open=True)
        if self.learn_alpha and self.alpha_init == "value":  # a learned alpha is a sigmoid into (ALPHA_FLOOR, 2): it never reaches its ends
            check_range("attention.alpha (learned, initial)", self.alpha, low=ALPHA_FLOOR, high=2.0,
                        low_open=True, high_open=True)
        check_range("attention.tv_lambda", self.tv_lambda, low=0.0, low_open=True)


@dataclass
class PlacementConfig:
    """Which mapping each attention site uses; the placement group fills these from `attention.name`."""
    name: str = "none"
    encoder: str = "softmax"          # encoder self-attention
    decoder: str = "softmax"          # decoder self-attention
    cross: str = "softmax"            # decoder cross-attention

    def __post_init__(self):
        for site in SITES:
            check_choice(f"placement.{site}", getattr(self, site), MAPPING_NAMES)
            if getattr(self, site) in GRID_MAPPINGS and not SITE_BY_NAME[site].grid_keys:
                grid_sites = [s for s in SITES if SITE_BY_NAME[s].grid_keys]
                raise ConfigError(f"placement.{site}={getattr(self, site)!r}: the {SITE_BY_NAME[site].title} has no "
                                  f"image grid for its keys; {getattr(self, site)} is valid at: {', '.join(grid_sites)}")


@dataclass
class LossConfig:
    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    eos_coef: float = 0.1

    def __post_init__(self):
        for key, value in vars(self).items():
            check_range(f"loss.{key}", value, low=0.0)


@dataclass
class OptimConfig:
    """AdamW as in DETR; learned alphas get their own group (no weight decay, own learning rate)."""
    lr: float = 1e-4
    lr_backbone: float = 1e-5         # 0 freezes the whole backbone
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1        # 0 turns gradient clipping off
    alpha_lr_multiplier: float = 10.0
    alpha_lr_drop: bool = True        # false keeps the alpha learning rate through lr_drop

    def __post_init__(self):
        check_range("optim.lr", self.lr, low=0.0, low_open=True)
        for key in ("lr_backbone", "weight_decay", "clip_max_norm"):
            check_range(f"optim.{key}", getattr(self, key), low=0.0)
        check_range("optim.alpha_lr_multiplier", self.alpha_lr_multiplier, low=0.0, low_open=True)


@dataclass
class ScheduleConfig:
    epochs: int = 300
    lr_drop: int = 200                # epoch at which every learning rate is multiplied by lr_drop_factor
    lr_drop_factor: float = 0.1

    def __post_init__(self):
        check_range("schedule.epochs", self.epochs, low=1)
        check_range("schedule.lr_drop", self.lr_drop, low=1)
        check_range("schedule.lr_drop_factor", self.lr_drop_factor, low=0.0, high=1.0, low_open=True)


@dataclass
class LoopConfig:
    device: str = "auto"              # auto (CUDA when visible) | cpu | cuda
    amp: str = "none"                 # none | bf16 | fp16: autocast on CUDA; ignored with a warning on CPU
    checkpoint_every: int = 0         # also checkpoint every N steps (0: at the end of each epoch only)
    eval_every: int = 1               # evaluate every N epochs, and always after the last
    max_steps: Optional[int] = None   # stop after this many optimizer steps in all
    log_every: int = 10               # steps between logged training metrics
    progress: str = "auto"            # auto (a bar on a terminal only) | on | off
    analyze_at_end: bool = False      # then analyse the final checkpoint in this job (sparse-detr-study asks for it)
    analyze_overrides: List[str] = field(default_factory=list)  # for that analysis, e.g. [max_images=200]

    def __post_init__(self):
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        check_choice("train.progress", self.progress, ("auto", "on", "off"))
        for key in ("checkpoint_every", "log_every", "eval_every"):
            check_range(f"train.{key}", getattr(self, key), low=0 if key == "checkpoint_every" else 1)
        if self.max_steps is not None:
            check_range("train.max_steps", self.max_steps, low=1)


@dataclass
class ClusterConfig:
    """Where the run executes. The scheduler's settings live in `hydra.launcher` (see conf/cluster/);
    this is what the training process itself needs to know."""
    name: str = "local"
    gpus_per_node: Optional[int] = None  # one task each; the berzelius and rpl profiles ask for this many (set there)
    preempt_signals: List[str] = field(default_factory=lambda: ["USR2"])  # checkpoint, then requeue

    def __post_init__(self):
        if self.gpus_per_node is not None:
            check_range("cluster.gpus_per_node", self.gpus_per_node, low=1)
        for name in self.preempt_signals:
            check_choice("cluster.preempt_signals", name, signal_names())


@dataclass
class TrainConfig:
    seed: int = 42
    output_dir: Optional[str] = None  # None: the folder Hydra made for this run
    resume: Optional[str] = None      # where a new run starts; once the run folder has its own checkpoint, that wins
    init_from: Optional[str] = None   # model weights only (e.g. an official DETR checkpoint), for a new run
    train: LoopConfig = field(default_factory=LoopConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self):
        check_range("seed", self.seed, low=0, high=MAX_SEED)


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
# `${sparse_detr.product:${hydra.launcher.nodes},${hydra.launcher.tasks_per_node}}`: GPUs of a SLURM job.
OmegaConf.register_new_resolver("sparse_detr.product", lambda *factors: math.prod(int(f) for f in factors), replace=True)


def reports_config_errors(entry_point: Callable) -> Callable:
    """For `@hydra.main` functions: a user error (a bad config value, a missing or unusable data
    set or file) ends the program with one line on stderr naming what is wrong, and exit status 2,
    instead of a traceback."""
    @functools.wraps(entry_point)
    def run(*args, **kwargs):
        try:
            return entry_point(*args, **kwargs)
        except UserError as error:
            print(one_line(error), file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return run


def hydra_message(error: BaseException) -> str:
    """Hydra wraps some errors in an exception without a message of its own."""
    while not str(error) and error.__cause__ is not None:
        error = error.__cause__
    # (without the search path Hydra appends to some: it names no bad value)
    return str(error).split("\nConfig search path:")[0].strip() or type(error).__name__


def hydra_first_line(error: BaseException) -> str:
    """The first line of `hydra_message`: what goes inside a one-line error of our own."""
    return hydra_message(error).splitlines()[0]


def exit_on_bad_overrides(config_name: str, args: Sequence[str]) -> None:
    """Compose a single run's command-line overrides before Hydra does: Hydra reports a misspelt
    group option or key over several lines with exit status 1, this as one `error:` line with exit
    status 2, like any other bad value. (A command line with flags, `-m` included, goes to Hydra as
    it is: `sweep.ValidateSweep` checks every run of a sweep.)"""
    if any(arg.startswith("-") for arg in args):
        return
    try:
        load_config(list(args), config_name)
    except Exception as error:
        print(one_line(ConfigError(hydra_message(error))), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def config_dir() -> Path:
    """`conf/` of a source checkout or editable install, else the copy installed with the package."""
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "train.yaml").is_file():
        return source
    return Path(__file__).resolve().parent / "conf"


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(key, the valid keys beside it) of every key that its schema does not declare.

    Hydra lets `+key=value` add a key to a structured config, and `OmegaConf.to_object` drops
    such a key silently; a misspelt `+model.hiden_dim=64` must not be ignored."""
    found = []
    schema = OmegaConf.get_type(cfg)
    fields = getattr(schema, "__dataclass_fields__", None)
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if fields is not None and key not in fields:
            found.append((dotted, sorted(fields)))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            found += unknown_keys(node, f"{dotted}.")
    return found


def validate(cfg: DictConfig) -> TrainConfig:
    """Run every type, choice and range check; raise ConfigError naming the key and valid values."""
    unknown = unknown_keys(cfg)
    if unknown:
        key, valid = unknown[0]
        raise ConfigError(f"{key} is not a config key; valid keys there: {', '.join(valid)}")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as error:  # omegaconf's own validation errors carry the key and value
        raise ConfigError(str(error)) from error


def validate_run(cfg: DictConfig, run_dir: str | Path) -> TrainConfig:
    """`validate`, and what starting training in `run_dir` needs: the files of `resume=` and
    `init_from=` exist, so a typo is found now, not after the model and the data are built. (A run
    folder that holds its own checkpoint resumes from that, so a file moved since is no error; a
    saved config checked by `sparse-detr-eval` elsewhere is not a start, and skips this.)"""
    checked = validate(cfg)
    if not checkpoint_path(run_dir).is_file():
        if checked.resume and not Path(checked.resume).expanduser().is_file():
            raise ConfigError(f"resume={checked.resume!r}: no such file (give the path of a checkpoint .pth file)")
        init_from = Path(checked.init_from).expanduser() if checked.init_from else None
        if init_from and not (init_from.is_file() or is_hf_detr_folder(init_from)):
            raise ConfigError(f"init_from={checked.init_from!r}: no such file (give a checkpoint .pth file, "
                              "or a Hugging Face DETR folder with config.json)")
    return checked


def load_config(overrides: Sequence[str] = (), config_name: str = "train", *,
                return_hydra_config: bool = False) -> DictConfig:
    """Compose the project's Hydra config with command-line style overrides, outside `@hydra.main`
    (with its `hydra` node if asked: what a launcher sees)."""
    kwargs = {"config_name": config_name, "overrides": list(overrides), "return_hydra_config": return_hydra_config}
    if GlobalHydra.instance().is_initialized():
        return compose(**kwargs)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(**kwargs)
