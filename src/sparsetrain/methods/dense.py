"""``dense``: plain SGD with momentum, no sparsity (the reference every method is compared to)."""
import torch

from .base import SGD_LR, BuildContext, Strategy, momentum_option, register


@register("dense", "SGD with momentum, no sparsity (reference)", **SGD_LR,
          options=(momentum_option(0.9),))
def build(model, ctx: BuildContext) -> Strategy:
    opt = torch.optim.SGD(model.parameters(), lr=ctx.cfg.lr, momentum=ctx.options["momentum"],
                          weight_decay=ctx.cfg.weight_decay)
    return Strategy(model, opt)
