"""Attention mappings: scores [batch, heads, queries, keys] -> probabilities over keys.

A mapping kind is one class registered in MAPPINGS under its config name (the stem of its
`conf/attention/<name>.yaml`). Every module of this package is imported here, so a new module
with a `@register_mapping` class is all the code a new mapping needs; `attention_mapping(name,
...)` and the model builder find it by name. See `base.AttentionMapping` for what a kind defines.
"""
from __future__ import annotations

import importlib
import pkgutil

from sparse_detr.models.mappings.base import (ALPHA_FLOOR, IMPLS, MAPPINGS, AttentionMapping, attention_mapping,
                                              config_value, register_mapping)

__all__ = ["ALPHA_FLOOR", "IMPLS", "MAPPINGS", "AttentionMapping", "attention_mapping", "config_value",
           "register_mapping"]

for _module in pkgutil.iter_modules(__path__):  # registers every kind; base (softmax) comes first
    importlib.import_module(f"{__name__}.{_module.name}")
