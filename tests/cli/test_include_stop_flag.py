"""`--include-stop-str-in-output / --no-include-stop-str-in-output` reach ServeConfig."""

from __future__ import annotations

from fireside.cli import build_parser, config_from_args


def test_include_stop_str_flag():
    def config(*flags: str):
        return config_from_args(build_parser().parse_args(["serve", *flags]))

    assert config().include_stop_str_in_output is True
    assert config("--no-include-stop-str-in-output").include_stop_str_in_output is False
    assert config("--include-stop-str-in-output").include_stop_str_in_output is True
