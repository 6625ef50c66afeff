"""The chat endpoint's own checks and shapes, on the fake engine (the real model's
behaviour is tests/e2e/test_chat.py's)."""

from __future__ import annotations

import dataclasses
import json

from .helpers import MODEL, assert_error

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}


def post(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, **body})


def user(text):
    return [{"role": "user", "content": text}]


def test_a_model_without_a_template_is_400_and_completions_still_work(make_client, engine):
    engine.tokenizer = dataclasses.replace(engine.tokenizer, chat_template=None)
    client = make_client()
    assert_error(post(client, messages=user("hi")), 400, "messages", "no_chat_template")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200


def test_a_server_template_replaces_the_models(make_client):
    client = make_client(chat_template="[{{ messages[0].content }}]")
    out = post(client, messages=user("hi"), max_tokens=1, raw_output=True).json()
    assert out["choices"][0]["raw_output"]["prompt_fragments"] == ["[hi]"]


def test_chat_answers_have_the_chat_shape(client):
    out = post(client, messages=user("hello world"), max_tokens=2).json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert set(out["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_a_stream_starts_with_the_role_and_ends_with_done(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL, "messages": user("hello"), "max_tokens": 3, "stream": True},
    ) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] is not None


def test_tool_checks(client):
    cases = [
        ({"tools": [TOOL], "functions": [TOOL["function"]]}, "functions"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"tools": [TOOL], "echo": True}, "echo"),
        ({"tools": [TOOL], "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [TOOL, TOOL]}, "tools"),  # duplicate names
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
    ]
    for fields, param in cases:
        assert_error(post(client, messages=user("hi"), **fields), 400, param)


def test_tool_choice_sends_a_grammar_and_none_sends_none(client, engine):
    post(client, messages=user("hi"), tools=[TOOL], tool_choice="required", max_tokens=1)
    assert engine.grammar_specs[-1].kind == "lark"
    count = len(engine.grammar_specs)
    post(client, messages=user("hi"), tools=[TOOL], tool_choice="none", max_tokens=1)
    assert len(engine.grammar_specs) == count


def test_message_checks(client):
    cases = [
        ([{"role": "assistant", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": "x", "tool_calls": []}, *user("y")], None),
        (
            [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [
                        {
                            "id": "a",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                }
            ],
            "messages[0].tool_calls",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": "x", "extra": 1}], "messages[0].extra"),
    ]
    for messages, param in cases:
        r = post(client, messages=messages, max_tokens=1)
        if param is None:
            assert r.status_code == 200, r.text
        else:
            assert_error(r, 400, param)
