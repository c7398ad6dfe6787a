"""What ``--resume`` may change: a resumed run repeats the saved run's settings.

A changed ``--sparsity`` would silently move the target half-way through a run, and a changed
``--lr`` would be ignored (the optimizer state carries the old one) while config.json records
it; so any setting that differs from the checkpoint's config is refused, naming the flag and
both values. :data:`RESUME_MAY_CHANGE` lists the exceptions.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import TrainConfig

# flags that --resume may change: they do not change what the run computes (--epochs extends it:
# the schedules are laid over the new total from the resumed step on)
# --threads too: without it the saved count is used; another count gives results equal to rounding
RESUME_MAY_CHANGE = ("epochs", "device", "threads", "progress", "out", "resume")


def changeable_flags() -> str:
    """The flags of :data:`RESUME_MAY_CHANGE` a user can change, as written on the command line."""
    return ", ".join("--no-progress" if k == "progress" else "--" + k.replace("_", "-")
                     for k in RESUME_MAY_CHANGE if k not in ("out", "resume"))


def check_resume_config(cfg: "TrainConfig", old: dict, out, inert=()) -> None:
    """Refuse a ``--resume`` whose settings differ from the saved run's (bar RESUME_MAY_CHANGE),
    naming the flag and both values: a changed --sparsity or --lr would otherwise silently change
    the run half-way (or be ignored while config.json records it). Options in ``inert`` do nothing
    on this run's model, so a saved value for them is not compared."""
    new = cfg.to_dict()
    pairs = [(k, new[k], old[k]) for k in new if k not in RESUME_MAY_CHANGE and k != "options" and k in old]
    old_opts = old.get("options") if isinstance(old.get("options"), dict) else {}
    pairs += [(k, v, old_opts.get(k)) for k, v in cfg.options.items() if "options" in old and k not in inert]
    for key, now, before in pairs:
        if _normal(now) != _normal(before):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: {flag} differs from the run in {out} ({_show(now)} now, {_show(before)} "
                             f"saved); allowed: the original value {_show(before)} (only {changeable_flags()} may change)")


def _normal(v):
    return list(v) if isinstance(v, tuple) else v


def _show(v) -> str:
    return "unset" if v is None else repr(_normal(v))
