"""The OpenAI request checks and response shapes of ``llmopt serve``, without HTTP."""

import json

import pytest

from llmopt.runtime import openai_protocol as protocol
from llmopt.runtime.openai_protocol import RequestError
from llmopt.runtime.sampling_params import SamplingParams
from llmopt.runtime.server import _streamable_text

BOS, EOS, OFFSET = 1, 2, 3  # token ids: specials, then one id per byte


class FakeTokenizer:
    """Bytes as tokens (id = byte + 3), a BOS it adds by default, and a chat template."""

    chat_template = "fake"
    eos_token_id = EOS

    def __len__(self):
        return 256 + OFFSET

    def __call__(self, text, add_special_tokens=True):
        ids = [byte + OFFSET for byte in text.encode()]
        return {"input_ids": ([BOS] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - OFFSET for i in ids if i >= OFFSET).decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        if any(m["role"] == "assistant" for m in messages[:1]):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        # Like SmolLM2's template, the text starts with a special token of its own.
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def completion(**fields):
    fields.setdefault("prompt", "Hi")
    return protocol.parse_completion_request(body(**fields))


def chat(**fields):
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return protocol.parse_chat_request(body(**fields))


def test_completion_fields_are_read():
    request = completion(model="m", prompt="Hello", max_tokens=5, temperature=0, top_p=0.5, top_k=3, seed=7,
                         stop="x", n=1, stream=True, stream_options={"include_usage": True}, ignore_eos=True,
                         stop_token_ids=[4, 5], user="someone", frequency_penalty=0, logprobs=None)
    assert (request.kind, request.model, request.prompt, request.max_tokens) == ("completion", "m", "Hello", 5)
    assert (request.temperature, request.top_p, request.top_k, request.seed) == (0.0, 0.5, 3, 7)
    assert request.stop == ["x"] and request.stop_token_ids == [4, 5]
    assert request.stream and request.include_usage and request.ignore_eos


def test_prompt_forms():
    assert completion(prompt=[5, 6, 7]).prompt == [5, 6, 7]
    assert completion(prompt=["one prompt in a list"]).prompt == "one prompt in a list"
    assert completion(prompt=[[5, 6]]).prompt == [5, 6]


def test_chat_messages_and_max_completion_tokens():
    request = chat(messages=[{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": None}],
                   max_tokens=3, max_completion_tokens=9)
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
                                {"role": "assistant", "content": ""}]
    assert request.max_tokens == 9


@pytest.mark.parametrize("raw, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b'{"prompt": "a", "temperature": NaN}', None, "not valid JSON"),
    (body(prompt="a", max_tokens="5"), "max_tokens", "must be an integer"),
    (body(prompt="a", max_tokens=0), "max_tokens", "at least 1"),
    (body(prompt="a", max_tokens=True), "max_tokens", "must be an integer"),
    (body(prompt="a", temperature=-1), "temperature", "at least 0"),
    (body(prompt="a", temperature="hot"), "temperature", "must be a number"),
    (body(prompt="a", top_p=0), "top_p", "(0, 1]"),
    (body(prompt="a", top_k=-2), "top_k", "at least -1"),
    (body(prompt="a", seed=1.5), "seed", "must be an integer"),
    (body(prompt="a", stop=["x", 3]), "stop", "list of strings"),
    (body(prompt="a", stop=""), "stop", "must not be empty"),
    (body(prompt="a", n=2), "n", "n must be 1"),
    (body(prompt="a", stream="yes"), "stream", "boolean"),
    (body(prompt="a", stream_options={"include_usage": True}), "stream_options", "stream: true"),
    (body(prompt="a", stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "boolean"),
    (body(prompt="a", ignore_eos="no"), "ignore_eos", "boolean"),
    (body(prompt="a", stop_token_ids=[-1]), "stop_token_ids", "token ids"),
    (body(prompt="a", model=5), "model", "string"),
    (body(prompt="a", foo=1), "foo", "Unrecognized request argument supplied: foo"),
    (body(prompt="a", logprobs=5), "logprobs", "not supported"),
    (body(prompt="a", frequency_penalty=0.5), "frequency_penalty", "not supported"),
    (body(prompt="a", echo=True), "echo", "not supported"),
    (body(), "prompt", "required"),
    (body(prompt=""), "prompt", "empty"),
    (body(prompt=[]), "prompt", "empty"),
    (body(prompt=["a", "b"]), "prompt", "one prompt per request"),
    (body(prompt=[1, "a"]), "prompt", "string or a list of token ids"),
    (body(prompt={"text": "a"}), "prompt", "string or a list of token ids"),
    (body(prompt="a", messages=[]), "messages", "Unrecognized"),
])
def test_completion_request_errors(raw, param, words):
    with pytest.raises(RequestError) as caught:
        protocol.parse_completion_request(raw)
    assert caught.value.param == param and caught.value.status == 400
    assert words in caught.value.message
    error = caught.value.body()["error"]
    assert error == {"message": caught.value.message, "type": "invalid_request_error", "param": param, "code": None}


@pytest.mark.parametrize("fields, param, words", [
    ({"messages": None}, "messages", "required"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", "only text parts"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, "messages[0]", "tool calls"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "at least 1"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"prompt": "a"}, "prompt", "Unrecognized"),
])
def test_chat_request_errors(fields, param, words):
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    if fields["messages"] is None:
        del fields["messages"]
    with pytest.raises(RequestError) as caught:
        protocol.parse_chat_request(body(**fields))
    assert caught.value.param == param and words in caught.value.message


def test_off_values_of_unsupported_fields_are_accepted():
    chat(logprobs=False, tool_choice="none", tools=[], response_format={"type": "text"}, presence_penalty=0.0,
         parallel_tool_calls=True)
    with pytest.raises(RequestError, match="logprobs"):
        chat(logprobs=True)


def test_completion_prompt_tokens_get_the_tokenizer_specials():
    ids = protocol.prompt_token_ids(completion(prompt="ab"), FakeTokenizer(), 64)
    assert ids == [BOS, ord("a") + OFFSET, ord("b") + OFFSET]
    assert protocol.prompt_token_ids(completion(prompt=[7, 8]), FakeTokenizer(), 64) == [7, 8]


def test_chat_prompt_is_the_template_without_added_specials():
    tokenizer = FakeTokenizer()
    ids = protocol.prompt_token_ids(chat(), tokenizer, 64)
    assert ids == tokenizer("<user>Hi\n<assistant>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("request_, param, words", [
    (lambda: completion(prompt="x" * 63), "prompt", "maximum context length is 64"),
    (lambda: completion(prompt="x" * 40, max_tokens=30), "max_tokens", "you asked for 71"),
    (lambda: chat(max_completion_tokens=60), "max_completion_tokens", "maximum context length"),
    (lambda: completion(prompt=[5, 300]), "prompt", "outside the vocabulary"),
    (lambda: chat(messages=[{"role": "assistant", "content": "x"}]), "messages", "must alternate"),
])
def test_prompt_errors(request_, param, words):
    with pytest.raises(RequestError) as caught:
        protocol.prompt_token_ids(request_(), FakeTokenizer(), 64)
    assert caught.value.param == param and words in caught.value.message


def test_chat_needs_a_template():
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = None
    with pytest.raises(RequestError, match="no chat template"):
        protocol.prompt_token_ids(chat(), tokenizer, 64)


def test_sampling_params_defaults_follow_openai():
    assert protocol.sampling_params(completion(), 10, 64) == SamplingParams(max_tokens=16)
    assert protocol.sampling_params(completion(), 60, 64).max_tokens == 4  # what the context has room for
    assert protocol.sampling_params(chat(), 10, 64).max_tokens == 54
    params = protocol.sampling_params(completion(temperature=0, top_k=5, top_p=0.9, seed=3, stop=["a", "b"],
                                                 stop_token_ids=[9], ignore_eos=True, max_tokens=4), 10, 64)
    assert params == SamplingParams(max_tokens=4, temperature=0.0, top_k=5, top_p=0.9, seed=3, stop=("a", "b"),
                                    stop_token_ids=(9,), ignore_eos=True)


def test_response_shapes():
    usage = protocol.usage(3, 4)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    answer = protocol.chat_response("id", "m", 1, "hi", "stop", usage)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert protocol.completion_response("id", "m", 1, "hi", "length", usage)["choices"][0]["text"] == "hi"
    first = protocol.stream_chunk("chat", "id", "m", 1, role="assistant", text="")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""} and "usage" not in first
    last = protocol.stream_chunk("chat", "id", "m", 1, finish_reason="stop", include_usage=True)
    assert last["choices"][0]["delta"] == {} and last["usage"] is None
    totals = protocol.stream_chunk("completion", "id", "m", 1, final_usage=True, usage_=usage)
    assert totals["choices"] == [] and totals["usage"] == usage and totals["object"] == "text_completion"


def test_streamed_text_holds_back_possible_stop_strings_and_half_characters():
    assert _streamable_text("hello wor", finished=False, holdback=2) == "hello w"
    assert _streamable_text("hello wor", finished=True, holdback=2) == "hello wor"
    assert _streamable_text("caf\ufffd", finished=False, holdback=0) == "caf"
    assert _streamable_text("ab", finished=False, holdback=5) == ""
