"""CLI conventions: --help lists every choice, --version, exit codes (2 usage, 1 runtime), and
no message or document names a command that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from distill import __version__
from distill.cli import _fail, app
from distill.core.exceptions import BrokerError, CheckpointError, ConfigError, DeliveryError, TopicMismatchError

ROOT = Path(__file__).resolve().parents[3]
WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}  # one line per option in the rich help


def invoke(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env=WIDE | env)


@pytest.mark.parametrize(
    ("command", "choices"),
    [
        (["teacher"], ["both|trainer|labeler", "auto|cpu|cuda"]),
        (["produce"], ["synthetic|movielens|file|events", "user|round_robin"]),
        (["up"], ["synthetic|movielens|file"]),
        (["sweep"], ["gain|gain-per-gflop|gain-per-second", "kafka|event", "auto|cpu|cuda"]),
        (["topics"], ["create"]),
    ],
)
def test_help_lists_the_choices(command, choices):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    for listed in choices:
        assert listed in result.output, f"{command} --help does not list {listed}:\n{result.output}"


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"distill {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["teacher", "--role", "boss"],
        ["teacher", "--device", "gpu"],
        ["produce", "kafka"],
        ["produce", "synthetic", "--partitioner", "random"],
        ["sweep", "--candidates", "c.toml", "--objective", "auc"],
        ["up", "--source", "csv"],
        ["student"],  # a required option missing
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(args):
    result = invoke(*args)
    assert result.exit_code == 2, result.output


def test_a_bad_config_is_a_usage_error(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("[teacher]\ndevic = 'cpu'\n")
    result = invoke("check-config", "--config", str(bad))
    assert result.exit_code == 2 and "teacher.devic: unknown key" in result.output
    result = invoke("produce", "events", "--rate", "10")
    assert result.exit_code == 2 and "apply to replays" in result.output


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("x"), 2),
        (TopicMismatchError("x"), 2),
        (BrokerError("x"), 1),
        (DeliveryError("x"), 1),
        (CheckpointError("x"), 1),
    ],
)
def test_runtime_errors_exit_1_config_errors_2(error, code):
    with pytest.raises(typer.Exit) as exited:
        _fail(error)
    assert exited.value.exit_code == code


def test_check_config_never_prints_the_registry_credentials():
    env = {"DISTILL_EVENTS__SCHEMA_REGISTRY__BASIC_AUTH_USER_INFO": "svc:s3cret"}
    result = invoke("check-config", **env)
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output and '"schema_registry"' in result.output


def _named_commands() -> set[tuple[str, ...]]:
    """Every `distill <command> [<word>]` quoted in the code, the docs and the manifests."""
    found = set()
    folders = ["distill", "producers", "teacher_worker", "student_worker", "docs", "deploy", "bench", "examples"]
    files = [ROOT / "README.md"] + [p for f in folders for p in (ROOT / f).rglob("*") if p.is_file()]
    for path in files:
        if path.suffix not in (".py", ".md", ".yaml", ".toml", ".json"):
            continue
        for cmd, word in re.findall(r"`distill ([a-z][a-z-]*)(?: ([a-z][a-z_-]*))?", path.read_text(errors="ignore")):
            found.add((cmd, word) if word else (cmd,))
    return found


def test_every_command_named_in_messages_and_docs_exists():
    named = _named_commands()
    assert ("topics",) in named or ("topics", "create") in named
    for words in sorted(named):
        result = invoke(*words, "--help")
        assert result.exit_code == 0, f"`distill {' '.join(words)}` is named but does not exist:\n{result.output}"


def test_help_texts_keep_their_brackets():
    """Rich reads [x] in a help text as markup: a text that means brackets escapes them."""
    result = invoke("sweep", "--help")
    assert "[[candidates]]" in result.output and "[grid]" in result.output, result.output
