"""What a run does when something goes wrong inside it: a diverging model, a seed at the top of its
range, fine-tuning weights that lack a mapping's parameters, a stop at an epoch's very end."""
from __future__ import annotations

import math
import signal

import pytest
import torch

from sparse_detr import build_model, load_config
from sparse_detr.config import ConfigError, MAX_SEED, validate
from sparse_detr.engine.checkpoint import load_training_checkpoint
from sparse_detr.engine.sampling import EpochSampler, SeededSamples
from sparse_detr.models.detr_checkpoint import save_detr_weights
from sparse_detr.tracking import TRAIN_EPOCH_MAIN

RUN = ["experiment=smoke", "train.progress=off", "logger=none"]


def trainer_for(run_dir, *overrides):
    from sparse_detr.engine.trainer import Trainer

    return Trainer(load_config([*RUN, *overrides]), run_dir)


def test_a_model_whose_outputs_blow_up_stops_naming_the_step_and_every_loss_term(tmp_path):
    """optim.lr=1e10: after one step the outputs are NaN; the matcher must never see them."""
    from sparse_detr.engine.loop import NonFiniteLoss

    trainer = trainer_for(tmp_path, "optim.lr=1e10", "train.checkpoint_every=1")
    matcher_forward, matched = trainer.criterion.matcher.forward, []

    def watched(outputs, targets):
        matched.append(all(torch.isfinite(outputs[k]).all() for k in ("pred_logits", "pred_boxes")))
        return matcher_forward(outputs, targets)

    trainer.criterion.matcher.forward = watched
    with pytest.raises(NonFiniteLoss) as caught:
        trainer.fit()
    trainer.close(exit_code=1)
    message = str(caught.value)
    step = load_training_checkpoint(tmp_path / "checkpoint.pth")["state"]["global_step"] + 1
    assert f"not finite at global step {step} " in message and "pred_boxes" in message
    for term in trainer.criterion.weight_dict:  # loss_ce ... loss_giou_0: every term
        assert f"{term}=nan" in message
    assert all(matched)


@pytest.mark.parametrize("seed", [20240101, MAX_SEED])
def test_any_seed_up_to_2_63_gives_reproducible_samples_and_order(seed):
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, index):
            return torch.rand(3)

    samples = SeededSamples(Noisy(), seed)
    samples.epoch = 299
    first = [samples[i] for i in range(5)]
    assert all(torch.equal(a, samples[i]) for i, a in enumerate(first))
    assert not torch.equal(first[0], first[1])
    sampler = EpochSampler(5, seed, shuffle=True)
    sampler.set_epoch(299)
    assert list(sampler) == list(sampler) and sorted(sampler) == list(range(5))


def test_seeds_outside_0_to_2_63_are_refused_before_any_work():
    for seed in (-1, MAX_SEED + 1):
        with pytest.raises(ConfigError, match=rf"seed={seed} is out of range"):
            validate(load_config([*RUN, f"seed={seed}"]))


def test_a_large_seed_trains_and_the_same_seed_trains_the_same(tmp_path):
    def one_step(folder):
        trainer = trainer_for(folder, "seed=20240101", "train.max_steps=1", "train.eval_every=100")
        trainer.evaluate = lambda: {}
        trainer.fit()
        trainer.close()
        return load_training_checkpoint(folder / "checkpoint.pth")

    first, second = one_step(tmp_path / "a"), one_step(tmp_path / "b")
    assert first["state"]["global_step"] == 1
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key


def test_init_from_softmax_weights_into_a_learned_alpha_entmax_model(tmp_path):
    from sparse_detr.engine.trainer import init_from_weights

    overrides = ["experiment=smoke", "model.num_classes=5"]
    torch.manual_seed(1)
    source, _, _ = build_model(load_config(overrides))
    save_detr_weights(source, tmp_path / "softmax.pth")
    learned = ["attention=alpha_entmax", "placement=cross", "attention.learn_alpha=true", "attention.alpha=1.3",
               "attention.impl=eager"]
    torch.manual_seed(2)
    target, _, _ = build_model(load_config([*overrides, *learned]))
    init_from_weights(target, str(tmp_path / "softmax.pth"))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    alphas = [attention.mapping.alpha for _, _, attention in target.transformer.site_attention()
              if getattr(attention.mapping, "learn_alpha", False)]
    assert len(alphas) == 2 and all(torch.allclose(a, torch.full_like(a, 1.3)) for a in alphas)

    weights = source.state_dict()
    del weights["transformer.decoder.layers.0.linear1.weight"]  # a key that truly is missing
    torch.save({"model": weights}, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match=r"missing \['transformer.decoder.layers.0.linear1.weight'\]"):
        init_from_weights(target, str(tmp_path / "incomplete.pth"))


def test_a_stop_at_an_epochs_last_step_still_logs_that_epochs_means(tmp_path):
    """SIGUSR2 during the last step of epoch 0: the resumed run logs epoch 0 with the values an
    uninterrupted run logs."""
    def epoch_rows(trainer):
        rows = {}
        trainer.tracker.log_epoch = lambda values, epoch: rows.setdefault(epoch, {}).update(values)
        return rows

    overrides = ["schedule.epochs=1", "train.eval_every=100"]
    straight = trainer_for(tmp_path / "straight", *overrides)
    straight.evaluate = lambda: {}
    expected = epoch_rows(straight)
    straight.fit()
    straight.close()

    stopped = trainer_for(tmp_path / "stopped", *overrides)
    stopped.evaluate = lambda: {}
    original_step = stopped._on_step

    def on_step(state):
        if state.batch_in_epoch == stopped.batches_per_epoch:
            stopped.preemption._record(signal.SIGUSR2, None)
        original_step(state)

    stopped._on_step = on_step
    with pytest.raises(SystemExit):
        stopped.fit()
    stopped.close(exit_code=1)
    resumed = trainer_for(tmp_path / "stopped", *overrides)
    resumed.evaluate = lambda: {}
    logged = epoch_rows(resumed)
    resumed.fit()
    resumed.close()
    assert set(logged[0]) == set(expected[0]) and f"{TRAIN_EPOCH_MAIN}/loss" in logged[0]
    for key, value in expected[0].items():
        assert math.isclose(logged[0][key], value, rel_tol=1e-12), key
