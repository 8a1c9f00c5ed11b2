"""The ``cfmae`` command line: one Typer app, one module per command."""

from __future__ import annotations

import typer

from cfmae_cli import __version__
from cfmae_cli.cli import common

app = typer.Typer(name="cfmae", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="CFMAE: coarse-to-fine masked-autoencoder pre-training of Vision Transformers.")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="show tracebacks and debug logs"),
          version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        typer.echo(f"cfmae {__version__}")
        raise typer.Exit(0)
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

app.command("bench")(_bench.bench)
app.command("export")(_export.export)
app.command("finetune")(_finetune.finetune)
app.command("label")(_label.label)
app.command("pack")(_pack.pack)
app.command("pretrain")(_pretrain.pretrain)
app.command("presets")(_presets.presets)
app.command("eval-robustness")(_robustness.eval_robustness)
app.command("reconstruct")(_visualise.reconstruct)
app.command("attention-map")(_visualise.attention_map)


def main() -> None:
    app()
