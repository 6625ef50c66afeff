"""Tool calling (api/chat_tools.py): the prompt text, the grammars, the parser and its stream.

The grammars are compiled by the engine's own `Grammars` with the embedded model's
vocabulary, and run on token strings from that model's tokenizer, so what is
accepted here is what the engine lets the model write.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from typing import Any

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fireside.api.chat_tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCall,
    ToolCallStream,
    call_text,
    parse_tool_calls,
    tool_grammar,
    tool_result_text,
    tools_system_text,
)
from fireside.engine.grammar import Grammars
from fireside.engine.types import GrammarSpec


def tool(name: str, parameters: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, **extra}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = tool(
    "get_weather",
    {
        "type": "object",
        "properties": {
            # Braces and quotes in a description must not upset the Lark reader.
            "city": {"type": "string", "description": 'a city, e.g. "Paris" {or} }London{'},
            "days": {"type": "integer"},
        },
        "required": ["city"],
    },
    description="The weather in a city.",
)
NOW = tool("now", description="The time.")  # no parameters: takes {}
TOOLS = [WEATHER, NOW]

PARIS = call_text("get_weather", '{"city": "Paris"}')
PARIS_3 = call_text("get_weather", '{"city": "Paris", "days": 3}')
NOW_CALL = call_text("now", "{}")


# -- the grammars, run by the engine's matcher ---------------------------


@pytest.fixture(scope="module")
def grammars() -> Iterator[Grammars]:
    """The engine's grammar compiler on the embedded model's vocabulary."""
    import llama_cpp
    from llguidance.llamacpp import lltokenizer_from_vocab

    from fireside.models import default_model_path
    from fireside.runner.llamacpp import init_backend

    init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(default_model_path()).encode(), params)
    assert model, "could not read the embedded model"
    try:
        # The tokenizer tokenizes through the vocabulary: the model must outlive it.
        with warnings.catch_warnings():  # llguidance reads each token's attributes
            warnings.simplefilter("ignore", DeprecationWarning)  # by an old name
            tokenizer = lltokenizer_from_vocab(llama_cpp.llama_model_get_vocab(model))
        yield Grammars(lambda: tokenizer, num_threads=1)
    finally:
        llama_cpp.llama_model_free(model)


def run(grammars: Grammars, spec: GrammarSpec | None, text: str) -> llguidance.LLMatcher:
    """A matcher for the spec that has consumed the text's tokens, as far as it could."""
    assert spec is not None and spec.kind == "lark"
    matcher = grammars.matcher(grammars.compile(spec))
    for token in grammars.tokenizer.tokenize_str(text):
        if not matcher.consume_token(token):
            break
    return matcher


def accepts(grammars: Grammars, spec: GrammarSpec | None, text: str) -> bool:
    """The whole text is allowed, and the output may end after it."""
    matcher = run(grammars, spec, text)
    return not matcher.is_error() and matcher.is_accepting()


def rejects(grammars: Grammars, spec: GrammarSpec | None, text: str) -> bool:
    """Some token of the text is forbidden."""
    return run(grammars, spec, text).is_error()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("choice", ["auto", "required", "get_weather", "now"])
def test_every_grammar_compiles_and_takes_its_calls(grammars, choice, parallel):
    spec = tool_grammar(TOOLS, choice, parallel)
    assert spec is not None and spec.kind == "lark"
    for name, text in [("get_weather", PARIS), ("get_weather", PARIS_3), ("now", NOW_CALL)]:
        if choice in ("auto", "required") or choice == name:
            assert accepts(grammars, spec, text), text
        else:
            assert rejects(grammars, spec, text), text


def test_the_json_is_compact_as_the_engine_writes_it(grammars):
    spec = tool_grammar(TOOLS, "required", False)
    assert accepts(grammars, spec, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    assert rejects(grammars, spec, '<tool_call>\n{"name":"now","arguments":{}}\n</tool_call>')
    assert rejects(grammars, spec, '<tool_call>\n{ "name": "now", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize(
    "text",
    [
        call_text("get_weather", '{"city": 3}'),  # wrong argument type
        call_text("get_weather", "{}"),  # missing required argument
        call_text("get_weather", '{"days": 3}'),
        call_text("get_weather", '{"city": "Paris", "wind": true}'),  # closed object
        call_text("get_time", "{}"),  # unknown name
        call_text("now", '{"city": "Paris"}'),  # the other function's arguments
        '<tool_call>\n{"arguments": {}, "name": "now"}\n</tool_call>',  # name comes first
        '<tool_call>\n{"name": "now"}\n</tool_call>',  # arguments are required
        '<tool_call>{"name": "now", "arguments": {}}</tool_call>',  # the newlines too
        "<tool_call>\nnot json",
    ],
)
@pytest.mark.parametrize("choice", ["auto", "required"])
def test_malformed_calls_are_rejected(grammars, choice, text):
    assert rejects(grammars, tool_grammar(TOOLS, choice, True), text)


def test_a_call_must_be_closed_before_the_output_ends(grammars):
    spec = tool_grammar(TOOLS, "required", True)
    matcher = run(grammars, spec, PARIS.removesuffix(TOOL_CALL_CLOSE))
    assert not matcher.is_error() and not matcher.is_accepting()


def test_required_takes_no_text(grammars):
    spec = tool_grammar(TOOLS, "required", True)
    assert rejects(grammars, spec, "Hello")
    assert rejects(grammars, spec, "Sure.\n" + PARIS)
    assert rejects(grammars, spec, PARIS + "\nDone.")


def test_a_named_choice_forces_that_function(grammars):
    spec = tool_grammar(TOOLS, "now", True)  # parallel does not apply to a named choice
    assert accepts(grammars, spec, NOW_CALL)
    assert rejects(grammars, spec, PARIS)
    assert rejects(grammars, spec, NOW_CALL + "\n" + NOW_CALL)
    assert rejects(grammars, spec, "It is noon.")


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_parallel_calls_only_when_asked_for(grammars, choice):
    two = PARIS + "\n" + NOW_CALL
    assert accepts(grammars, tool_grammar(TOOLS, choice, True), two)
    assert accepts(grammars, tool_grammar(TOOLS, choice, True), two + "\n")
    assert accepts(grammars, tool_grammar(TOOLS, choice, True), two + "\n" + PARIS_3)
    assert rejects(grammars, tool_grammar(TOOLS, choice, False), two)
    assert rejects(grammars, tool_grammar(TOOLS, choice, True), PARIS + NOW_CALL)  # no newline


def test_one_call_completes_the_grammar(grammars):
    # The matcher stops after the closing tag: the engine ends the sample there.
    for choice in ("required", "get_weather"):
        matcher = run(grammars, tool_grammar(TOOLS, choice, False), PARIS)
        assert matcher.is_accepting() and matcher.is_stopped()
    # With parallel calls, EOS ends it.
    matcher = run(grammars, tool_grammar(TOOLS, "required", True), PARIS)
    assert matcher.is_accepting() and not matcher.is_stopped()
    assert matcher.consume_token(grammars.tokenizer.eos_token) and matcher.is_stopped()


@pytest.mark.parametrize(
    "text",
    [
        "Hello <b>there</b>",
        "",
        "<",
        "<tool",
        "<tool_call",
        "a <tool_response> and </tool_call> are just text",
        'Line one.\n\nLine two: 1 < 2 > 0 {"name": "now"}\n',
        "Grüße, 東京 🌧",
    ],
)
def test_auto_takes_any_text_without_the_opening_tag(grammars, text):
    spec = tool_grammar(TOOLS, "auto", True)
    matcher = run(grammars, spec, text)
    assert not matcher.is_error() and matcher.is_accepting(), text
    assert matcher.consume_token(grammars.tokenizer.eos_token)


@pytest.mark.parametrize("parallel", [False, True])
def test_auto_after_the_opening_tag_only_calls(grammars, parallel):
    spec = tool_grammar(TOOLS, "auto", parallel)
    assert accepts(grammars, spec, PARIS)
    assert accepts(grammars, spec, "Let me look that up.\n" + PARIS)
    assert rejects(grammars, spec, "<tool_call>\nnot json")
    assert rejects(grammars, spec, "<tool_call> is how I call tools")
    assert rejects(grammars, spec, "Let me see. <tool_call>\n{}\n</tool_call>")
    assert rejects(grammars, spec, PARIS + "\nDone.")  # nothing after the calls
    # The first tag counts: text cannot hide a second one after a malformed first.
    assert rejects(grammars, spec, "<tool_call>x " + PARIS)


def test_arguments_may_be_any_json_the_schema_allows(grammars):
    spec = tool_grammar(TOOLS, "get_weather", False)
    for arguments in ['{"city": "Zürich"}', '{"city": "a \\"quoted\\" \\\\ \\n name"}']:
        assert accepts(grammars, spec, call_text("get_weather", arguments)), arguments


def test_references_inside_parameters_still_resolve(grammars):
    located = tool(
        "locate",
        {
            "type": "object",
            "properties": {"place": {"$ref": "#/$defs/Place"}},
            "required": ["place"],
            "$defs": {
                "Place": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "near": {"$ref": "#/$defs/Place"}},
                    "required": ["city"],
                }
            },
        },
    )
    spec = tool_grammar([located, NOW], "required", False)
    good = '{"place": {"city": "Paris", "near": {"city": "Versailles"}}}'
    assert accepts(grammars, spec, call_text("locate", good))
    assert rejects(grammars, spec, call_text("locate", '{"place": {"town": "Paris"}}'))


def test_references_are_rebased_in_properties_named_like_keywords(grammars):
    # A property called "const" is a schema, not a const value.
    odd = tool(
        "odd",
        {
            "type": "object",
            "properties": {"const": {"$ref": "#/$defs/N"}, "enum": {"const": {"$ref": "#/x"}}},
            "required": ["const", "enum"],
            "$defs": {"N": {"type": "integer"}},
        },
    )
    spec = tool_grammar([odd], "odd", False)
    assert accepts(grammars, spec, call_text("odd", '{"const": 3, "enum": {"$ref": "#/x"}}'))
    assert rejects(grammars, spec, call_text("odd", '{"const": "3", "enum": {"$ref": "#/x"}}'))


def test_an_open_parameters_schema_takes_any_object(grammars):
    spec = tool_grammar([tool("log", {"type": "object"})], "log", False)
    assert accepts(grammars, spec, call_text("log", '{"level": 3, "tags": ["a"]}'))
    assert accepts(grammars, spec, call_text("log", "{}"))
    assert rejects(grammars, spec, call_text("log", "[1]"))


def test_calls_written_into_history_are_what_the_grammar_allows(grammars):
    # call_text writes a call exactly as a constrained model would.
    spec = tool_grammar(TOOLS, "required", True)
    history = "\n".join(
        [
            call_text("get_weather", '{"city":"Paris",\n "days":  3}'),
            call_text("now", "{ }"),
        ]
    )
    assert accepts(grammars, spec, history)


def test_none_and_toolless_auto_are_unconstrained():
    assert tool_grammar(TOOLS, "none", True) is None
    assert tool_grammar([], "none", False) is None
    assert tool_grammar([], "auto", True) is None


def test_grammars_are_deterministic():
    assert tool_grammar(TOOLS, "auto", True) == tool_grammar(TOOLS, "auto", True)


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        (TOOLS, "get_time", "get_time"),
        ([WEATHER, WEATHER], "auto", "not unique"),
        ([], "required", "at least one tool"),
        ([{"type": "function"}], "auto", "function must be an object"),
        ([{"type": "function", "function": {"name": ""}}], "auto", "name"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "auto", "type 'function'"),
        ([tool("f", parameters="{}")], "auto", "parameters"),
    ],
)
def test_bad_tools_and_choices_raise_value_error(tools, choice, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tool_grammar(tools, choice, True)


# -- the prompt text -----------------------------------------------------


def test_tools_system_text_lists_the_functions_and_the_format():
    text = tools_system_text(TOOLS)
    assert text == tools_system_text(json.loads(json.dumps(TOOLS)))  # same tools, same text
    listing = text[text.index("<tools>\n") + len("<tools>\n") : text.index("\n</tools>")]
    entries = [json.loads(line) for line in listing.splitlines()]
    assert [e["name"] for e in entries] == ["get_weather", "now"]
    assert entries[0] == {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": WEATHER["function"]["parameters"],
    }
    assert entries[1]["parameters"] == {"type": "object", "properties": {}}
    assert '<tool_call>\n{"name": "<function name>", "arguments": ' in text
    assert "\n</tool_call>" in text


def test_tools_system_text_checks_the_tools():
    with pytest.raises(ValueError, match="not unique"):
        tools_system_text([NOW, NOW])


def test_call_text_is_the_block_format():
    assert (
        PARIS
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert call_text("f", '{"a":[1,2],\n"b":{}}') == (
        '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2], "b": {}}}\n</tool_call>'
    )
    assert call_text("f", "{not json") == (
        '<tool_call>\n{"name": "f", "arguments": {not json}\n</tool_call>'
    )


def test_tool_result_text():
    assert tool_result_text("22 C") == "<tool_response>\n22 C\n</tool_response>"


# -- parsing -------------------------------------------------------------


def calls_of(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_parse_one_call():
    content, calls = parse_tool_calls(PARIS)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "Paris"})]
    (call,) = calls
    assert call.arguments == '{"city": "Paris"}'
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)


def test_parse_several_calls_in_order_with_fresh_ids():
    content, calls = parse_tool_calls(PARIS + "\n" + NOW_CALL + "\n" + PARIS_3 + "\n")
    assert content is None
    assert calls_of(calls) == [
        ("get_weather", {"city": "Paris"}),
        ("now", {}),
        ("get_weather", {"city": "Paris", "days": 3}),
    ]
    assert len({c.id for c in calls}) == 3


def test_parse_text_around_calls():
    content, calls = parse_tool_calls("  Let me check.\n" + PARIS + "\nOne moment. \n")
    assert content == "Let me check.\n\nOne moment."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"})]


def test_parse_plain_text():
    assert parse_tool_calls("Hello <b>there</b>") == ("Hello <b>there</b>", [])
    assert parse_tool_calls("") == (None, [])
    assert parse_tool_calls(" \n ") == (None, [])


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n["now", {}]\n</tool_call>',
        "<tool_call></tool_call>",
    ],
)
def test_malformed_blocks_stay_text(block):
    # A block that never holds a call is text, and so is everything after it: its end
    # is the first closing tag before which it holds a call, and it has none.
    text = block + "\n" + NOW_CALL
    assert parse_tool_calls(text) == (text, [])
    content, calls = parse_tool_calls(NOW_CALL + "\n" + block)
    assert content == block and calls_of(calls) == [("now", {})]


def test_an_unclosed_final_block_stays_text():
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    content, calls = parse_tool_calls(NOW_CALL + "\n" + cut)
    assert content == cut and calls_of(calls) == [("now", {})]


def test_a_closing_tag_inside_a_string_does_not_end_the_block():
    # Constrained decoding lets a string hold anything, the closing tag too.
    text = '<tool_call>\n{"name": "f", "arguments": {"s": ")</tool_call> x"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"s": ")</tool_call> x"})]
    stream = ToolCallStream()
    items = [item for ch in text for item in stream.feed(ch)] + stream.finish()
    assert [(c.name, c.arguments) for c in items] == [(c.name, c.arguments) for c in calls]


def test_arguments_come_back_as_compact_json():
    block = '<tool_call>\n  {"name":"f",\n "arguments":{"x":[1, 2],"s":"é"}}  \n</tool_call>'
    (call,) = parse_tool_calls(block)[1]
    assert call.arguments == '{"x": [1, 2], "s": "é"}'
    # Missing arguments are none; arguments already written as a JSON string are kept.
    (call,) = parse_tool_calls('<tool_call>\n{"name": "f"}\n</tool_call>')[1]
    assert call.arguments == "{}"
    (call,) = parse_tool_calls(
        '<tool_call>\n{"name": "f", "arguments": "{\\"x\\":1}"}\n</tool_call>'
    )[1]
    assert call.arguments == '{"x":1}'


@pytest.mark.parametrize(
    "arguments", ['{"city": "Paris"}', '{"a": [1, {"b": null}], "c": "\\u00e9"}']
)
def test_call_text_round_trips(arguments):
    content, calls = parse_tool_calls(call_text("f", arguments))
    assert content is None
    assert calls_of(calls) == [("f", json.loads(arguments))]


# -- streaming -----------------------------------------------------------


def stream(pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """The content (joined) and the calls (name, arguments) a stream gives for pieces."""
    parser = ToolCallStream()
    items = [item for piece in pieces for item in parser.feed(piece)] + parser.finish()
    assert all(item for item in items)  # never an empty piece of content
    content = "".join(item for item in items if isinstance(item, str))
    return content, [(i.name, i.arguments) for i in items if isinstance(i, ToolCall)]


def parsed(text: str) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parse_tool_calls(text)
    return content or "", [(c.name, c.arguments) for c in calls]


SAMPLES = [
    PARIS,
    PARIS + "\n" + NOW_CALL,
    "Let me check.\n" + PARIS + "\n" + NOW_CALL + "\n",
    "Hello <b>there</b> <tool_c and <tool_call",
    "<tool_call>\nnot json\n</tool_call> then " + NOW_CALL + " and after",
    "  \n" + NOW_CALL + "\n  \n",
    NOW_CALL + "\n" + '<tool_call>\n{"name": "get_weather", "arguments": {"ci',
    "<<tool_call>\n" + '{"name": "f", "arguments": {"x": "</tool"}}' + "\n</tool_call>>",
    "a\n\n b <tool_call>\n{}\n</tool_call>  c  ",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_the_stream_agrees_with_the_parser_over_every_split(text):
    expected = parsed(text)
    assert stream([text]) == expected
    assert stream(list(text)) == expected  # one character at a time
    for i in range(len(text) + 1):
        assert stream([text[:i], text[i:]]) == expected, i


FRAGMENTS = st.sampled_from(
    [
        TOOL_CALL_OPEN,
        TOOL_CALL_CLOSE,
        "<tool",
        "<",
        "_call>",
        "</tool",
        "\n",
        " ",
        "Hi",
        "x>",
        '{"name": "f", "arguments": {"a": 1}}',
        '{"name": "g"}',
        "{bad",
        PARIS,
        NOW_CALL,
    ]
)


@settings(max_examples=300, deadline=None)
@given(fragments=st.lists(FRAGMENTS, max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_the_stream_agrees_with_the_parser_over_random_text(fragments, cuts):
    text = "".join(fragments)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert stream(pieces) == parsed(text)


def test_the_stream_sends_text_at_once_and_holds_only_what_may_be_a_tag():
    parser = ToolCallStream()
    assert parser.feed("Hello") == ["Hello"]
    assert parser.feed(" <b>") == [" <b>"]
    assert parser.feed(" <to") == []  # may be the opening tag
    assert parser.feed("y>") == [" <toy>"]
    assert parser.feed("\n") == []  # whitespace waits for more content
    assert parser.feed("<tool_call>\n{") == []  # a block is held until it closes
    assert parser.feed('"name": "now", "arguments": {}}\n</tool') == []
    (call,) = parser.feed("_call>")
    assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("now", "{}")
    assert parser.feed("\nok") == ["\n\nok"]
    assert parser.feed(" <tool_call>\n{") == []
    assert parser.finish() == [" <tool_call>\n{"]  # an unclosed block is text
