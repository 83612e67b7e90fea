"""Backbones: torchvision ResNets as DETR uses them, and a tiny CNN for CPU runs.

State-dict keys match DETR's (`backbone.0.body.layer1...`): the ResNet sits in `body`, an
`IntermediateLayerGetter` that keeps layer4 and drops the pooling and classifier.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

from sparse_detr.errors import ConfigError
from sparse_detr.models.position_encoding import build_position_encoding

RESNET_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
# torchvision's file names for ImageNet weights, for the error message when one is missing.
RESNET_WEIGHT_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
}


def read_resnet_weights(name: str, weights: str | None) -> dict[str, torch.Tensor]:
    """Load ImageNet weights from a local file; nothing is ever downloaded."""
    if weights is None:
        raise ConfigError(
            f"backbone.pretrained=true needs a local weights file, and nothing can be downloaded here. "
            f"Fetch torchvision's {name} ImageNet weights ({RESNET_WEIGHT_FILES.get(name, name + '.pth')}) "
            f"on a machine with internet, copy the file here and pass backbone.weights=/path/to/that/file."
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.weights={weights!r}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


class ResNetBody(nn.Module):
    """A torchvision ResNet with frozen BatchNorm, stem and layer1 frozen, returning layer4."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool, weights: str | None, pretrained: bool):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        if pretrained:
            missing, unexpected = resnet.load_state_dict(read_resnet_weights(name, weights), strict=False)
            unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
            if missing or unexpected:
                raise ConfigError(f"backbone.weights={weights!r} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for parameter_name, parameter in resnet.named_parameters():
            if not train_backbone or not parameter_name.startswith(("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, return_layers={"layer4": "0"})
        self.num_channels = RESNET_CHANNELS[name]
        self.stride = 16 if dilation else 32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)["0"]


class TinyBody(nn.Module):
    """Four stride-2 conv blocks (stride 16) with GroupNorm: trains from scratch on a CPU."""

    def __init__(self, channels: int):
        super().__init__()
        widths = [channels, channels * 2, channels * 4, channels * 8]
        layers, in_channels = [], 3
        for width in widths:
            layers += [
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(inplace=True),
            ]
            in_channels = width
        self.body = nn.Sequential(*layers)
        self.num_channels = widths[-1]
        self.stride = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class Joiner(nn.Sequential):
    """(body, position encoding) as DETR's `backbone.0` / `backbone.1`."""

    def __init__(self, body: nn.Module, position_encoding: nn.Module):
        super().__init__(body, position_encoding)
        self.num_channels = body.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, 3, H, W], [B, H, W] -> features [B, C, h, w], mask [B, h, w], position [B, D, h, w]."""
        features = self[0](images)
        feature_mask = F.interpolate(mask[None].float(), size=features.shape[-2:])[0].to(torch.bool)
        return features, feature_mask, self[1](feature_mask).to(features.dtype)


def build_backbone(backbone_cfg, model_cfg, train_backbone: bool = True) -> Joiner:
    """The CNN (`backbone_cfg`) joined with the position encoding `model_cfg` asks for."""
    if backbone_cfg.name == "tiny":
        body = TinyBody(backbone_cfg.channels)
    else:
        body = ResNetBody(backbone_cfg.name, train_backbone, backbone_cfg.dilation,
                          backbone_cfg.weights, backbone_cfg.pretrained)
    position = build_position_encoding(model_cfg.position_embedding, model_cfg.hidden_dim, model_cfg.position_temperature)
    return Joiner(body, position)
