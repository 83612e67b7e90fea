"""Hugging Face DETR folders load into our model and give Hugging Face's numbers (offline: a
randomly initialised `DetrForObjectDetection` with a transformers ResNet backbone)."""
import json
import logging

import pytest
import torch

from sparse_detr.engine.trainer import init_from_weights
from sparse_detr.models.detr import build_model
from sparse_detr.models.hf_detr import check_representable, model_overrides

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency: pip install -e .[dev]")
pytest.importorskip("safetensors")

TINY = dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5)


def hf_detr(layer_type: str, depths: list[int], hidden_sizes: list[int], num_labels: int, seed: int = 0):
    backbone = transformers.ResNetConfig(depths=depths, layer_type=layer_type, hidden_sizes=hidden_sizes,
                                         out_features=["stage4"])
    config = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                     num_labels=num_labels, **TINY)
    torch.manual_seed(seed)
    model = transformers.DetrForObjectDetection(config).eval()
    with torch.no_grad():  # random BatchNorm statistics, so a wrong mapping of them would show
        for module in model.modules():
            if hasattr(module, "running_mean") and module.running_mean is not None:
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        for parameter in model.bbox_predictor.parameters():  # boxes that differ between queries and images
            parameter.normal_(0.0, 0.3)
    return model


def images_and_mask():
    """Two images of different sizes in one zero-padded batch: the masks must be handled exactly."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    images[1, :, 64:] = 0
    images[1, :, :, 96:] = 0
    mask[1, 64:] = True
    mask[1, :, 96:] = True
    return images, mask


@pytest.mark.parametrize("layer_type, depths, hidden_sizes", [
    ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),             # ResNet-18
    ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),     # ResNet-50, as facebook/detr-resnet-50
])
def test_a_saved_hugging_face_detr_gives_the_same_outputs(tmp_path, compose, layer_type, depths, hidden_sizes):
    reference = hf_detr(layer_type, depths, hidden_sizes, num_labels=4)
    reference.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = build_model(compose(*model_overrides(config), "model.num_classes=4"))[0].eval()
    init_from_weights(ours, str(tmp_path / "hf"))
    images, mask = images_and_mask()
    with torch.no_grad():
        expected = reference(pixel_values=images, pixel_mask=(~mask).long())
        got = ours(images, mask)
    assert torch.allclose(got["pred_logits"], expected.logits, atol=1e-4), (got["pred_logits"] - expected.logits).abs().max()
    assert torch.allclose(got["pred_boxes"], expected.pred_boxes, atol=1e-4)


def test_a_class_head_of_another_size_is_reinitialised_as_for_detr_checkpoints(tmp_path, compose, caplog):
    hf_detr("basic", [2, 2, 2, 2], [64, 128, 256, 512], num_labels=7).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    ours = build_model(compose(*model_overrides(config), "model.num_classes=4"))[0]
    before = ours.class_embed.weight.clone()
    with caplog.at_level(logging.WARNING):
        init_from_weights(ours, str(tmp_path / "hf"))
    assert "class head re-initialised (7 classes in the checkpoint, 4 here)" in caplog.text
    assert torch.equal(ours.class_embed.weight, before)


@pytest.mark.parametrize("field, value", [("activation_function", "gelu"), ("position_embedding_type", "learned"),
                                          ("decoder_ffn_dim", 32), ("backbone", "efficientnet_b0")])
def test_a_config_we_cannot_represent_names_the_field(field, value):
    config = {"model_type": "detr", "use_timm_backbone": True, "backbone": "resnet50", "activation_function": "relu",
              "position_embedding_type": "sine", "encoder_attention_heads": 8, "decoder_attention_heads": 8,
              "encoder_ffn_dim": 2048, "decoder_ffn_dim": 2048, field: value}
    with pytest.raises(ValueError, match=field):
        check_representable(config)


def test_transformers_5_module_names_convert_as_the_saved_legacy_names():
    from sparse_detr.models.hf_detr import convert_state_dict

    legacy = {"model.encoder.layers.0.self_attn.out_proj.weight": torch.ones(2, 2),
              "model.decoder.layers.1.fc1.bias": torch.zeros(3),
              "model.backbone.conv_encoder.model.layer1.0.conv1.weight": torch.ones(1)}
    renamed = {"model.encoder.layers.0.self_attn.o_proj.weight": torch.ones(2, 2),
               "model.decoder.layers.1.mlp.fc1.bias": torch.zeros(3),
               "model.backbone.model.layer1.0.conv1.weight": torch.ones(1)}
    expected = ["transformer.encoder.layers.0.self_attn.out_proj.weight", "transformer.decoder.layers.1.linear1.bias",
                "backbone.0.body.layer1.0.conv1.weight"]  # a timm backbone keeps torchvision's names
    assert sorted(convert_state_dict(legacy, timm_backbone=True)) == sorted(expected)
    assert sorted(convert_state_dict(renamed, timm_backbone=True)) == sorted(expected)
