"""A whole training run: build, resume, train, checkpoint, evaluate; what `sparse-detr-train` runs."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from sparse_detr.config import TrainConfig, validate
from sparse_detr.data import build_dataset
from sparse_detr.data.coco import category_table
from sparse_detr.data.collate import collate
from sparse_detr.engine import distributed
from sparse_detr.engine.checkpoint import atomic_save, load_training_checkpoint, restore_rng_states, rng_states
from sparse_detr.engine.loop import TrainState, evaluate, mean_across_ranks, train_one_epoch, unwrap
from sparse_detr.engine.optim import build_optimizer, build_scheduler
from sparse_detr.engine.preemption import PreemptionGuard
from sparse_detr.errors import ConfigError
from sparse_detr.engine.sampling import EpochSampler, SeededSamples
from sparse_detr.metrics.coco_eval import CocoEvaluator
from sparse_detr.metrics.paibb_sizes import PaibbBySize, paibb_metrics
from sparse_detr.metrics.sparsity import SparsityAccumulator
from sparse_detr.models.detr import build_model
from sparse_detr.models.detr_checkpoint import model_state_dict, read_checkpoint
from sparse_detr.run_folder import EVAL_METRICS_NAME, checkpoint_path, write_json
from sparse_detr.provenance import collect as collect_provenance
from sparse_detr.provenance import record_provenance
from sparse_detr.tracking import SPARSITY, TRAIN_EPOCH_MAIN, VAL_EPOCH, build_tracker

log = logging.getLogger(__name__)


def make_loader(dataset, batch_size: int, num_workers: int, sampler: EpochSampler, drop_last: bool) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global stream (exact resume).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, drop_last=drop_last,
                      num_workers=num_workers, generator=torch.Generator(), persistent_workers=False)


def mapping_state_keys(model) -> set[str]:
    """State-dict keys of the attention mappings' own parameters (a learned alpha-entmax's `pre_alpha`)."""
    mappings = {id(attention.mapping) for _, _, attention in unwrap(model).transformer.site_attention()}
    return {f"{name}.{key}" for name, module in unwrap(model).named_modules() if id(module) in mappings
            for key in module.state_dict()}


PRE_NORM_ENCODER_NORM = "transformer.encoder.norm."   # only pre-norm transformers have it


def init_from_weights(model, path: str) -> None:
    """Model weights only, for fine-tuning. A class head of another size is left re-initialised,
    mapping parameters the checkpoint lacks (softmax or official DETR weights into a learned
    alpha-entmax model) keep their configured initial values, and so does a pre-norm model's final
    encoder norm (official DETR weights are post-norm); any other missing or extra key is an error."""
    weights = model_state_dict(read_checkpoint(path))
    own = model.state_dict()
    head = ("class_embed.weight", "class_embed.bias")
    if all(k in weights for k in head) and weights[head[1]].shape != own[head[1]].shape:
        log.warning("init_from: class head re-initialised (%d classes in the checkpoint, %d here)",
                    weights[head[1]].shape[0] - 1, own[head[1]].shape[0] - 1)
        for key in head:
            del weights[key]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    new_mapping_keys = sorted(set(missing) & mapping_state_keys(model))
    if new_mapping_keys:
        log.info("init_from: %d attention mapping parameters not in the checkpoint keep their initial values "
                 "(%s, ...)", len(new_mapping_keys), new_mapping_keys[0])
    # DETR's published weights are post-norm: a pre-norm model (the thesis recipes) has a final encoder
    # LayerNorm they lack, which keeps its identity initialisation.
    encoder_norm = [k for k in missing if k.startswith(PRE_NORM_ENCODER_NORM)]
    if encoder_norm:
        log.warning("init_from: the checkpoint has no %s* (post-norm weights into a pre-norm model); it starts "
                    "as the identity, and fine-tuning starts from a different function than the checkpoint's",
                    PRE_NORM_ENCODER_NORM)
    missing = [k for k in missing if (k not in head or k in weights) and k not in new_mapping_keys
               and k not in encoder_norm]
    if missing or unexpected:
        raise ValueError(f"init_from={path!r} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def sparsity_metrics(values: dict) -> dict[str, float]:
    """`sparsity/<site>/layer_<l>/<metric>` (head mean) from a SparsityAccumulator result."""
    return {f"{SPARSITY}/{site}/layer_{layer}/{metric}": float(per_head.mean())
            for (site, layer), metrics in values.items() for metric, per_head in metrics.items()}


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: str | Path, checked: TrainConfig | None = None):
        """cfg: the composed config (saved in checkpoints as it is); checked: `validate(cfg)`, when
        the caller has it already (`sparse-detr-train` does), else validated here."""
        self.cfg = cfg
        self.checked = checked if checked is not None else validate(cfg)
        data = self.checked.data
        self.run_dir = Path(run_dir)
        self.ctx = distributed.setup(cfg.train.device)
        if self.ctx.device.type != "cuda" and cfg.train.amp != "none":
            warnings.warn(f"train.amp={cfg.train.amp} applies to CUDA only; running in float32 on the CPU")
        torch.manual_seed(cfg.seed)
        self.model, self.criterion, self.postprocessor = build_model(cfg)
        self.model.to(self.ctx.device)
        self.criterion.to(self.ctx.device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.schedule)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" and self.ctx.device.type == "cuda" else None
        self.state = TrainState()
        train_set = build_dataset(data, "train")
        self.val_set = build_dataset(data, "val")
        self.train_samples = SeededSamples(train_set, cfg.seed)
        self.train_sampler = EpochSampler(len(train_set), cfg.seed, True, self.ctx.rank, self.ctx.world_size)
        self.batches_per_epoch = len(self.train_sampler) // data.batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(f"data.batch_size={data.batch_size} is larger than the {len(self.train_sampler)} "
                             f"training images each process gets; lower it or add images")
        self.val_sampler = EpochSampler(len(self.val_set), cfg.seed, False, self.ctx.rank, self.ctx.world_size)
        self.tracker_run_id = None
        self._restore()
        if self.state.global_step == 0:  # same initial weights on every rank, then own dropout streams
            torch.manual_seed(cfg.seed + self.ctx.rank)
        self.network = self.model
        if self.ctx.enabled:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        provenance = collect_provenance()
        if self.ctx.is_main:
            record_provenance(self.run_dir, provenance)
        self.tracker = build_tracker(cfg.logger, self.run_dir,
                                     {**OmegaConf.to_container(cfg, resolve=True), "provenance": provenance},
                                     run_id=self.tracker_run_id, rank=self.ctx.rank)
        # SLURM's warning before the time limit (or a preemption): checkpoint after the step, then requeue.
        self.preemption = PreemptionGuard(cfg.cluster.preempt_signals).install()

    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_path(self.run_dir)

    def _restore(self) -> None:
        """The run folder's own checkpoint, once there is one; else `resume=` or `init_from=`, which
        only say where a new run starts (a requeue repeats them, and must not go back to them)."""
        own = self.checkpoint_path.is_file()
        ignored = [f"{key}={self.cfg[key]}" for key in ("resume", "init_from") if self.cfg[key]]
        if own:
            path = self.checkpoint_path
            if ignored and self.ctx.is_main:
                log.info("the run folder holds its own checkpoint: resuming from it, not from %s "
                         "(those only start a new run)", " or ".join(ignored))
        elif self.cfg.resume:
            path = self.cfg.resume
        else:
            if self.cfg.init_from:
                init_from_weights(self.model, self.cfg.init_from)
                log.info("new run: weights from init_from=%s", self.cfg.init_from)
            return
        checkpoint = load_training_checkpoint(path)
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = TrainState(**checkpoint["state"])
        self.tracker_run_id = checkpoint.get("tracker_run_id")
        restore_rng_states(checkpoint["rng"][min(self.ctx.rank, len(checkpoint["rng"]) - 1)])
        log.info("resumed from %s (%s) at epoch %d, step %d", path, "the run folder's own checkpoint" if own else "resume=",
                 self.state.epoch, self.state.global_step)

    def save(self, state: TrainState | None = None) -> None:
        """Every rank's random streams are gathered; rank 0 writes the file."""
        states = [rng_states()]
        if self.ctx.enabled:
            states = [None] * self.ctx.world_size
            torch.distributed.all_gather_object(states, rng_states())
        state = state or self.state
        # The epoch's running sums as the mean over ranks: every rank resumes from rank 0's file.
        saved_state = {**vars(state), "epoch_sums": mean_across_ranks(dict(state.epoch_sums))}
        if not self.ctx.is_main:
            return
        atomic_save({
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "state": saved_state,
            "rng": states,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "categories": category_table(self.val_set),
            "tracker_run_id": self.tracker.run_id,
        }, self.checkpoint_path, keep_previous=True)

    def _on_step(self, state: TrainState) -> None:
        every = self.cfg.train.checkpoint_every
        if every and state.global_step % every == 0:
            self.save(state)
        if self.preemption.requested(self.ctx):
            self.preemption.stop(lambda: self._save_for_requeue(state), f"step {state.global_step}",
                                 str(self.checkpoint_path))

    def _save_for_requeue(self, state: TrainState) -> None:
        """Checkpoint, and flush the tracker now: a requeue kills the tracker's helper processes."""
        self.save(state)
        self.tracker.finish()

    def _max_steps_reached(self) -> bool:
        return self.cfg.train.max_steps is not None and self.state.global_step >= self.cfg.train.max_steps

    def evaluate(self) -> dict[str, float]:
        loader = make_loader(self.val_set, self.checked.data.batch_size, self.checked.data.num_workers, self.val_sampler, False)
        evaluator = CocoEvaluator(self.val_set.coco, self.val_set.label_to_category)
        sparsity, paibb = SparsityAccumulator(), PaibbBySize()
        metrics = evaluate(self.network, self.postprocessor, loader, evaluator, device=self.ctx.device,
                           loop_cfg=self.cfg.train, sparsity=sparsity, paibb=paibb, criterion=self.criterion)
        if self.ctx.is_main:
            write_json(self.run_dir / EVAL_METRICS_NAME, {**metrics, "epoch": self.state.epoch, "global_step": self.state.global_step})
            self.tracker.log_epoch({f"{VAL_EPOCH}/{k}": v for k, v in metrics.items()}, epoch=self.state.epoch)
            self.tracker.log({**sparsity_metrics(sparsity.compute()), **paibb_metrics(paibb.compute())},
                             step=self.state.global_step)
        return metrics

    def fit(self) -> dict[str, float]:
        cfg = self.cfg
        loader = make_loader(self.train_samples, self.checked.data.batch_size, self.checked.data.num_workers, self.train_sampler, True)
        metrics: dict[str, float] = {}
        while self.state.epoch < cfg.schedule.epochs and not self._max_steps_reached():
            epoch = self.state.epoch
            self.train_sampler.set_epoch(epoch, skip=self.state.batch_in_epoch * self.checked.data.batch_size)
            self.train_samples.epoch = epoch
            means = train_one_epoch(self.network, self.criterion, loader, self.optimizer, self.state,
                                    device=self.ctx.device, loop_cfg=cfg.train, clip_max_norm=cfg.optim.clip_max_norm,
                                    tracker=self.tracker, on_step=self._on_step, scaler=self.scaler)
            if self.state.batch_in_epoch < self.batches_per_epoch:  # stopped early by max_steps
                self.save()
                break
            self.state.epoch, self.state.batch_in_epoch, self.state.epoch_sums = epoch + 1, 0, {}
            self.scheduler.step()
            self.tracker.log_epoch({f"{TRAIN_EPOCH_MAIN}/{k.split('/')[-1]}": v for k, v in means.items()}, epoch=epoch)
            if self.state.epoch % cfg.train.eval_every == 0 or self.state.epoch == cfg.schedule.epochs:
                metrics = self.evaluate()
            self.save()
        if not metrics:
            metrics = self.evaluate()
        return metrics

    def close(self, exit_code: int = 0) -> None:
        self.preemption.uninstall()
        self.tracker.finish(exit_code)
        distributed.teardown()
