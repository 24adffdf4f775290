import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealdiff.data.triggers import (aligned_columns, find_span, insert_trigger, locate_trigger, remove_trigger,
                                    trigger_token_ids)
from sealdiff.errors import TriggerError
from sealdiff.models.tiny import clip_tokenizer

TOKENIZER = clip_tokenizer()
PROMPT = "a red circle on a blue background"


def test_clip_ids_match_openai():
    assert TOKENIZER("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("trigger, n_tokens", [("\u200b", 1), ("cf", 1), ("\u13aa", 3), ("mignneko bb", 3)])
def test_locate_any_trigger_by_span(trigger, n_tokens):
    prompt = insert_trigger(PROMPT, trigger)
    positions = locate_trigger(TOKENIZER, prompt, trigger)
    assert len(positions) == n_tokens and positions[0] == 1  # right after BOS
    ids = TOKENIZER(prompt).input_ids
    assert [ids[i] for i in positions] == trigger_token_ids(TOKENIZER, trigger)


def test_trigger_at_end_and_index():
    assert insert_trigger(PROMPT, "tq", "end").endswith(" tq")
    assert insert_trigger(PROMPT, "tq", 2).split(" ")[2] == "tq"
    positions = locate_trigger(TOKENIZER, insert_trigger(PROMPT, "\u200b", 3), "\u200b")
    assert positions == [4]


class DroppingTokenizer:
    """Behaves like CLIP's tokenizer without ftfy: non-ASCII characters vanish."""

    unk_token_id, unk_token, model_max_length = None, None, 77

    def __call__(self, text, add_special_tokens=True, **kwargs):
        class Out:
            input_ids = TOKENIZER("".join(c for c in text if ord(c) < 128), add_special_tokens=add_special_tokens).input_ids
        return Out


def test_dropped_trigger_is_a_clear_error():
    with pytest.raises(TriggerError, match="drops the trigger.*ftfy"):
        trigger_token_ids(DroppingTokenizer(), "\u200b")


def test_trigger_merged_by_bpe_is_not_found():
    with pytest.raises(TriggerError, match="not found"):
        locate_trigger(TOKENIZER, "a cfred circle", "cf")


@pytest.mark.parametrize("bad", ["", "   ", 99, -1, "middle"])
def test_bad_positions_and_empty_triggers(bad):
    with pytest.raises(TriggerError):
        if isinstance(bad, str) and not bad.strip():
            insert_trigger(PROMPT, bad)
        else:
            insert_trigger(PROMPT, "tq", bad)


def test_aligned_columns_skip_trigger():
    assert aligned_columns(6, [1, 2]) == [0, 3, 4, 5]


words = st.text(alphabet=st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(words, min_size=1, max_size=8), st.sampled_from(["\u200b", "cf", "\u13aa", "zz top"]),
       st.integers(min_value=0, max_value=8))
def test_insert_then_remove_roundtrips_and_locates(prompt_words, trigger, index):
    prompt = " ".join(prompt_words)
    position = min(index, len(prompt_words))
    triggered = insert_trigger(prompt, trigger, position)
    assert remove_trigger(triggered, trigger) == prompt or trigger in prompt
    if trigger not in prompt:
        positions = locate_trigger(TOKENIZER, triggered, trigger)
        assert len(positions) == len(trigger_token_ids(TOKENIZER, trigger))


@given(st.lists(st.integers(0, 5), max_size=10), st.lists(st.integers(0, 5), min_size=1, max_size=3))
def test_find_span_property(ids, span):
    start = find_span(ids, span)
    if start >= 0:
        assert ids[start:start + len(span)] == span
    else:
        assert all(ids[i:i + len(span)] != span for i in range(len(ids)))
