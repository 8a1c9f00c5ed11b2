"""The ``cfmae`` command line: one Typer app, one module per command."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import typer
from cfmae_cli import __version__
from cfmae_cli.cli import common
from cfmae_cli.cli.helptext import HelpCommand, HelpGroup

if TYPE_CHECKING:
    from typer._click.core import Context  # what typer (0.29+, its own copy of click) passes

# Old spellings, per command, kept working (not shown in the help): one vocabulary across the commands.
ALIASES = {"pretrain": {"--init": "--checkpoint"}, "reconstruct": {"--modality": "--modalities"},
           "attention-map": {"--modality": "--modalities", "--images": "--limit"},
           "eval-robustness": {"--root": "--data"}}
VERBOSE = ("-v", "--verbose")


def canonical(args: list[str]) -> list[str]:
    """The command line with ``-v`` / ``--verbose`` moved before the command (where the option lives) and the
    command's old option spellings (:data:`ALIASES`) replaced by the current ones (also ``--old=value``)."""
    flags = [a for a in args if a in VERBOSE]
    rest = [a for a in args if a not in VERBOSE]
    command = next((a for a in rest if not a.startswith("-")), None)
    aliases = ALIASES.get(command or "", {})
    out = []
    for arg in rest:
        name, eq, value = arg.partition("=")
        out.append(aliases[name] + eq + value if name in aliases else arg)
    return flags[:1] + out


COMMAND_LINE = "CFMAE_COMMAND_LINE"  # the user's command line, for run.json (worker processes inherit it)


class _Group(HelpGroup):
    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):  # not a worker of a launcher
            os.environ[COMMAND_LINE] = json.dumps(["cfmae", *args])
        return super().parse_args(ctx, canonical(list(args)))


app = typer.Typer(name="cfmae", cls=_Group, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # help text printed as written: "[default: …]" and brackets stay
                  help="CFMAE: coarse-to-fine masked-autoencoder pre-training of Vision Transformers.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cfmae {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="show tracebacks and debug logs (also "
                                       "accepted after the command)"),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, expose_value=True,
                                       help="print the version and exit")) -> None:
    common.setup(verbose)


from cfmae_cli.cli import bench as _bench  # noqa: E402
from cfmae_cli.cli import export as _export  # noqa: E402
from cfmae_cli.cli import finetune as _finetune  # noqa: E402
from cfmae_cli.cli import label as _label  # noqa: E402
from cfmae_cli.cli import pack as _pack  # noqa: E402
from cfmae_cli.cli import presets as _presets  # noqa: E402
from cfmae_cli.cli import pretrain as _pretrain  # noqa: E402
from cfmae_cli.cli import robustness as _robustness  # noqa: E402
from cfmae_cli.cli import visualise as _visualise  # noqa: E402

# name: (function, its line in `cfmae --help`: one whole sentence that fits 80 columns)
COMMANDS = {
    "attention-map": (_visualise.attention_map, "Draw encoder attention, or measure it over a dataset."),
    "bench": (_bench.bench, "Time the step, masks and data path; count a step's memory."),
    "eval-robustness": (_robustness.eval_robustness, "Score a classifier on ImageNet-A, -R, -Sketch and -C."),
    "export": (_export.export, "Export an encoder or a classifier as a timm model."),
    "finetune": (_finetune.finetune, "Fine-tune a pre-trained encoder, evaluating each epoch."),
    "label": (_label.label, "Pseudo-label images with instance and semantic maps."),
    "pack": (_pack.pack, "Pack a dataset into shards for fast pre-training."),
    "presets": (_presets.presets, "List the presets, or print one resolved."),
    "pretrain": (_pretrain.pretrain, "Pre-train a ViT with CFMAE."),
    "reconstruct": (_visualise.reconstruct, "Draw masked reconstructions and predicted maps."),
}
for _name, (_function, _summary) in COMMANDS.items():
    app.command(_name, cls=HelpCommand, short_help=_summary)(_function)

def main() -> None:
    """The ``cfmae`` program: output that cannot stop the work (:func:`common.protect_streams`); a worker of a
    local launch that ends with its launcher; then the command."""
    common.protect_streams()
    if "RANK" in os.environ:  # a worker of a launcher (torch is imported by every command that has workers)
        from cfmae_cli.train.distributed import die_with_launcher

        die_with_launcher()
    app(prog_name="cfmae")
