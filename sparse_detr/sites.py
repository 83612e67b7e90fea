"""The model's attention sites, named once.

Everything that iterates over sites (placement keys, the model's attention modules, sparsity
metrics and their masks, analysis tables, figures, tracking keys) reads SITE_LIST or SITES, so
a site's name, title and what its queries and keys are stay in one place. Imports nothing.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Site:
    name: str           # the key under `placement.` and in metric names
    title: str          # for figures and tables
    grid_queries: bool  # the queries are the image's feature-map cells (else the object queries)
    grid_keys: bool     # the keys are the image's feature-map cells (else the object queries)


SITE_LIST = (
    Site("encoder", "encoder self-attention", grid_queries=True, grid_keys=True),
    Site("decoder", "decoder self-attention", grid_queries=False, grid_keys=False),
    Site("cross", "decoder cross-attention", grid_queries=False, grid_keys=True),
)
SITES = tuple(site.name for site in SITE_LIST)
SITE_BY_NAME = {site.name: site for site in SITE_LIST}
