"""``dense``: plain SGD with momentum, no sparsity (the reference every method is compared to)."""
import torch

from .base import SGD_MODEL_DEFAULTS, BuildContext, Strategy, momentum_option, register


@register("dense", "SGD with momentum, no sparsity (reference)", lr=0.1,
          options=(momentum_option(0.9),), model_defaults=SGD_MODEL_DEFAULTS)
def build(model, ctx: BuildContext) -> Strategy:
    opt = torch.optim.SGD(model.parameters(), lr=ctx.cfg.lr, momentum=ctx.options["momentum"],
                          weight_decay=ctx.cfg.weight_decay)
    return Strategy(model, opt)
