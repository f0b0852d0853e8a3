"""The OpenAI chat-completions request and response, as MLflow's llm/v1/chat speaks them.

Pure Python (no torch, no transformers): it ships with the logged pyfunc model.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

ROLES = ("system", "user", "assistant")
REQUEST_KEYS = ("messages", "temperature", "top_p", "top_k", "max_tokens", "stop", "n", "stream", "seed",
                "custom_inputs", "frequency_penalty", "presence_penalty")
# The prompt interface: raw text and the generation settings (each a column or an MLflow param).
PROMPT_KEYS = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed")
MAX_N = 8
# Bounds on what one request may ask the model to read: the context length bounds the tokens, these bound the
# work of getting there (templating and tokenizing a huge body) before that check can run.
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 1_000_000


class ChatRequestError(ValueError):
    """A request that does not follow the chat schema; the message says what is allowed."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    max_tokens: int
    prompt: Optional[str] = None  # raw text for the tokenizer as it is (the prompt interface); then no messages
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: Optional[int] = None
    stream: bool = False

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(body: dict, key: str, kind, low, high, default):
    value = body.get(key)
    if _missing(value):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ChatRequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not low <= value <= high:
        raise ChatRequestError(f"'{key}' must be between {low} and {high}, got {value}")
    return kind(value)


def parse_request(body: dict, defaults: dict, params: Optional[dict] = None) -> ChatRequest:
    """Validate one chat request against the schema and fill in the target's generation defaults."""
    if not isinstance(body, dict):
        raise ChatRequestError(f"a chat request is an object with 'messages', got {type(body).__name__}")
    body = {k: v for k, v in body.items() if not _missing(v) or k == "messages"}
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise ChatRequestError(f"unknown request field(s) {', '.join(unknown)}; allowed: {', '.join(REQUEST_KEYS)}")
    messages = body.get("messages")
    if messages is None or (hasattr(messages, "__len__") and len(messages) == 0):
        raise ChatRequestError("'messages' is required: a non-empty list of {role, content} objects")
    if not isinstance(messages, (list, tuple)) and not hasattr(messages, "tolist"):
        raise ChatRequestError(f"'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    messages = list(messages)
    if len(messages) > MAX_MESSAGES:
        raise ChatRequestError(f"'messages' holds {len(messages)} messages; at most {MAX_MESSAGES} are allowed")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatRequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatRequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content:
            raise ChatRequestError(f"messages[{i}].content must be a non-empty string, got {content!r}")
        _check_text(f"messages[{i}].content", content)
        clean.append({"role": role, "content": content})
    size = sum(len(m["content"]) for m in clean)
    if size > MAX_CONTENT_CHARS:
        raise ChatRequestError(f"the messages hold {size} characters; at most {MAX_CONTENT_CHARS} are allowed")
    for key in ("frequency_penalty", "presence_penalty"):
        if not _missing(body.get(key)) and body[key] != 0:
            raise ChatRequestError(f"'{key}' is not supported by this model; leave it out or set 0")
    custom = body.get("custom_inputs") or {}
    if not isinstance(custom, dict) or set(custom) - {"seed"}:
        raise ChatRequestError("'custom_inputs' may hold only 'seed' (an integer)")
    # A seed may come in the body, in custom_inputs (the chat schema's extension point) or as an MLflow param;
    # -1 is the param's "none" default.
    seed = next((s for s in (body.get("seed"), custom.get("seed"), (params or {}).get("seed"))
                 if not _missing(s) and s != -1), None)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ChatRequestError(f"'stream' must be true or false, got {stream!r}")
    return ChatRequest(messages=clean, n=_number(body, "n", int, 1, MAX_N, 1), stream=stream,
                       **_generation({**body, "seed": seed}, defaults))


def parse_prompt_request(row: dict, defaults: dict, params: Optional[dict] = None) -> ChatRequest:
    """Validate one raw-prompt request (the prompt interface: text the model continues as it is, with no chat
    template) and fill in generation settings: the row's own, else the MLflow params', else the target's."""
    if not isinstance(row, dict):
        raise ChatRequestError(f"a prompt request is an object with 'prompt', got {type(row).__name__}")
    given = {k: v for k, v in {**(params or {}), **row}.items() if not _missing(v) and not (k == "seed" and v == -1)}
    unknown = sorted(set(given) - set(PROMPT_KEYS))
    if unknown:
        raise ChatRequestError(f"unknown request field(s) {', '.join(unknown)}; allowed: {', '.join(PROMPT_KEYS)}")
    prompt = given.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ChatRequestError(f"'prompt' is required: a non-empty string, got {prompt!r}")
    _check_text("'prompt'", prompt)
    if len(prompt) > MAX_CONTENT_CHARS:
        raise ChatRequestError(f"'prompt' holds {len(prompt)} characters; at most {MAX_CONTENT_CHARS} are allowed")
    return ChatRequest(messages=[], prompt=prompt, **_generation(given, defaults))


def _check_text(where: str, text: str) -> None:
    # A lone surrogate (a JSON escape or bytes can carry one) is no text a tokenizer can take.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ChatRequestError(f"{where} is not valid Unicode: a lone surrogate at character {exc.start}; send "
                               f"UTF-8 text (beyond U+FFFF: a surrogate pair)") from None


def _generation(body: dict, defaults: dict) -> dict:
    """The generation settings of a request body (max_tokens, temperature, top_p, top_k, stop, seed), checked,
    with the target's defaults for those it leaves out."""
    stop = body.get("stop")
    stop = () if _missing(stop) else stop
    if isinstance(stop, str):
        stop = (stop,)
    if hasattr(stop, "tolist"):  # a numpy array, as MLflow's input conversion may hand it over
        stop = stop.tolist()
    if not isinstance(stop, (list, tuple)):
        raise ChatRequestError(f"'stop' must be a string or a list of at most 4 non-empty strings, got {stop!r}")
    stop = tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ChatRequestError(f"'stop' must be a string or a list of at most 4 non-empty strings, got {stop!r}")
    return dict(
        max_tokens=_number(body, "max_tokens", int, 1, 1 << 20, defaults["max_new_tokens"]),
        temperature=_number(body, "temperature", float, 0.0, 2.0, defaults["temperature"]),
        top_p=_number(body, "top_p", float, 1e-9, 1.0, defaults["top_p"]),
        top_k=_number(body, "top_k", int, 0, 1 << 20, defaults["top_k"]),
        stop=stop,
        seed=_number(body, "seed", int, 0, 2**63 - 1, None),
    )


@dataclass
class Completion:
    text: str = ""
    finish_reason: str = "length"
    completion_tokens: int = 0


@dataclass
class ChatResponse:
    model: str
    prompt_tokens: int
    choices: list[Completion] = field(default_factory=list)
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def to_dict(self) -> dict[str, Any]:
        completion_tokens = sum(c.completion_tokens for c in self.choices)
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason} for i, c in enumerate(self.choices)],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": self.prompt_tokens + completion_tokens},
        }


def chunk(response_id: str, created: int, model: str, index: int, delta: dict,
          finish_reason: Optional[str] = None) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}
