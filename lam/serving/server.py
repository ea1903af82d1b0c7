"""An OpenAI-compatible HTTP API and a web page for one loaded model: `create_app(model)`, run by uvicorn.

Endpoints: GET / (the page), GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
The model is anything with `stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, sampled)`
yielding text pieces, `logprobs(ids, start, top)`, a `tokenizer` with `encode` and `decode`, and an `info` dict
(what `lam.load` returns).

Generation runs on a worker thread, one request at a time (a lock: requests queue, none sees another's state);
pieces reach the event loop through a queue. A streaming client that disconnects stops its generation at the next
piece. Bad parameters are answered 4xx in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from importlib.resources import files
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from lam.errors import UserError

MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
# OpenAI's fields this server does not implement, and the values that ask for nothing (what their clients send
# by default); any other value is refused rather than ignored
UNSUPPORTED = {"logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
               "tool_choice": (None, "none"), "response_format": (None, {"type": "text"})}


class Sampling(BaseModel):
    """The sampling parameters both endpoints share. Other fields are ignored (user, metadata, ...), except those
    of UNSUPPORTED that ask for something."""

    model_config = ConfigDict(strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # null: DEFAULT_MAX_TOKENS or the server's cap if lower; 0
    # only to score an echoed prompt
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # per time a token was sampled; null: 0
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # once a token was sampled; null: 0
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None


    @model_validator(mode="before")
    @classmethod
    def null_is_the_default(cls, fields):
        """A field sent as null takes its default, as OpenAI's API does (clients send null for "unset")."""
        return {k: v for k, v in fields.items() if v is not None} if isinstance(fields, dict) else fields

    @model_validator(mode="after")
    def token_limit(self) -> Sampling:
        """A chat's max_completion_tokens (OpenAI's newer name) where given, else max_tokens; null where neither
        is (the server's default applies)."""
        self.max_tokens = getattr(self, "max_completion_tokens", None) or self.max_tokens
        return self


class CompletionRequest(Sampling):
    prompt: str | list[str]
    echo: bool = False  # true: the text begins with the prompt
    logprobs: int | None = Field(None, ge=0, le=5)  # the log-probability of each token, and this many alternatives


class TextPart(BaseModel):
    """One part of a message's content given as a list, OpenAI's form: only text parts."""
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]  # OpenAI's roles
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        """The content as one string: a list's text parts joined."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # where given, it is max_tokens
    logprobs: bool = False  # the log-probability of each token of the reply
    top_logprobs: int | None = Field(None, ge=0, le=20)  # with logprobs: this many alternatives at each token


async def read_request(request: Request, schema: type[Sampling]) -> Sampling:
    """The JSON body validated against `schema`, whatever its Content-Type says (curl -d sends a form's)."""
    body = await request.body()
    try:
        fields = json.loads(body)
    except ValueError:  # answered by the validation below
        fields = None
    for field, neutral in UNSUPPORTED.items():
        if isinstance(fields, dict) and fields.get(field) not in neutral:
            raise APIError(400, f"{field} is not supported by this server", field, "unsupported_parameter")
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param) from None


def chat_prompt(messages: list[Message]) -> str:
    """The plain template the chat endpoint continues: one "role: content" line per message, then "assistant:".
    LAM's models are not instruction-tuned; they continue this text as they would any other."""
    return "".join(f"{m.role}: {m.text}\n" for m in messages) + "assistant:"


def stop_strings(stop: str | list[str] | None) -> list[str] | None:
    strings = [stop] if isinstance(stop, str) else stop
    if not strings:
        return None
    if len(strings) > MAX_STOP_STRINGS or not all(strings):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", "stop")
    return strings


class Server:
    """The model, its lock and the limits; `pieces` runs one generation on a worker thread."""

    def __init__(self, model, model_id: str, max_prompt_tokens: int, max_tokens: int):
        self.model, self.model_id = model, model_id
        self.max_prompt_tokens, self.max_tokens = max_prompt_tokens, max_tokens
        self.lock = threading.Lock()
        self.pieces_generated = 0  # over the server's life: lets a test see generation stop

    def check(self, params: Sampling, prompt: str, param: str = "prompt") -> int:
        """The prompt's token count, after checking the request against the model and the limits; `param` is
        the request's field the prompt comes from (a chat's prompt is the transcript of its `messages`)."""
        if params.model is not None and params.model != self.model_id:
            raise APIError(404, f"the model {params.model!r} does not exist; this server has {self.model_id!r}",
                           "model", "model_not_found")
        if params.max_tokens is None:  # unset: OpenAI's default, within this server's cap
            params.max_tokens = min(DEFAULT_MAX_TOKENS, self.max_tokens)
        if params.max_tokens == 0 and not getattr(params, "echo", False):
            raise APIError(400, "max_tokens must be >= 1 (0 only with echo: true, to score the prompt)",
                           "max_tokens")
        if params.max_tokens > self.max_tokens:
            field = "max_completion_tokens" if getattr(params, "max_completion_tokens", None) else "max_tokens"
            raise APIError(400, f"{field} is at most {self.max_tokens} on this server, got {params.max_tokens}",
                           field)
        shown = "the prompt" if param == "prompt" else "the transcript (a 'role: content' line per message)"
        try:
            n = len(self.model.tokenizer.encode(prompt))
        except UserError as e:
            raise APIError(400, f"{shown}: {e}", param) from None
        if n == 0:
            raise APIError(400, "the prompt is empty: give at least one character", param)
        if n > self.max_prompt_tokens:
            raise APIError(400, f"{shown} has {n} tokens; this server takes at most {self.max_prompt_tokens}",
                           param, "context_length_exceeded")
        return n

    def count(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text)) if text else 0

    def scored(self, prompt: str, sampled: list[int], text: str, echo: bool, top: int) -> list[dict]:
        """The tokens of a completion's `text` (after the prompt's, with `echo`), each with its id, its text, its
        log-probability (None for the first of all: nothing comes before it) and the `top` most likely tokens
        in its place with theirs."""
        decode, prompt_ids = self.model.tokenizer.decode, self.model.tokenizer.encode(prompt)
        kept = sampled
        if len(decode(sampled)) > len(text):  # a stop string cut the text: its tokens are not kept
            kept = next(sampled[:k] for k in range(len(sampled)) if len(decode(sampled[:k])) >= len(text))
        ids, first = prompt_ids + kept, 0 if echo else len(prompt_ids)
        with self.lock:
            scores = self.model.logprobs(ids, start=max(first, 1), top=top)
        entries = [{"id": ids[0], "token": decode(ids[:1]), "logprob": None, "top": None}] if first == 0 else []
        for i, (logprob, best) in zip(range(max(first, 1), len(ids)), scores):
            entries.append({"id": ids[i], "token": decode([ids[i]]), "logprob": logprob,
                            "top": [(decode([j]), value) for j, value in best]})
        return entries

    async def pieces(self, prompt: str, params: Sampling, sampled: list[int] | None = None) -> AsyncIterator[str]:
        """The generated text, piece by piece; `sampled`, where given, receives the token ids. Closing this
        iterator (a client gone) stops the worker."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        end = object()
        seed = params.seed if params.seed is not None else secrets.randbelow(2**63)

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening
                cancelled.set()

        def work() -> None:
            try:
                with self.lock:
                    if cancelled.is_set():
                        return
                    ids = {} if sampled is None else {"sampled": sampled}
                    for piece in self.model.stream(prompt, max_new_tokens=params.max_tokens,
                                                   temperature=params.temperature, top_k=params.top_k,
                                                   top_p=params.top_p, seed=seed, stop=stop_strings(params.stop),
                                                   frequency_penalty=params.frequency_penalty or 0.0,
                                                   presence_penalty=params.presence_penalty or 0.0, **ids):
                        self.pieces_generated += 1
                        put(piece)
                        if cancelled.is_set():
                            return
            except Exception as e:  # handed to the request, which answers it
                put(e)
            finally:
                put(end)

        threading.Thread(target=work, name="lam-generation", daemon=True).start()
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancelled.set()


async def collect(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


async def until_disconnected(request: Request, work):
    """The result of the coroutine `work`, which is cancelled (its generation stopped) if the client leaves."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()  # a no-op where it is done
        watch.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)  # a cancelled task ends at its next await
    if task.cancelled():  # nobody is left to read the answer
        raise APIError(499, "the client closed the request", kind="client_closed_request")
    return task.result()


def finish_reason(server: Server, params: Sampling, text: str) -> str:
    """"length" where the completion used its max_tokens, else "stop" (a stop string or the end of text)."""
    return "length" if server.count(text) >= params.max_tokens else "stop"


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """OpenAI's logprobs of a text completion; `offset`: where the first entry's text begins in prompt + text."""
    offsets = [offset]
    for entry in entries[:-1]:
        offsets.append(offsets[-1] + len(entry["token"]))
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else dict(e["top"]) for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dict]) -> dict:
    """OpenAI's logprobs of a chat reply: each token with its UTF-8 bytes and its alternatives."""
    def token(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**token(e["token"], e["logprob"]), "top_logprobs": [token(*t) for t in e["top"]]}
                        for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: Any) -> str:
    """One server-sent event; plain "\\n" separators, which every JavaScript parser splits on."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(model, model_id: str = "lam", max_prompt_tokens: int = 4096, max_tokens: int = 2048) -> FastAPI:
    """The app serving `model` as `model_id`. Prompts longer than `max_prompt_tokens` tokens, or a `max_tokens`
    above `max_tokens`, are refused with 400."""
    app = FastAPI(title="LAM", docs_url=None, redoc_url=None)
    server = Server(model, model_id, max_prompt_tokens, max_tokens)
    app.state.server = server
    page = files("lam.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:  # the model refused a parameter
        return APIError(400, str(e)).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), code=str(e.status_code)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"the server failed: {type(e).__name__}", kind="server_error").response()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "max_tokens": max_tokens, "max_prompt_tokens": max_prompt_tokens}

    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "lam", **model.info}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str) -> dict:
        if name != model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_id!r}", "model",
                           "model_not_found")
        return card

    async def respond(request: Request, params: Sampling, prompt: str, kind: str):
        chat = kind == "chatcmpl"
        prompt_tokens = server.check(params, prompt, "messages" if chat else "prompt")
        stop_strings(params.stop)
        ident, created = f"{kind}-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                delta = {**({"role": "assistant"} if role else {}), **({} if text is None else {"content": text})}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": model_id, "choices": [choice]}

        echo = prompt if getattr(params, "echo", False) else ""  # a completion's text may begin with its prompt
        top = (params.top_logprobs or 0) if chat else params.logprobs
        if chat and params.top_logprobs is not None and not params.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        scoring = bool(params.logprobs) if chat else params.logprobs is not None
        if scoring and params.stream:
            raise APIError(400, "logprobs are given with stream: false only", "logprobs")
        if not params.stream:
            sampled = [] if scoring else None
            text = await until_disconnected(request, collect(server.pieces(prompt, params, sampled)))
            reason = finish_reason(server, params, text)
            logprobs = None
            if scoring:
                entries = await asyncio.to_thread(server.scored, prompt, sampled, text, bool(echo), top)
                logprobs = chat_logprobs(entries) if chat else completion_logprobs(entries, 0 if echo else len(prompt))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                       "finish_reason": reason} if chat else
                      {"index": 0, "text": echo + text, "logprobs": logprobs, "finish_reason": reason})
            return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": model_id, "choices": [choice], "usage": usage(prompt_tokens, server.count(text))}

        async def events() -> AsyncIterator[str]:
            text = ""
            if chat:  # OpenAI's order: the role in a delta of its own, first; then the content's pieces
                yield sse(chunk("", None, role=True))
            elif echo:
                yield sse(chunk(echo, None))
            try:
                async for piece in server.pieces(prompt, params):
                    text += piece
                    yield sse(chunk(piece, None))
            except Exception as e:  # the status line is sent already: the error goes in the stream
                message = str(e) if isinstance(e, UserError) else f"the server failed: {type(e).__name__}"
                yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                return
            yield sse(chunk(None, finish_reason(server, params, text)))
            if (params.stream_options or {}).get("include_usage"):
                yield sse({**chunk(None, None), "choices": [], "usage": usage(prompt_tokens, server.count(text))})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        params = await read_request(request, CompletionRequest)
        prompts = [params.prompt] if isinstance(params.prompt, str) else params.prompt
        if len(prompts) != 1:
            raise APIError(400, "this server takes one prompt per request", "prompt")
        return await respond(request, params, prompts[0], "cmpl")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        params = await read_request(request, ChatRequest)
        return await respond(request, params, chat_prompt(params.messages), "chatcmpl")

    return app


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn on a background thread (port 0: a free one); yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
