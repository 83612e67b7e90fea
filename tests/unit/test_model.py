"""DETR built from config: placements, DETR's state-dict keys, checkpoints, inputs and outputs."""
import argparse
import itertools
import math
from pathlib import Path

import pytest
import torch

from sparse_detr import build_model, load_config
from sparse_detr.config import GRID_MAPPINGS, MAPPING_NAMES, ConfigError
from sparse_detr.sites import SITE_BY_NAME, SITES
from sparse_detr.models.attention import MultiheadAttention
from sparse_detr.models.detr import PostProcess
from sparse_detr.models.detr_checkpoint import load_detr_weights, read_checkpoint, save_detr_weights

KEYS_FILE = Path(__file__).with_name("detr_r50_state_dict_keys.tsv")


def images(sizes=((64, 80), (48, 64)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def targets(n=2):
    return [{"labels": torch.tensor([1, 3][: i + 1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.2]][: i + 1])}
            for i in range(n)]


def site_mappings(model):
    layers = model.transformer
    return {
        "encoder": {type(layer.self_attn.mapping) for layer in layers.encoder.layers},
        "decoder": {type(layer.self_attn.mapping) for layer in layers.decoder.layers},
        "cross": {type(layer.multihead_attn.mapping) for layer in layers.decoder.layers},
    }


def reference_mapping_types():
    from sparse_detr import attention_mapping

    params = {"alpha_entmax": {"num_heads": 4, "learn_alpha": True}}
    return {name: type(attention_mapping(name, **params.get(name, {}))) for name in MAPPING_NAMES}


# every combination that validation accepts (a grid mapping needs a site whose keys are the feature map)
VALID_COMBOS = [combo for combo in itertools.product(MAPPING_NAMES, repeat=3)
                if not any(name in GRID_MAPPINGS and not SITE_BY_NAME[site].grid_keys for site, name in zip(SITES, combo))]


@pytest.mark.parametrize("combo", VALID_COMBOS, ids="-".join)
def test_every_placement_combination_builds_and_trains(compose, combo):
    overrides = [f"placement.{site}={name}" for site, name in zip(SITES, combo)]
    cfg = compose("attention.impl=eager", "attention.learn_alpha=true", *overrides)
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    outputs = model(images(((32, 48), (40, 32))))
    losses = criterion(outputs, targets())
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()

    expected = reference_mapping_types()
    assert site_mappings(model) == {site: {expected[name]} for site, name in zip(SITES, combo)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    alphas = [n for n, _ in model.named_parameters() if n.endswith("pre_alpha")]
    assert len(alphas) == 2 * combo.count("alpha_entmax")  # 2 encoder and 2 decoder layers


def test_placement_group_puts_the_mapping_only_on_its_sites(compose):
    expected = reference_mapping_types()
    for placement, sites in [("none", ()), ("encoder", ("encoder",)), ("decoder", ("decoder",)), ("cross", ("cross",)),
                             ("decoder_all", ("decoder", "cross")), ("all", SITES)]:
        cfg = compose("attention=entmax15", f"placement={placement}", "attention.impl=eager")
        model, _, _ = build_model(cfg)
        assert site_mappings(model) == {
            site: {expected["entmax15" if site in sites else "softmax"]} for site in SITES
        }, placement


def test_learned_alphas_receive_gradients_and_are_the_only_extra_parameters(compose):
    softmax_model, _, _ = build_model(compose())
    cfg = compose("attention=alpha_entmax", "placement=all", "attention.impl=eager")
    model, criterion, _ = build_model(cfg)
    extra = set(model.state_dict()) - set(softmax_model.state_dict())
    layers = cfg.model.enc_layers + 2 * cfg.model.dec_layers
    assert len(extra) == layers and all(key.endswith("mapping.pre_alpha") for key in extra)
    losses = criterion(model(images()), targets())
    sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
    for name, parameter in model.named_parameters():
        if name.endswith("pre_alpha"):
            assert parameter.grad is not None, name
            # The first decoder self-attention attends over zero targets, so its values are the
            # zero-initialised bias: the weights (and alpha) cannot matter there at initialisation.
            if name != "transformer.decoder.layers.0.self_attn.mapping.pre_alpha":
                assert parameter.grad.abs().sum() > 0, name


def r50_model():
    cfg = load_config(["backbone=resnet50", "attention=softmax", "data=coco"])
    return build_model(cfg)[0]


def test_r50_state_dict_equals_original_detr_keys_and_shapes():
    expected = {}
    for line in KEYS_FILE.read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    assert len(expected) == 458
    actual = {key: tuple(value.shape) for key, value in r50_model().state_dict().items()}
    assert actual.keys() == expected.keys()
    assert actual == expected


def test_detr_checkpoint_round_trips_strictly(tmp_path):
    model = r50_model()
    path = tmp_path / "detr.pth"
    save_detr_weights(model, path)
    fresh = r50_model()
    load_detr_weights(fresh, path, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_official_checkpoint_layout_with_args_loads_safely(tmp_path, compose):
    model, _, _ = build_model(compose())
    path = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4, backbone="resnet50"), "epoch": 299}, path)
    fresh, _, _ = build_model(compose())
    load_detr_weights(fresh, path, strict=True)
    assert read_checkpoint(path)["args"].backbone == "resnet50"


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(ValueError, match="not safe to load"):
        read_checkpoint(path)


def test_softmax_model_equals_the_same_model_with_torch_attention(compose):
    """Swap every attention module for torch.nn.MultiheadAttention with the same weights."""
    torch.manual_seed(0)
    model, _, _ = build_model(compose())
    model.eval()
    batch = images()
    ours = model(batch)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, MultiheadAttention):
                reference = torch.nn.MultiheadAttention(child.embed_dim, child.num_heads)
                reference.load_state_dict(child.state_dict())
                setattr(parent, name, reference)
    theirs = model(batch)
    torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], atol=1e-5, rtol=0)


def test_list_of_images_equals_padded_batch_with_mask(compose):
    from sparse_detr.data.collate import pad_images

    model, _, _ = build_model(compose())
    model.eval()
    batch = images()
    padded, mask = pad_images(batch)
    a, b = model(batch), model(padded, mask)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(a["pred_boxes"], b["pred_boxes"])
    assert a["pred_logits"].shape == (2, 10, 6) and a["pred_boxes"].shape == (2, 10, 4)
    assert len(a["aux_outputs"]) == 1


def test_attention_weights_are_returned_per_head_without_changing_outputs(compose):
    model, _, _ = build_model(compose("attention=sparsemax", "placement=all", "attention.impl=eager"))
    model.eval()
    plain = model(images())
    traced = model(images(), return_attention=True)
    assert torch.equal(plain["pred_logits"], traced["pred_logits"])
    h, w = traced["feature_mask"].shape[-2:]
    assert [t.shape for t in traced["attention"]["encoder"]] == [(2, 4, h * w, h * w)] * 2
    assert [t.shape for t in traced["attention"]["decoder"]] == [(2, 4, 10, 10)] * 2
    assert [t.shape for t in traced["attention"]["cross"]] == [(2, 4, 10, h * w)] * 2
    padded_keys = traced["feature_mask"].flatten(1)[:, None, None, :]
    for weights in traced["attention"]["cross"]:
        assert torch.all(weights.masked_select(padded_keys.expand_as(weights)) == 0)


def test_postprocess_scales_boxes_to_original_pixels():
    logits = torch.tensor([[[0.0, 5.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.25]]])
    result = PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    assert result[0]["labels"].tolist() == [1]
    torch.testing.assert_close(result[0]["boxes"], torch.tensor([[50.0, 37.5, 150.0, 62.5]]))
    torch.testing.assert_close(result[0]["scores"], torch.softmax(logits[0, 0], -1)[1:2])


@pytest.mark.parametrize("override", ["model.pre_norm=true", "model.position_embedding=learned"])
def test_model_variants_run(compose, override):
    model, _, _ = build_model(compose(override))
    out = model(images())
    assert torch.isfinite(out["pred_boxes"]).all()
    if override == "model.pre_norm=true":
        assert "transformer.encoder.norm.weight" in model.state_dict()


@pytest.mark.parametrize("temperature", [10000.0, 20.0])
def test_sine_position_encoding_uses_the_configured_temperature(compose, temperature):
    """Known answer: channel 2i of the x half at column j (of w, unpadded) is sin(2 pi (j+1)/w / T^(2i/F))."""
    model, _, _ = build_model(compose(f"model.position_temperature={temperature}"))
    encoding = model.backbone[1]
    features = encoding.num_pos_feats
    pos = encoding(torch.zeros(1, 3, 8, dtype=torch.bool))[0, features:, 0]      # x half, first row
    columns = torch.arange(1, 9) / 8 * 2 * math.pi
    for i in range(features // 2):
        expected = torch.sin(columns / temperature ** (2 * i / features))
        torch.testing.assert_close(pos[2 * i], expected, atol=1e-5, rtol=0)


def test_dilation_halves_the_stride():
    cfg = load_config(["backbone=resnet50", "backbone.dilation=true", "experiment=smoke", "model.num_classes=3"])
    model, _, _ = build_model(cfg)
    out = model([torch.randn(3, 64, 64)], return_attention=True)
    assert out["feature_mask"].shape[-2:] == (4, 4)


def test_pretrained_without_a_local_file_says_what_to_provide(compose):
    cfg = compose("backbone=resnet18", "backbone.pretrained=true")
    with pytest.raises(ConfigError, match=r"resnet18-f37072fd\.pth.*backbone\.weights="):
        build_model(cfg)


def test_local_backbone_weights_file_is_loaded(compose, tmp_path):
    import torchvision

    torch.manual_seed(3)
    resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model, _, _ = build_model(compose("backbone=resnet18", "backbone.pretrained=true", f"backbone.weights={path}"))
    torch.testing.assert_close(model.state_dict()["backbone.0.body.layer2.0.conv1.weight"], resnet.layer2[0].conv1.weight)


def test_stem_and_layer1_are_frozen():
    model = r50_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone")}
    assert trainable and all(n.split(".")[3] in ("layer2", "layer3", "layer4") for n in trainable)
