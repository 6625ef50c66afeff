"""Chat completions on the completions core: messages in, a completion plan out.

A chat request is a completion of one prompt: the messages rendered with the
model's chat template (chat_template.py), tokenized, and planned and run by the
same code as `POST /completions` (planning.py, running.py). So everything the
completions endpoint does, chat does too, field for field: the prefix cache
(turn k+1's prompt starts with turn k's prompt and answer), `n` at one
prefill, structured output, logprobs, images, speculation, tiers, limits,
metrics and log lines. What is chat's own:

- `ChatPlanner.prepare`: the checks of the conversation as a whole (a tool
  result answers an earlier call, images only for a vision model, content only
  null beside calls), the tools and `tool_choice` (chat_tools.py: the tool
  text for templates that do not take `tools`, the grammar that keeps calls
  well-formed), `prompt_truncate_len`, and `safe_tokenization`;
- the chat shape of the answers: `chat_body` for a whole response and
  `ChatStreamChunks` for a stream, with tool calls parsed out of the text.

Tokenization follows Hugging Face's `apply_chat_template(tokenize=True)`: the
rendered prompt is tokenized without adding BOS, since templates print it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fireside.api import images
from fireside.api.chat_protocol import ChatCompletionRequest
from fireside.api.chat_template import ChatTemplate, ChatTemplateError, RenderedPrompt
from fireside.api.chat_tools import (
    ToolCall,
    ToolCallStream,
    call_text,
    parse_tool_calls,
    tool_grammar,
    tool_result_text,
    tools_system_text,
)
from fireside.api.choices import Choices
from fireside.api.errors import APIError
from fireside.api.metrics import ServingCounters
from fireside.api.plan import Caller, CompletionPlan
from fireside.api.prompts import TOKENIZE_IN_THREAD_CHARS
from fireside.api.protocol import CompletionRequest, SamplingRequest
from fireside.api.responses import CompletionChunkChoice
from fireside.api.running import CompletionResult, IsDisconnected
from fireside.api.serving import CompletionService
from fireside.api.stream_chunks import StreamChunks
from fireside.engine.client import EngineClient
from fireside.engine.types import GrammarSpec

logger = logging.getLogger(__name__)

CHAT_ID_PREFIX = "chatcmpl-"
# Keys a completion choice may carry besides text, finish reason and logprobs; a chat
# choice carries them as they are.
_EXTRA_CHOICE_KEYS = ("prompt_token_ids", "token_ids", "raw_output")


@dataclass(frozen=True)
class ChatPlan:
    """A checked chat request: the completion plan of its rendered prompt, and how
    its output becomes messages."""

    plan: CompletionPlan
    parses_tool_calls: bool  # tools are on: calls are read out of the text

    @property
    def stream(self) -> bool:
        return self.plan.stream


@dataclass
class _Conversation:
    """The messages as the template gets them, and the images they hold (data URIs,
    in marker order)."""

    messages: list[dict[str, Any]]
    image_urls: list[str] = field(default_factory=list)


class ChatPlanner:
    """Chat requests into completion plans. `templates` holds each model's chat
    template, None for a model that has none (chat is then a 400)."""

    def __init__(
        self, service: CompletionService, templates: Mapping[str, ChatTemplate | None]
    ) -> None:
        self.service = service
        self.templates = dict(templates)

    async def prepare(self, request: ChatCompletionRequest, caller: Caller) -> ChatPlan:
        """Check, render and plan; raises `APIError` and submits nothing."""
        engine = self.service.engines.get(request.model)
        if engine is None:
            raise APIError.model_not_found(request.model)
        template = self.templates.get(request.model)
        if template is None:
            raise APIError.invalid(
                f"The model `{request.model}` has no chat template: its file carries none "
                "and the server was started without --chat-template FILE. Use "
                "/v1/completions with a prompt of your own.",
                "messages",
                "no_chat_template",
            )
        tools, choice = _tools_and_choice(request)
        parses_calls = bool(tools) and choice != "none"
        grammar = self._grammar(request, tools, choice) if parses_calls else None
        if parses_calls and request.echo:
            raise APIError.invalid("`echo` is not supported with tools", "echo")
        described = tools if parses_calls and not template.takes_tools else None
        conversation = _conversation(request, engine, described)
        if conversation.image_urls and request.safe_tokenization:
            raise APIError.invalid(
                "`safe_tokenization` is not supported with images", "safe_tokenization"
            )
        template_tools = tools if parses_calls and template.takes_tools else None
        rendered, token_ids = await _render_and_tokenize(
            engine, template, conversation, template_tools, request
        )
        completion = _completion_request(request, rendered.text, conversation, grammar)
        plan = await self.service.planner.prepare(
            completion,
            caller,
            tokenized=None if conversation.image_urls else (token_ids, rendered.text),
            grammar_spec=grammar,
            id_prefix=CHAT_ID_PREFIX,
        )
        return ChatPlan(plan, parses_calls)

    @staticmethod
    def _grammar(
        request: ChatCompletionRequest, tools: list[dict[str, Any]], choice: str
    ) -> GrammarSpec | None:
        if request.response_format is not None and request.response_format.get("type") not in (
            None,
            "text",
        ):
            raise APIError.invalid(
                "`response_format` cannot be combined with tools; use tool_choice 'none' "
                "or leave response_format out",
                "response_format",
            )
        parallel = request.parallel_tool_calls is not False
        try:
            return tool_grammar(tools, choice, parallel)
        except ValueError as exc:
            param = "tools" if choice in ("auto", "required") else "tool_choice"
            raise APIError.invalid(str(exc), param) from None


class ChatService:
    """Plans chat requests (`ChatPlanner`) and runs them on the completions runner."""

    def __init__(
        self, service: CompletionService, templates: Mapping[str, ChatTemplate | None]
    ) -> None:
        self.service = service
        self.planner = ChatPlanner(service, templates)

    async def prepare(self, request: ChatCompletionRequest, caller: Caller) -> ChatPlan:
        return await self.planner.prepare(request, caller)

    async def complete(
        self, chat: ChatPlan, is_disconnected: IsDisconnected | None = None
    ) -> tuple[dict[str, Any], CompletionResult]:
        """The whole answer in the chat shape (and the completion result, for its
        perf-metrics headers); `ClientDisconnected` if the client leaves first."""
        result = await self.service.complete(chat.plan, is_disconnected)
        return chat_body(chat, dict(result.body)), result

    def stream(self, chat: ChatPlan) -> AsyncIterator[bytes]:
        def chunks(
            plan: CompletionPlan, choices: Choices, counters: ServingCounters
        ) -> StreamChunks:
            return ChatStreamChunks(plan, choices, counters, chat.parses_tool_calls)

        return self.service.runner.stream(chat.plan, chunks)


# --- the conversation


def _tools_and_choice(request: ChatCompletionRequest) -> tuple[list[dict[str, Any]], str]:
    """The tools (OpenAI's shape) and the choice: "none", "auto", "required" or a
    function's name. `functions` and `function_call` are the deprecated forms."""
    if request.functions is not None and request.tools is not None:
        raise APIError.invalid("give `tools` or `functions`, not both", "functions")
    if request.function_call is not None and request.tool_choice is not None:
        raise APIError.invalid("give `tool_choice` or `function_call`, not both", "function_call")
    tools: list[dict[str, Any]]
    if request.functions is not None:
        tools = [{"type": "function", "function": dict(f)} for f in request.functions]
    else:
        tools = [dict[str, Any](t) for t in request.tools or []]
    raw: Any = request.tool_choice if request.tool_choice is not None else request.function_call
    param = "tool_choice" if request.tool_choice is not None else "function_call"
    if raw is None:
        choice = "auto" if tools else "none"
    elif isinstance(raw, str):
        choice = "required" if raw == "any" else raw
    else:
        named = raw.get("function") or {}
        name = named.get("name") if isinstance(named, dict) else None
        name = name or raw.get("name")
        if not name:
            raise APIError.invalid("a named tool_choice needs the function's `name`", param)
        choice = name
    if choice != "none" and not tools:
        raise APIError.invalid(f"{param} {choice!r} needs `tools`", param)
    names = {t["function"]["name"] for t in tools}
    if choice not in ("none", "auto", "required") and choice not in names:
        raise APIError.invalid(f"{param} names {choice!r}, which is not among the tools", param)
    return tools, choice


def _conversation(
    request: ChatCompletionRequest,
    engine: EngineClient,
    described: list[dict[str, Any]] | None,
) -> _Conversation:
    """The messages as the template gets them. `described`: tools for a template that
    does not take them, so they are described in the system message and earlier calls
    and results are written as text in the format the model is asked to use."""
    tool_text = described is not None
    conversation = _Conversation([])
    call_ids: set[str] = set()
    for i, message in enumerate(request.messages):
        path = f"messages[{i}]"
        role = "system" if message["role"] == "developer" else message["role"]
        content = _content_text(message.get("content"), role, path, engine, conversation)
        calls = message.get("tool_calls") or []
        if calls and role != "assistant":
            raise APIError.invalid("only assistant messages have tool_calls", f"{path}.tool_calls")
        if content is None and not calls:
            raise APIError.invalid(
                "content may be null only in an assistant message with tool_calls",
                f"{path}.content",
            )
        out: dict[str, Any] = {"role": role, "content": content or ""}
        if message.get("name") is not None:
            out["name"] = message["name"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None or call_id not in call_ids:
                raise APIError.invalid(
                    "a tool message must answer an earlier assistant tool call "
                    "(`tool_call_id` naming one of its ids)",
                    f"{path}.tool_call_id",
                )
            out["tool_call_id"] = call_id
            if tool_text:
                out["content"] = tool_result_text(out["content"])
        if calls:
            call_ids.update(call["id"] for call in calls)
            if tool_text:
                written = "\n".join(
                    call_text(c["function"]["name"], c["function"]["arguments"]) for c in calls
                )
                out["content"] = f"{out['content']}\n{written}" if out["content"] else written
            else:
                out["tool_calls"] = [_template_call(c) for c in calls]
        conversation.messages.append(out)
    if described is not None:
        _add_tools_text(conversation.messages, described)
    return conversation


def _content_text(
    content: Any, role: str, path: str, engine: EngineClient, conversation: _Conversation
) -> str | None:
    """A message's content as one string; image parts become image markers."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        where = f"{path}.content[{j}]"
        if part["type"] == "text":
            if part.get("text") is None:
                raise APIError.invalid("a text part needs `text`", f"{where}.text")
            texts.append(part["text"])
            continue
        url = (part.get("image_url") or {}).get("url")
        if not url:
            raise APIError.invalid("an image_url part needs `image_url.url`", where)
        if not engine.supports_images:
            raise APIError.invalid("model does not accept images", where)
        if role != "user":
            raise APIError.invalid("images go in user messages", where)
        texts.append(images.MARKER)
        conversation.image_urls.append(url)
    return "".join(texts)


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """An earlier call for a template that takes tools: arguments as an object when they
    are JSON (templates print them with `tojson`), as vLLM passes them."""
    arguments: Any = call["function"]["arguments"]
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        arguments = parsed
    return {
        "id": call["id"],
        "type": "function",
        "function": {"name": call["function"]["name"], "arguments": arguments},
    }


def _add_tools_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> None:
    """The tools' description at the end of the system message (a new one if none)."""
    text = tools_system_text(tools)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        first["content"] = f"{first['content']}\n\n{text}" if first["content"] else text
    else:
        messages.insert(0, {"role": "system", "content": text})


async def _render_and_tokenize(
    engine: EngineClient,
    template: ChatTemplate,
    conversation: _Conversation,
    tools: list[dict[str, Any]] | None,
    request: ChatCompletionRequest,
) -> tuple[RenderedPrompt, list[int]]:
    """The rendered prompt and its token ids, the oldest turns dropped while it is longer
    than `prompt_truncate_len`."""
    messages = conversation.messages
    safe = bool(request.safe_tokenization)
    limit = None if safe else request.prompt_truncate_len

    def run() -> tuple[RenderedPrompt, list[int]]:
        nonlocal messages
        while True:
            rendered = _render(template, messages, tools)
            token_ids = _tokenize(engine, rendered, safe)
            if limit is None or len(token_ids) <= limit:
                return rendered, token_ids
            shorter = _drop_oldest_turn(messages)
            if shorter is None:  # only the system prompt and the last message are left
                return rendered, token_ids
            messages = shorter

    text_size = sum(len(m["content"]) for m in messages)
    if text_size > TOKENIZE_IN_THREAD_CHARS or limit is not None:
        return await asyncio.to_thread(run)
    return run()


def _render(
    template: ChatTemplate, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> RenderedPrompt:
    try:
        return template.render(messages, tools=tools, add_generation_prompt=True)
    except ChatTemplateError as exc:
        raise APIError.invalid(
            f"The chat template could not render these messages: {exc}",
            "messages",
            "chat_template_error",
        ) from None


def _tokenize(engine: EngineClient, rendered: RenderedPrompt, safe: bool) -> list[int]:
    if not safe:
        return engine.tokenize(rendered.text, add_special=False)
    if not rendered.content_located:
        raise APIError.invalid(
            "`safe_tokenization` is not possible with this model's chat template: it "
            "rewrites message content, so the content cannot be told from its own text",
            "safe_tokenization",
        )
    token_ids: list[int] = []
    for text, is_content in rendered.pieces:
        token_ids += engine.tokenize(text, add_special=False, parse_special=not is_content)
    return token_ids


def _drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The messages without the oldest user or assistant turn (and the tool results
    that answer it), keeping system messages and the last message; None if nothing is
    left to drop."""
    for i, message in enumerate(messages[:-1]):
        if message["role"] == "system":
            continue
        end = i + 1
        while end < len(messages) - 1 and messages[end]["role"] == "tool":
            end += 1  # results of this turn's calls go with it
        return messages[:i] + messages[end:]
    return None


def _completion_request(
    request: ChatCompletionRequest,
    text: str,
    conversation: _Conversation,
    grammar: GrammarSpec | None,
) -> CompletionRequest:
    """The completion request of the rendered prompt, with the chat request's fields.
    Built without validating again: every field was validated as the chat request's."""
    fields = {name: getattr(request, name) for name in SamplingRequest.model_fields}
    if request.logprobs_format is not None:  # chat's content[] format, whatever was sent
        fields["logprobs"] = True
        fields["top_logprobs"] = request.num_top_logprobs
    if grammar is not None:
        fields["response_format"] = None
    # With images the planner tokenizes the text itself, through the vision projector.
    images_ = conversation.image_urls or None
    return CompletionRequest.model_construct(**fields, prompt=text, images=images_)


# --- the answers


def chat_body(chat: ChatPlan, body: dict[str, Any]) -> dict[str, Any]:
    """A completions response as a chat response."""
    out: dict[str, Any] = {
        "id": body["id"],
        "object": "chat.completion",
        "created": body["created"],
        "model": body["model"],
        "choices": [_message_choice(chat, choice) for choice in body["choices"]],
        "usage": body["usage"],
    }
    if "perf_metrics" in body:
        out["perf_metrics"] = body["perf_metrics"]
    return out


def _message_choice(chat: ChatPlan, choice: Mapping[str, Any]) -> dict[str, Any]:
    text: str = choice["text"]
    calls: list[ToolCall] = []
    content: str | None = text
    if chat.parses_tool_calls:
        content, calls = parse_tool_calls(text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [_call_dict(call) for call in calls]
    elif content is None:
        message["content"] = ""
    out = {
        "index": choice["index"],
        "message": message,
        "finish_reason": _finish_reason(choice["finish_reason"], bool(calls)),
        "logprobs": choice.get("logprobs"),
    }
    out.update({key: choice[key] for key in _EXTRA_CHOICE_KEYS if key in choice})
    return out


def _call_dict(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {} if index is None else {"index": index}
    out |= {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }
    return out


def _finish_reason(reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and reason == "stop" else reason


@dataclass
class _StreamedChoice:
    calls: ToolCallStream | None
    is_started: bool = False
    num_calls: int = 0


class ChatStreamChunks(StreamChunks):
    """A chat stream's chunks: `chat.completion.chunk` events whose choices carry a
    `delta`, the role in each choice's first, then content or `tool_calls` deltas (a
    call goes out whole once its block has closed), the finish reason on the last."""

    def __init__(
        self,
        plan: CompletionPlan,
        choices: Choices,
        counters: ServingCounters,
        parses_tool_calls: bool,
    ) -> None:
        super().__init__(plan, choices, counters)
        self._parses_tool_calls = parses_tool_calls
        self._streamed: dict[int, _StreamedChoice] = {}
        self._is_empty = False  # the last chunk built says nothing (text held back)

    def of(self, choice: CompletionChunkChoice) -> bytes:
        event = super().of(choice)
        # Text held back while a call's block is open makes no delta: no event for it.
        return b"" if self._is_empty else event

    def body(self, choices: list[CompletionChunkChoice]) -> dict[str, Any]:
        plan = self._plan
        return {
            "id": plan.cmpl_id,
            "object": "chat.completion.chunk",
            "created": plan.created,
            "model": plan.model,
            "choices": [self._delta_choice(choice) for choice in choices],
        }

    def _delta_choice(self, choice: CompletionChunkChoice) -> dict[str, Any]:
        index = choice["index"]
        state = self._streamed.get(index)
        if state is None:
            parser = ToolCallStream() if self._parses_tool_calls else None
            state = self._streamed[index] = _StreamedChoice(parser)
        is_last = choice["finish_reason"] is not None
        if state.calls is None:
            items: list[str | ToolCall] = [choice["text"]]
        else:
            items = list(state.calls.feed(choice["text"]))
            if is_last:
                items += state.calls.finish()
        delta: dict[str, Any] = {}
        if not state.is_started:
            delta["role"] = "assistant"
            state.is_started = True
        content = "".join(item for item in items if isinstance(item, str))
        if content or "role" in delta:
            delta["content"] = content
        calls = [item for item in items if isinstance(item, ToolCall)]
        if calls:
            delta["tool_calls"] = [
                _call_dict(call, state.num_calls + k) for k, call in enumerate(calls)
            ]
            state.num_calls += len(calls)
        out: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "finish_reason": _finish_reason(choice["finish_reason"], state.num_calls > 0),
            "logprobs": choice.get("logprobs"),
        }
        extra: Mapping[str, Any] = choice
        out.update({key: extra[key] for key in _EXTRA_CHOICE_KEYS if key in extra})
        self._is_empty = (
            not delta and out["finish_reason"] is None and out["logprobs"] is None and len(out) == 4
        )
        return out


def chat_templates(
    engines: Mapping[str, EngineClient], override: str | None = None
) -> dict[str, ChatTemplate | None]:
    """Each model's chat template: `override` (the `--chat-template FILE` text) for
    every model, else the one its file carries. A model file's template that does not
    compile leaves that model without chat (logged); a bad override is the caller's
    start-up error (`ChatTemplateError`)."""
    templates: dict[str, ChatTemplate | None] = {}
    for name, engine in engines.items():
        info = engine.tokenizer_info()
        tokens = {"bos_token": info.bos_token or "", "eos_token": info.eos_token or ""}
        if override is not None:
            templates[name] = ChatTemplate(override, **tokens)
            continue
        templates[name] = None
        if info.chat_template:
            try:
                templates[name] = ChatTemplate(info.chat_template, **tokens)
            except ChatTemplateError as exc:
                logger.warning("model %s: no chat completions: %s", name, exc)
    return templates
