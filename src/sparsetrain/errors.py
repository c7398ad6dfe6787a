"""User-facing errors: one line, exit code 2, no traceback (the CLI catches these)."""
import difflib


class UsageError(ValueError):
    """Bad input from the user: a flag, a config value, a data directory, a checkpoint.

    The message is one line naming the field and the allowed values, e.g.
    ``--lr: must be > 0, got -1``.
    """


def check(condition: bool, field: str, expected: str, got) -> None:
    """Raise ``UsageError('{field}: must be {expected}, got {got!r}')`` unless ``condition``."""
    if not condition:
        raise UsageError(f"{field}: must be {expected}, got {got!r}")


def did_you_mean(value, allowed) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``allowed`` to ``value`` (difflib), else ``""``."""
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
    if not close:                  # a case slip or a prefix: 'LeNet300', 'lenet'
        low = str(value).lower().replace("_", "-")
        close = [n for n in names if n.lower() == low] or [n for n in names if low and n.lower().startswith(low)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def choice(value: str, field: str, allowed, what: str = "value") -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a UsageError listing them (and the
    closest one): ``FIELD: unknown WHAT 'value'; allowed: ...``."""
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"{field}: unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}"
                         f"{did_you_mean(value, allowed)}")
    return value
