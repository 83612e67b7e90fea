"""What a study is: a training recipe, a grid of choices, a cluster profile and a folder.

Its runs are every combination of the grid's values, each with the recipe and `train_overrides`,
named and placed exactly as `sparse-detr-train -m` would place them in `<study dir>/runs`.
Combinations that are the same model (softmax at every site, whatever the placement) are one run.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sparse_detr.checks import check_choice
from sparse_detr.config import ConfigError, config_dir

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# keys a grid or the train overrides must not set: the study sets them, or they would put every run in one folder
STUDY_KEYS = ("cluster", "output_dir", "resume", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.run.dir",
              "train.analyze_at_end", "train.analyze_overrides")


@dataclass
class StudyConfig:
    name: str = MISSING                   # names the default folder, outputs/studies/<name>
    recipe: List[str] = field(default_factory=list)           # training overrides of every run, e.g. [experiment=smoke]
    grid: Dict[str, List[Any]] = field(default_factory=dict)  # key -> values; a run per combination
    cluster: Dict[str, Any] = field(default_factory=dict)     # the conf/cluster/ profile chosen by `cluster=`
    dir: Optional[str] = None             # None: outputs/studies/<name>
    train_overrides: List[str] = field(default_factory=list)  # more training overrides of every run
    analysis: List[str] = field(default_factory=list)         # sparse-detr-analyze overrides of each run's analysis
    report: List[str] = field(default_factory=list)           # sparse-detr-report overrides of the study's report

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"name={self.name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
        if not self.grid or any(not values for values in self.grid.values()):
            raise ConfigError(f"grid={self.grid}: give each key a non-empty list, e.g. grid.seed=[0,1]")
        clusters = sorted(p.stem for p in (config_dir() / "cluster").glob("*.yaml"))
        check_choice("cluster", self.cluster_profile, clusters)
        for where, keys in (("grid", list(self.grid)),
                            ("recipe", [o.split("=", 1)[0] for o in self.recipe]),
                            ("train_overrides", [o.split("=", 1)[0] for o in self.train_overrides])):
            for key in keys:
                if key.lstrip("+~") in STUDY_KEYS:
                    raise ConfigError(f"{where} sets {key.lstrip('+~')}, which the study sets itself; "
                                      f"the study's own keys: {', '.join(STUDY_KEYS)}")

    @property
    def cluster_profile(self) -> str:
        """local: the runs train one after another on this machine; another profile submits a sweep."""
        return str(self.cluster.get("name", ""))

    @property
    def folder(self) -> Path:
        return Path(self.dir or f"outputs/studies/{self.name}").absolute()

    @property
    def runs_folder(self) -> Path:
        return self.folder / "runs"

    def grid_points(self) -> list[list[str]]:
        """The grid's overrides of every run, in grid order (the last key varies fastest)."""
        keys = list(self.grid)
        return [[f"{key}={hydra_value(value)}" for key, value in zip(keys, values)]
                for values in itertools.product(*(self.grid[key] for key in keys))]

    def common_overrides(self) -> list[str]:
        """What every training run gets besides its grid point."""
        return [*self.recipe, *self.train_overrides, f"cluster={self.cluster_profile}", "train.analyze_at_end=true",
                f"train.analyze_overrides={hydra_list(self.analysis)}"]


def hydra_value(value: Any) -> str:
    """A value as one Hydra override value: plain when it can be, else quoted."""
    text = str(value)
    return text if re.fullmatch(r"[\w.\-/:]+", text) else "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_list(values: List[str]) -> str:
    """A list of strings as one Hydra override value, each element quoted (they hold `=`)."""
    return "[" + ",".join("'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'" for v in values) + "]"


ConfigStore.instance().store(name="study_schema", node=StudyConfig)
