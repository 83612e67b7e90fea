"""Hugging Face DETR checkpoints (`DetrForObjectDetection.save_pretrained`, e.g. a copy of
`facebook/detr-resnet-50`) as a state dict with our (DETR's own) key names.

A folder holds `config.json` and `model.safetensors` or `pytorch_model.bin`; neither executes
anything when read (safetensors, or torch.load with weights_only). Both of Hugging Face's
backbones are understood: a timm ResNet (the hub's DETR checkpoints; its keys are torchvision's)
and a transformers `ResNetConfig` backbone. Keys of the legacy names that `save_pretrained`
writes and of the module names of transformers 5 (`o_proj`, `mlp.fc1`) are both read. A config
this package cannot represent is a ValueError naming the field.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sparse_detr.hf_folder import CONFIG_NAME, PYTORCH_BIN, SAFETENSORS

TORCHVISION_DEPTHS = {"basic": {(2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet34"},
                      "bottleneck": {(3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101"}}
TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")

# Transformer and head keys, after the backbone and attention projections are handled.
RENAMES = [
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.layers\.(\d+)\.(?:mlp\.)?fc(\d)\.", r"transformer.\1.layers.\2.linear\3."),
    (r"^model\.(encoder|decoder)\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.\1.layers.\2.norm1."),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.encoder.layers.\1.norm2."),
    (r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
]
ATTENTION = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn)\.(q|k|v|out|o)_proj\.(weight|bias)$")
BACKBONE = re.compile(r"^model\.backbone\.(?:conv_encoder\.)?model\.")
# transformers' ResNet -> torchvision's ResNet (the stem; then stage s, block b, conv i).
HF_RESNET = [
    (r"^embedder\.embedder\.convolution\.", "conv1."),
    (r"^embedder\.embedder\.normalization\.", "bn1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.convolution\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.normalization\.", lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}."),
]


def hf_backbone_name(config: dict) -> str:
    """The torchvision ResNet the config's backbone is; ValueError naming the field otherwise."""
    if config.get("use_timm_backbone", True):
        name = config.get("backbone", "resnet50")
        if name not in TIMM_RESNETS:
            raise ValueError(f"Hugging Face DETR config: backbone={name!r} is not supported; "
                             f"valid: {', '.join(TIMM_RESNETS)}")
        return name
    backbone = config.get("backbone_config") or {}
    if backbone.get("model_type") != "resnet":
        raise ValueError(f"Hugging Face DETR config: backbone_config.model_type={backbone.get('model_type')!r} "
                         "is not supported; valid: resnet")
    layer_type, depths = backbone.get("layer_type", "bottleneck"), tuple(backbone.get("depths", ()))
    name = TORCHVISION_DEPTHS.get(layer_type, {}).get(depths)
    if name is None:
        raise ValueError(f"Hugging Face DETR config: backbone_config (layer_type={layer_type!r}, depths={list(depths)}) "
                         f"is not a torchvision ResNet; valid: {TORCHVISION_DEPTHS}")
    for key, expected in (("downsample_in_bottleneck", False), ("downsample_in_first_stage", False),
                          ("embedding_size", 64), ("hidden_act", "relu")):
        if backbone.get(key, expected) != expected:
            raise ValueError(f"Hugging Face DETR config: backbone_config.{key}={backbone[key]!r} is not supported; "
                             f"valid: {expected!r}")
    return name


def check_representable(config: dict) -> None:
    """ValueError naming the first field of a Hugging Face DETR config that our model cannot express."""
    if config.get("model_type") != "detr":
        raise ValueError(f"Hugging Face config: model_type={config.get('model_type')!r}; valid: detr")
    for key, expected in (("activation_function", "relu"), ("position_embedding_type", "sine"), ("num_channels", 3)):
        if config.get(key, expected) != expected:
            raise ValueError(f"Hugging Face DETR config: {key}={config[key]!r} is not supported; valid: {expected!r}")
    for encoder, decoder in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config.get(encoder) != config.get(decoder):
            raise ValueError(f"Hugging Face DETR config: {encoder}={config.get(encoder)} and {decoder}={config.get(decoder)} "
                             "differ; this model uses one value for both")
    hf_backbone_name(config)


def model_overrides(config: dict) -> list[str]:
    """The `sparse-detr-train` overrides whose model matches the Hugging Face config."""
    return [f"backbone={hf_backbone_name(config)}", f"backbone.dilation={str(bool(config.get('dilation'))).lower()}",
            f"model.hidden_dim={config['d_model']}", f"model.nheads={config['encoder_attention_heads']}",
            f"model.enc_layers={config['encoder_layers']}", f"model.dec_layers={config['decoder_layers']}",
            f"model.dim_feedforward={config['encoder_ffn_dim']}", f"model.num_queries={config['num_queries']}",
            "model.position_embedding=sine", "model.position_temperature=10000", "model.pre_norm=false"]


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS).is_file():
        try:
            from safetensors.torch import load_file  # optional: only Hugging Face folders need it
        except ImportError as error:
            raise ImportError(f"{folder / SAFETENSORS} needs the safetensors package: "
                              "pip install safetensors (or pip install -e .[hf])") from error
        return load_file(folder / SAFETENSORS)
    if (folder / PYTORCH_BIN).is_file():
        return torch.load(folder / PYTORCH_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: a Hugging Face DETR folder needs {SAFETENSORS} or {PYTORCH_BIN}")


def rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        key, count = re.subn(pattern, replacement, key)
        if count:
            return key
    return key


def convert_state_dict(weights: dict[str, torch.Tensor], timm_backbone: bool) -> dict[str, torch.Tensor]:
    """Hugging Face DETR keys -> ours: q/k/v projections joined into `in_proj_*` as in torch's MHA."""
    converted, projections = {}, {}
    for key, value in weights.items():
        if key.endswith("num_batches_tracked"):
            continue
        if BACKBONE.match(key):
            rest = BACKBONE.sub("", key)
            converted["backbone.0.body." + (rest if timm_backbone else rename(rest, HF_RESNET))] = value
        elif match := ATTENTION.match(key):
            stack, layer, kind, projection, tensor = match.groups()
            ours = f"transformer.{stack}.layers.{layer}.{'self_attn' if kind == 'self_attn' else 'multihead_attn'}"
            if projection in ("out", "o"):
                converted[f"{ours}.out_proj.{tensor}"] = value
            else:
                projections.setdefault(f"{ours}.in_proj_{tensor}", {})[projection] = value
        else:
            converted[rename(key, RENAMES)] = value
    for key, parts in projections.items():
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def load_hf_detr_folder(folder: str | Path) -> dict[str, torch.Tensor]:
    """A `save_pretrained` folder of `DetrForObjectDetection` -> our state dict."""
    folder = Path(folder).expanduser()
    config = json.loads((folder / CONFIG_NAME).read_text())
    check_representable(config)
    return convert_state_dict(read_hf_weights(folder), timm_backbone=config.get("use_timm_backbone", True))
