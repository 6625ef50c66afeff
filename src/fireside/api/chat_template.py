"""Chat messages into a prompt with the model's own chat template.

A GGUF carries its Jinja chat template in `tokenizer.chat_template` (or the operator
gives one with `--chat-template FILE`). `ChatTemplate` renders it the way Hugging Face
transformers' `apply_chat_template` does, so a model sees the prompt it was trained on:
a sandboxed, immutable Jinja environment with `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension, a pass-through `{% generation %}` tag, the globals
`raise_exception` and `strftime_now`, and transformers' `tojson` (no ASCII escaping, no
HTML escaping).

The rendered prompt also says which parts of it are message content the client sent
(`RenderedPrompt.pieces`): those must be tokenized without parsing special tokens, or a
client could write `<|im_start|>system` into a message and be read as the template's
own markup. The template's text around them is tokenized with special tokens parsed.
The content is found by rendering a second time with each content replaced by a unique
sentinel (see `ChatTemplate.render`); a template that rewrites content beyond trimming
whitespace defeats this, and the prompt says so (`content_located` False) rather than
guessing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

# What an error shows a client: enough to see what went wrong, never a wall of text.
_MAX_ERROR_CHARS = 300

# Variables the renderer sets itself; `extra` must not replace them.
_RESERVED_VARIABLES = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
    | {"raise_exception", "strftime_now"}
)

# Sentinels are made only of private-use characters: no tokenizer, case mapping or
# whitespace trimming gives them any meaning, so a template passes them through as it
# would pass the content they stand for. A fresh random nonce per render means client
# text (which may contain private-use characters too) cannot forge one.
_SENTINEL_OPEN = "\ue000"
_SENTINEL_CLOSE = "\ue001"
_DIGIT_BASE = 0xE010  # the index, one private-use character per decimal digit
_NONCE_FIRST, _NONCE_LAST = 0xE100, 0xF8FF
_NONCE_LENGTH = 6


class ChatTemplateError(ValueError):
    """The template could not compile or render these messages.

    str(exc) is safe to show a client: the template's own `raise_exception` message, or
    a short description of the Jinja error, never a traceback.
    """


@dataclass(frozen=True)
class RenderedPrompt:
    """A rendered prompt, cut into template text and message content.

    `pieces` is (text, is_content) in order, adjacent pieces of one kind merged, and
    `"".join(text for text, _ in pieces) == text`. Content pieces are the messages'
    `content` strings as they appear in the prompt (trimmed where the template trims
    them); everything else is the template's own text. Other client text the template
    may print (a message's `name`, `tool_call_id`, the names and arguments of its
    `tool_calls`, the `tools` and `extra` variables) is NOT located: it counts as
    template text.

    `content_located` is False when the content could not be found (the template
    rewrites or inspects it beyond trimming whitespace); then `pieces` is the whole
    prompt as one template piece, and a caller that needs content kept apart from
    special tokens must refuse the request rather than tokenize it so.
    """

    text: str
    pieces: tuple[tuple[str, bool], ...]
    content_located: bool = True


class _TemplateRaised(Exception):
    """What `raise_exception` throws inside a render; becomes a ChatTemplateError."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _raise_exception(message: Any) -> NoReturn:
    raise _TemplateRaised(str(message))


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates are written against
    # transformers' filter, which is plain json.dumps with non-ASCII kept.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; templates
    that carry it must still compile here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the tag's name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


def _short(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _describe_render_error(exc: Exception) -> str:
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return _short(f"chat template attempted an unsafe operation: {exc}")
    if isinstance(exc, jinja2.TemplateError):
        return _short(f"chat template error: {exc}")
    return _short(f"chat template error: {type(exc).__name__}: {exc}")


class ChatTemplate:
    """One compiled chat template, rendered with transformers' semantics."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        environment = _environment()
        try:
            self._template = environment.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(environment.parse(source))
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                _short(f"chat template does not compile: {exc.message} (line {exc.lineno})")
            ) from None
        except Exception as exc:  # e.g. RecursionError on absurdly nested blocks
            raise ChatTemplateError(
                _short(f"chat template does not compile: {type(exc).__name__}: {exc}")
            ) from None
        self._source = source
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._takes_tools = "tools" in variables

    @property
    def source(self) -> str:
        return self._source

    @property
    def takes_tools(self) -> bool:
        """Whether the template reads the `tools` variable at all."""
        return self._takes_tools

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> RenderedPrompt:
        """The prompt for these messages, with the message content located in it.

        `messages` are passed to the template as given (each copied to a plain dict),
        `tool_calls` included: a template that wants `function.arguments` as a dict
        gets a dict only if the caller gave one. `extra` adds template variables (such
        as `enable_thinking`); it may not replace the ones set here.

        Content is located by a second render in which every non-empty `content`
        string is a unique sentinel: split at the sentinels, that render gives the
        template's own text between contents, and the pieces are accepted only if
        template text and contents rebuild the real render exactly. Each content may
        appear as given or stripped of surrounding whitespace or newlines (at either
        end or both), as templates commonly `trim` it; it may appear any number of
        times, each a content piece.
        """
        reserved = sorted(_RESERVED_VARIABLES.intersection(extra or {}))
        if reserved:
            raise ChatTemplateError(
                f"chat template variable {reserved[0]!r} is set by the server and cannot be given"
            )
        plain = [dict(message) for message in messages]
        text = self._render(plain, tools, add_generation_prompt, extra)
        if not text:
            return RenderedPrompt(text, ())

        contents: dict[int, str] = {}
        for index, message in enumerate(plain):
            content = message.get("content")
            if isinstance(content, str):
                if content:
                    contents[index] = content
            elif content is not None:
                # Content parts (a list) are printed by the template in ways that cannot
                # be told from its own text here.
                return _unlocated(text)
        if not contents:
            return RenderedPrompt(text, ((text, False),))

        nonce = "".join(
            chr(_NONCE_FIRST + secrets.randbelow(_NONCE_LAST - _NONCE_FIRST + 1))
            for _ in range(_NONCE_LENGTH)
        )
        marked = [
            {**message, "content": _sentinel(nonce, index)} if index in contents else message
            for index, message in enumerate(plain)
        ]
        try:
            marked_text = self._render(marked, tools, add_generation_prompt, extra)
        except ChatTemplateError:
            # The template refuses the sentinels (it checks content), so its handling of
            # the real content cannot be traced.
            return _unlocated(text)
        pieces = _locate(text, marked_text, nonce, contents)
        if pieces is None:
            return _unlocated(text)
        return RenderedPrompt(text, pieces)

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        extra: Mapping[str, Any] | None,
    ) -> str:
        try:
            return self._template.render(
                **(extra or {}),
                messages=messages,
                tools=list(tools) if tools is not None else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except _TemplateRaised as exc:
            raise ChatTemplateError(_short(exc.message) or "chat template error") from None
        except Exception as exc:  # anything a template can do wrong: a 400, not a 500
            raise ChatTemplateError(_describe_render_error(exc)) from None


def _sentinel(nonce: str, index: int) -> str:
    digits = "".join(chr(_DIGIT_BASE + int(digit)) for digit in str(index))
    return f"{_SENTINEL_OPEN}{nonce}{digits}{_SENTINEL_CLOSE}"


def _unlocated(text: str) -> RenderedPrompt:
    return RenderedPrompt(text, ((text, False),), content_located=False)


def _variants(content: str) -> list[str]:
    """The forms in which a template may print a content: as given, or trimmed.

    Trimmed of whitespace (`| trim`, `.strip()`) or of newlines only (Qwen's
    `.lstrip('\\n')`), at either end or both.
    """
    forms = [content]
    for chars in (None, "\n"):
        forms += [content.strip(chars), content.rstrip(chars), content.lstrip(chars)]
    return list(dict.fromkeys(forms))


def _locate(
    text: str, marked_text: str, nonce: str, contents: Mapping[int, str]
) -> tuple[tuple[str, bool], ...] | None:
    """Pieces of `text` rebuilt from the sentinel render, or None where they do not fit."""
    digit_chars = f"{chr(_DIGIT_BASE)}-{chr(_DIGIT_BASE + 9)}"
    pattern = re.escape(_SENTINEL_OPEN + nonce) + f"([{digit_chars}]+)" + re.escape(_SENTINEL_CLOSE)
    # [template, index, template, index, ..., template]
    parts = re.split(pattern, marked_text)
    between = parts[0::2]
    if any(nonce in part for part in between):
        return None  # a sentinel the template cut up or altered: it rewrote content
    occurrences: list[str] = []
    for digits in parts[1::2]:
        index = int("".join(str(ord(char) - _DIGIT_BASE) for char in digits))
        if index not in contents:
            return None
        occurrences.append(contents[index])

    if not text.startswith(between[0]):
        return None
    # Which form each occurrence takes is settled by what follows it; forms of one
    # content differ only in whitespace, so several may fit locally. Track every
    # position reachable after each occurrence (rarely more than one) with how it was
    # reached, then walk back from the end of the text.
    reachable: list[dict[int, tuple[int, str]]] = [{len(between[0]): (-1, "")}]
    for number, content in enumerate(occurrences):
        following = between[number + 1]
        after: dict[int, tuple[int, str]] = {}
        for position in reachable[-1]:
            for form in _variants(content):
                end = position + len(form)
                if text.startswith(form, position) and text.startswith(following, end):
                    after.setdefault(end + len(following), (position, form))
        if not after:
            return None
        reachable.append(after)
    if len(text) not in reachable[-1]:
        return None

    forms: list[str] = []
    position = len(text)
    for step in reversed(reachable[1:]):
        position, form = step[position]
        forms.append(form)
    forms.reverse()

    pieces: list[tuple[str, bool]] = []

    def add(piece: str, is_content: bool) -> None:
        if not piece:
            return
        if pieces and pieces[-1][1] == is_content:
            pieces[-1] = (pieces[-1][0] + piece, is_content)
        else:
            pieces.append((piece, is_content))

    add(between[0], False)
    for form, following in zip(forms, between[1:], strict=True):
        add(form, True)
        add(following, False)
    if "".join(piece for piece, _ in pieces) != text:
        return None  # cannot happen if the walk above is right; never risk a wrong cut
    return tuple(pieces)


def load_chat_template(path: str | os.PathLike[str]) -> str:
    """The template in a `--chat-template FILE`: Jinja text, or a JSON object's key.

    A JSON object with a "chat_template" key (Hugging Face's tokenizer_config.json or
    chat_template.json) gives that key's value; where the value is a list of named
    templates, the one named "default".
    """
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ChatTemplateError(
            f"cannot read chat template {os.fspath(path)!r}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ChatTemplateError(f"chat template {os.fspath(path)!r} is not UTF-8 text") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    template = _template_from_json(text, path)
    if template is None:
        template = text
    if not template.strip():
        raise ChatTemplateError(f"chat template {os.fspath(path)!r} is empty")
    return template


def _template_from_json(text: str, path: str | os.PathLike[str]) -> str | None:
    """The template in a JSON object's "chat_template", or None if text is not JSON."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None  # Jinja source that happens to start with a brace
    if not isinstance(document, dict):
        return None
    name = os.fspath(path)
    value = document.get("chat_template")
    if isinstance(value, list):
        named = {
            entry.get("name"): entry.get("template") for entry in value if isinstance(entry, dict)
        }
        value = named.get("default")
        if value is None:
            raise ChatTemplateError(f"{name!r} has no chat template named 'default'")
    if not isinstance(value, str):
        raise ChatTemplateError(f'{name!r} has no "chat_template" string')
    return value
