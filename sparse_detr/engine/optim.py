"""DETR's AdamW parameter groups and step decay, with learned mapping parameters (alpha-entmax's
alphas, TVMax's lambdas) in a group of their own."""
from __future__ import annotations

import torch
from torch import nn

from sparse_detr.models.mappings import AttentionMapping


def mapping_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters that attention mappings own (what they learn: `pre_alpha`,
    `log_lambda`, or a new kind's), whatever their names."""
    return {id(p) for module in model.modules() if isinstance(module, AttentionMapping) for p in module.parameters()}


def parameter_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """Three groups, each named: transformer and heads (lr), backbone (lr_backbone), and `alpha`:
    every learned mapping parameter (lr x alpha_lr_multiplier, no weight decay: decay would pull
    alpha towards 1.5, or lambda towards 1, for no reason)."""
    groups = {"main": [], "backbone": [], "alpha": []}
    learned = mapping_parameter_ids(model)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in learned:
            groups["alpha"].append(parameter)
        elif name.startswith("backbone."):
            groups["backbone"].append(parameter)
        else:
            groups["main"].append(parameter)
    settings = {
        "main": {"lr": optim_cfg.lr, "weight_decay": optim_cfg.weight_decay},
        "backbone": {"lr": optim_cfg.lr_backbone, "weight_decay": optim_cfg.weight_decay},
        "alpha": {"lr": optim_cfg.lr * optim_cfg.alpha_lr_multiplier, "weight_decay": 0.0},
    }
    return [{"name": name, "params": params, **settings[name]} for name, params in groups.items() if params]


# torch 2.4 added a fused AdamW kernel for the CPU: one pass over all parameters instead of a dozen
# small operations per tensor, a tenth of the tiny model's step on 2 cores (same update to 1e-7).
FUSED_ON_CPU = torch.__version__ >= "2.4"


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`; fused where every parameter is on the CPU, torch's default elsewhere."""
    groups = parameter_groups(model, optim_cfg)
    on_cpu = all(p.device.type == "cpu" for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay,
                             fused=True if on_cpu and FUSED_ON_CPU else None)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, schedule_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch step decay at `lr_drop`; the alpha (mapping parameter) group keeps its rate unless `alpha_lr_drop`."""
    def decay(epoch: int) -> float:
        return schedule_cfg.lr_drop_factor if epoch >= schedule_cfg.lr_drop else 1.0

    def keep(epoch: int) -> float:
        return 1.0

    lambdas = [keep if group["name"] == "alpha" and not optim_cfg.alpha_lr_drop else decay
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
