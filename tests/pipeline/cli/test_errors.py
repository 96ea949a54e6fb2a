"""The command line's error contract: a `MaskdietError` is one red line and exit code 2; anything else is a
bug: exit code 1 with a line that says so, and its traceback with -v (never dressed up as a user error)."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.common import VerboseOption, command_context
from pipeline.core.errors import MaskdietError


def _app_raising(error: Exception) -> typer.Typer:
    """A one-command app in the same frame as every maskdiet command."""
    probe = typer.Typer()

    @probe.command()
    def fail(verbose: VerboseOption = False) -> None:
        with command_context(verbose):
            raise error

    @probe.command()
    def other() -> None:  # two commands, so typer keeps `fail` as a subcommand name
        pass

    return probe


def test_a_user_error_is_one_line_with_exit_code_2(tmp_path) -> None:
    out = CliRunner().invoke(app, ["demo-data", str(tmp_path / "d"), "--noise", "1.5"])
    assert out.exit_code == 2, out.output
    assert "error:" in out.output and "--noise must be in [0, 1)" in out.output
    assert "Traceback" not in out.output


def test_maskdiet_error_subclasses_keep_exit_code_2_even_with_verbose() -> None:
    out = CliRunner().invoke(_app_raising(MaskdietError("bucket missing: create it")), ["fail", "-v"])
    assert out.exit_code == 2 and "bucket missing: create it" in out.output


def test_any_other_exception_is_a_bug_not_a_user_error() -> None:
    """A ValueError from an internal check used to print as if the user had erred, with no way to see where."""
    out = CliRunner().invoke(_app_raising(ValueError("shapes (3,) and (4,) differ")), ["fail"])
    assert out.exit_code == 1
    assert "internal error" in out.output and "ValueError: shapes (3,) and (4,) differ" in out.output
    assert "-v" in out.output  # says how to see the traceback


def test_verbose_shows_the_bug_with_its_traceback() -> None:
    out = CliRunner().invoke(_app_raising(KeyError("state")), ["fail", "-v"])
    assert out.exit_code == 1
    assert isinstance(out.exception, KeyError)  # propagated: Python prints the traceback
    assert out.exc_info is not None and out.exc_info[2] is not None
