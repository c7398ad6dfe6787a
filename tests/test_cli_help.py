"""--help states every option's default and allowed values; unknown names suggest the closest."""
import argparse

import pytest

from sparsetrain.cli import build_parser, main
from sparsetrain.errors import UsageError, choice


def _subparsers():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("command", ["train", "export", "compare"])
def test_every_valued_option_states_its_default(command):
    parser = _subparsers()[command]
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.dest == "help":
            continue
        assert action.help, action.option_strings
        help_text = parser._get_formatter()._get_help_string(action)
        assert "default" in help_text, (command, action.option_strings, help_text)
    assert text


def test_method_options_list_allowed_values_and_per_method_defaults():
    text = "".join(_subparsers()["train"].format_help().split())      # argparse wraps at hyphens too
    assert "--distributionSTR" in text and "default:adabregerk,gmpglobal,impglobal,linbregerk,magnitudeglobal,proxsgdglobal,riglerk,xrdaglobal" in text
    assert "--regSTR" in text and "allowed:l1,group,conv-group,sparse-group,nuclear,none" in text
    assert "--momentumFLOAT" in text and "allowed:in[0,1)" in text


@pytest.mark.parametrize("argv, hint", [
    (["train", "--model", "lenet30", "--epochs", "1"], "did you mean 'lenet300'?"),
    (["train", "--method", "linbrg"], "did you mean 'linbreg'?"),
    (["train", "--data", "fashionmnist"], "did you mean 'fashion-mnist'?"),
    (["train", "--lrr", "0.1"], "did you mean '--lr'?"),
    (["train", "--sparsty", "0.9"], "did you mean '--sparsity'?"),
    (["tran"], "did you mean 'train'?"),
    (["train", "--method", "proxsgd", "--reg", "l2"], "did you mean 'l1'?"),
    (["export", "x", "--format", "sparce"], "did you mean 'sparse'?"),
])
def test_unknown_names_suggest_the_closest(argv, hint, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert hint in err and len(err.strip().splitlines()) == 1


def test_choice_suggests_nothing_when_nothing_is_close():
    with pytest.raises(UsageError) as e:
        choice("zzz", "--x", ["alpha", "beta"])
    assert "did you mean" not in str(e.value)
