"""`ServeConfig` is the one home of every server setting: `fireside serve`'s parser is
made from its fields, its checks name the flags, and the configs below it (engine,
scheduler, runner, serving) have no defaults of their own to disagree with it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import typing

import pytest

from fireside.api.serving import CompletionService
from fireside.cli import build_parser, config_from_args, main
from fireside.config import ServeConfig
from fireside.engine.engine import EngineConfig
from fireside.engine.scheduler import SchedulerConfig
from fireside.runner.llamacpp import LlamaCppConfig

FIELDS = dataclasses.fields(ServeConfig)
KINDS = typing.get_type_hints(ServeConfig)


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch):
    monkeypatch.delenv("FIRESIDE_API_KEYS", raising=False)


def parse(*flags: str) -> ServeConfig:
    return config_from_args(build_parser().parse_args(["serve", *flags]))


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_field_is_a_flag_in_serve_help():
    text = serve_parser().format_help()
    for field in FIELDS:
        flag = field.metadata["flag"]
        assert flag.startswith("--") and flag in text, field.name
        assert field.metadata["help"] in " ".join(text.split()), field.name


def test_serve_has_no_flag_without_a_field():
    flags = {f.metadata["flag"] for f in FIELDS}
    for action in serve_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        # --no-X of a switch is the same flag
        names = {o.replace("--no-", "--") for o in action.option_strings}
        assert names <= flags, action.option_strings
        assert action.dest in {f.name for f in FIELDS}


def test_no_flags_give_the_config_defaults():
    assert parse() == ServeConfig()


def a_new_value(field: dataclasses.Field) -> tuple[list[str], object]:
    """Flags that set the field to something other than its default, and that value."""
    flag, kind, default = field.metadata["flag"], KINDS[field.name], field.default
    if kind is bool:
        return [("--no-" + flag[2:]) if default else flag], not default
    if typing.get_origin(kind) is tuple:
        return [flag, "a=b", flag, "c"], ("a=b", "c")
    if field.metadata["choices"]:
        other = next(c for c in field.metadata["choices"] if c != default)
        return [flag, other], other
    if kind in (int, float):
        return [flag, str(default + 3)], default + 3
    return [flag, "x"], "x"


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_each_flag_sets_its_field_and_only_it(field):
    flags, value = a_new_value(field)
    assert parse(*flags) == dataclasses.replace(ServeConfig(), **{field.name: value})


def test_api_keys_come_from_flags_and_the_environment(monkeypatch):
    monkeypatch.setenv("FIRESIDE_API_KEYS", " k2, ,k3")
    assert parse("--api-key", "k1").api_keys == ("k1", "k2", "k3")


def test_the_defaults_pass_their_own_checks():
    assert ServeConfig().problems() == []


BOUNDED = [f for f in FIELDS if f.metadata["low"] is not None or f.metadata["positive"]]


@pytest.mark.parametrize("field", BOUNDED, ids=lambda f: f.name)
def test_a_value_out_of_bounds_is_one_problem_naming_its_flag(field):
    meta = field.metadata
    below = 0 if meta["positive"] else meta["low"] - 1
    problems = dataclasses.replace(ServeConfig(), **{field.name: below}).problems()
    assert len(problems) == 1 and problems[0].startswith(meta["flag"] + " must be"), problems
    if meta["high"] is not None:
        problems = dataclasses.replace(ServeConfig(), **{field.name: meta["high"] + 1}).problems()
        assert problems == [f"{meta['flag']} must be in {meta['low']}..{meta['high']}"]


def test_every_problem_is_reported_at_once():
    config = ServeConfig(parallel=0, aliases=("x=nothing",), request_timeout=0)
    problems = config.problems()
    assert any(p.startswith("--alias x=nothing") for p in problems)
    assert "--parallel must be in 1..256" in problems
    assert "--request-timeout must be positive" in problems


def test_a_missing_model_file_is_named():
    assert ServeConfig(models=("m=/no/such.gguf",)).problems() == ["m: /no/such.gguf: no such file"]


def test_the_command_line_refuses_bad_values_by_flag(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--parallel", "0", "--shutdown-grace", "-1"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--parallel must be in 1..256" in err and "--shutdown-grace must be 0 or more" in err


# Below ServeConfig, a default would be a second home for a setting: every field is
# passed by server.py. The few knobs that are not server settings are named here.
NOT_SERVER_SETTINGS = {
    LlamaCppConfig: {"verbose"},
    EngineConfig: set(),
    SchedulerConfig: set(),
}


@pytest.mark.parametrize("config", NOT_SERVER_SETTINGS, ids=lambda c: c.__name__)
def test_lower_configs_have_no_defaults_of_their_own(config):
    with pytest.raises(TypeError):
        config()
    defaulted = {
        f.name
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    assert defaulted == NOT_SERVER_SETTINGS[config]


def test_completion_service_takes_every_server_setting_explicitly():
    parameters = inspect.signature(CompletionService.__init__).parameters.values()
    defaulted = {p.name for p in parameters if p.default is not inspect.Parameter.empty}
    # counters: made fresh; the others are API limits, not flags (api/protocol.py MAX_N,
    # api/serving.py MAX_TOTAL_TOKENS).
    assert defaulted == {"counters", "max_prompts", "max_total_tokens"}
    with pytest.raises(TypeError):
        CompletionService({})


def test_deterministic_needs_kv_cells_for_every_sequence_id():
    from fireside.config import ServeConfig

    # 8,192 cells over 16 + 16 ids: 256 each, under the 512 the mode needs.
    problems = ServeConfig(deterministic=True, ctx_size=8192).problems()
    assert any("--deterministic" in p and "--ctx-size 16384" in p for p in problems), problems
    assert ServeConfig(deterministic=True, ctx_size=16384).problems() == []
    assert ServeConfig(deterministic=True).problems() == []  # 2,048 each by default
    assert ServeConfig(ctx_size=8192).problems() == []
    unified = ServeConfig(deterministic=True, kv_unified=True).problems()
    assert any("--kv-unified" in p for p in unified), unified


def test_each_sequence_id_gets_its_share_of_the_cells_unless_they_are_one_pool():
    from fireside.config import ServeConfig

    config = ServeConfig()
    assert config.sequence_ids() == config.parallel + config.prefix_cache == 32
    assert config.cells_per_sequence() == 2048
    assert ServeConfig(ctx_size=1000, parallel=2, prefix_cache=1).cells_per_sequence() == 512
    unified = ServeConfig(kv_unified=True)
    assert unified.sequence_ids() == 128 + unified.prefix_cache  # one per sample of n=128
    assert unified.cells_per_sequence() == unified.ctx_size
