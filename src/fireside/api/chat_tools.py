"""Tool calling for chat completions: the prompt text, the grammar, and the parser.

Models served here write a tool call as one block of text, Hermes-style: the
opening tag on its own line, one JSON object with the function's name and its
arguments, and the closing tag::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Parallel calls are several such blocks, separated by a newline. The JSON is
written as `json.dumps` writes it (", " and ": ", no other whitespace), the same
compact form the engine enforces for `response_format` (engine/grammar.py).

This module holds everything that knows the format:

- `tools_system_text`: the system text that tells a model (whose chat template
  does not take `tools`) which functions it may call and how;
- `call_text` and `tool_result_text`: earlier calls and tool results, written
  into the history for such templates;
- `tool_grammar`: the Lark grammar (llguidance's dialect) that `tool_choice`
  imposes on the output;
- `parse_tool_calls` and `ToolCallStream`: the calls and the remaining content
  of an output, whole or as it streams. Both read blocks the same way, so a
  streamed answer and a non-streamed one agree.

Nothing here imports llama.cpp or llguidance: the grammar is text, compiled by
the engine like any other `GrammarSpec`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fireside.api.structured import close_objects
from fireside.engine.types import GrammarSpec

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
CALL_SEPARATOR = "\n"  # between the blocks of parallel calls

# The engine's JSON options (engine/grammar.py `_JSON_OPTIONS`). A `%json` rule in a
# Lark grammar takes its options from the schema's own `x-guidance` key, not from the
# compile defaults, so they are written into every schema here.
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# A function's parameters go under the root's `$defs` (key `tool_<i>`), so that the
# `#/...` references inside them still resolve: `#` is the root of the whole `%json`
# schema, no longer of the parameters.
_DEFS_KEY = "tool_"
# Keywords whose values are data, not schemas: a "$ref" key there is not a reference.
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})
_SCHEMA_MAP_KEYS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

_SPECIAL_CHOICES = ("none", "auto", "required")


# -- the prompt ------------------------------------------------------------


@dataclass(frozen=True)
class _Function:
    name: str
    description: str | None
    parameters: Mapping[str, Any] | None


def _functions(tools: Sequence[Mapping[str, Any]]) -> list[_Function]:
    """The tools' functions, checked; ValueError says what is wrong (the caller's 400)."""
    functions: list[_Function] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be an object of type 'function'")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise ValueError(f"tools[{i}].function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        if name in seen:
            raise ValueError(f"tools[{i}].function.name {name!r} is not unique")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append(_Function(name, description, parameters))
    return functions


def tools_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system text offering the tools, for a chat template that does not take them.

    Each function is listed as one line of JSON (name, description, parameters, in
    that order and as given), then the call format is shown. The same tools always
    give the same text, so the prompt's prefix stays cacheable across requests.
    """
    lines = []
    for f in _functions(tools):
        entry: dict[str, Any] = {"name": f.name}
        if f.description is not None:
            entry["description"] = f.description
        entry["parameters"] = dict(f.parameters) if f.parameters is not None else _NO_PARAMETERS
        lines.append(json.dumps(entry, ensure_ascii=False))
    listing = "\n".join(lines)
    return (
        "You may call one or more functions to help with the user's request. "
        "The functions are listed as JSON within <tools></tools>:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "To call a function, write its name and its arguments (a JSON object that "
        f"matches its parameters) within {TOOL_CALL_OPEN}{TOOL_CALL_CLOSE}, exactly so:\n"
        f"{TOOL_CALL_OPEN}\n"
        '{"name": "<function name>", "arguments": {"<argument>": <value>}}\n'
        f"{TOOL_CALL_CLOSE}\n"
        "To call several functions, write one such block for each, one after another "
        "on new lines."
    )


def call_text(name: str, arguments: str) -> str:
    """An earlier assistant call as the model would have written it.

    `arguments` is the API's JSON string; it is rewritten compactly (as the grammar
    makes the model write it), or kept as is when it is not JSON. Non-ASCII text
    stays as it is, as the model writes it. Join several with `CALL_SEPARATOR`.
    """
    try:
        args = json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        args = arguments
    body = f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}'
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tool_result_text(content: str) -> str:
    """A tool message's content, as the model is shown it."""
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


# -- the grammar -----------------------------------------------------------


def tool_grammar(
    tools: Sequence[Mapping[str, Any]], choice: str, parallel: bool
) -> GrammarSpec | None:
    """The constraint `tool_choice` puts on the output, as a Lark grammar; None for none.

    `choice` is "none", "auto", "required" or the name of one of the functions (the
    caller resolves OpenAI's `{"type": "function", "function": {"name": ...}}` to
    the name). The three words always mean themselves: a function named "auto" can
    be called under "auto" or "required" but not forced by name.

    - "none": None, the output is free text.
    - "required": the whole output is calls, nothing before or between them but
      the newline that separates them: one call, or with `parallel` one or more.
      Each call's JSON is `{"name": <a tool's name>, "arguments": <that
      function's parameters>}` (anyOf over the functions, the name a const, so
      the name decides the arguments' schema). A function without `parameters`
      takes `{}` only.
    - a function's name: the whole output is exactly one call to that function
      (`parallel` does not apply).
    - "auto": text, or text followed by calls. Text is anything that does not
      contain the opening tag `<tool_call>` ("<", "<b>", "<tool_call" are fine);
      once the tag is written, at the start or after some text, the rest of the
      output must be well-formed calls as under "required". With no tools, "auto"
      is None, as "none".

    The output ends after the last call: without `parallel` the grammar is then
    complete (the matcher stops, and the engine ends the sample); with it, EOS, a
    newline then EOS, or a newline and another call may follow. Calls' JSON is
    compact (", " and ": ", no other whitespace) and objects whose schema lists
    properties allow no other keys (`structured.close_objects`), as for
    `response_format`.

    Raises ValueError for malformed tools, duplicate names, an unknown function
    name, or "required" without tools.
    """
    functions = _functions(tools)
    if choice == "none" or (choice == "auto" and not functions):
        return None
    if choice not in _SPECIAL_CHOICES:
        functions = [f for f in functions if f.name == choice]
        if not functions:
            raise ValueError(f"tool_choice names function {choice!r}, which is not in tools")
        parallel = False
    elif not functions:
        raise ValueError(f"tool_choice {choice!r} needs at least one tool")
    separator = _lark_escape(CALL_SEPARATOR)
    # A newline after the last call may end the output too: a model that writes one
    # out of habit is not then forced into another call.
    more_calls = f' ("{separator}" call)* "{separator}"?' if parallel else ""
    open_tag, close_tag = _lark_escape(TOOL_CALL_OPEN), _lark_escape(TOOL_CALL_CLOSE)
    rules = [
        f'call: "{open_tag}\\n" call_body',
        f'call_body: call_json "\\n{close_tag}"',
        f"call_json: %json {json.dumps(_calls_schema(functions))}",
    ]
    if choice == "auto":
        # TEXT is any text without the tag. The first call's opening tag ends one
        # lexeme with the text before it (TEXT again, so that the first tag is the
        # one that counts); while no tag has been written both alternatives are
        # alive, and the tag kills the first, so the tag commits to calls.
        tag = re.escape(TOOL_CALL_OPEN)
        rules = [
            f"start: TEXT | text_then_open call_body{more_calls}",
            f'text_then_open[lazy]: TEXT "{open_tag}\\n"',
            f"TEXT: /(?s:.*)/ & ~/(?s:.*){tag}(?s:.*)/",
            *rules,
        ]
    else:
        rules.insert(0, f"start: call{more_calls}")
    return GrammarSpec("lark", "\n".join(rules) + "\n")


def _calls_schema(functions: Sequence[_Function]) -> dict[str, Any]:
    """One JSON schema for a call to any of the functions (anyOf, the name as a const)."""
    defs: dict[str, Any] = {}
    alternatives = []
    for i, f in enumerate(functions):
        key = f"{_DEFS_KEY}{i}"
        parameters = f.parameters if f.parameters is not None else _NO_PARAMETERS
        defs[key] = _rebase_refs(close_objects(dict(parameters)), f"#/$defs/{key}")
        alternatives.append(
            {
                "type": "object",
                # Property order is the order written: name first, then arguments.
                "properties": {"name": {"const": f.name}, "arguments": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"x-guidance": _JSON_OPTIONS, "$defs": defs}
    if len(alternatives) == 1:
        schema.update(alternatives[0])
    else:
        schema["anyOf"] = alternatives
    return schema


def _rebase_refs(schema: Any, base: str) -> Any:
    """A copy of the schema whose local references (`#...`) point under `base`."""
    if isinstance(schema, list):
        return [_rebase_refs(s, base) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in _DATA_KEYS:
            out[key] = value
        elif key in _SCHEMA_MAP_KEYS and isinstance(value, dict):
            # Keys here are names (a property may be called "const"); values are schemas.
            out[key] = {name: _rebase_refs(s, base) for name, s in value.items()}
        else:
            out[key] = _rebase_refs(value, base)
    return out


def _lark_escape(text: str) -> str:
    """Text as the inside of a Lark string literal."""
    return json.dumps(text)[1:-1]


# -- the parser ------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    id: str  # "call_" and 24 hex digits
    name: str
    arguments: str  # a JSON string, as the API sends it


StreamItem = str | ToolCall


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _read_call(body: str) -> ToolCall | None:
    """The call a block holds (the text between its tags), or None if it holds none.

    A call is a JSON object with a string `name`; its `arguments` (missing: `{}`)
    are written back as compact JSON, or kept when the model wrote them as a
    string of JSON already.
    """
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            arguments = json.dumps(arguments, ensure_ascii=False)
    else:
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(new_call_id(), value["name"], arguments)


def _close_block(text: str) -> tuple[int, ToolCall] | None:
    """Where the block that `text` opens ends (after its closing tag) and its call: at
    the first closing tag before which the text holds a call. Not simply the first
    closing tag: a string in the arguments may contain one (constrained decoding
    allows any string). None while no closing tag ends a call."""
    close = text.find(TOOL_CALL_CLOSE, len(TOOL_CALL_OPEN))
    while close >= 0:
        call = _read_call(text[len(TOOL_CALL_OPEN) : close])
        if call is not None:
            return close + len(TOOL_CALL_CLOSE), call
        close = text.find(TOOL_CALL_CLOSE, close + 1)
    return None


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output's content and calls, in order; never raises.

    A block is the opening tag, then text up to the first closing tag before which
    it holds a call (a JSON object with a string `name`). Blocks are taken out as
    calls; a block that never holds a call (cut by max_tokens, or not JSON) is
    content text, with everything after it. The content is the remaining text,
    stripped of whitespace at both ends, or None when nothing is left.
    """
    content: list[str] = []
    calls: list[ToolCall] = []
    at = 0
    while (start := text.find(TOOL_CALL_OPEN, at)) >= 0:
        closed = _close_block(text[start:])
        if closed is None:
            break
        content.append(text[at:start])
        calls.append(closed[1])
        at = start + closed[0]
    content.append(text[at:])
    return "".join(content).strip() or None, calls


class ToolCallStream:
    """`parse_tool_calls`, incrementally, for streamed output.

    `feed` takes the next text and returns what can be said now: content text
    (str) and calls (`ToolCall`, whole, once the closing tag has arrived), in
    order. Held back are only a tail that could still become the opening tag ("<",
    "<tool", ...), the text of an open block, and whitespace (see below).
    `finish` returns what is held at the end: an unclosed block is content text.

    The content is trimmed as `parse_tool_calls` strips it: leading whitespace is
    dropped, and whitespace is sent only when more content follows it. So for any
    text, cut into any pieces, the content items joined are exactly the content of
    `parse_tool_calls(text)` ("" where that is None), and the calls are its calls
    (the ids differ: each is new).
    """

    def __init__(self) -> None:
        self._pending = ""  # text not yet sent: a possible opening tag, or an open block
        self._in_block = False  # _pending starts with the opening tag
        self._started = False  # some content other than whitespace has been sent
        self._space = ""  # whitespace after the last content sent, held till more comes

    def feed(self, text: str) -> list[StreamItem]:
        items: list[StreamItem] = []
        self._pending += text
        while True:
            if self._in_block:
                closed = _close_block(self._pending)
                if closed is None:
                    return items  # held: a later closing tag may end a call
                self._pending = self._pending[closed[0] :]
                self._in_block = False
                items.append(closed[1])
            else:
                start = self._pending.find(TOOL_CALL_OPEN)
                if start >= 0:
                    self._content(self._pending[:start], items)
                    self._pending = self._pending[start:]
                    self._in_block = True
                    continue
                keep = _partial_tag_length(self._pending)
                cut = len(self._pending) - keep
                self._content(self._pending[:cut], items)
                self._pending = self._pending[cut:]
                return items

    def finish(self) -> list[StreamItem]:
        """The held text, as content (trailing whitespace is dropped)."""
        items: list[StreamItem] = []
        self._content(self._pending, items)
        self._pending = ""
        self._in_block = False
        self._space = ""
        return items

    def _content(self, text: str, items: list[StreamItem]) -> None:
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept) :]
        if kept:
            items.append(kept)


def _partial_tag_length(text: str) -> int:
    """The length of the longest end of `text` that begins the opening tag."""
    for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if text.endswith(TOOL_CALL_OPEN[:n]):
            return n
    return 0
