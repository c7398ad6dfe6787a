"""User-facing errors: one line, exit code 2, no traceback (the CLI catches these)."""


class UsageError(ValueError):
    """Bad input from the user: a flag, a config value, a data directory, a checkpoint.

    The message is one line naming the field and the allowed values, e.g.
    ``--lr: must be > 0, got -1``.
    """


def check(condition: bool, field: str, expected: str, got) -> None:
    """Raise ``UsageError('{field}: must be {expected}, got {got!r}')`` unless ``condition``."""
    if not condition:
        raise UsageError(f"{field}: must be {expected}, got {got!r}")


def choice(value: str, field: str, allowed) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a UsageError listing them."""
    allowed = list(allowed)
    if value not in allowed:
        raise UsageError(f"{field}: unknown value {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value
