"""lam.serve: the OpenAI-compatible API (in process and over a live uvicorn server), the official openai client,
and the page in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import lam
from lam.data.tokenizer import CharTokenizer
from lam.errors import UserError
from lam.models import LAM
from lam.serving import Model
from lam.serving.server import APIError, Message, chat_prompt, create_app, running, until_disconnected

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[1] / "docs"
MAX_TOKENS = 2000


ALPHABET = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CONFIG = {"_target_": "lam.models.LAM", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 64,
          "attention": {"_target_": "lam.models.attention.SoftmaxAttention", "_partial_": True}}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A model file of a randomly initialised one-layer LAM: what serving does is the same for any weights."""
    torch.manual_seed(0)
    tokenizer = CharTokenizer(ALPHABET)
    net = LAM(tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64)
    return Model(net, tokenizer, CONFIG, {"corpus": "none (random weights)"}).save(
        tmp_path_factory.mktemp("model") / "tiny.lam")


@pytest.fixture(scope="module")
def model(model_path):
    return lam.load(model_path)


class Watched:
    """A model whose pieces each take `delay` seconds more (as a bigger model's would; the GIL is handed over),
    recording the most generations that ever ran at once."""

    def __init__(self, model, delay: float = 0.001):
        self.model, self.tokenizer, self.info, self.delay = model, model.tokenizer, model.info, delay
        self.logprobs = model.logprobs
        self.running = self.most = 0

    def stream(self, prompt, **kwargs):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            for piece in self.model.stream(prompt, **kwargs):
                time.sleep(self.delay)
                yield piece
        finally:
            self.running -= 1

    def generate(self, prompt, **kwargs) -> str:
        return "".join(self.model.stream(prompt, **kwargs))


@pytest.fixture()
def client(model):
    return TestClient(create_app(model, model_id="tiny", max_prompt_tokens=50, max_tokens=MAX_TOKENS))


@dataclass
class Live:
    url: str
    app: FastAPI


@pytest.fixture()
def live(model):
    """A live server of the model whose pieces take 5 ms each: long enough to stop one mid-way."""
    slow = Watched(model, delay=0.005)
    app = create_app(slow, model_id="tiny", max_tokens=MAX_TOKENS)
    with running(app) as url:
        yield Live(url, app), slow


def events(body: str) -> list:
    """The data of each server-sent event, checking the framing: `data: ...` blocks, blank-line separated."""
    assert "\r" not in body and body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(b.startswith("data: ") for b in blocks), blocks
    data = [b.removeprefix("data: ") for b in blocks]
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def test_health_and_models(client, model):
    assert client.get("/health").json() == {"status": "ok", "model": "tiny", "max_tokens": MAX_TOKENS,
                                            "max_prompt_tokens": 50}
    [entry] = client.get("/v1/models").json()["data"]
    assert entry["id"] == "tiny" and entry["object"] == "model"
    assert {k: entry[k] for k in model.info} == model.info
    assert client.get("/v1/models/tiny").json() == entry  # openai's models.retrieve
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_completion_json_is_the_python_generation_for_the_seed(client, model):
    body = {"model": "tiny", "prompt": "To be", "max_tokens": 30, "temperature": 0.9, "top_k": 20, "seed": 7}
    answer = client.post("/v1/completions", json=body).json()
    [choice] = answer["choices"]
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    assert choice["text"] == model.generate("To be", max_new_tokens=30, temperature=0.9, top_k=20, seed=7)
    assert choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 30, "total_tokens": 35}
    other_seed = client.post("/v1/completions", json={**body, "seed": 8}).json()["choices"][0]["text"]
    assert other_seed != choice["text"]


def test_stream_parses_ends_with_done_and_joins_to_the_python_generation(client, model):
    body = {"prompt": "To be", "max_tokens": 25, "temperature": 1.0, "seed": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response.read().decode())
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(pieces) == 25 + 1  # one per token, then the one with finish_reason
    assert "".join(pieces) == model.generate("To be", max_new_tokens=25, temperature=1.0, seed=3)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 25, "total_tokens": 30}


def test_a_stop_string_ends_the_completion_before_it(client, model):
    full = model.generate("To be", max_new_tokens=40, temperature=0, seed=0)
    stop = full[10:12]
    answer = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 40, "temperature": 0,
                                                  "stop": [stop]}).json()
    assert answer["choices"][0]["text"] == full[:full.find(stop)]
    assert answer["choices"][0]["finish_reason"] == "stop"


def test_chat_continues_the_role_template(client, model):
    messages = [{"role": "user", "content": "Who goes there?"}]
    body = {"messages": messages, "max_tokens": 20, "seed": 1, "temperature": 0.8}
    answer = client.post("/v1/chat/completions", json=body).json()
    assert chat_prompt_text(messages) == "user: Who goes there?\nassistant:"
    expected = model.generate(chat_prompt_text(messages), max_new_tokens=20, temperature=0.8, seed=1)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = events(response.read().decode())
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}  # the role once, first, as OpenAI streams it
    assert all("role" not in d for d in deltas[1:]) and deltas[-1] == {}


def test_openais_defaults_for_fields_it_does_not_implement_are_accepted(client, model):
    """What OpenAI's clients send when nothing is asked of logprobs, penalties, ...; max_tokens null: 16."""
    neutral = {"logprobs": None, "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "best_of": 1,
               "user": "someone", "max_tokens": None, "temperature": None, "top_p": None, "stream": None,
               "echo": None, "n": None}
    answer = client.post("/v1/completions", json={"prompt": "To be", "seed": 2, **neutral}).json()
    assert answer["choices"][0]["text"] == model.generate("To be", max_new_tokens=16, seed=2)
    assert answer["usage"]["completion_tokens"] == 16


def test_an_unset_max_tokens_is_16_or_the_servers_cap_where_lower(model):
    capped = TestClient(create_app(model, model_id="tiny", max_tokens=5))
    for path, body in ("/v1/completions", {"prompt": "To be"}), \
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who?"}]}):
        answer = capped.post(path, json={**body, "seed": 1, "logprobs": None})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5, answer.text


def test_penalties_sample_as_the_python_generation_does(client, model):
    body = {"prompt": "To be", "max_tokens": 40, "temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert text == model.generate("To be", max_new_tokens=40, temperature=0, frequency_penalty=1.5,
                                  presence_penalty=0.5)
    assert text != model.generate("To be", max_new_tokens=40, temperature=0)


def test_echo_puts_the_prompt_before_the_completion(client, model):
    body = {"prompt": "To be", "max_tokens": 12, "seed": 4, "echo": True}
    expected = model.generate("To be", max_new_tokens=12, seed=4)
    answer = client.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] == "To be" + expected
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert answer["choices"][0]["finish_reason"] == "length"
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = events(response.read().decode())
    assert chunks[0]["choices"][0]["text"] == "To be"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "To be" + expected


def recomputed_logprobs(model, ids: list[int]) -> list[torch.Tensor]:
    """The log-probabilities after ids[:i] for each i >= 1, each from its own forward pass over the last
    block_size tokens, as sampling without a cache sees them."""
    with torch.no_grad():
        return [model.net(torch.tensor([ids[max(0, i - 64):i]]))[0][0, -1].log_softmax(-1) for i in range(1, len(ids))]


def test_logprobs_of_no_ids_are_none_and_an_id_outside_the_vocabulary_is_refused(model):
    assert model.logprobs([]) == [] and model.logprobs([3]) == []  # nothing before the first token to score
    for ids in ([1, model.tokenizer.vocab_size], [-1, 2], [1, 2.0]):
        with pytest.raises(ValueError, match=r"^ids must be token ids, integers in \[0, "):
            model.logprobs(ids)


def test_logprobs_past_the_position_table_are_those_of_the_window_sampling_recomputes(model):
    ids = model.tokenizer.encode("To be, or not to be: that is the question. Whether tis nobler in the mind to suffer")
    assert len(ids) > 64
    reference = recomputed_logprobs(model, ids)
    scored = model.logprobs(ids, start=3, top=4)
    assert len(scored) == len(ids) - 3
    for i, (logprob, best) in zip(range(3, len(ids)), scored):
        assert logprob == pytest.approx(reference[i - 1][ids[i]].item(), abs=1e-5)
        values, indices = reference[i - 1].topk(4)
        assert [j for j, _ in best] == indices.tolist()
        assert [v for _, v in best] == pytest.approx(values.tolist(), abs=1e-5)


def test_completion_logprobs_score_the_sampled_tokens_and_with_echo_the_prompts(client, model):
    body = {"prompt": "To be", "max_tokens": 20, "seed": 6, "logprobs": 3}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == "To be" + plain["text"]
    ids = model.tokenizer.encode(echoed["text"])  # one character a token
    reference = recomputed_logprobs(model, ids)
    lp = echoed["logprobs"]
    assert "".join(lp["tokens"]) == echoed["text"] and lp["text_offset"] == list(range(len(ids)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx([reference[i - 1][ids[i]].item() for i in range(1, len(ids))],
                                                      abs=1e-5)
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        values, indices = reference[i - 1].topk(3)
        assert list(top) == [model.tokenizer.decode([j]) for j in indices.tolist()]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-5)
    assert plain["logprobs"]["tokens"] == lp["tokens"][5:] and plain["logprobs"]["text_offset"][0] == 5
    assert plain["logprobs"]["token_logprobs"] == lp["token_logprobs"][5:]


def test_echo_with_no_new_token_scores_the_prompt_alone(client, model):
    answer = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 0, "echo": True,
                                                  "logprobs": 0}).json()
    [choice] = answer["choices"]
    ids = model.tokenizer.encode("To be")
    assert choice["text"] == "To be" and choice["logprobs"]["tokens"] == list("To be")
    assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [lp for lp, _ in model.logprobs(ids)], abs=1e-6)
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 0}).json()
    assert chat["error"]["param"] == "max_tokens"


def test_greedy_logprobs_are_the_most_likely_and_a_stop_strings_tokens_are_left_out(client, model):
    full = model.generate("To be", max_new_tokens=30, temperature=0)
    stop = full[12:14]
    answer = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 30, "temperature": 0,
                                                  "logprobs": 1, "stop": stop}).json()["choices"][0]
    assert answer["text"] == full[:full.find(stop)] and "".join(answer["logprobs"]["tokens"]) == answer["text"]
    for logprob, top in zip(answer["logprobs"]["token_logprobs"], answer["logprobs"]["top_logprobs"]):
        assert [logprob] == pytest.approx(list(top.values()), abs=1e-6)


def test_chat_logprobs_give_each_tokens_bytes_and_alternatives(client, model):
    body = {"messages": [{"role": "user", "content": "Who goes there?"}], "max_tokens": 15, "seed": 9,
            "logprobs": True, "top_logprobs": 2}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"] and len(content) == 15
    assert all(c["bytes"] == list(c["token"].encode()) and len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] >= max(c["logprob"], c["top_logprobs"][1]["logprob"])
               for c in content)
    alone = {k: v for k, v in body.items() if k != "top_logprobs"}
    assert client.post("/v1/chat/completions", json=alone).json()["choices"][0]["logprobs"]["content"][0][
        "top_logprobs"] == []
    assert client.post("/v1/chat/completions", json={**alone, "logprobs": False}).json()["choices"][0][
        "logprobs"] is None
    error = client.post("/v1/chat/completions", json={**body, "logprobs": False}).json()["error"]
    assert error["param"] == "top_logprobs"


def test_a_chats_max_completion_tokens_is_its_max_tokens(client, model):
    messages = [{"role": "user", "content": "Who goes there?"}]
    answer = client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 7,
                                                       "max_tokens": 30, "seed": 5}).json()
    assert answer["choices"][0]["message"]["content"] == model.generate(chat_prompt_text(messages),
                                                                        max_new_tokens=7, seed=5)
    assert answer["usage"]["completion_tokens"] == 7
    error = client.post("/v1/chat/completions", json={"messages": messages,
                                                      "max_completion_tokens": MAX_TOKENS + 1}).json()["error"]
    assert error["param"] == "max_completion_tokens" and str(MAX_TOKENS) in error["message"]


def chat_prompt_text(messages: list[dict]) -> str:
    return chat_prompt([Message(**m) for m in messages])


@pytest.mark.parametrize("change, param", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"n": 2}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "€uro"}, "prompt"),
    ({"prompt": "a" * 51}, "prompt"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"model": "gpt-4"}, "model"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": 1, "stream": True}, "logprobs"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"best_of": 3}, "best_of"),
    ({"suffix": "end"}, "suffix"),
    ({"echo": "yes"}, "echo"),
])
def test_each_bad_parameter_is_a_4xx_in_openais_error_shape(client, change, param):
    response = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 5, **change})
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("content, message", [
    ("€uro", "the transcript (a 'role: content' line per message): character '€' is not in the tokenizer's "),
    ("a" * 51, "the transcript (a 'role: content' line per message) has {n} tokens; this server takes at most 50"),
])
def test_a_chat_the_model_cannot_read_names_its_messages(client, content, message):
    messages = [{"role": "user", "content": content}]
    message = message.format(n=len(chat_prompt_text(messages)))  # one character a token
    response = client.post("/v1/chat/completions", json={"messages": messages})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "messages" and error["message"].startswith(message)


def test_a_chat_message_may_give_its_content_as_text_parts(client, model):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Who goes "}, {"type": "text", "text": "there?"}]}]
    plain = [{"role": "user", "content": "Who goes there?"}]
    answers = [client.post("/v1/chat/completions", json={"messages": m, "max_tokens": 6, "seed": 3}).json()
               for m in (parts, plain)]
    assert answers[0]["choices"] == answers[1]["choices"]


@pytest.mark.parametrize("message", [{"role": "wizard", "content": "hi"},
                                     {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
def test_a_chat_message_with_an_unknown_role_or_a_part_that_is_not_text_is_a_400(client, message):
    response = client.post("/v1/chat/completions", json={"messages": [message]})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages"), response.text


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"messages": []}', b'{"messages": [{"role": "user"}]}'])
def test_a_malformed_body_is_a_400(client, body):
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = client.post(path, content=body)
        assert response.status_code == 400 and response.json()["error"]["message"], response.text


def test_an_unknown_path_answers_in_the_error_shape(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "404"


def test_concurrent_requests_queue_without_touching_each_others_state(model):
    watched = Watched(model)
    client = TestClient(create_app(watched, model_id="tiny"))
    bodies = [{"prompt": p, "max_tokens": 15, "seed": s, "temperature": 1.0} for p in ("To", "Be") for s in (1, 2)]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda b: client.post("/v1/completions", json=b).json()["choices"][0]["text"],
                              bodies * 2))
    expected = [model.generate(b["prompt"], max_new_tokens=15, temperature=1.0, seed=b["seed"]) for b in bodies]
    assert texts == expected * 2
    assert watched.most == 1


def settled(server, still: float = 0.3, timeout: float = 10) -> int:
    """The server's count of generated pieces once it has not moved for `still` seconds."""
    deadline = time.monotonic() + timeout
    count = server.pieces_generated
    while time.monotonic() < deadline:
        time.sleep(still)
        if server.pieces_generated == count:
            return count
        count = server.pieces_generated
    raise AssertionError(f"generation still running after {timeout} s: {count} pieces")


def test_a_client_that_disconnects_stops_its_generation(live):
    server, slow = live
    counted = server.app.state.server
    body = {"prompt": "To be", "max_tokens": MAX_TOKENS, "stream": True, "seed": 0}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(10)) if line.startswith("data:")]
        assert received
        assert settled(counted) < MAX_TOKENS / 4  # 5 ms a piece: all of them would take 10 s
        # the lock is free again: the next request is answered
        answer = http.post("/v1/completions", json={"prompt": "To", "max_tokens": 3}).json()
        assert len(answer["choices"][0]["text"]) == 3


def test_a_plain_request_whose_client_leaves_is_answered_499():
    """The work is cancelled and awaited until it ends, so the answer is the 499, not an error of reading a
    task that was still cancelling."""
    class Leaving:
        async def receive(self) -> dict:
            await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

    async def slow() -> str:
        await asyncio.sleep(10)
        return "never"

    with pytest.raises(APIError) as error:
        asyncio.run(until_disconnected(Leaving(), slow()))
    assert error.value.status == 499


def test_a_client_that_gives_up_on_a_plain_request_stops_its_generation(live):
    server, slow = live
    counted = server.app.state.server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": "To be", "max_tokens": MAX_TOKENS}, timeout=0.3)
    assert settled(counted) < MAX_TOKENS / 4


def test_the_openai_client_completes_plain_and_streamed(live):
    openai = pytest.importorskip("openai", reason="the openai package comes with the dev extra")
    server, slow = live
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    expected = slow.generate("To be", max_new_tokens=20, temperature=0.7, seed=5)
    plain = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0.7, seed=5)
    assert plain.choices[0].text == expected and plain.usage.completion_tokens == 20
    streamed = client.completions.create(model="tiny", prompt="To be", max_tokens=20, temperature=0.7, seed=5,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, seed=1)
    assert chat.choices[0].message.content == slow.generate("user: Hi\nassistant:", max_new_tokens=5, seed=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="To be", temperature=9)
    scored = client.completions.create(model="tiny", prompt="To be", max_tokens=1, temperature=0, echo=True,
                                       logprobs=1)  # how lm-evaluation-harness scores a text
    assert scored.choices[0].logprobs.tokens == list(scored.choices[0].text) and len(scored.choices[0].text) == 6
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    assert all(lp < 0 for lp in scored.choices[0].logprobs.token_logprobs[1:])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_completion_tokens=4, seed=1, logprobs=True, top_logprobs=3)
    assert [t.token for t in chat.choices[0].logprobs.content] == list(chat.choices[0].message.content)
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)


BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture()
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's package (apt-get install chromium; .ci/run does)")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="playwright comes with the dev extra")
    with sync_playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


def set_slider(page, id: str, value) -> None:
    page.eval_on_selector(f"#{id}", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }",
                          str(value))


def test_the_page_streams_stops_and_matches_the_api_greedy(live, browser, tmp_path):
    server, slow = live
    counted = server.app.state.server
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.goto(server.url)
    page.wait_for_function("document.getElementById('title').textContent.includes('tiny')")
    assert "vocab_size" in page.text_content("#info-table")

    # typing a prompt streams text in; Stop ends it, and the server stops generating
    page.fill("#prompt-text", "")
    page.locator("#prompt-text").press_sequentially("To be")
    set_slider(page, "max-tokens", MAX_TOKENS)
    page.click("#generate-button")
    page.wait_for_function("document.getElementById('generated').textContent.length >= 20")
    page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')")
    page.screenshot(path=tmp_path / "streaming.png")
    page.click("#stop-button")
    page.wait_for_function("document.getElementById('status').textContent.includes('stopped')")
    assert settled(counted) < MAX_TOKENS / 2
    assert 20 <= len(page.inner_text("#generated")) < MAX_TOKENS / 2
    assert page.inner_text("#given") == "To be" and page.is_enabled("#continue-button")

    # greedy: the page shows what the API returns
    set_slider(page, "temperature", 0)
    set_slider(page, "max-tokens", 60)
    page.click("#generate-button")
    page.wait_for_function("document.getElementById('status').textContent.includes('done')")
    api = httpx.post(f"{server.url}/v1/completions", json={"prompt": "To be", "max_tokens": 60, "temperature": 0})
    assert page.text_content("#generated") == api.json()["choices"][0]["text"]
    assert "done (length)" in page.inner_text("#status")

    # Continue: the whole text so far becomes the prompt
    before = page.text_content("#given") + page.text_content("#generated")
    page.click("#continue-button")
    page.wait_for_function("document.getElementById('status').textContent.includes('done')")
    assert page.text_content("#given") == before
    continued = httpx.post(f"{server.url}/v1/completions", json={"prompt": before, "max_tokens": 60,
                                                                "temperature": 0})
    assert page.text_content("#generated") == continued.json()["choices"][0]["text"]
    page.screenshot(path=tmp_path / "greedy.png", full_page=True)

    # a bad request shows the API's message
    page.fill("#prompt-text", "€")
    page.click("#generate-button")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
    assert "vocabulary" in page.inner_text("#status")


def test_a_phone_sized_viewport_shows_every_control(model, browser, tmp_path):
    """LAM_SERVE_SCREENSHOT=FILE.lam serves that model instead and copies the picture to docs/serve.png."""
    shown = os.environ.get("LAM_SERVE_SCREENSHOT")
    with running(create_app(lam.load(shown) if shown else model, model_id=Path(shown).stem if shown else "tiny",
                            max_tokens=MAX_TOKENS)) as url:
        page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                                has_touch=True)
        page.goto(url)
        page.wait_for_function("document.getElementById('title').textContent.includes(':')")
        page.fill("#prompt-text", "ROMEO:" if shown else "To be")
        set_slider(page, "max-tokens", 240)
        page.click("#generate-button")
        page.wait_for_function("document.getElementById('status').textContent.includes('done')")
        width = page.evaluate("document.documentElement.clientWidth")
        assert page.evaluate("document.documentElement.scrollWidth") <= width  # nothing runs off to the side
        for id in ["prompt-text", "generate-button", "stop-button", "continue-button", "temperature", "top-k",
                   "top-p", "max-tokens", "seed", "output", "status"]:
            box = page.locator(f"#{id}").bounding_box()
            assert box and box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= width, id
        page.click("#info summary")
        assert page.locator("#info-table").bounding_box()["width"] <= width
        page.screenshot(path=tmp_path / "phone.png", full_page=True)
    if shown:
        shutil.copy(tmp_path / "phone.png", DOCS / "serve.png")


@pytest.mark.parametrize("args, says", [
    ([], "give the model to serve: model=<file>.lam"),
    (["model=m.lam", "ckpt=run/best.ckpt"], "give the model to serve"),
    (["model=m.lam", "port=70000"], "port takes an integer from 0 to 65535"),
    (["model=m.lam", "port=http"], "port takes an integer"),
    (["model=m.lam", "max_tokens=0"], "max_tokens takes an integer from 1"),
    (["model=m.lam", "tokens=5"], "Key 'tokens' is not in struct"),
    (["m.lam"], "arguments are key=value"),
])
def test_serve_refuses_bad_arguments_in_one_line(args, says):
    from lam.serve import read_config

    with pytest.raises(UserError, match=says):
        read_config(args)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False)])
def test_only_loopback_hosts_serve_without_a_warning(host, loopback):
    from lam.serve import is_loopback

    assert is_loopback(host) is loopback


def free_port() -> int:
    """A port of 127.0.0.1 free a moment ago; the server binds it again at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_lam_serve_serves_a_model_file_on_loopback(model_path, model):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lam.serve", f"model={model_path}", f"port={port}",
                               "log_level=warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().startswith(f"serving tiny at http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        assert health.json()["model"] == "tiny"
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=json.dumps(
            {"prompt": "To be", "max_tokens": 12, "temperature": 0}), timeout=30)  # no JSON content type, as curl -d
        assert answer.json()["choices"][0]["text"] == model.generate("To be", max_new_tokens=12, temperature=0)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "warning" not in server.stderr.read()


def test_serving_beyond_loopback_warns(model_path, monkeypatch, capsys):
    import lam.serve

    served = {}
    monkeypatch.setattr(lam.serve.uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    threads = torch.get_num_threads()
    port = free_port()
    lam.serve.main([f"model={model_path}", "host=0.0.0.0", f"port={port}", f"threads={threads + 1}"])
    assert torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)
    assert served["host"] == "0.0.0.0" and served["port"] == port
    assert "warning: host=0.0.0.0 serves the model to anyone" in capsys.readouterr().err


def test_serve_takes_a_checkpoint_as_the_other_commands_do(model, tmp_path, monkeypatch):
    import lam.serve

    checkpoint = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.net.state_dict().items()},
                "lam": {"config": {"model": CONFIG, "data": {"path": "corpus.txt"}},
                        "tokenizer": model.tokenizer.state_dict()}}, checkpoint)
    served = {}
    monkeypatch.setattr(lam.serve.uvicorn, "run", lambda app, **kwargs: served.update(app=app))
    lam.serve.main([f"ckpt={checkpoint}", f"port={free_port()}"])
    client = TestClient(served["app"])
    assert client.get("/health").json()["model"] == "best"
    answer = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 12, "temperature": 0}).json()
    assert answer["choices"][0]["text"] == model.generate("To be", max_new_tokens=12, temperature=0)


def test_serve_refuses_a_port_another_server_holds_before_loading_the_model(model_path, monkeypatch):
    import lam.serve

    monkeypatch.setattr(lam, "load", lambda path: pytest.fail("the model was loaded"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UserError, match=f"^port {port} on 127.0.0.1 is in use \\(another server holds it\\): "
                                            "give another port=$"):
            lam.serve.main.__wrapped__([f"model={model_path}", f"port={port}"])
    def unknown(*args, **kwargs):  # as a resolver answers for a name it does not know, without asking one
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    with pytest.raises(UserError, match="^host=nowhere.invalid is not an address of this machine"):
        lam.serve.main.__wrapped__([f"model={model_path}", "host=nowhere.invalid"])


def test_serve_names_a_missing_model_file_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lam.serve", f"model={tmp_path / 'none.lam'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: model file {tmp_path / 'none.lam'} does not exist"]


def test_serve_help_names_every_key():
    page = subprocess.run([sys.executable, "-m", "lam.serve", "--help"], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    assert page.startswith("python -m lam.serve model=")
    for key in ("model", "ckpt", "model_id", "host", "port", "max_tokens", "max_prompt_tokens", "threads",
                "log_level"):
        assert f"\n{key}: " in page, key
