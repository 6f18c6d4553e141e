"""Incremental detokenization and stops, with the real SmolLM2 tokenizer (byte-level BPE).

Every stream is checked against ``tokenizer.decode`` of the same ids, and at
every step the text handed out so far must be a prefix of the final text: so
no partial character and no part of a stop string is ever streamed.
"""

import random

import pytest

from llmopt.runtime.detokenizer import IncrementalDetokenizer
from llmopt.runtime.sampling_params import SamplingParams

MULTI_BYTE = "Naïve café: 日本語 and 😀🎉 — über Ελληνικά, señor. Ça va? 中文字符 👨‍👩‍👧"
TEXTS = [
    "Hello world, this is the END of it.",
    MULTI_BYTE,
    "The answer is 42.\n\nQuestion: next\ttab  double  spaces",
    "🎉",
]


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


DEFAULT = SamplingParams()


def stream(tok, ids, params=DEFAULT, eos=frozenset()):
    """Feed ids one at a time as the engine would; return (detokenizer, deltas, stop).

    Checks on the way that the deltas add up to ``.text`` and that the text
    handed out only ever grows by appending.
    """
    det = IncrementalDetokenizer(tok, [1, 2, 3], params)
    deltas, stop, seen = [], None, []
    for token in ids:
        deltas.append(det.add(token))
        stop = det.check_stop(eos)
        if stop is None:
            assert det.text == "".join(deltas)
            seen.append(det.text)
        else:
            break
    deltas.append(det.flush())
    assert det.finished and det.text == "".join(deltas)
    assert all(det.text.startswith(text) for text in seen)
    assert det.flush() == ""
    return det, deltas, stop


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(tok, text):
    ids = encode(tok, text)
    det, deltas, stop = stream(tok, ids)
    assert stop is None
    assert det.text == tok.decode(ids) == text
    assert det.token_ids == ids
    assert not any("\ufffd" in d for d in deltas)  # no partial character ever streamed


def test_partial_characters_are_held_back(tok):
    ids = encode(tok, " 😀")
    assert tok.decode(ids[:1]).endswith("\ufffd")  # the emoji's bytes span several tokens
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    assert det.add(ids[0]) == "" and det.text == ""
    deltas = [det.add(t) for t in ids[1:]]
    assert "".join(deltas) == " 😀" and deltas[-1] == " 😀"


def test_flush_returns_an_unfinished_character_as_decode_does(tok):
    first = encode(tok, " 😀")[0]
    det = IncrementalDetokenizer(tok, [], SamplingParams())
    assert det.add(first) == ""
    assert det.flush() == tok.decode([first]) == " \ufffd"
    with pytest.raises(RuntimeError, match="already ended"):
        det.add(first)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_ids_equal_decode(tok, skip_special_tokens):
    """Arbitrary ids (invalid UTF-8, special tokens anywhere) still end up as decode() says."""
    rng = random.Random(0)
    params = SamplingParams(skip_special_tokens=skip_special_tokens, ignore_eos=True)
    for _ in range(20):
        ids = [rng.choice([0, 1, 2, rng.randrange(len(tok)), rng.randrange(256)]) for _ in range(40)]
        det, _, stop = stream(tok, ids, params, eos={tok.eos_token_id})
        assert stop is None
        assert det.text == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decodes_a_small_window_not_the_whole_output(tok):
    """O(new tokens) per step: two decodes per token, each of a few ids."""
    lengths = []

    class Spy:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = encode(tok, " ".join([MULTI_BYTE] * 8))
    assert len(ids) > 300
    det, _, _ = stream(Spy(), ids)
    assert det.text == tok.decode(ids)
    assert len(lengths) <= 2 * len(ids) + 2
    assert max(lengths) <= 8


def test_window_keeps_context_for_sentencepiece_style_decoders():
    """A decoder that drops the leading space of what it decodes (SentencePiece) keeps its spaces."""

    class SentencePieceLike:
        def decode(self, ids, skip_special_tokens=True):
            pieces = {0: "▁Hello", 1: "▁world", 2: ",", 3: "▁again"}
            return "".join(pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")

    ids = [0, 1, 2, 3]
    det, deltas, _ = stream(SentencePieceLike(), ids)
    assert deltas[:4] == ["Hello", " world", ",", " again"]
    assert det.text == SentencePieceLike().decode(ids) == "Hello world, again"


def test_eos_stops_and_is_not_in_the_text(tok):
    eos = tok.eos_token_id
    ids = encode(tok, "Hello world")
    det, _, stop = stream(tok, ids + [eos] + encode(tok, " more"), eos={eos})
    assert stop == ("stop", eos)
    assert det.text == "Hello world" and det.token_ids == ids + [eos]
    assert det.check_stop({eos}) == ("stop", eos)  # asking again gives the same answer


def test_eos_text_shows_only_without_skip_special_tokens(tok):
    eos = tok.eos_token_id
    ids = encode(tok, "Hi") + [eos]
    det, _, stop = stream(tok, ids, SamplingParams(skip_special_tokens=False), eos={eos})
    assert stop == ("stop", eos)
    assert det.text == tok.decode(ids, skip_special_tokens=False) == "Hi" + tok.eos_token


def test_ignore_eos_keeps_going(tok):
    eos = tok.eos_token_id
    ids = encode(tok, "Hello") + [eos] + encode(tok, " world") + [eos]
    det, _, stop = stream(tok, ids, SamplingParams(ignore_eos=True), eos={eos})
    assert stop is None
    assert det.text == tok.decode(ids, skip_special_tokens=True) == "Hello world"


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_ids(tok, include):
    ids = encode(tok, "Hello world, this is the END of it.")
    of = encode(tok, " of")[0]
    assert of in ids
    params = SamplingParams(stop_token_ids=[of], include_stop_str_in_output=include)
    det, _, stop = stream(tok, ids, params)
    assert stop == ("stop", of)
    assert det.text == "Hello world, this is the END" + (" of" if include else "")
    assert det.token_ids == ids[:ids.index(of) + 1]


def test_stop_token_that_is_not_special(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")  # decoded as text even with skip_special_tokens
    assert tok.decode([im_end]) == "<|im_end|>"
    det, _, stop = stream(tok, encode(tok, "Done.") + [im_end], SamplingParams(stop_token_ids=[im_end]))
    assert stop == ("stop", im_end) and det.text == "Done."


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok, include):
    ids = encode(tok, "Hello world, this is the END of it.")
    assert tok.decode(ids[:2]) == "Hello world"  # "lo wor" spans "Hello" and " world"
    det, deltas, stop = stream(tok, ids, SamplingParams(stop="lo wor", include_stop_str_in_output=include))
    assert stop == ("stop", "lo wor")
    assert det.token_ids == ids[:2]
    assert deltas[0] == "Hel"  # "lo" could start the stop string: held back
    assert det.text == ("Hello wor" if include else "Hel")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_at_the_very_beginning(tok, include):
    det, _, stop = stream(tok, encode(tok, "STOP here please"),
                               SamplingParams(stop=["STOP"], include_stop_str_in_output=include))
    assert stop == ("stop", "STOP") and det.token_ids == encode(tok, "STOP")
    assert det.text == ("STOP" if include else "")


def test_stop_string_inside_a_token(tok):
    det, deltas, stop = stream(tok, encode(tok, "Hello world, again"), SamplingParams(stop="orl"))
    assert stop == ("stop", "orl")
    assert deltas[:2] == ["Hell", "o w"]  # "o" could start "orl": held back
    assert det.text == "Hello w"


def test_possible_stop_start_is_held_then_released(tok):
    ids = encode(tok, "Hello world, this is the END of it")
    det = IncrementalDetokenizer(tok, [], SamplingParams(stop=["END!", "it!"]))
    for token in ids[:7]:  # up to " END": could be "END!"
        det.add(token)
        assert det.check_stop(()) is None
    assert det.text == "Hello world, this is the "
    assert det.add(ids[7]) == "END of"  # " of": it was not
    for token in ids[8:]:  # " it": could be "it!"
        det.add(token)
    assert det.text == "Hello world, this is the END of "
    assert det.flush() == "it"  # the request ended for another reason (length)
    assert det.text == tok.decode(ids)


@pytest.mark.parametrize("include", [False, True])
def test_multi_byte_stop_string(tok, include):
    det, _, stop = stream(tok, encode(tok, MULTI_BYTE),
                               SamplingParams(stop="本語", include_stop_str_in_output=include))
    assert stop == ("stop", "本語")
    assert det.text == "Naïve café: 日" + ("本語" if include else "")


def test_of_several_stop_strings_the_first_to_end_wins(tok):
    ids = encode(tok, "Hello world, this is the END of it.")
    det, _, stop = stream(tok, ids, SamplingParams(stop=["world, this", "lo w"]))
    assert stop == ("stop", "lo w") and det.text == "Hel"
    # Both complete in the same token (" world"): "orl" starts later but ends first.
    det, _, stop = stream(tok, ids, SamplingParams(stop=["world", "orl"]))
    assert stop == ("stop", "orl") and det.text == "Hello w"


def test_smollm2_goes_through_decode_stream(tok):
    """SmolLM2's tokenizer passes the probe, so the deltas above came from tokenizers' DecodeStream."""
    from llmopt.runtime.detokenizer import decode_stream_matches

    assert decode_stream_matches(tok, True) and decode_stream_matches(tok, False)
    assert IncrementalDetokenizer(tok, [], DEFAULT)._stream is not None


def test_a_tokenizer_without_a_backend_uses_the_window():
    class Bytes:  # a slow tokenizer: no backend_tokenizer
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode(errors="replace")

    det = IncrementalDetokenizer(Bytes(), [], DEFAULT)
    assert det._stream is None
    ids = list("café 🎉".encode())
    assert "".join(det.add(i) for i in ids) + det.flush() == "café 🎉"
