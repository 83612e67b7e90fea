"""Engine pieces: data order, parameter groups, schedule, checkpoints, a training step that learns."""
import pytest
import torch

from sparse_detr import build_model
from sparse_detr.engine.loop import learned_mapping_values
from sparse_detr.models.mappings import AttentionMapping
from sparse_detr.engine.checkpoint import atomic_save, load_training_checkpoint, restore_rng_states, rng_states
from sparse_detr.engine.optim import FUSED_ON_CPU, build_optimizer, build_scheduler, parameter_groups
from sparse_detr.engine.sampling import EpochSampler, SeededSamples, sample_seed
from sparse_detr.matching.criterion import total_loss


def test_sampler_order_depends_on_seed_and_epoch_only_and_resumes_mid_epoch():
    sampler = EpochSampler(10, seed=3, shuffle=True)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == list(range(10))
    sampler.set_epoch(2, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_sampler_shards_cover_every_sample_once_per_epoch():
    shards = [EpochSampler(11, seed=0, shuffle=True, rank=r, world_size=3) for r in range(3)]
    for shard in shards:
        shard.set_epoch(1)
    seen = [i for shard in shards for i in shard]
    assert len(seen) == 12 and set(seen) == set(range(11))  # one repeat pads the last shard


class Noisy(torch.utils.data.Dataset):
    """Four samples of fresh random numbers: what a random augmentation draws."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.rand(3)


def test_seeded_samples_repeat_their_augmentation_and_leave_the_global_stream_alone():
    samples = SeededSamples(Noisy(), seed=1)
    torch.manual_seed(0)
    first = samples[2]
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(samples[2], first) and torch.equal(torch.rand(1), after)
    samples.epoch = 1
    assert not torch.equal(samples[2], first)


def test_seeded_samples_draw_what_a_manual_seed_of_the_sample_seed_draws():
    samples = SeededSamples(Noisy(), seed=7)
    samples.epoch = 2
    torch.manual_seed(sample_seed(7, 2, 3))
    assert torch.equal(samples[3], torch.rand(3))


def test_the_cpu_optimizer_makes_plain_adamws_update(compose):
    """Fused on the CPU (torch >= 2.4): the same steps as the per-tensor AdamW DETR uses, to float32 rounding."""
    cfg = compose()
    updated = []
    for plain in (False, True):
        torch.manual_seed(0)
        model, _, _ = build_model(cfg)
        if plain:
            optimizer = torch.optim.AdamW(parameter_groups(model, cfg.optim), lr=cfg.optim.lr,
                                          weight_decay=cfg.optim.weight_decay, foreach=False)
        else:
            optimizer = build_optimizer(model, cfg.optim)
            assert optimizer.defaults["fused"] == (True if FUSED_ON_CPU else None)
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            for parameter in model.parameters():
                parameter.grad = torch.randn(parameter.shape, generator=generator)
            optimizer.step()
        updated.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(updated[0], updated[1], rtol=0, atol=1e-6)

def test_alphas_get_their_own_group_without_weight_decay_and_optional_lr_drop(compose):
    cfg = compose("attention=alpha_entmax", "placement=cross", "attention.impl=eager", "optim.alpha_lr_drop=false",
                  "schedule.lr_drop=2")
    model, _, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["alpha"]["weight_decay"] == 0.0
    assert groups["alpha"]["lr"] == cfg.optim.lr * cfg.optim.alpha_lr_multiplier
    assert groups["backbone"]["lr"] == cfg.optim.lr_backbone
    assert len(groups["alpha"]["params"]) == cfg.model.dec_layers
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.schedule)
    for _ in range(2):
        scheduler.step()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["main"]["lr"] == cfg.optim.lr * 0.1
    assert groups["alpha"]["lr"] == cfg.optim.lr * cfg.optim.alpha_lr_multiplier


def test_learned_lambdas_train_in_the_mapping_group_without_weight_decay_and_are_logged_per_head(compose):
    cfg = compose("attention=tvmax", "placement=encoder", "attention.learn_lambda=true", "attention.tv_lambda=0.2",
                  "attention.impl=eager")
    model, _, _ = build_model(cfg)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    lambdas = {id(p) for name, p in model.named_parameters() if name.endswith("log_lambda")}
    assert len(lambdas) == cfg.model.enc_layers
    assert {id(p) for p in groups["alpha"]["params"]} == lambdas     # and nowhere else
    assert not lambdas & {id(p) for g in ("main", "backbone") for p in groups[g]["params"]}
    assert groups["alpha"]["weight_decay"] == 0.0 and groups["main"]["weight_decay"] == cfg.optim.weight_decay
    heads = cfg.model.nheads
    values = learned_mapping_values(model)
    assert values == pytest.approx({f"lambda/encoder/layer_{l}/head_{h}": 0.2
                                    for l in range(cfg.model.enc_layers) for h in range(heads)})


def test_a_fifth_kind_declares_what_it_learns_and_needs_no_engine_edit(compose):
    """A kind registered from this test alone: its parameter trains without decay and is logged."""
    class ScaledSoftmax(AttentionMapping):
        name, learned_names = "scaled_softmax_test", ("temperature",)

        def __init__(self, heads):
            super().__init__()
            self.log_temperature = torch.nn.Parameter(torch.zeros(heads))

        def learned_values(self):
            return {"temperature": self.log_temperature.exp()}

        def _map(self, x):
            return torch.softmax(x / self.log_temperature.exp().view(1, -1, 1, 1), dim=-1)

    cfg = compose()
    model, _, _ = build_model(cfg)
    for _, _, attention in model.transformer.site_attention():
        attention.mapping = ScaledSoftmax(cfg.model.nheads)
    groups = {g["name"]: g for g in build_optimizer(model, cfg.optim).param_groups}
    temperatures = {id(p) for name, p in model.named_parameters() if name.endswith("log_temperature")}
    assert temperatures and {id(p) for p in groups["alpha"]["params"]} == temperatures
    assert set(learned_mapping_values(model)) == {
        f"temperature/{site}/layer_{l}/head_{h}" for site, l, _ in model.transformer.site_attention()
        for h in range(cfg.model.nheads)}


def test_checkpoint_round_trip_restores_every_random_stream(tmp_path):
    import random

    import numpy as np

    states = rng_states()
    drawn = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    atomic_save({"rng": states}, tmp_path / "c.pth")
    restore_rng_states(load_training_checkpoint(tmp_path / "c.pth")["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == drawn
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(compose):
    cfg = compose("optim.lr=1e-3", "optim.lr_backbone=1e-3")
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    images = torch.randn(2, 3, 64, 64)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])},
               {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.4], [0.2, 0.7, 0.2, 0.2]])}]
    losses = []
    for _ in range(30):
        loss = total_loss(criterion(model(images), targets), criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    import pytest

    from sparse_detr import load_config
    from sparse_detr.engine.loop import NonFiniteLoss
    from sparse_detr.engine.trainer import Trainer

    cfg = load_config(["experiment=smoke", "train.checkpoint_every=1", "train.progress=off", "logger=none"])
    trainer = Trainer(cfg, tmp_path)
    criterion_forward, calls = trainer.criterion.forward, []

    def poisoned(outputs, targets, **kwargs):
        losses = criterion_forward(outputs, targets, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            losses["loss_giou"] = losses["loss_giou"] * float("nan")
        return losses

    trainer.criterion.forward = poisoned
    with pytest.raises(NonFiniteLoss, match=r"global step 3: .*loss_giou=nan"):
        trainer.fit()
    trainer.close(exit_code=1)
    kept = load_training_checkpoint(tmp_path / "checkpoint.pth")
    assert kept["state"]["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_init_from_loads_weights_and_reinitialises_a_head_of_another_size(compose, tmp_path):
    from sparse_detr.engine.trainer import init_from_weights
    from sparse_detr.models.detr_checkpoint import save_detr_weights

    torch.manual_seed(1)
    source, _, _ = build_model(compose("model.num_classes=91"))
    save_detr_weights(source, tmp_path / "detr.pth")
    torch.manual_seed(2)
    target, _, _ = build_model(compose())
    head_before = target.class_embed.weight.clone()
    init_from_weights(target, str(tmp_path / "detr.pth"))
    assert torch.equal(target.class_embed.weight, head_before)
    for key, value in source.state_dict().items():
        if not key.startswith("class_embed"):
            assert torch.equal(target.state_dict()[key], value), key
