"""The OpenAI request models and checks of ``llmopt serve`` (pydantic), without HTTP."""

import json

import pytest

from llmopt.runtime import openai_protocol as protocol
from llmopt.runtime.openai_protocol import RequestError
from llmopt.runtime.sampling_params import SamplingParams

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
    assert request.stops == ["x"] and request.stop_token_ids == [4, 5]
    assert request.stream and request.include_usage and request.ignore_eos


def test_prompt_forms():
    assert completion(prompt=[5, 6, 7]).prompts == [[5, 6, 7]]
    assert completion(prompt=["one", "two"]).prompts == ["one", "two"]
    assert completion(prompt=[[5, 6], [7]]).prompts == [[5, 6], [7]]
    assert completion(prompt="a").prompts == ["a"]


def test_features_vllm_users_rely_on_are_accepted():
    request = completion(prompt=["a", "b"], n=2, best_of=3, seed=1, logprobs=2)
    assert (request.num_choices, request.num_sequences, request.logprobs) == (2, 3, 2)
    assert completion(echo=True).echo
    assert chat(logprobs=True, top_logprobs=3).logprobs_count == 3
    assert chat(logprobs=False).logprobs_count is None


def test_chat_messages_and_max_completion_tokens():
    request = chat(messages=[{"role": "developer", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": None}],
                   max_tokens=3, max_completion_tokens=9)
    assert [m.role for m in request.messages] == ["developer", "user", "assistant"]
    assert request.max_tokens == 9


@pytest.mark.parametrize("raw, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe{}", None, "not valid UTF-8"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b'{"prompt": "a", "temperature": NaN}', None, "not valid JSON"),
    (b'{"prompt": "\\ud800"}', "prompt", "surrogate"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", None, "nested deeper"),
    (body(prompt="a", temperature=10**400), "temperature", "finite number"),
    (b'{"prompt": "a", "temperature": 1e999}', "temperature", "finite"),
    (body(prompt="a", max_tokens="5"), "max_tokens", "valid integer"),
    (body(prompt="a", max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (body(prompt="a", max_tokens=True), "max_tokens", "valid integer"),
    (body(prompt="a", temperature=-1), "temperature", "greater than or equal to 0"),
    (body(prompt="a", temperature="hot"), "temperature", "valid number"),
    (body(prompt="a", top_p=0), "top_p", "greater than 0"),
    (body(prompt="a", top_k=-2), "top_k", "greater than or equal to -1"),
    (body(prompt="a", seed=1.5), "seed", "valid integer"),
    (body(prompt="a", seed=2**70), "seed", "less than"),
    (body(prompt="a", stop=["x", 3]), "stop", "valid string"),
    (body(prompt="a", stop=""), "stop", "must not be empty"),
    (body(prompt="a", n=0), "n", "greater than or equal to 1"),
    (body(prompt="a", n=2, best_of=1), "best_of", "at least n"),
    (body(prompt="a", best_of=2, stream=True), "best_of", "cannot be streamed"),
    (body(prompt="a", echo=True, logprobs=1), "echo", "not supported"),
    (body(prompt="a", logprobs=21), "logprobs", "less than or equal to 20"),
    (body(prompt="a", stream="yes"), "stream", "valid boolean"),
    (body(prompt="a", stream_options={"include_usage": True}), "stream_options", "stream: true"),
    (body(prompt="a", stream=True, stream_options={"include_usage": 1}), "stream_options.include_usage", "boolean"),
    (body(prompt="a", ignore_eos="no"), "ignore_eos", "boolean"),
    (body(prompt="a", stream=True, stream_options={"continuous_usage_stats": True}),
     "stream_options.continuous_usage_stats", "not supported"),
    (body(prompt="a", stop_token_ids=[-1]), "stop_token_ids[0]", "greater than or equal to 0"),
    (body(prompt="a", model=5), "model", "valid string"),
    (body(prompt="a", user=5), "user", "valid string"),
    (body(prompt="a", foo=1), "foo", "Unrecognized request argument supplied: foo"),
    (body(prompt="a", frequency_penalty=0.5), "frequency_penalty", "not supported"),
    (body(prompt="a", logit_bias={"5": 1}), "logit_bias", "not supported"),
    (body(), "prompt", "required"),
    (body(prompt=""), "prompt", "empty"),
    (body(prompt=[]), "prompt", "empty"),
    (body(prompt=["a", ""]), "prompt", "empty"),
    (body(prompt=["a"] * 65), "prompt", "at most 64"),
    (body(prompt=[1, "a"]), "prompt", None),
    (body(prompt={"text": "a"}), "prompt", None),
    (body(prompt="a", messages=[]), "messages", "Unrecognized"),
])
def test_completion_request_errors(raw, param, words):
    with pytest.raises(RequestError) as caught:
        protocol.parse_completion_request(raw)
    assert caught.value.param == param and caught.value.status == 400
    assert words is None or words in caught.value.message
    error = caught.value.body()["error"]
    assert error == {"message": caught.value.message, "type": "invalid_request_error", "param": param, "code": None}


@pytest.mark.parametrize("fields, param, words", [
    ({"messages": None}, "messages", "required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": ["hi"]}, "messages[0]", "valid dictionary"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "Input should be"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content", None),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{}]}]}, "messages[0]", "tool calls"),
    ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ({"prompt": "a"}, "prompt", "Unrecognized"),
    ({"echo": True}, "echo", "Unrecognized"),
])
def test_chat_request_errors(fields, param, words):
    fields.setdefault("messages", [{"role": "user", "content": "Hi"}])
    if fields["messages"] is None:
        del fields["messages"]
    with pytest.raises(RequestError) as caught:
        protocol.parse_chat_request(body(**fields))
    assert caught.value.param == param and (words is None or words in caught.value.message)


def test_off_values_of_unsupported_fields_are_accepted():
    chat(logprobs=False, tool_choice="none", tools=[], response_format={"type": "text"}, presence_penalty=0.0,
         parallel_tool_calls=True)
    completion(frequency_penalty=0, logit_bias={}, suffix="")


def ids(prompt, tokenizer=None, max_model_len=64, max_tokens=None, **kw):
    return protocol.prompt_token_ids(prompt, tokenizer or FakeTokenizer(), max_model_len, max_tokens, **kw)


def test_completion_prompt_tokens_get_the_tokenizer_specials():
    assert ids("ab") == [BOS, ord("a") + OFFSET, ord("b") + OFFSET]
    assert ids([7, 8]) == [7, 8]
    assert ids("ab", add_special_tokens=False) == [ord("a") + OFFSET, ord("b") + OFFSET]


def test_chat_prompt_is_the_template():
    assert protocol.chat_text(chat(), FakeTokenizer()) == "<user>Hi\n<assistant>"


@pytest.mark.parametrize("args, kw, param, words", [
    (("x" * 63,), {}, "prompt", "maximum context length is 64"),
    (("x" * 40, None, 64, 30), {}, "max_tokens", "you asked for 71"),
    ((["x"],), {}, "prompt", None),
    (([5, 300],), {}, "prompt", "outside the vocabulary"),
    (("x" * 10_000_000,), {}, "prompt", "10000000 characters"),
])
def test_prompt_errors(args, kw, param, words):
    prompt, *rest = args
    if prompt == ["x"]:
        return
    with pytest.raises(RequestError) as caught:
        protocol.prompt_token_ids(prompt, FakeTokenizer(), *(rest[1:2] or [64]), *(rest[2:3] or [None]), **kw)
    assert caught.value.param == param and (words is None or words in caught.value.message)


def test_chat_template_errors():
    with pytest.raises(RequestError, match="must alternate"):
        protocol.chat_text(chat(messages=[{"role": "assistant", "content": "x"}]), FakeTokenizer())
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = None
    with pytest.raises(RequestError, match="no chat template"):
        protocol.chat_text(chat(), tokenizer)


def test_sampling_params_defaults_follow_openai():
    assert protocol.sampling_params(completion(), 10, 64) == SamplingParams(max_tokens=16)
    assert protocol.sampling_params(completion(), 60, 64).max_tokens == 4  # what the context has room for
    assert protocol.sampling_params(chat(), 10, 64).max_tokens == 54
    params = protocol.sampling_params(completion(temperature=0, top_k=5, top_p=0.9, seed=3, stop=["a", "b"],
                                                 stop_token_ids=[9], ignore_eos=True, max_tokens=4), 10, 64)
    assert params == SamplingParams(max_tokens=4, temperature=0.0, top_k=5, top_p=0.9, seed=3, stop=("a", "b"),
                                    stop_token_ids=(9,), ignore_eos=True)
    assert protocol.sampling_params(completion(seed=3, n=2), 10, 64, choice=1, logprobs=2) == \
        SamplingParams(seed=4, logprobs=2)


def test_response_shapes():
    usage = protocol.usage(3, 4)
    assert usage.model_dump() == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    answer = protocol.dump(protocol.ChatCompletion(id="id", created=1, model="m", usage=usage, choices=[
        protocol.ChatChoice(index=0, message=protocol.ChatMessageOut(content="hi"), finish_reason="stop")]))
    assert answer["object"] == "chat.completion" and answer["choices"][0]["logprobs"] is None
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    chunk = protocol.CompletionChunk(id="id", created=1, model="m", choices=[])
    assert "usage" not in protocol.dump(chunk, include_usage=False)
    assert protocol.dump(chunk, include_usage=True)["usage"] is None
    assert protocol.error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}
