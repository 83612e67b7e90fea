"""DETR with pluggable sparse attention (softmax, sparsemax, entmax-1.5, alpha-entmax, TVMax) at any site."""
from sparse_detr.config import load_config, validate

__all__ = ["load_config", "validate", "build_model", "attention_mapping"]


def build_model(cfg):
    """cfg -> (model, criterion, postprocessor). See `sparse_detr.models.detr.build_model`."""
    # imported here, not at the top: `import sparse_detr` (and every config check) must not load torch
    from sparse_detr.models.detr import build_model as _build

    return _build(cfg)


def attention_mapping(name: str, **params):
    """A mapping module from the registry `sparse_detr.models.mappings.MAPPINGS`; see
    `sparse_detr.models.mappings.attention_mapping`."""
    from sparse_detr.models.mappings import attention_mapping as _mapping  # torch: see build_model

    return _mapping(name, **params)
