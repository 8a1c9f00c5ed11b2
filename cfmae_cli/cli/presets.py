"""``cfmae presets [NAME]``: list the presets, or print one fully resolved with its derived values."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from cfmae_cli.cli.common import console, guarded
from cfmae_cli.config import batch_plan, derived, dump_config, list_presets, load_config, OptimConfig, preset_task


def describe_derived(info: dict, optim: OptimConfig) -> list[str]:
    """Human-readable lines of the derived values (printed by ``presets`` and at the start of a run)."""
    return [
        f"tokens              {info['num_visible']} visible of {info['tokens_total']} "
        f"({info['tokens_per_modality']} per modality; mask ratio {info['mask_ratio']:.3f})",
        f"effective batch     {info['effective_batch']} = "
        f"{info['effective_batch'] // info['devices'] // info['accumulation_steps']} per device x "
        f"{info['devices']} device(s) x {info['accumulation_steps']} accumulation step(s)",
        f"lr                  {info['lr']:.1e} " + ("(optim.lr, set explicitly)" if optim.lr is not None else
                                                 f"(= base_lr {optim.base_lr:.1e} x {info['effective_batch']} / 256)"),
        f"modalities          {' + '.join(info['modalities'])}",
        f"decoder             {info['decoder']}",
        f"map size            {info['map_size']} x {info['map_size']}",
    ]


@guarded
def presets(
    name: Optional[str] = typer.Argument(None, metavar="NAME", show_default="list the presets",
                                         help="preset name or YAML file to print resolved"),
    gpus: int = typer.Option(1, "--gpus", min=1, metavar="N", help="devices to derive accumulation steps for"),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default="the preset's values",
                                   help="override any config key (repeatable), e.g. --set optim.base_lr=1.5e-4"),
) -> None:
    """List the presets, or print one resolved (YAML) with derived values.

    Example: cfmae presets vitb-400e --gpus 8
    """
    if name is None:
        table = Table("preset", "command", "description", title="cfmae presets")
        for preset, text in list_presets().items():
            table.add_row(preset, preset_task(preset), text)
        console.print(table)
        console.print("Show one with: cfmae presets NAME")
        return
    if preset_task(name) == "finetune":
        from cfmae_cli.eval.config import FinetuneConfig

        cfg = load_config(name, set_, FinetuneConfig)
        console.print(f"# fine-tuning preset {name}, resolved (model.encoder null = the checkpoint's)",
                      highlight=False)
        console.print(dump_config(cfg), highlight=False, end="")
        plan = batch_plan(cfg.optim, cfg.train, gpus)
        console.print(f"# derived (for {gpus} device(s)): lr {plan['lr']:.1e} at effective batch "
                      f"{plan['effective_batch']}, {plan['accumulation_steps']} accumulation step(s)", highlight=False)
        return
    cfg = load_config(name, set_)
    info = derived(cfg, world_size=gpus)
    console.print(f"# preset {name}, resolved", highlight=False)
    console.print(dump_config(cfg), highlight=False, end="")
    console.print(f"# derived (for {gpus} device(s)):", highlight=False)
    for line in describe_derived(info, cfg.optim):
        console.print(f"#   {line}", highlight=False)
