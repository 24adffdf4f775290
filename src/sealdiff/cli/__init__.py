"""The `sealdiff` command line. Bad input prints one line and exits with code 2."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from sealdiff.errors import SealdiffError

EXIT_BAD_INPUT = 2
INTERRUPTED = "sealdiff: interrupted; no output was written (a training checkpoint, if any, is kept for --resume)"


def decode_escapes(text: str) -> str:
    """Let a shell user type invisible triggers: '\\u200b' -> U+200B (other text unchanged)."""
    return re.sub(r"\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})", lambda m: chr(int(m.group(1) or m.group(2), 16)), text)


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    from sealdiff.cli.app import app

    try:
        result = app(args=argv, prog_name="sealdiff", standalone_mode=False)
    except SealdiffError as exc:
        print(f"sealdiff: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # usage errors of typer's (vendored) click
        import typer

        if isinstance(exc, typer.TyperException) and hasattr(exc, "format_message"):
            print(f"sealdiff: error: {exc.format_message()}", file=sys.stderr)
            return EXIT_BAD_INPUT
        raise
    if result == 130:  # typer turns Ctrl-C into Exit(130) and returns it
        print(INTERRUPTED, file=sys.stderr)
    return result if isinstance(result, int) else 0
