"""Turn one request's output tokens into text as they arrive, and spot stops.

Decoding the whole output at every step costs O(length) per token. Instead
:class:`IncrementalDetokenizer` decodes a small window: ``tokens[prefix:read]``
is text already shown, ``tokens[read:]`` the new tokens. The new text is
``decode(tokens[prefix:])`` minus ``decode(tokens[prefix:read])``. The
already-shown tokens stay in the window as context because decoding is not
concatenative at the edges: a SentencePiece tokenizer drops the leading space
of the first token it decodes, and byte-level BPE splits one character's
UTF-8 bytes across tokens. When the new text ends in U+FFFD (a character whose
bytes are not all there yet) it is held back and the window grows until the
character is whole; otherwise the window slides forward.

Where the tokenizer is a Hugging Face fast tokenizer and ``tokenizers``'
``DecodeStream`` gives it the same text (checked once per tokenizer on a
probe of spaces, newlines, accents, CJK and emoji, with and without special
tokens: ``decode_stream_matches``), each new token goes through
``DecodeStream.step`` instead: one small decode a token in Rust, which also
holds back an unfinished character. The window above is kept in step (it
slides whenever the stream hands out text) and finishes the text when the
request ends with bytes still held.

Stop strings hold back text too: the end of the text that could be the start
of a stop string is not handed out until the next tokens show it is not one,
so a streaming client never sees part of a stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable
from typing import Any

from llmopt.runtime.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
_PROBE = "Hello, world!  Two  spaces,\ttab\nnew line; caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e \U0001F389\U0001F680 x\u0301 end."
_stream_ok: dict[tuple[int, bool], bool] = {}  # (id(backend tokenizer), skip_special_tokens) -> DecodeStream fits
logger = logging.getLogger("llmopt.detokenizer")


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a Hugging Face fast tokenizer, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and hasattr(backend, "decode") else None


def decode_stream_matches(tokenizer: Any, skip_special_tokens: bool) -> bool:
    """True if ``DecodeStream`` gives this tokenizer's ``decode`` text on a probe (cached per tokenizer)."""
    backend = _backend(tokenizer)
    if backend is None:
        return False
    key = (id(backend), skip_special_tokens)
    if key not in _stream_ok:
        try:
            from tokenizers.decoders import DecodeStream

            ids = list(tokenizer.encode(_PROBE, add_special_tokens=False))
            specials = [i for i in getattr(tokenizer, "all_special_ids", [])[:2]]
            ids = ids[:5] + specials + ids[5:] + specials
            stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            text = "".join(stream.step(backend, i) or "" for i in ids)
            _stream_ok[key] = text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        except Exception:  # an older tokenizers, or a tokenizer DecodeStream cannot drive
            _stream_ok[key] = False
        if not _stream_ok[key]:
            logger.info("detokenizer: DecodeStream differs from decode for %s; using windowed decode",
                        type(tokenizer).__name__)
    return _stream_ok[key]

StopResult = tuple[str, str | int]


class IncrementalDetokenizer:
    """Incremental text and stop handling of one request.

    Call :meth:`add` with each sampled token (it returns the text that token
    makes visible), then :meth:`check_stop`; when the request ends, :meth:`flush`
    returns what is still held back. The deltas of ``add`` and ``flush``
    concatenate to ``.text``, which in the end is
    ``tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)``
    cut at the stop string (kept with ``include_stop_str_in_output``), and
    without the text of a token in ``params.stop_token_ids`` (unless
    ``include_stop_str_in_output``). EOS tokens are usually special tokens,
    which ``skip_special_tokens`` leaves out.

    Decoding starts at the first output token, with no prompt tokens as
    context, so that the text equals ``decode(output token ids)``;
    ``prompt_token_ids`` is kept for the caller.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Iterable[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.token_ids: list[int] = []  # every output token
        self._text_ids: list[int] = []  # the tokens whose text counts (not a hidden stop token)
        self._prefix_offset = 0  # window start in _text_ids: context, already decoded
        self._read_offset = 0  # _text_ids[:read_offset] are in _decoded
        self._decoded = ""  # text of the decoded tokens, held-back text included
        self._num_returned = 0  # characters handed out by add and flush
        self._final: str | None = None  # the whole text once the request ended
        self._stop: StopResult | None = None
        self._stop_token_ids = frozenset(params.stop_token_ids)
        self._max_stop_len = max(map(len, params.stop), default=0)
        self._stream = None  # tokenizers' DecodeStream, where it gives decode's text
        if decode_stream_matches(tokenizer, params.skip_special_tokens):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
            self._backend = _backend(tokenizer)

    @property
    def text(self) -> str:
        """The text handed out so far; the whole output once it has ended."""
        return self._final if self._final is not None else self._decoded[:self._num_returned]

    @property
    def finished(self) -> bool:
        return self._final is not None

    def add(self, token_id: int) -> str:
        """Append one output token; return the text it makes visible (often "")."""
        if self._final is not None:
            raise RuntimeError("IncrementalDetokenizer.add: the request has already ended")
        self.token_ids.append(token_id)
        if token_id in self._stop_token_ids and not self.params.include_stop_str_in_output:
            return ""  # its text never shows; check_stop ends the request
        self._text_ids.append(token_id)
        new_text = self._step(token_id)
        if not new_text:
            return ""
        old_len = len(self._decoded)
        self._decoded += new_text
        stop = self._find_stop_string(old_len)
        if stop is not None:
            stop_string, end = stop
            self._stop = ("stop", stop_string)
            return self._finish(self._decoded[:end])
        visible = max(self._num_returned, len(self._decoded) - self._stop_prefix_len())
        delta = self._decoded[self._num_returned:visible]
        self._num_returned = visible
        return delta

    def check_stop(self, eos_token_ids: Container[int]) -> StopResult | None:
        """("stop", reason) when the request must end, else None; call after each add.

        The reason is the stop string the text now holds, or the last token
        when it is in ``params.stop_token_ids``, or is an EOS token and
        ``params.ignore_eos`` is off. The request then has ended: ``.text`` is
        final and :meth:`flush` returns its text not handed out yet.
        """
        if self._stop is None and self.token_ids:
            last = self.token_ids[-1]
            is_eos = last in eos_token_ids and not self.params.ignore_eos
            if last in self._stop_token_ids or is_eos:
                self._stop = ("stop", last)
                self._finish(self._decoded + self._decode_window(complete_only=False))
        return self._stop

    def flush(self) -> str:
        """End the request (if not yet ended) and return the text still held back.

        Held back are a possible start of a stop string and the bytes of an
        unfinished character (decoded as U+FFFD, as ``tokenizer.decode`` does).
        """
        if self._final is None:
            return self._finish(self._decoded + self._decode_window(complete_only=False))
        delta = self._final[self._num_returned:]
        self._num_returned = len(self._final)
        return delta

    def _finish(self, final_text: str) -> str:
        self._final = final_text
        delta = final_text[self._num_returned:]
        self._num_returned = len(final_text)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def _step(self, token_id: int) -> str:
        """The text the new token completes ("" while a character is unfinished)."""
        if self._stream is None:
            return self._decode_window(complete_only=True)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception:  # e.g. an id the backend does not know: back to the window for good
            self._stream = None
            return self._decode_window(complete_only=True)
        if not text:
            return ""
        # The window follows the stream, so flush can finish held bytes the usual way.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._text_ids)
        return text

    def _decode_window(self, complete_only: bool) -> str:
        """Text of ``_text_ids[read_offset:]``, sliding the window when it is whole.

        With ``complete_only``, "" while the text is unfinished (ends in U+FFFD).
        """
        ids = self._text_ids
        known = self._decode(ids[self._prefix_offset:self._read_offset])
        text = self._decode(ids[self._prefix_offset:])
        # Nothing new (a skipped special token): keep the context where it is.
        if len(text) <= len(known) or (complete_only and text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return text[len(known):]

    def _find_stop_string(self, old_len: int) -> tuple[str, int] | None:
        """The stop string the new text completed and where the text ends, or None.

        Only a string ending after ``old_len`` can be new, so the search starts
        at most ``len(longest stop) - 1`` characters back. Of several, the one
        ending first wins (a character-by-character stream would meet it first).
        """
        if not self.params.stop:
            return None
        start = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (end, start, string)
        for stop_string in self.params.stop:
            i = self._decoded.find(stop_string, start)
            if i >= 0 and (best is None or (i + len(stop_string), i) < best[:2]):
                best = (i + len(stop_string), i, stop_string)
        if best is None:
            return None
        end, i, stop_string = best
        return stop_string, end if self.params.include_stop_str_in_output else i

    def _stop_prefix_len(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        longest = min(self._max_stop_len - 1, len(self._decoded) - self._num_returned)
        for k in range(longest, 0, -1):
            tail = self._decoded[-k:]
            if any(s.startswith(tail) for s in self.params.stop):
                return k
        return 0
