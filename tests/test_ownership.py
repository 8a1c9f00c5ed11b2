"""Folders that cfmae writes are owned while they are written (issue 25): a second writer of a run folder is
refused naming the first (its PID and command) and changes nothing; a lock never outlives its process; a
folder that a run left unfinished loses only cfmae's files, and is refused when it holds anything else; a
stamped output is replaced only by the command that wrote it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cfmae_cli.cli import app
from cfmae_cli.errors import CfmaeError
from cfmae_cli.formats import atomic_write_text, check_output, json_stamp
from cfmae_cli.ownership import HELD_ENV, LOCK_NAME, FolderLock, foreign_files
from cfmae_cli.train.rundir import NO_CHECKPOINT_YET, RUN_FILES, UNFINISHED, claim_run_dir, unfinished_by
from tests.conftest import TINY_OVERRIDES, make_dataset

runner = CliRunner()
SETS = [x for item in TINY_OVERRIDES for x in ("--set", item)]

HOLDER = """
import sys, time
from cfmae_cli.ownership import FolderLock
folder, lock_file = sys.argv[1], (sys.argv[2:] or [None])[0]
sys.argv = ["cfmae", "pretrain", "--out", folder]
FolderLock(folder, lock_file=lock_file).acquire()
print("held", flush=True)
time.sleep(300)
"""


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def hold(folder: Path, lock_file: Path | None = None) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock (as `cfmae pretrain --out FOLDER` would) until killed."""
    env = {k: v for k, v in os.environ.items() if k != HELD_ENV}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), *([str(lock_file)] if lock_file else [])],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def refused(args: list[str], *names: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in text, (name, result.output)
    return text


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pre-training run of 2 epochs (a checkpoint per epoch), and its data beside it."""
    root = tmp_path_factory.mktemp("owned")
    data = make_dataset(root / "data", n_per_class=2)
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(root / "run"), *SETS])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_a_second_writer_is_refused_naming_the_first_and_changes_nothing(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data"
    live = tmp_path / "live"
    live.mkdir()
    (live / "config.yaml").write_text("the first run's\n")  # as if the first had begun to write
    holder = hold(live)
    try:
        before = tree(live)
        text = refused(["pretrain", "--data", data, "--out", live, *SETS], f"--out {live}: in use",
                       f"PID {holder.pid}", "cfmae pretrain --out")
        assert tree(live) == before
        # --resume of a run that another process trains: refused before anything is read or written
        holder_run = hold(run)
        try:
            before = tree(run)
            refused(["pretrain", "--resume", run / "checkpoints" / "epoch-0001.pt"], f"--resume {run}: in use",
                    f"PID {holder_run.pid}")
            assert tree(run) == before
        finally:
            holder_run.kill()
            holder_run.wait()
    finally:
        holder.kill()  # SIGKILL: the process cannot release anything itself
        holder.wait()
    assert "another --out" in text
    lock = FolderLock(live).acquire()  # the kernel released the dead holder's lock: no stale lock
    lock.release()


def test_label_pack_and_export_refuse_an_output_that_another_process_writes(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data"
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(next((data / "rgb").rglob("*.png")), photos / "a.png")
    cases = [(["label", photos, "--out"], tmp_path / "labelled", None),
             (["pack", data, "--size", "32", "--workers", "1", "--out"], tmp_path / "packed", None),
             (["export", run, "--out"], tmp_path / "exported", tmp_path / f".exported.{'cfmae-lock'}")]
    for args, out, lock_file in cases:
        out.mkdir()
        holder = hold(out, lock_file)
        try:
            refused([*args, out], f"--out {out}: in use by another cfmae process", f"PID {holder.pid}")
        finally:
            holder.kill()
            holder.wait()
        assert [p.name for p in out.iterdir()] == ([] if lock_file else [LOCK_NAME])  # nothing written
        runner.invoke(app, [str(a) for a in [*args, out]])  # the holder is gone: the command runs
        assert any(p.name != LOCK_NAME for p in out.iterdir()), args[0]
        assert not (out / LOCK_NAME).exists() and not (lock_file and lock_file.exists())  # removed at the end


def test_workers_of_the_holder_inherit_its_lock_and_others_do_not(tmp_path: Path) -> None:
    probe = ("import sys\nfrom cfmae_cli.ownership import FolderLock\nfrom cfmae_cli.errors import CfmaeError\n"
             "try:\n    lock = FolderLock(sys.argv[1]).acquire()\n    print('inherited' if lock.inherited else 'took')\n"
             "except CfmaeError as exc:\n    print('refused')\n")
    root = Path(__file__).resolve().parents[1]
    with FolderLock(tmp_path) as lock:
        assert lock.fd is not None and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        child = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, cwd=root)
        assert child.stdout.strip() == "inherited", child.stderr
        stranger = {k: v for k, v in os.environ.items() if k != HELD_ENV}
        child = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, cwd=root,
                               env=stranger)
        assert child.stdout.strip() == "refused", child.stderr
        with pytest.raises(CfmaeError, match="in use by another cfmae process"):
            FolderLock(tmp_path).acquire()  # a second lock in one process is a second writer too
    assert HELD_ENV not in os.environ
    child = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, cwd=root)
    assert child.stdout.strip() == "took"


def unfinished(folder: Path, command: str = "pretrain") -> Path:
    """What a run of ``command`` leaves when it stops before it is safe (no checkpoint, no results)."""
    claim = claim_run_dir(command, "x", folder)
    if command == "eval-robustness":
        (folder / "log.txt").write_text("INFO model: …\n")
    else:
        for name in ("config.yaml", "log.txt", "metrics.jsonl", "run.json", "events.out.tfevents.1.vm.2.0"):
            (folder / name).write_text(name)
        (folder / "plots").mkdir()
        (folder / "plots" / "loss.png").write_bytes(b"png")
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / ".last.pt.abc.tmp").write_bytes(b"cut off")
    claim.release()
    return folder


def test_a_reused_run_folder_loses_only_cfmae_files(run: Path, tmp_path: Path) -> None:
    data = run.parent / "data"
    folder = unfinished(tmp_path / "out")
    assert unfinished_by(folder) == "pretrain"
    (folder / "notes.txt").write_text("mine")
    (folder / "plots" / "figure-for-the-paper.pdf").write_text("mine too")
    (folder / "mine").mkdir()
    before = tree(folder)
    refused(["pretrain", "--data", data, "--out", folder, *SETS], "notes.txt", "plots/figure-for-the-paper.pdf",
            "mine/", "nothing was removed")
    assert tree(folder) == before and (folder / "mine").is_dir()
    refused(["finetune", "--data", data, "--checkpoint", run, "--out", folder], "unfinished run of `cfmae pretrain`")
    assert tree(folder) == before
    for name in ("notes.txt", "plots/figure-for-the-paper.pdf"):
        (folder / name).unlink()
    (folder / "mine").rmdir()
    claim = claim_run_dir("pretrain", "x", folder)  # now only the run's own files: cleared, marked again
    try:
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME, UNFINISHED]
    finally:
        claim.release()


def test_an_unfinished_folder_is_taken_by_its_own_command_only(tmp_path: Path) -> None:
    ev = unfinished(tmp_path / "eval", "eval-robustness")  # killed before its results: the rerun is accepted
    claim_run_dir("eval-robustness", "x", ev).release()
    assert not (ev / "log.txt").exists() and unfinished_by(ev) == "eval-robustness"
    with pytest.raises(CfmaeError, match="unfinished run of `cfmae eval-robustness`"):
        claim_run_dir("pretrain", "x", ev)
    assert unfinished_by(ev) == "eval-robustness"
    (ev / UNFINISHED).unlink()  # finished: its results stay
    (ev / "results.json").write_text("{}")
    with pytest.raises(CfmaeError, match="holds the results of a finished run"):
        claim_run_dir("eval-robustness", "x", ev)
    old = tmp_path / "old"  # the mark of an earlier cfmae's training run is still read
    old.mkdir()
    (old / NO_CHECKPOINT_YET).write_text("")
    (old / "log.txt").write_text("")
    claim_run_dir("finetune", "x", old).release()
    assert not (old / NO_CHECKPOINT_YET).exists() and unfinished_by(old) == "finetune"


def test_refused_claim_leaves_a_users_folder_as_it_was(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(CfmaeError, match="holds other files"):
        claim_run_dir("pretrain", "x", folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"]  # no lock file, no mark left behind


def test_foreign_files_sees_what_no_pattern_covers(run: Path, tmp_path: Path) -> None:
    assert foreign_files(run, RUN_FILES["pretrain"]) == []  # every file a real run writes is in the list
    for name in ("config.yaml", "metrics-epoch.csv", "checkpoints/last.pt", "checkpoints/diverged/epoch-0002.pt",
                 "mlruns/0/meta.yaml", "wandb/run-1/files/x", ".run.json.k2j3.tmp", "plots/.loss.png.tmp.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert foreign_files(tmp_path, RUN_FILES["pretrain"]) == []
    (tmp_path / "checkpoints" / "my-notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    os.symlink("/etc/hostname", tmp_path / "link")
    assert foreign_files(tmp_path, RUN_FILES["pretrain"]) == ["checkpoints/my-notes.txt", "empty/", "link"]


def test_a_stamped_output_is_replaced_only_by_its_own_command(run: Path, tmp_path: Path) -> None:
    figure = tmp_path / "f.json"
    atomic_write_text(figure, json.dumps(json_stamp("reconstruct")))
    assert check_output(figure, command="reconstruct") == figure
    with pytest.raises(CfmaeError, match="written by `cfmae reconstruct`, not by `cfmae bench`"):
        check_output(figure, command="bench")
    image = next((run.parent / "data" / "rgb").rglob("*.png"))
    before = tree(run)
    # reconstruct's JSON beside --out RUN/run.png would be the run's record run.json: refused
    refused(["reconstruct", image, "--checkpoint", run, "--out", run / "run.png"], f"{run / 'run.json'}",
            "not by `cfmae reconstruct`")
    plot = sorted((run / "plots").glob("recon-epoch-*.png"))[0]
    refused(["attention-map", image, "--checkpoint", run, "--out", plot], "written by `cfmae pretrain`")
    assert tree(run) == before
