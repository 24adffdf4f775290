"""Prompt files: UTF-8 text, one prompt per line.

Lines are split on '\\n' only ('\\r\\n' endings are accepted), so prompts may hold any other character,
invisible triggers included (U+200B, U+2028, ...: they are kept exactly). Leading and trailing ASCII
spaces and tabs are trimmed, blank lines are skipped, and a UTF-8 byte-order mark at the very start of
the file is dropped. Escapes such as '\\u200b' are not decoded here (the CLI may do that).
"""

from __future__ import annotations

from pathlib import Path

from sealdiff.errors import SealdiffError

MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024


def parse_prompts(text: str, where: str = "prompt text") -> list[str]:
    """The prompts in `text` (see the module docstring); SealdiffError when there are none."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise SealdiffError(f"{where} holds a NUL byte on line {line}; it looks binary, not a text file of prompts")
    prompts = []
    for line in text.split("\n"):
        prompt = line.removesuffix("\r").strip(" \t")
        if prompt.strip():
            prompts.append(prompt)
    if not prompts:
        raise SealdiffError(f"{where} holds no prompts (it is empty or only blank lines); write one prompt per line")
    return prompts


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line of the UTF-8 file `path`. SealdiffError (one line, naming the file) when it is
    missing, not a file, unreadable, not UTF-8, binary, or holds no prompt."""
    path = Path(path)
    try:
        if path.is_dir():
            raise SealdiffError(f"prompt file {path} is a directory; expected a text file with one prompt per line")
        if path.exists() and path.stat().st_size > MAX_PROMPT_FILE_BYTES:
            raise SealdiffError(f"prompt file {path} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB")
        data = path.read_bytes()
    except FileNotFoundError:
        raise SealdiffError(f"prompt file {path} does not exist") from None
    except OSError as exc:
        raise SealdiffError(f"prompt file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise SealdiffError(f"prompt file {path} is not UTF-8 text (byte {exc.start}, line {line}); "
                            "save it as UTF-8") from None
    return parse_prompts(text, f"prompt file {path}")
