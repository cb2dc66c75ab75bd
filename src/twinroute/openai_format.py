"""The slice of OpenAI's completions API that the router and the engine simulator both speak.

One parser for both sides keeps them honest with each other: a request the router accepts is
one the engine simulator accepts, and a chat conversation renders to the same prompt text on
both (so prefix keys computed by the router name the blocks the engine caches).

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status carried by `RequestError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

Kind = Literal["completions", "chat"]

# OpenAI's and vLLM's default for /v1/completions. Chat has none: vLLM answers until the model
# ends the message, within the rest of the context window, so a chat request without a limit
# has `max_tokens` None (a default of ours would cut answers, and continuations, short).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Above this a request is refused as absurd rather than queued for minutes.
MAX_TOKENS_LIMIT = 131_072
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.error_type = error_type
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(
            message=self.message, error_type=self.error_type, param=self.param, code=self.code
        )


def error_body(
    *, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A validated completions or chat request; the raw body is kept for forwarding."""

    kind: Kind
    model: str
    # Exactly one of the two is set: the prompt text (chat: the rendered conversation), or
    # the token ids a completions request sent instead of text.
    prompt_text: str | None
    prompt_token_ids: tuple[int, ...] | None
    # The output budget; None for a chat request that set none (the engine decides).
    max_tokens: int | None
    stream: bool
    include_usage: bool
    body: Mapping[str, Any]

    @property
    def cache_salt(self) -> str:
        salt = self.body.get("cache_salt")
        return salt if isinstance(salt, str) else ""

    @property
    def session_id(self) -> str:
        user = self.body.get("user")
        return user if isinstance(user, str) else ""


def render_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> str:
    """Render a validated conversation to prompt text, deterministically.

    The format is our own (a real engine applies its model's chat template); what matters is
    that a conversation that extends another renders to text that extends the other's.
    `continue_final_message` (vLLM's flag of that name, with `add_generation_prompt` false)
    leaves the last message open, so the model continues it: how a stream migrated by
    recompute continues an assistant answer on another engine.
    """
    if continue_final_message and messages:
        parts = [f"<|{m['role']}|>\n{_message_text(m)}\n" for m in messages[:-1]]
        last = messages[-1]
        parts.append(f"<|{last['role']}|>\n{_message_text(last)}")
        return "".join(parts)
    parts = [f"<|{m['role']}|>\n{_message_text(m)}\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part["text"]) for part in content)


def decode_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply") from None
    except ValueError as error:  # e.g. an integer over Python's 4,300-digit limit
        raise RequestError(f"request body is not usable JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    # JSON may escape a lone UTF-16 surrogate (`\ud800`), which no engine can encode; the
    # full check runs only when the raw body holds such an escape (rare), so it costs nothing
    # on ordinary requests.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(
                "request body holds a lone UTF-16 surrogate escape (not valid Unicode text)"
            ) from None
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def parse_request(
    body: Mapping[str, Any],
    *,
    kind: Kind,
    served_models: Sequence[str],
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
) -> ParsedRequest:
    """Validate `body`; RequestError (400 or 404) says what is wrong and which field."""
    model = body.get("model")
    if model is None:
        raise RequestError("you must provide a model parameter", param="model")
    if not isinstance(model, str):
        raise RequestError("model must be a string", param="model")
    if served_models and model not in served_models:
        raise RequestError(
            f"the model {model!r} does not exist; served: {', '.join(served_models)}",
            status=404,
            param="model",
            error_type="NotFoundError",
            code="model_not_found",
        )
    prompt_text: str | None = None
    token_ids: tuple[int, ...] | None = None
    if kind == "completions":
        prompt_text, token_ids = _parse_prompt(body.get("prompt"))
    else:
        prompt_text = render_chat(
            _parse_messages(body.get("messages")),
            add_generation_prompt=body.get("add_generation_prompt") is not False,
            continue_final_message=body.get("continue_final_message") is True,
        )
    max_tokens = _parse_max_tokens(body, kind=kind, limit=max_tokens_limit)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
    for name in ("cache_salt", "user"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"{name} must be a string", param=name)
    return ParsedRequest(
        kind=kind,
        model=model,
        prompt_text=prompt_text,
        prompt_token_ids=token_ids,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        body=body,
    )


def _parse_prompt(prompt: object) -> tuple[str | None, tuple[int, ...] | None]:
    # A one-element batch is the same request as its element; larger batches are not served.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        return prompt, None
    if isinstance(prompt, list) and prompt:
        if all(type(t) is int and 0 <= t < 2**32 for t in prompt):
            return None, tuple(prompt)
        if all(isinstance(p, str | list) for p in prompt):
            raise RequestError("batched prompts are not supported; send one prompt", param="prompt")
        raise RequestError(
            "prompt must be a string or a list of token ids (integers in 0..2^32-1)",
            param="prompt",
        )
    if prompt is None:
        raise RequestError("you must provide a prompt", param="prompt")
    raise RequestError(
        "prompt must be a non-empty string or a non-empty list of token ids", param="prompt"
    )


def _parse_messages(messages: object) -> list[Mapping[str, Any]]:
    if messages is None:
        raise RequestError("you must provide messages", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{param} must be an object", param=param)
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise RequestError(
                f"{param}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}",
                param=f"{param}.role",
            )
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if isinstance(content, list) and all(
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
            for part in content
        ):
            continue
        raise RequestError(
            f"{param}.content must be a string or a list of text parts", param=f"{param}.content"
        )
    return messages


def _parse_max_tokens(body: Mapping[str, Any], *, kind: Kind, limit: int) -> int | None:
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int:
            raise RequestError(f"{name} must be an integer", param=name)
        if value < 1:
            raise RequestError(f"{name} must be at least 1, got {value}", param=name)
        if value > limit:
            raise RequestError(f"{name} must be at most {limit}, got {value}", param=name)
        return value
    return COMPLETIONS_DEFAULT_MAX_TOKENS if kind == "completions" else None


async def answer_errors(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    *,
    max_body_bytes: int,
) -> web.StreamResponse:
    """Run `handler`; refusals (bad input, an oversized body, any other HTTP error) become
    4xx answers in OpenAI's error format, so no client ever has to parse an HTML error page."""
    try:
        return await handler(request)
    except RequestError as error:
        return web.json_response(error.body(), status=error.status)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response(
            error_body(
                message=f"request body exceeds {max_body_bytes} bytes",
                error_type="invalid_request_error",
                code="request_too_large",
            ),
            status=413,
        )
    except web.HTTPException as error:
        return web.json_response(
            error_body(message=error.reason, error_type="invalid_request_error"),
            status=error.status,
        )
