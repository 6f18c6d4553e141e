"""``llmopt serve``: the HTTP server, against a fake engine and (slow) the real one.

The fake engine implements the engine interface with deterministic tokens
(the alphabet, from where the prompt length points) and records which
thread calls it and which requests share each step.
"""

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from llmopt.runtime.detokenizer import IncrementalDetokenizer
from llmopt.runtime.outputs import CompletionOutput, RequestOutput
from llmopt.runtime.server import build_server

from .test_openai_protocol import OFFSET, FakeTokenizer

MODEL = "fake-model"
REJECTED_TOKEN = 4  # the fake engine refuses prompts holding it, as the real one refuses bad prompts


class FakeEngine:
    """The engine interface: add_request / step / abort / has_unfinished, one KV block per request."""

    def __init__(self, max_model_len=64, num_blocks=8, step_s=0.0):
        self.tokenizer = FakeTokenizer()
        self.model_name = MODEL
        self.max_model_len = max_model_len
        self.num_total_blocks = self.num_free_blocks = num_blocks
        self.step_s = step_s
        self.requests = {}  # id -> [prompt ids, params, output ids]
        self.added, self.aborted, self.batches = [], [], []
        self.threads = set()
        self.fail_next_step = False
        self.min_batch = 0  # steps make no progress until this many requests are in

    def add_request(self, request_id, prompt, params):
        self.threads.add(threading.get_ident())
        if not prompt or REJECTED_TOKEN in prompt:
            raise ValueError("the fake engine refuses this prompt")
        self.num_free_blocks -= 1
        self.requests[request_id] = [list(prompt), params, [], IncrementalDetokenizer(self.tokenizer, prompt, params)]
        self.added.append((request_id, list(prompt), params))

    def abort(self, request_id):
        self.threads.add(threading.get_ident())
        if self.requests.pop(request_id, None) is not None:
            self.num_free_blocks += 1
            self.aborted.append(request_id)

    def has_unfinished(self):
        self.threads.add(threading.get_ident())
        return bool(self.requests)

    def step(self):
        self.threads.add(threading.get_ident())
        time.sleep(self.step_s)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("out of fake memory")
        if len(self.requests) < self.min_batch:
            return []
        self.min_batch = 0
        self.batches.append(sorted(self.requests))
        outputs = []
        for request_id, (prompt, params, tokens, detokenizer) in list(self.requests.items()):
            token = OFFSET + ord("a") + (len(prompt) + len(tokens)) % 26
            if params.seed is not None and params.seed >= 100:  # "sampling": seeds from 100 shift the letters
                token = OFFSET + ord("a") + (len(prompt) + len(tokens) + params.seed - 100) % 26
            tokens.append(token)
            detokenizer.add(token)
            finish = "stop" if detokenizer.check_stop(()) is not None else None
            if finish is None and len(tokens) >= params.max_tokens:
                finish = "length"
                detokenizer.flush()
            logprobs = None
            if params.logprobs is not None:
                top = [(token + k, -0.5 - k) for k in range(params.logprobs)]
                logprobs = [(t, -0.5 - (t - OFFSET) % 3, top) for t in tokens]
            completion = CompletionOutput(0, detokenizer.text, list(tokens), finish, None, logprobs)
            outputs.append(RequestOutput(request_id, None, prompt, [completion], finished=finish is not None))
            if finish is not None:
                del self.requests[request_id]
                self.num_free_blocks += 1
        return outputs


def expected_text(num_prompt_tokens, num_tokens):
    return "".join(chr(ord("a") + (num_prompt_tokens + i) % 26) for i in range(num_tokens))


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def server(engine):
    server = build_server(engine, "127.0.0.1", 0)
    server.start()
    yield server
    server.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=20)


def request(server, method, path, payload=None, raw=None):
    """(status, decoded JSON body) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    data = raw if raw is not None else None if payload is None else json.dumps(payload).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, text = response.status, response.read()
    connection.close()
    return status, json.loads(text)


# --- plain endpoints -----------------------------------------------------------


def test_health_and_models(server):
    assert request(server, "GET", "/health") == (200, {"status": "ok"})
    status, models = request(server, "GET", "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in models["data"]] == [(MODEL, "model", 64)]
    assert request(server, "GET", f"/v1/models/{MODEL}")[1]["id"] == MODEL
    status, error = request(server, "GET", "/v1/models/other")
    assert status == 404 and error["error"]["code"] == "model_not_found"
    assert request(server, "GET", "/nowhere")[0] == 404
    assert request(server, "POST", "/v1/embeddings", {"input": "a"})[0] == 404


def test_models_through_the_openai_client(client):
    assert [model.id for model in client.models.list()] == [MODEL]


def test_served_model_name(engine):
    server = build_server(engine, "127.0.0.1", 0, served_model_name="alias")
    server.start()
    try:
        assert request(server, "GET", "/v1/models")[1]["data"][0]["id"] == "alias"
        assert request(server, "POST", "/v1/completions", {"model": "alias", "prompt": "a", "max_tokens": 1})[0] == 200
    finally:
        server.close()


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("path, payload, param", [
    ("/v1/completions", b"{oops", None),
    ("/v1/completions", b"", None),
    ("/v1/completions", {"prompt": "a", "max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "a", "wat": 1}, "wat"),
    ("/v1/completions", {"prompt": "a", "n": 30}, "n"),
    ("/v1/completions", {"prompt": "a", "user": 3}, "user"),
    ("/v1/completions", {"prompt": "x" * 80}, "prompt"),
    ("/v1/completions", {"prompt": "x" * 40, "max_tokens": 40}, "max_tokens"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream_options": {}},
     "stream_options"),
])
def test_bad_requests_get_400_in_openai_shape(server, engine, path, payload, param):
    raw = payload if isinstance(payload, bytes) else None
    status, body = request(server, "POST", path, None if raw is not None else payload, raw=raw)
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert engine.added == []


def test_unknown_model_is_404(server):
    status, body = request(server, "POST", "/v1/completions", {"model": "gpt-9", "prompt": "a"})
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and "gpt-9" in body["error"]["message"]


def test_openai_client_raises_on_400(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="a", top_p=2.0)


def test_prompt_refused_by_the_engine_is_400(client, engine):
    with pytest.raises(openai.BadRequestError, match="refuses"):
        client.completions.create(model=MODEL, prompt=[5, REJECTED_TOKEN])
    assert engine.num_free_blocks == engine.num_total_blocks


def test_engine_failure_is_500_and_the_loop_carries_on(client, engine):
    engine.fail_next_step = True
    with pytest.raises(openai.InternalServerError, match="out of fake memory"):
        client.completions.create(model=MODEL, prompt="ab", max_tokens=3)
    assert engine.num_free_blocks == engine.num_total_blocks  # the failed request was aborted
    again = client.completions.create(model=MODEL, prompt="ab", max_tokens=3)
    assert again.choices[0].text == expected_text(3, 3)


def test_engine_failure_mid_stream_ends_the_stream_with_an_error(client, engine):
    engine.step_s = 0.02
    stream = client.completions.create(model=MODEL, prompt="ab", max_tokens=30, stream=True)
    with pytest.raises(openai.APIError, match="out of fake memory"):
        for i, _ in enumerate(stream):
            if i == 2:
                engine.fail_next_step = True
    assert engine.num_free_blocks == engine.num_total_blocks


# --- generation ---------------------------------------------------------------------


def test_completion(client, engine):
    answer = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, seed=1)
    prompt_ids, params = engine.added[0][1:]
    assert prompt_ids == FakeTokenizer()("Hello")["input_ids"]  # BOS added for completion prompts
    assert (params.max_tokens, params.temperature, params.seed) == (5, 0.0, 1)
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    assert answer.choices[0].text == expected_text(6, 5) and answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (6, 5, 11)


def test_completion_defaults_and_extensions(client, engine):
    answer = client.completions.create(model=MODEL, prompt=[10, 11, 12],
                                       extra_body={"top_k": 3, "ignore_eos": True, "stop_token_ids": [99]})
    params = engine.added[0][2]
    assert (params.max_tokens, params.top_k, params.ignore_eos, params.stop_token_ids) == (16, 3, True, (99,))
    assert answer.usage.completion_tokens == 16


def test_completion_stop_string_and_model_omitted(server):
    status, answer = request(server, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 20, "stop": ["gh"]})
    assert status == 200 and answer["model"] == MODEL
    assert answer["choices"][0]["text"] == "def" and answer["choices"][0]["finish_reason"] == "stop"


def test_chat_completion(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=4)
    prompt_ids = engine.added[0][1]
    template = "<system>Be brief.\n<user>Hi\n<assistant>"
    assert prompt_ids == FakeTokenizer()(template, add_special_tokens=False)["input_ids"]  # no second BOS
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected_text(len(prompt_ids), 4)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(prompt_ids) and answer.usage.completion_tokens == 4


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=8).choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(chunk.object == "text_completion" for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_streamed_chat(client, engine):
    engine.step_s = 0.05
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None
    assert len(chunks) > 3  # token by token, not all at the end


def test_streaming_never_sends_the_start_of_a_stop_string(client, engine):
    engine.step_s = 0.005
    chunks = list(client.completions.create(model=MODEL, prompt="ab", max_tokens=20, stop=["ghi"], stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == "def"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_client_that_leaves_mid_stream_has_its_request_aborted(server, engine):
    engine.step_s = 0.01
    sock = socket.create_connection(("127.0.0.1", server.port))
    payload = json.dumps({"prompt": "ab", "max_tokens": 60, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    received = b""
    while received.count(b"data:") < 3:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    deadline = time.monotonic() + 10
    while engine.aborted == [] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.aborted) == 1
    assert engine.num_free_blocks == engine.num_total_blocks


def test_a_client_that_leaves_while_waiting_has_its_request_aborted(server, engine):
    engine.step_s = 0.05
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.3)
    connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "ab", "max_tokens": 60}))
    with pytest.raises(TimeoutError):
        connection.getresponse()
    connection.close()
    deadline = time.monotonic() + 10
    while engine.aborted == [] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(engine.aborted) == 1 and engine.num_free_blocks == engine.num_total_blocks


def test_concurrent_clients_share_engine_steps(client, engine):
    engine.step_s = 0.01
    engine.min_batch = 4  # however late a thread starts, the first step waits for it
    start = threading.Barrier(4)
    answers = {}

    def ask(i):
        start.wait()
        stream = i % 2 == 1
        reply = client.completions.create(model=MODEL, prompt="x" * (i + 1), max_tokens=10, stream=stream)
        answers[i] = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == {i: expected_text(i + 2, 10) for i in range(4)}
    assert len(engine.batches[0]) == 4 and len(engine.batches) == 10  # all four in every step
    assert len(engine.threads) == 1  # only the engine loop ever touched the engine
    assert engine.num_free_blocks == engine.num_total_blocks


def test_keep_alive_connection_serves_several_requests(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    for stream in (True, False, True):
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 2,
                                                                       "stream": stream}))
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200
        assert text.endswith("data: [DONE]\n\n") if stream else json.loads(text)["usage"]["completion_tokens"] == 2
    connection.close()


# --- the real server (slow) ------------------------------------------------------------


REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"llmopt serve: ready on http://127\.0\.0\.1:(\d+), model (\S+)")


@pytest.fixture(scope="module")
def server_process():
    """`llmopt serve --lower eager --port 0` on SmolLM2, as a separate process (not waited for)."""
    if not (REPO / "llmopt" / "runtime" / "llm.py").exists():
        pytest.skip("engine not built yet (llmopt/runtime/llm.py)")
    command = [sys.executable, "-m", "llmopt.cli", "serve", "--lower", "eager", "--port", "0", "--kv-cache-gib", "0.25"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def real_server(server_process):
    """(port, model name) from the server's ready line, once it is ready."""
    lines = []
    for line in server_process.stdout:
        lines.append(line)
        match = READY.search(line)
        if match:
            break
    else:
        pytest.fail("llmopt serve exited before it was ready:\n" + "".join(lines[-30:]))
    threading.Thread(target=lambda: [None for _ in server_process.stdout], daemon=True).start()  # keep it drained
    return int(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def real_client(real_server):
    port, _ = real_server
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def engine_greedy(server_process, smollm2):
    """The engine's own greedy reply to ``CHAT``, computed while the server loads."""
    from llmopt.runtime.llm import LLM
    from llmopt.runtime.sampling_params import SamplingParams

    llm = LLM(model=smollm2.model, tokenizer=smollm2.tokenizer, lower="eager", kv_cache_memory_gib=0.25)
    prompt = llm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    [output] = llm.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))
    return output.text


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_real_server_chat_is_the_engines_greedy_output(engine_greedy, real_server, real_client):
    _, model = real_server
    assert model == "smollm2"
    answer = real_client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == engine_greedy
    streamed = real_client.chat.completions.create(model=model, messages=CHAT, max_tokens=12, temperature=0,
                                                   stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == engine_greedy


@pytest.mark.slow
def test_real_server_refuses_a_malformed_request(real_server):
    port, _ = real_server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/chat/completions", body=b'{"messages": [}')
    response = connection.getresponse()
    assert response.status == 400 and json.loads(response.read())["error"]["type"] == "invalid_request_error"
    connection.close()


@pytest.mark.slow
def test_real_server_concurrent_clients(real_client):
    prompts = ["Count to five.", "Name a colour.", "Say hello."]
    alone = [real_client.completions.create(model="smollm2", prompt=p, max_tokens=8, temperature=0).choices[0].text for p in prompts]
    together = {}
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, real_client.completions.create(model="smollm2", prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text))
        for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert [together[i] for i in range(len(prompts))] == alone


# --- the server's contract beyond generation ---------------------------------------------


def raw_request(server, method, path, payload=None, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    data = None if payload is None else json.dumps(payload).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def test_api_key(engine):
    server = build_server(engine, "127.0.0.1", 0, api_key="sekrit")
    server.start()
    try:
        status, headers, body = raw_request(server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
        assert raw_request(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert raw_request(server, "GET", "/health")[0] == 200  # health and metrics stay open
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekrit", max_retries=0, timeout=20)
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=2).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        server.close()


def test_a_full_queue_is_503_with_retry_after(engine):
    engine.step_s = 0.02
    server = build_server(engine, "127.0.0.1", 0, max_waiting=1)  # the fake engine has no config: 128 + 1
    server.start()
    try:
        status, headers, body = raw_request(server, "POST", "/v1/completions",
                                            {"prompt": [[5]] * 2, "n": 16, "max_tokens": 1})
        assert status == 200  # 32 sequences fit
        serving = server.app.state.serving
        serving.max_pending = 3
        status, headers, body = raw_request(server, "POST", "/v1/completions", {"prompt": "a", "n": 4})
        assert status == 503 and headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "queue_full"
    finally:
        server.close()


def test_shutting_down_is_503_with_retry_after(engine):
    """Once SIGTERM stopped accepting (serving.accepting, set by the handler), a new request
    and /health are 503s in OpenAI's shape, the request's with Retry-After."""
    server = build_server(engine, "127.0.0.1", 0)
    server.start()
    try:
        assert raw_request(server, "GET", "/health")[0] == 200
        server.app.state.serving.accepting = False
        status, headers, body = raw_request(server, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})
        assert status == 503 and headers["retry-after"] == "5"
        assert json.loads(body)["error"]["type"] == "server_error"
        status, headers, body = raw_request(server, "GET", "/health")
        assert status == 503
    finally:
        server.close()


def test_body_limit_content_type_and_methods(engine):
    server = build_server(engine, "127.0.0.1", 0, max_body_bytes=1000)
    server.start()
    try:
        status, _, body = raw_request(server, "POST", "/v1/completions", {"prompt": "a" * 2000})
        assert status == 413 and json.loads(body)["error"]["type"] == "invalid_request_error"
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        connection.request("POST", "/v1/completions", body=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"})
        response = connection.getresponse()
        assert response.status == 415 and "error" in json.loads(response.read())
        for method in ("PUT", "DELETE", "PATCH"):
            status, headers, body = raw_request(server, method, "/v1/completions", {"prompt": "a"})
            assert status == 405 and json.loads(body)["error"]["message"]
    finally:
        server.close()


def test_n_prompt_lists_echo_and_logprobs(client, engine):
    answer = client.completions.create(model=MODEL, prompt=["ab", "abc"], max_tokens=3, n=2, seed=100)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [c.text for c in answer.choices] == [expected_text(3, 3), expected_text(4, 3), expected_text(4, 3),
                                                expected_text(5, 3)]  # seed + i per choice
    assert answer.usage.prompt_tokens == 3 + 4 and answer.usage.completion_tokens == 12
    echo = client.completions.create(model=MODEL, prompt="ab", max_tokens=2, echo=True)
    assert echo.choices[0].text == "ab" + expected_text(3, 2)
    with_logprobs = client.completions.create(model=MODEL, prompt="ab", max_tokens=3, logprobs=2)
    logprobs = with_logprobs.choices[0].logprobs
    assert logprobs.tokens == list(expected_text(3, 3)) and len(logprobs.top_logprobs[0]) == 2
    assert logprobs.text_offset == [0, 1, 2]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          logprobs=True, top_logprobs=1)
    assert [entry.token for entry in chat.choices[0].logprobs.content] == list(chat.choices[0].message.content)
    best = client.completions.create(model=MODEL, prompt="ab", max_tokens=3, n=1, best_of=3, seed=100)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    streamed = list(client.completions.create(model=MODEL, prompt="ab", max_tokens=3, n=2, stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {0: expected_text(3, 3), 1: expected_text(3, 3)}


def test_metrics_endpoint(server, client):
    client.completions.create(model=MODEL, prompt="ab", max_tokens=3)
    status, headers, body = raw_request(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("llmopt_num_requests_running", "llmopt_num_requests_waiting", "llmopt_kv_blocks_used",
                 "llmopt_kv_blocks_free", "llmopt_prefix_cache_hit_rate", "llmopt_prompt_tokens_total",
                 "llmopt_generation_tokens_total", "llmopt_time_to_first_token_seconds_bucket",
                 "llmopt_time_per_output_token_seconds_bucket"):
        assert name in text
    assert 'llmopt_generation_tokens_total{model_name="fake-model"} 3.0' in text


def test_without_the_serve_extra_the_error_names_it(monkeypatch):
    from llmopt.runtime import server as server_module

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    with pytest.raises(server_module.MissingServeExtra, match=r"llmopt\[serve\]"):
        server_module.serve({"model": "smollm2"}, "127.0.0.1", 0)


def test_a_port_in_use_is_a_bind_error_before_the_model_loads():
    from llmopt.runtime.server import BindError, bind_socket

    taken = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(BindError, match="cannot serve on 127.0.0.1"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
