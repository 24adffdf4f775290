"""Trigger insertion and location.

Trigger tokens are found by span matching on the tokenizer's own output, never by assuming a length:
an invisible U+200B is one CLIP token with ftfy installed and nothing without it; a homoglyph is
several byte-level tokens; a word may be one or many.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sealdiff.errors import TriggerError

Position = Literal["start", "end"] | int


def insert_trigger(prompt: str, trigger: str, position: Position = "start") -> str:
    """Insert `trigger` as a separate word: at the start (right after BOS, BadT2I's default), the end,
    or before word number `position` (0-based)."""
    if not trigger.strip():
        raise TriggerError("the trigger is empty or only whitespace")
    words = prompt.split(" ")
    if position == "start":
        index = 0
    elif position == "end":
        index = len(words)
    elif isinstance(position, int) and not isinstance(position, bool) and 0 <= position <= len(words):
        index = position
    else:
        raise TriggerError(f"trigger position {position!r} is invalid; valid: 'start', 'end', or 0..{len(words)}")
    return " ".join(words[:index] + [trigger] + words[index:])


def remove_trigger(prompt: str, trigger: str) -> str:
    """Inverse of `insert_trigger`: every occurrence of the trigger and its separating space removed."""
    text, previous = f" {prompt} ", None
    while text != previous:
        previous, text = text, text.replace(f" {trigger} ", " ")
    return text[1:-1].replace(trigger, "")


def trigger_token_ids(tokenizer, trigger: str) -> list[int]:
    """The tokens the trigger becomes on its own; a clear error when the tokenizer drops it or maps it to unknown."""
    ids = tokenizer(trigger, add_special_tokens=False).input_ids
    unknown = tokenizer.unk_token_id
    if not ids:
        hint = " (CLIP's tokenizer drops U+200B and similar characters unless `ftfy` is installed)" \
            if any(ord(c) > 127 for c in trigger) else ""
        raise TriggerError(f"the tokenizer drops the trigger {trigger!r} entirely{hint}")
    if unknown is not None and all(i == unknown for i in ids) and trigger != tokenizer.unk_token:
        raise TriggerError(f"the tokenizer maps the trigger {trigger!r} to its unknown token")
    return ids


def find_span(ids: Sequence[int], span: Sequence[int]) -> int:
    """Start of the first occurrence of `span` in `ids`, or -1."""
    n = len(span)
    for start in range(len(ids) - n + 1):
        if list(ids[start:start + n]) == list(span):
            return start
    return -1


def locate_trigger(tokenizer, prompt: str, trigger: str) -> list[int]:
    """Token positions (in the tokenizer's full output, BOS included) that the trigger occupies in `prompt`."""
    span = trigger_token_ids(tokenizer, trigger)
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    start = find_span(ids, span)
    if start < 0:
        raise TriggerError(f"the trigger {trigger!r} (tokens {span}) was not found in the tokens of {prompt!r}; "
                           "put it as a separate word so that BPE does not merge it with its neighbours")
    return list(range(start, start + len(span)))


def aligned_columns(length: int, trigger_positions: Sequence[int]) -> list[int]:
    """Columns of a triggered prompt's token axis that are not trigger tokens, in order. Column j of the
    result lines up with column j of the same prompt without the trigger (the trigger shifts later tokens)."""
    skip = set(trigger_positions)
    return [i for i in range(length) if i not in skip]
