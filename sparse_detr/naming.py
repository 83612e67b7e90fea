"""What a run is named after: the model that actually runs, not the words that asked for it.

The run folder, the W&B group and the W&B run name all come from `variant_name`:

    <attention>-<placement>-<backbone>-<data>[+other overrides]

- `<attention>-<placement>` is read off the mapping each site really uses (`placement.encoder`,
  `.decoder`, `.cross`): every site softmax is `softmax-none` whatever `attention=` said, one
  mapping at the sites of a named placement is `<mapping>-<placement>` (as before), other mixes
  list their sparse sites (`encoder_sparsemax-cross_entmax15`). So equal models get equal names,
  and a sweep that asks for the same model twice trains it once.
- `<data>` is the data set's name; `coco_format` adds a short hash of its four paths, so two
  COCO-format data sets never share a folder while no path ever enters a name.
- `+other overrides` are the command-line overrides that change the run, sorted, as Hydra's
  `override_dirname` writes them, without: the keys of `hydra.job.config.override_dirname.exclude_keys`;
  what the head already says (`attention.name`, `placement.*`), or parameters of mappings no
  site uses (`attention.alpha` with no alpha-entmax site); paths; keys that only name or place a
  run (`logger.*`, `cluster.*`); and anything that looks like a secret.

The resolver `${sparse_detr.variant:}` gives the name inside the Hydra config (conf/train.yaml's
run and sweep folders), from the same function.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from sparse_detr.sites import SITES
from sparse_detr.tracking import looks_secret

SOFTMAX = "softmax"
MIXED = "mixed"        # the attention of a model with several sparse mappings
# the sites that use the mapping -> the `placement=` option with those sites (conf/placement/)
PLACEMENT_OF_SITES = {
    frozenset(): "none",
    frozenset({"encoder"}): "encoder",
    frozenset({"decoder"}): "decoder",
    frozenset({"cross"}): "cross",
    frozenset({"decoder", "cross"}): "decoder_all",
    frozenset(SITES): "all",
}
# `attention.*` keys that only one mapping reads: they name a run only when that mapping runs somewhere
MAPPING_PARAMETERS = {**{key: "alpha_entmax" for key in ("attention.alpha", "attention.learn_alpha",
                                                        "attention.alpha_init", "attention.alpha_param")},
                      **{key: "tvmax" for key in ("attention.tv_lambda", "attention.learn_lambda")}}
# said by the `<attention>-<placement>` head itself
HEAD_KEYS = ("attention", "attention.name", "placement")
# where a run logs or runs, never what it trains
NAMING_ONLY_PREFIXES = ("logger", "cluster", "hydra")
# file and folder paths: where things are, not what they are
PATH_KEYS = ("output_dir", "resume", "init_from", "backbone.weights", "data.root", "data.train_images",
             "data.train_annotations", "data.val_images", "data.val_annotations")
DATA_PATH_KEYS = PATH_KEYS[-4:]


def select(cfg: Any, dotted: str, default: Any = None) -> Any:
    """cfg["a"]["b"] for "a.b" of a DictConfig or plain dicts; `default` where missing (`???`) or absent."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.select(cfg, dotted, default=default, throw_on_missing=False)
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def site_mappings(cfg: Any) -> dict[str, str]:
    """{site: the mapping it runs} for encoder, decoder and cross."""
    return {site: str(select(cfg, f"placement.{site}") or SOFTMAX) for site in SITES}


def attention_and_placement(cfg: Any) -> tuple[str, str]:
    """(attention, placement) of what runs at each site: ("softmax", "none") when every site is
    softmax, (mapping, placement) for one mapping (placement named as in conf/placement/, else its
    sites joined by `_`), ("mixed", `<site>_<mapping>-...`) for several mappings."""
    sparse = {site: m for site, m in site_mappings(cfg).items() if m != SOFTMAX}
    kinds = set(sparse.values())
    if not kinds:
        return SOFTMAX, "none"
    if len(kinds) == 1:
        return kinds.pop(), PLACEMENT_OF_SITES.get(frozenset(sparse), "_".join(sparse))
    return MIXED, "-".join(f"{site}_{mapping}" for site, mapping in sparse.items())


def attention_label(cfg: Any) -> str:
    """`<mapping>-<placement>`, or for several mappings `<site>_<mapping>-...` (see the module docstring)."""
    attention, placement = attention_and_placement(cfg)
    return placement if attention == MIXED else f"{attention}-{placement}"


def data_label(cfg: Any) -> str:
    """The data set's name; for `coco_format`, with a short hash of its four paths (absolute)."""
    name = str(select(cfg, "data.name"))
    if name != "coco_format":
        return name
    paths = [os.path.abspath(os.path.expanduser(str(p))) if p else "" for p in
             (select(cfg, key) for key in DATA_PATH_KEYS)]
    return f"{name}_{hashlib.sha256(chr(0).join(paths).encode()).hexdigest()[:8]}"


def names_the_model(key: str, mappings_in_use: set[str], exclude_keys: Sequence[str] = ()) -> bool:
    """Whether an override of `key` (e.g. `model.dropout`, `+logger.api_key`) belongs in the name."""
    if key in exclude_keys or key in HEAD_KEYS or key in PATH_KEYS or looks_secret(key):
        return False
    if key.split(".")[0] in NAMING_ONLY_PREFIXES or key.startswith("placement."):
        return False
    if key in MAPPING_PARAMETERS and MAPPING_PARAMETERS[key] not in mappings_in_use:
        return False
    if key.startswith("attention.") and mappings_in_use <= {SOFTMAX}:
        return False  # softmax has no parameters
    return True


def override_suffix(cfg: Any, overrides: Sequence[str], exclude_keys: Sequence[str] = ()) -> str:
    """`+k=v,k2=v2`: the overrides that name the model, sorted, as Hydra's override_dirname; or ""."""
    in_use = set(site_mappings(cfg).values())
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    lines = sorted(o.input_line for o in parsed if names_the_model(o.key_or_group, in_use, exclude_keys))
    return f"+{','.join(lines)}" if lines else ""


def variant_name(cfg: Any, overrides: Sequence[str] = (), exclude_keys: Sequence[str] = ()) -> str:
    """`<attention>-<placement>-<backbone>-<data>[+overrides]`: the run folder's name without the seed."""
    head = "-".join([attention_label(cfg), str(select(cfg, "backbone.name")), data_label(cfg)])
    return head + override_suffix(cfg, overrides, exclude_keys)


def _variant_of_root(*, _root_: DictConfig) -> str:
    """The resolver: the name of the run whose whole config (with its `hydra` node) is `_root_`."""
    hydra = _root_.hydra
    return variant_name(_root_, list(hydra.overrides.task),
                        list(OmegaConf.select(hydra, "job.config.override_dirname.exclude_keys", default=[]) or []))


OmegaConf.register_new_resolver("sparse_detr.variant", _variant_of_root, replace=True)
