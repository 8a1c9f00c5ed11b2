"""How ``cfmae … --help`` reads, one style for every command (issue 26, item 8).

- A value is named by its option's metavar (``N``, ``FOLDER``, ``CKPT``, ``KEY=VALUE`` …), never by a type name:
  a parameter without a metavar is shown by its own name in capitals.
- Every option and argument ends its line with ``[default: …]`` (the value, or the ``show_default`` text that
  says what happens without it; ``off`` for a flag) or ``[required]``. Eager flags (``--help``, ``--version``)
  are actions and show neither. ``show_default=REQUIRED`` marks an option that the command itself requires
  (with a message of its own, where the parser's "Missing option" would say less): ``[required]`` too.
- Allowed ranges are not printed as ``x>=1``: where a range matters, the help says it in words.
- Arguments in the usage line as ``SRC``, ``[NAME]``, ``IMAGE...``.

Only typer is imported here: ``--help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:  # typer (0.29+) runs on its own copy of click: these are the objects it passes
    from typer._click.core import Context, Parameter
    from typer._click.formatting import HelpFormatter

REQUIRED = "required"

# The options that pretrain and finetune declare alike (one declaration, read by both commands).
GPUS = typer.Option(None, "--gpus", min=0, metavar="N", show_default="1 if there is a GPU, else 0",
                    help="GPUs on this machine, one process each (0 = the CPU)")
PROCS = typer.Option(1, "--procs", min=1, metavar="N", help="with --gpus 0: CPU processes (gloo)")
EPOCHS = typer.Option(None, "--epochs", min=1, metavar="N", show_default="the preset's train.epochs",
                      help="epochs to train")
SEED = typer.Option(None, "--seed", metavar="N", show_default="the preset's train.seed", help="random seed")


def default_text(param: Parameter) -> Optional[str]:
    """What ``[default: …]`` says for ``param``; None when it has nothing to say (then its help must)."""
    shown = getattr(param, "show_default", None)
    if isinstance(shown, str):
        return shown
    if getattr(param, "is_flag", False):
        return "on" if param.default else "off"
    value = param.default
    if value is None or callable(value) or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def join_options(opts: Sequence[str]) -> str:
    """An option's spellings as one column entry, shorter prefixes first (``-c, --checkpoint``), as click does."""
    return ", ".join(sorted(opts, key=lambda opt: len(opt) - len(opt.lstrip(opt[:1]))))


def metavar(param: Parameter) -> str:
    return param.metavar or (param.name or "value").upper()


def help_record(param: Parameter) -> Optional[tuple[str, str]]:
    """(the left column, the help with its ``[default: …]`` / ``[required]``) of one parameter; None if hidden."""
    if getattr(param, "hidden", False):
        return None
    is_argument = param.param_type_name == "argument"
    if is_argument:
        name = metavar(param) + ("..." if param.nargs != 1 else "")
    else:
        name = join_options(param.opts)
        if not (getattr(param, "is_flag", False) or getattr(param, "count", False)):
            name += f" {metavar(param)}"
    text = (getattr(param, "help", None) or "").strip()
    if param.required or getattr(param, "show_default", None) == REQUIRED:
        note: Optional[str] = "required"
    elif param.is_eager and getattr(param, "is_flag", False):
        note = None  # --help, --version: actions
    else:
        found = default_text(param)
        note = f"default: {found}" if found is not None else None
    if note:
        text = f"{text}  [{note}]" if text else f"[{note}]"
    return name, text


def usage_piece(param: Parameter) -> str:
    piece = metavar(param)
    if not param.required:
        piece = f"[{piece}]"
    return piece + ("..." if param.nargs != 1 else "")


def _write(ctx: Context, formatter: HelpFormatter) -> None:
    params = ctx.command.get_params(ctx)
    for title, kind in (("Arguments", "argument"), ("Options", "option")):
        rows = [r for p in params if p.param_type_name == kind and (r := help_record(p)) is not None]
        if rows:
            with formatter.section(title):
                formatter.write_dl(rows)


class HelpCommand(TyperCommand):
    """A cfmae command: its help in the style of this module."""

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [usage_piece(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _write(ctx, formatter)


class HelpGroup(TyperGroup):
    """The ``cfmae`` group: its options in the style of this module, its commands in alphabetical order."""

    def list_commands(self, ctx: Context) -> list[str]:
        return sorted(self.commands)

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        _write(ctx, formatter)
        self.format_commands(ctx, formatter)

