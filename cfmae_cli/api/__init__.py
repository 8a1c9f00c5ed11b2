"""cfmae's commands as Python functions (docs/api.md): the same options, defaults, checks and run folders as
the command line, which calls them; no Typer, nothing printed (the lines a command prints go to a
:class:`Report`, by default the ``cfmae_cli.api`` logger).

    from cfmae_cli import api

    summary = api.pretrain(preset="demo", out="runs/pretrain/mine", overrides={"train.epochs": 2})
    result = api.finetune(checkpoint=summary["run_dir"], overrides={"train.epochs": 1})
    scores = api.evaluate(result["run_dir"])          # cfmae finetune --eval-only

Bad input raises :class:`cfmae_cli.errors.CfmaeError` (the commands' exit code 2) with the command's message.
"""

from cfmae_cli.api.evaluate import evaluate
from cfmae_cli.api.export import export
from cfmae_cli.api.robustness import eval_robustness
from cfmae_cli.api.common import AUTO, Report, WorkersFailed
from cfmae_cli.api.training import finetune, pretrain

__all__ = ["AUTO", "Report", "WorkersFailed", "eval_robustness", "evaluate", "export", "finetune", "pretrain"]
