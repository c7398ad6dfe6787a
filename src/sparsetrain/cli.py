"""``sparsetrain`` command line: train, inspect, compare, export.

Every user error is a :class:`~sparsetrain.errors.UsageError`: one line on stderr naming the
field and the allowed values, exit code 2, no traceback.

Exit codes: 0 done; 2 bad input (flags, --config file, data, checkpoint, unwritable or full
--out); 3 training diverged or cannot train (a NaN/inf loss: one line naming the step; a dead
network — no gradient reaches a layer in the first steps: one line naming the layer; non-finite
weights or test loss at the end of an epoch; the last good checkpoint is kept); 130 interrupted
(Ctrl-C; the last finished epoch is kept, continue with --resume); 143 terminated (SIGTERM; the
same, and no temporary file is left behind).
Under ``torchrun`` every rank exits with the same code and one rank prints the message (torchrun
itself then reports the failed workers and exits 1).

Subcommands other than ``train`` and ``inspect`` live in their own modules, which define
``configure_parser(parser)`` and ``run_cli(args) -> int``.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import sys
from pathlib import Path

from .errors import UsageError, did_you_mean
from .liveness import DeadNetworkError

# subcommand -> (module, help); modules are imported lazily so `sparsetrain --help` stays fast
COMMANDS = {
    "train": ("sparsetrain.cli", "train a model with one method and write a run directory"),
    "inspect": ("sparsetrain.cli", "print a run's per-layer sparsity table (and export sizes)"),
    "compare": ("sparsetrain.compare", "run several methods at several target sparsities, side by side"),
    "export": ("sparsetrain.export", "export a trained run as dense / compressed / shrunk / sparse"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        command = self.prog.split()[1:]
        if message.startswith("unrecognized arguments"):
            message += f"; allowed: the flags listed by `{self.prog if command else 'sparsetrain COMMAND'} --help`"
            flags = [t for t in message.split(";")[0].split(":", 1)[1].split() if t.startswith("-")]
            if flags:
                message += did_you_mean(flags[0].split("=")[0], self._all_flags())
        else:
            import re
            bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
            if bad:
                message += did_you_mean(bad.group(1), re.findall(r"'?([\w-]+)'?", bad.group(2)))
        raise UsageError(f"{command[0]}: {message}" if command else message)

    def _all_flags(self) -> list[str]:
        """The option strings of this parser and of its subcommands (argparse reports a
        subcommand's unknown flag from the top-level parser)."""
        flags = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += list(sub._option_string_actions)
        return flags


class _HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to every flag whose help does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default is argparse.SUPPRESS
                or not action.option_strings or action.nargs == 0):   # on/off flags: no value to show
            return text
        if action.default is None or (isinstance(action.default, (list, tuple, str)) and not action.default):
            return f"{text} (default: none)".strip()
        value = ",".join(map(str, action.default)) if isinstance(action.default, (tuple, list)) else action.default
        return f"{text} (default: {value})".strip()


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``train``: general ones, then every method's own options."""
    from .data import DATASETS
    from .methods import METHODS
    from .methods.base import all_options
    from .models import MODELS
    from .resume import changeable_flags
    from .trainer import SCHEDULES

    g = p.add_argument_group("run")
    g.add_argument("--config", default=None, metavar="FILE.json",
                   help="JSON object of train settings (the flags below without dashes, e.g. "
                        '{"method": "gmp", "epochs": 5, "sparsity": 0.9}); flags given here override it')
    g.add_argument("--recipe", default=None, metavar="NAME",
                   help="a seed paper's published configuration, read like a --config file: "
                        f"{', '.join(_recipe_names()) or 'none found'}, or a path to a JSON file; "
                        "--config and flags given here override it")
    g.add_argument("--method", default="linbreg", help=f"one of: {', '.join(sorted(METHODS))} (default linbreg)")
    g.add_argument("--model", default="lenet300", help=f"one of: {', '.join(MODELS)} (default lenet300)")
    g.add_argument("--data", default="fashion-mnist", help=f"one of: {', '.join(DATASETS)} (default fashion-mnist)")
    g.add_argument("--data-dir", default=None, help="directory with the dataset's files (default: $SPARSETRAIN_DATA, "
                   "/usr/share/datasets/NAME, else download)")
    g.add_argument("--epochs", type=int, default=20, help="epochs (an integer > 0)")
    g.add_argument("--batch-size", type=int, default=128, help="batch size (an integer > 0)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay (>= 0; AdaBreg: decoupled, as AdamW) (default: 0)")
    g.add_argument("--schedule", default="cosine", help=f"learning-rate schedule, one of: {', '.join(SCHEDULES)}")
    g.add_argument("--milestones", type=_parse_fractions, default=(0.5, 0.75), metavar="F,F,...",
                   help="step schedule: fractions of training where the lr is multiplied by --gamma (default 0.5,0.75)")
    g.add_argument("--gamma", type=float, default=0.1, help="step/plateau schedule: lr factor (default 0.1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (an integer) (default: 0)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--pattern", default=None, metavar="N:M",
                   help="N:M structured sparsity (2:4 runs faster on NVIDIA GPUs): pruning methods prune in "
                        "blocks of M along the input dimension, the others end with the exact N:M projection")
    g.add_argument("--precision", default="fp32",
                   help="fp32 | bf16 | fp16: autocast dtype of the forward pass (fp16 with a gradient scaler; "
                        "weights and optimizer state stay fp32)")
    g.add_argument("--out", default=None, help="run directory (config, metrics, checkpoint, summary; default: none, nothing written)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint; "
                   f"every setting must equal the saved run's (refused otherwise) except {changeable_flags()} "
                   "(a larger --epochs extends the run)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the run (default: torch's count; recorded in config.json and reused by "
                        "--resume: results are bit-identical for the same count)")
    g.add_argument("--val-fraction", type=float, default=0.0,
                   help="seeded validation split of the training set, in [0, 1) (default: 0)")
    g.add_argument("--train-subset", type=int, default=None, help="use only the first N training samples (default: all)")
    g.add_argument("--test-subset", type=int, default=None, help="use only the first N test samples (default: all)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or epoch lines")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    m = p.add_argument_group("method options (each applies to the methods named in its help)")
    for name, opt in sorted(all_options().items()):
        users = [k for k, meth in sorted(METHODS.items()) if any(o.name == name for o in meth.options)]
        kwargs = {"type": opt.type} if opt.type is not bool else {"type": _parse_bool}
        m.add_argument(opt.flag, dest=f"opt_{name}", default=None, metavar=opt.type.__name__.upper(),
                       help=f"{opt.help} [{', '.join(users)}]; {_option_facts(name, users)}", **kwargs)


def _option_facts(name: str, users: list[str]) -> str:
    """``allowed: ...; default: ...`` of a method option (per method where the defaults differ)."""
    from .methods import METHODS
    opts = {k: next(o for o in METHODS[k].options if o.name == name) for k in users}
    first = next(iter(opts.values()))
    allowed = ", ".join(map(str, first.choices)) if first.choices else (
        first.allowed or ("true or false" if first.type is bool else "a string" if first.type is str else "a number"))
    shown = {k: ("none" if o.default is None else repr(o.default) if o.default == "" else o.default)
             for k, o in opts.items()}
    values = set(map(str, shown.values()))
    default = str(next(iter(shown.values()))) if len(values) == 1 else ", ".join(f"{k} {v}" for k, v in shown.items())
    return f"allowed: {allowed}; default: {default}"


def _parse_fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated numbers, e.g. 0.5,0.75") from None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of parsed ``train`` flags over the ``--config`` file's values (if any)."""
    from .trainer import TrainConfig
    opts = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    fields = {f for f in TrainConfig.__dataclass_fields__ if f != "options"}
    values = {k: v for k, v in vars(args).items() if k in fields}
    layers = []                                         # --recipe, then --config over it
    if getattr(args, "recipe", None):
        from .recipes import load_recipe
        layers.append(load_recipe(args.recipe))
    if getattr(args, "config", None):
        layers.append(load_config_file(args.config))
    given = getattr(args, "explicit", set())           # flags typed on the command line win
    file_opts = {}
    for layer_values, layer_opts in layers:
        values.update({k: v for k, v in layer_values.items() if k not in given})
        file_opts.update(layer_opts)
    return TrainConfig(**values, options={**file_opts, **opts})


def _recipe_names() -> list[str]:
    from .recipes import available
    return list(available())


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_value(where: str, key: str, value, kind, nullable: bool):
    if value is None and nullable:
        return None
    if kind is tuple:                                   # milestones: a list of numbers
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return tuple(float(v) for v in value)
        raise UsageError(f"{where}: {key} must be a list of numbers, got {json.dumps(value)}")
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool)}.get(kind)
    if ok is not None and not ok(value):
        raise UsageError(f"{where}: {key} must be {_TYPE_NAMES[kind]}{' or null' if nullable else ''}, "
                         f"got {json.dumps(value)}")
    return float(value) if kind is float else value


def load_config_file(path: str) -> tuple[dict, dict]:
    """(TrainConfig fields, method options) of a ``--config`` JSON file, type-checked.

    Keys are TrainConfig fields and method options (dashes or underscores), or ``options``: an
    object of method options. Unknown keys and wrong types are one-line errors."""
    from .methods.base import all_options
    from .trainer import TrainConfig
    where = f"--config {path}"
    try:
        text = open(path, "rb").read().decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"--config: {path}: no such file; allowed: a JSON file of train settings") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: {path}: unreadable ({getattr(e, 'strerror', None) or e}); "
                         f"allowed: a UTF-8 JSON file of train settings") from None
    try:
        raw = json.loads(text)
    except RecursionError:
        raise UsageError(f"{where}: nested too deeply; allowed: a flat JSON object of settings (plus one "
                         f"\"options\" object)") from None
    except ValueError as e:
        raise UsageError(f"{where}: not valid JSON ({getattr(e, 'msg', e)} at line {getattr(e, 'lineno', '?')}); "
                         f"allowed: a JSON object such as {{\"method\": \"dense\", \"epochs\": 5}}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: must be a JSON object of settings, got {type(raw).__name__}; "
                         f"allowed: e.g. {{\"method\": \"dense\", \"epochs\": 5}}")
    kinds = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "options":
            continue
        ann = str(f.type)
        base = ann.split("|")[0].strip()
        kind = tuple if base.startswith("tuple") else {"int": int, "float": float, "str": str, "bool": bool}.get(base)
        kinds[f.name] = (kind, "None" in ann)
    options = {name: (o.type, True) for name, o in all_options().items()}
    allowed = sorted(kinds) + sorted(options) + ["options"]
    values, opts = {}, {}

    def unknown(key):
        return UsageError(f"{where}: unknown key {key!r}; allowed: {', '.join(allowed)}{did_you_mean(key, allowed)}")

    items = [(str(k).replace("-", "_"), v) for k, v in raw.items()]
    nested = [(k, v) for k, v in items if k == "options"]
    for _, sub in nested:
        if not isinstance(sub, dict):
            raise UsageError(f"{where}: options must be an object of method options, got {json.dumps(sub)}")
        inner = [(str(k).replace("-", "_"), v) for k, v in sub.items()]
        if any(k == "options" for k, _ in inner):
            raise UsageError(f"{where}: options inside options would be ignored; allowed: method options "
                             f"directly inside the one \"options\" object")
        items += inner
    for key, value in items:
        if key == "options":
            continue
        if key in kinds:
            values[key] = _check_value(where, key, value, *kinds[key])
        elif key in options:
            opts[key] = _check_value(where, key, value, *options[key])
        else:
            raise unknown(key)
    return values, opts


def _explicit_train_flags(argv: list[str] | None) -> set[str]:
    """The destinations of the ``train`` flags typed in ``argv`` (not filled in by defaults)."""
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for a in sub.choices["train"]._actions:
        a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def cmd_train(args) -> int:
    from .trainer import train
    summary = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) != 0:      # under torchrun: rank 0 prints the summary
        return 0
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_layer"}, default=float))
    else:
        print(f"test accuracy {summary['test_accuracy']:.4f}  sparsity {summary['sparsity']:.4f}  "
              f"density {summary['density']:.4f}  compression {summary['compression_ratio']:.1f}x  "
              f"({summary['wall_seconds']:.1f}s)")
    return 0


def cmd_inspect(args) -> int:
    from .metrics import format_table
    run = Path(args.run_dir)
    if run.is_file():                                   # an export file written by `sparsetrain export`
        from .export import print_export_info
        print_export_info(run)
        return 0
    path = run / "summary.json"
    if not path.is_file():
        raise UsageError(f"inspect: {run} has no summary.json (allowed: a finished run directory written by train)")
    try:   # a hand-edited or foreign summary.json: any missing key or wrong type is one line
        s = json.loads(path.read_text())
        lines = [f"{s.get('method')} on {s.get('model')}/{s.get('data')}: test accuracy {s['test_accuracy']:.4f}, "
                 f"sparsity {s['sparsity']:.4f}, density {s['density']:.4f}, "
                 f"compression {s['compression_ratio']:.1f}x"]
        if "flops" in s:
            lines.append(f"MACs per input: dense {s['flops']['dense_macs']:,}, sparse {s['flops']['sparse_macs']:,} "
                         f"({s['flops']['relative']:.4f} of dense)")
        lines.append(format_table(s["per_layer"]))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
        reason = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) and e.args else f"{type(e).__name__}: {e}"
        raise UsageError(f"inspect: {path} is not a sparsetrain summary ({reason[:160]}); "
                         f"allowed: a finished run directory written by train") from None
    print("\n".join(lines))
    try:
        from .export import inspect_exports
    except ImportError:
        return 0
    inspect_exports(run)
    return 0


class _RawEpilogHelpFormatter(_HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults as in :class:`_HelpFormatter`, description and epilog printed as written."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="sparsetrain", description="Train sparse neural networks by optimization.",
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"sparsetrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module, help) in COMMANDS.items():
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        if name == "train":
            add_train_arguments(sp)
            from .methods.base import model_defaults_text
            sp.formatter_class = _RawEpilogHelpFormatter      # the defaults table keeps its lines
            sp.epilog = ("per-model defaults (measured on Fashion-MNIST; they replace the method's default "
                         "for that model unless the flag is given):\n" + model_defaults_text())
            sp.set_defaults(func=cmd_train)
        elif name == "inspect":
            sp.add_argument("run_dir", help="a run directory written by `sparsetrain train`, or an export file")
            sp.set_defaults(func=cmd_inspect)
        else:
            try:
                mod = importlib.import_module(module)
                if not (hasattr(mod, "configure_parser") and hasattr(mod, "run_cli")):
                    raise ImportError(f"{module} is not a subcommand module (yet)")
            except ImportError:
                sub._name_parser_map.pop(name, None)
                sub._choices_actions = [a for a in sub._choices_actions if a.dest != name]
                continue
            mod.configure_parser(sp)
            sp.set_defaults(func=mod.run_cli)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that half-written files are cleaned up as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    try:      # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C: no .tmp file is left behind
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:    # not the main thread
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "config", None) or getattr(args, "recipe", None):
            args.explicit = _explicit_train_flags(argv)
        return args.func(args)
    except UsageError as e:
        if not getattr(e, "quiet", False):           # quiet: another rank reports the same error
            print(f"sparsetrain: error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, DeadNetworkError) as e:
        if not getattr(e, "quiet", False):
            print(f"sparsetrain: error: {e}", file=sys.stderr)
        return 3
    except Terminated:
        print("sparsetrain: terminated (SIGTERM); the last finished epoch is saved (continue with --resume)",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("sparsetrain: interrupted; the last finished epoch is saved (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
