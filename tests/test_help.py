"""`cfmae --help` and `cfmae COMMAND --help` in one style (issue 26, item 8): values named by metavars, never by
type names; every option and argument with its default (or what happens without it) or [required]; the command
list sorted, one whole sentence per command; one name and one metavar per concept across the commands."""

from __future__ import annotations

import re

import click
import pytest
import typer.main
from typer.testing import CliRunner

from cfmae_cli.cli import app, canonical

GROUP = typer.main.get_command(app)
NAMES = sorted(GROUP.commands)
# type names as typer / click print them when a parameter has no metavar, and click's ranges
LEAKS = re.compile(r"<(int|float|str|path|bool|list|tuple|choice|text)[^>]*>|\{|\b(INTEGER|FLOAT|TEXT|BOOLEAN|"
                   r"FILENAME|DIRECTORY)\b|\bx\s*[<>]=|[<>]=\s*x\b", re.IGNORECASE)
METAVAR = re.compile(r"^[A-Z][A-Z0-9_]*(=[A-Z]+)?(\[,[A-Z]+\.\.\.\])?$")  # N, CKPT, KEY=VALUE, N[,N...]
ACTIONS = {"--help", "--version"}  # eager flags: they do something instead of setting something


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def entries(text: str, section: str) -> list[str]:
    """The rows of a help section, each with its wrapped lines joined: a row starts at a line indented by two
    spaces, its continuation lines are indented further."""
    rows: list[str] = []
    inside = False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside = line.rstrip() == f"{section}:"
            continue
        if not inside or not line.strip():
            continue
        if re.match(r"^  \S", line):
            rows.append(line.strip())
        else:
            rows[-1] += " " + line.strip()
    return rows


@pytest.mark.parametrize("name", ["", *NAMES])
def test_help_names_values_by_metavars_not_types(name: str) -> None:
    text = help_text(*([name] if name else []))
    found = LEAKS.search(text)
    assert not found, f"cfmae {name} --help: a type name or range: {found.group(0)!r}"
    assert "design §" not in text.lower()  # a design section is cited by its file: docs/design.md §x
    assert text.startswith("Usage: cfmae"), text


@pytest.mark.parametrize("name", ["", *NAMES])
def test_every_option_and_argument_states_its_default(name: str) -> None:
    """Each row of the Arguments and Options sections (wrapped lines joined) ends in ``[default: …]`` or
    ``[required]``; --help and --version, which act instead of setting something, are the exceptions."""
    text = help_text(*([name] if name else []))
    rows = [*entries(text, "Arguments"), *entries(text, "Options")]
    assert rows, text
    silent = [r for r in rows if not set(re.split(r"[\s,]+", r)[:2]) & ACTIONS
              and not re.search(r"\[(default: .+|required)\]$", r)]
    assert not silent, f"cfmae {name} --help: options without [default: …] or [required]: {silent}"


def test_every_parameter_has_a_metavar_of_one_style_and_one_per_concept() -> None:
    seen: dict[str, dict[str, str]] = {}
    for name in NAMES:
        command = GROUP.get_command(click.Context(GROUP), name)
        for param in command.params:
            if getattr(param, "hidden", False) or getattr(param, "is_flag", False):
                continue
            where = f"{name} {param.opts[0] if param.param_type_name == 'option' else param.name}"
            assert param.metavar and METAVAR.match(param.metavar), f"{where}: metavar {param.metavar!r}"
            if param.param_type_name == "option":
                seen.setdefault(max(param.opts, key=len), {})[name] = param.metavar
    # one metavar per option name; --out names a FILE or a FOLDER, bench's --workers takes several counts
    allowed = {"--out": {"FILE", "FOLDER"}, "--workers": {"N", "N[,N...]"}}
    for option, by_command in seen.items():
        assert set(by_command.values()) <= allowed.get(option, set()) or len(set(by_command.values())) == 1, \
            f"{option}: {by_command}"
    assert {seen["--checkpoint"][c] for c in seen["--checkpoint"]} == {"CKPT"}
    assert set(seen["--set"]) == {"pretrain", "finetune", "presets", "bench"}  # the commands with a config
    assert set(seen["--set"].values()) == {"KEY=VALUE"}


def test_commands_are_sorted_with_whole_one_line_sentences() -> None:
    rows = entries(help_text(), "Commands")
    lines = [line for line in help_text().split("Commands:")[1].splitlines() if line.strip()]
    assert len(lines) == len(rows) == len(NAMES), "a description wraps onto a second line at 80 columns"
    names = [row.split()[0] for row in rows]
    assert names == sorted(names) == NAMES
    for row in rows:
        summary = row.split(None, 1)[1]
        assert summary.endswith(".") and not summary.endswith("..."), row
        assert summary.count("(") == summary.count(")"), row


def test_the_image_limit_is_limit_everywhere() -> None:
    limiting = {name for name in NAMES
                for p in GROUP.get_command(click.Context(GROUP), name).params
                if p.param_type_name == "option" and re.search(r"\b(first|at most) N images\b", p.help or "")}
    assert limiting == {"label", "eval-robustness", "attention-map"}
    for name in limiting:
        options = {o for p in GROUP.get_command(click.Context(GROUP), name).params for o in getattr(p, "opts", [])}
        assert "--limit" in options and "--images" not in options, name
    # the old spelling still works (hidden)
    assert canonical(["attention-map", "--stats", "d", "--images", "5"])[-2:] == ["--limit", "5"]
    assert canonical(["attention-map", "--images=5"])[-1] == "--limit=5"
    assert "--images" not in help_text("attention-map")


def test_bench_workers_takes_one_count_or_several_and_refuses_others(tmp_path) -> None:
    for bad in ("x", "1,,2", "-1", "1.5"):  # refused at once (exit 2), before torch is imported
        result = CliRunner().invoke(app, ["bench", "--what", "data", "--device", "cpu", "--compare", "none",
                                          "--workers", bad, "--out", str(tmp_path / "b.json")])
        assert result.exit_code == 2 and "--workers" in result.output, result.output
    from cfmae_cli.cli.bench import worker_counts

    assert worker_counts("0") == [0] and worker_counts("1, 4,16") == [1, 4, 16]
