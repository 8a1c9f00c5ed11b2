"""The command line answers at once: its help, `presets` and `--version` import none of the heavy libraries
(torch, numpy, …), which the commands import when they run (issue #18). Times are in benchmarks/bench_cli.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cfmae_cli.cli import canonical

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "numpy", "PIL", "matplotlib", "skimage", "transformers", "safetensors")
PROBE = """
import json, sys
from cfmae_cli.cli import main
sys.argv = ["cfmae", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit:
    pass
print("HEAVY", json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def loaded(*args: str) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(args)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    line = [x for x in proc.stdout.splitlines() if x.startswith("HEAVY ")][-1]
    return json.loads(line[6:]), proc.stdout + proc.stderr


COMMANDS = ["pretrain", "finetune", "label", "pack", "export", "eval-robustness", "reconstruct", "attention-map",
            "bench", "presets"]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["presets"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_presets_and_version_import_no_heavy_library(args) -> None:
    heavy, output = loaded(*args)
    assert heavy == [], f"cfmae {' '.join(args)} imported {heavy}"
    if args == ["--version"]:
        assert output.startswith("cfmae "), output


def test_verbose_is_taken_anywhere_on_the_line_and_old_spellings_work() -> None:
    assert canonical(["pretrain", "--epochs", "2", "-v"]) == ["-v", "pretrain", "--epochs", "2"]
    assert canonical(["--verbose", "presets"]) == ["--verbose", "presets"]
    assert canonical(["presets"]) == ["presets"]
    proc = subprocess.run([sys.executable, "-m", "cfmae_cli", "pretrain", "--preset", "nope", "-v"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unknown preset 'nope'" in proc.stderr


def test_brackets_in_help_and_messages_are_printed() -> None:
    from typer.testing import CliRunner

    from cfmae_cli.cli import app

    result = CliRunner().invoke(app, ["finetune", "--help"])
    text = " ".join(result.output.split())
    assert "[default: the newest pre-training run]" in text and "[default: ft-demo" in text  # not eaten as markup
    # (the style of every command's help: tests/test_help.py)
