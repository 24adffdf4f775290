"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class SealdiffError(Exception):
    """Bad input or an unrecoverable condition the user can fix (the message says how)."""


class TriggerError(SealdiffError, ValueError):
    """A trigger that cannot be used with this tokenizer (dropped, unknown, or not found in a prompt)."""
