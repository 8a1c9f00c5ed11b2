"""The setup phase of benchmarks/gpu_check.sh (standard library only: it runs before anything is installed).

Installs the carried wheels (a folder of ``*.whl``, benchmarks/README.md) into ``--site``, then, for each module the
check needs that still does not import, tries the package index (``--index``; a machine without network fails
in seconds), and writes the phase's result.json: what came from the wheels, what from the index, and what could
not be installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

#: module -> distribution: cfmae's own dependencies (pyproject.toml) and pytest, which the check runs
NEEDED = {"pydantic": "pydantic", "pydantic_core": "pydantic-core", "annotated_types": "annotated-types",
          "typing_inspection": "typing-inspection", "yaml": "pyyaml", "typer": "typer", "rich": "rich",
          "timm": "timm", "skimage": "scikit-image", "safetensors": "safetensors", "tensorboard": "tensorboard",
          "PIL": "pillow", "numpy": "numpy", "torchvision": "torchvision", "matplotlib": "matplotlib",
          "pytest": "pytest"}
#: imported by parts of cfmae the check does not run (COCO evaluation): reported, not required
OPTIONAL = {"pycocotools": "pycocotools"}


def missing(site: Path, modules: dict[str, str]) -> list[str]:
    """The modules of ``modules`` that a fresh interpreter with ``site`` first on its path cannot find."""
    probe = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
             "print(' '.join(m for m in sys.argv[2:] if importlib.util.find_spec(m) is None))")
    out = subprocess.run([sys.executable, "-c", probe, str(site), *modules], capture_output=True, text=True)
    return out.stdout.split()


def pip(*args: str, timeout: float) -> bool:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--no-cache-dir", "--disable-pip-version-check",
           "--upgrade", *args]
    try:
        return subprocess.run(cmd, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, required=True, help="the --target folder (put on PYTHONPATH)")
    parser.add_argument("--wheels", type=Path, required=True, help="folder of carried *.whl files")
    parser.add_argument("--index", action="store_true", help="try the package index for what is still missing")
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    if importlib.util.find_spec("pip") is None:
        print("pip is not there: nothing can be installed", flush=True)
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    installed, refused = [], []
    if wheels:
        target = ["--no-index", "--no-deps", "--target", str(args.site)]
        if pip(*target, *map(str, wheels), timeout=120):
            installed = [w.name.split("-")[0] for w in wheels]
        else:  # one at a time, to name the wheels that do not install (another Python's, two versions of one)
            for w in wheels:
                (installed if pip(*target, str(w), timeout=60) else refused).append(w.name.split("-")[0])
    before = missing(args.site, {**NEEDED, **OPTIONAL})
    from_index: list[str] = []
    if before and args.index:
        dists = [{**NEEDED, **OPTIONAL}[m] for m in before]
        print(f"not importable: {', '.join(before)}; trying the package index for {', '.join(dists)}", flush=True)
        pip("--target", str(args.site), "--timeout", "5", "--retries", "0", *dists, timeout=90)
    after = missing(args.site, {**NEEDED, **OPTIONAL})
    from_index = [m for m in before if m not in after]
    lost = [m for m in after if m in NEEDED]
    parts = [f"wheels: {', '.join(installed) or 'none'}"]
    if refused:
        parts.append(f"wheels that did not install: {', '.join(refused)}")
    if from_index:
        parts.append(f"index: {', '.join(from_index)}")
    if lost:
        parts.append(f"COULD NOT INSTALL: {', '.join(NEEDED[m] for m in lost)} (carry their wheels)")
    if [m for m in after if m in OPTIONAL]:
        parts.append(f"optional, not there: {', '.join(OPTIONAL[m] for m in after if m in OPTIONAL)}")
    if not lost:  # cfmae itself must import, with what was installed
        probe = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(args.site)!r}); "
                                "import cfmae_cli.cli, torch, platform; c = torch.cuda; print(f'cfmae imports; python "
                                "{platform.python_version()}, torch {torch.__version__}, ' + (c.get_device_name(0) + "
                                "f' x {c.device_count()}' if c.is_available() else 'no CUDA'))"],
                               capture_output=True, text=True)
        lines = (probe.stdout + probe.stderr).strip().splitlines()
        parts.insert(0, lines[-1] if probe.returncode == 0 else f"cfmae does not import: {lines[-1] if lines else ''}")
        if probe.returncode:
            lost.append("cfmae_cli")
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps({"result": "FAIL" if lost else "PASS", "numbers": "; ".join(parts)}) + "\n")
    print("; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
