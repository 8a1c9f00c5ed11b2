"""``hf-hub:owner/name[@revision]`` wherever weights are read, and ``cfmae export --push-to-hub`` (issue 30).

The hub cache is filled by huggingface_hub's own download code (``snapshot_download``) from a small server on
127.0.0.1 that answers the requests the hub answers (a repository's revision, its file list, each file); then
cfmae reads with ``HF_HUB_OFFLINE=1`` and the server counts that no request reached it. The push goes to the same
server, which answers the hub's repository, pre-upload and commit requests and keeps what was committed: the
real hub (its LFS / Xet upload of large files, its tokens) is not exercised here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from typer.testing import CliRunner

from cfmae_cli import hub
from cfmae_cli.cli import app
from cfmae_cli.config import AlignConfig, check_weights_file, load_config
from cfmae_cli.errors import CfmaeError
from cfmae_cli.eval.config import FinetuneConfig
from cfmae_cli.model.align import Teacher, build_teacher
from cfmae_cli.model.weights import read_weights
from cfmae_cli.viz.inference import load_pretrained
from tests.conftest import make_dataset
from tests.test_align import tiny_teacher
from tests.test_export import _ours
from tests.test_robustness import SYNSETS, make_sketch, tiny_classifier

runner = CliRunner()
FT_SETS = ["data.img_size=32", "data.num_workers=0", "optim.effective_batch=4", "train.batch_size=4",
           "optim.warmup_epochs=1", "train.epochs=1", "train.log_every=1", "train.save_every=1", "train.threads=1"]


class FakeHub:
    """A local stand-in for the hub's HTTP API, enough for huggingface_hub's snapshot_download (revision, tree,
    HEAD / GET of a file) and for create_repo + upload_folder of small files (create, validate-yaml, preupload,
    commit). ``requests`` lists every request it answered; ``created`` and ``commits`` what was pushed."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.revisions: dict[str, dict[str, str]] = {}  # repo → revision name → commit
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def send(self, code: int, body: bytes | Any = b"", headers: dict[str, str] | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = unquote(urlparse(self.path).path)
                fake.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo, what, rev = "/".join(parts[2:4]), parts[4], parts[5]
                    commit = fake.revisions.get(repo, {}).get(rev, rev)
                    if repo not in fake.repos:
                        return self.send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    if commit not in fake.revisions[repo].values():
                        return self.send(404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
                    files = fake.repos[repo]
                    if what == "revision":
                        siblings = [{"rfilename": f} for f in files]
                        return self.send(200, {"id": repo, "sha": commit, "siblings": siblings})
                    if what == "tree":
                        return self.send(200, [{"type": "file", "path": f, "size": len(b),
                                                "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                    data = fake.repos.get(repo, {}).get(name)
                    if data is not None:
                        commit = fake.revisions[repo].get(rev, rev)
                        return self.send(200, data, {"Content-Type": "application/octet-stream",
                                                     "X-Repo-Commit": commit,
                                                     "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
                self.send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

            def do_POST(self) -> None:
                path = urlparse(self.path).path
                fake.requests.append((self.command, path))
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if not self.headers.get("Authorization", "").startswith("Bearer "):  # as the hub answers writes
                    return self.send(401, {"error": "Invalid username or password."}, {"X-Error-Code": "Unauthorized"})
                if path == "/api/repos/create":
                    ask = json.loads(body)
                    fake.created.append(ask)
                    return self.send(200, {"url": f"{fake.url}/{ask['organization']}/{ask['name']}"})
                if path == "/api/validate-yaml":
                    return self.send(200, {"errors": [], "warnings": []})
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    return self.send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                     for f in json.loads(body)["files"]]})
                if parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo = "/".join(parts[2:4])
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    fake.commits[repo] = {x["value"]["path"]: base64.b64decode(x["value"]["content"])
                                          for x in lines if x["key"] == "file"}
                    return self.send(200, {"commitUrl": f"{fake.url}/{repo}/commit/{'c' * 40}",
                                           "commitOid": "c" * 40, "success": True})
                self.send(404, {"error": "not here"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, folder: Path, revisions: tuple[str, ...] = ("main",)) -> None:
        """The files of ``folder`` as the repository ``repo`` (one commit, under the names ``revisions``)."""
        self.repos[repo] = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        commit = hashlib.sha1(repr(sorted(self.repos[repo].items())).encode()).hexdigest()
        self.revisions[repo] = {r: commit for r in revisions}


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A FakeHub and an empty hub cache in tmp_path (huggingface_hub's and the environment's, for subprocesses),
    offline as every test is (conftest), cfmae's memory of resolved specs cleared."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_resolved", {})
    fake = FakeHub()
    yield fake
    fake.server.shutdown()


def download(fake: FakeHub, repo: str, revision: str | None = None) -> Path:
    """huggingface_hub's own snapshot_download of ``repo`` from the fake hub into the cache (online for this call
    alone), as a user's first download with network does."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, endpoint=fake.url))


@contextmanager
def no_requests(fake: FakeHub) -> Iterator[None]:
    """The block reaches the fake hub with no request: it reads the cache alone."""
    before = len(fake.requests)
    yield
    assert fake.requests[before:] == []


def export(checkpoint: Path, out: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(out), *args])
    return result.exit_code, " ".join(result.output.split())


def robustness(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["eval-robustness", *args])
    return result.exit_code, " ".join(result.output.split())


# ----------------------------------------------------------------------------------------------------------
# specs


def test_specs_are_parsed_and_malformed_ones_refused(fake_hub: FakeHub, tmp_path: Path) -> None:
    assert hub.parse_hub("hf-hub:me/tiny") == ("me/tiny", None)
    assert hub.parse_hub("hf-hub:me/tiny.v2@refs/pr/1") == ("me/tiny.v2", "refs/pr/1")
    assert hub.is_hub("hf-hub:me/x") and hub.is_hub(Path("hf-hub:me/x")) and not hub.is_hub("me/x")
    assert hub.local_weights(tmp_path / "a.pt") == tmp_path / "a.pt"  # a local path as it is
    for bad, why in [("hf-hub:tiny", "owner/name"), ("hf-hub:me/tiny/x", "owner/name"), ("hf-hub:me/", "owner/name"),
                     ("hf-hub:me/tiny@", "revision after '@' is empty"), ("hf-hub:me/ti ny", "letters, digits"),
                     ("hf-hub:me/a--b", "no '--'")]:
        with pytest.raises(CfmaeError, match=why) as err:
            hub.parse_hub(bad)
        assert bad in str(err.value) and "hf-hub:owner/name@revision" in str(err.value)
    code, text = robustness("-c", "hf-hub:tiny", "--data", str(tmp_path))
    assert code == 2 and "hf-hub:tiny: not a hub spec (the repository must be owner/name)" in text
    assert fake_hub.requests == []


def test_not_cached_while_offline_and_unknown_repositories_say_what_to_do(fake_hub: FakeHub, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    code, text = robustness("-c", "hf-hub:me/absent", "--data", str(tmp_path))
    assert code == 2 and "hf-hub:me/absent: not in the local cache" in text and "HF_HUB_OFFLINE=1" in text
    assert "download it once with network, or unset HF_HUB_OFFLINE" in text
    code, text = export(Path("hf-hub:me/absent@v3"), tmp_path / "exp")
    assert code == 2 and "hf-hub:me/absent@v3: not in the local cache" in text and not (tmp_path / "exp").exists()
    # online: the fake hub says what is wrong, huggingface_hub raises, cfmae says it in one line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    fake_hub.add("me/there", tiny_teacher(tmp_path / "t"))
    with pytest.raises(CfmaeError, match="hf-hub:me/nothere: no such repository on the hub, or a private one"):
        hub.local_weights("hf-hub:me/nothere")
    with pytest.raises(CfmaeError, match="hf-hub:me/there@nope: the repository has no such revision"):
        hub.local_weights("hf-hub:me/there@nope")


def test_a_repository_of_one_checkpoint_file_and_one_of_several(fake_hub: FakeHub, tmp_path: Path) -> None:
    """A cfmae checkpoint uploaded as it is resolves to that file: read_weights gives what the local file gives,
    and check_weights_file runs its checks with the spec in the message."""
    _, ckpt = _ours(tmp_path / "one")
    fake_hub.add("me/ckpt", tmp_path / "one")
    download(fake_hub, "me/ckpt")
    with no_requests(fake_hub):
        w = read_weights("hf-hub:me/ckpt")
        assert w.format == "cfmae-pretrain" and w.path.name == "ckpt.pt" and w.spec == "hf-hub:me/ckpt"
        assert w.source == "hf-hub:me/ckpt (cfmae-pretrain format)"
        local = read_weights(ckpt)
        assert w.state.keys() == local.state.keys() and all(torch.equal(w.state[k], local.state[k]) for k in w.state)
        assert hub.weights_exist("hf-hub:me/ckpt") and not hub.weights_exist(tmp_path / "none.pt")
        assert hub.stored_spec("hf-hub:me/ckpt") == "hf-hub:me/ckpt"
        assert load_pretrained("hf-hub:me/ckpt", torch.device("cpu")).classes == ["a", "b", "c"]  # reconstruct's
        assert hub.stored_spec(tmp_path / "one" / "." / "ckpt.pt") == str(ckpt.resolve())
    (tmp_path / "two").mkdir()
    for name in ("a.pt", "b.safetensors"):
        (tmp_path / "two" / name).write_bytes((tmp_path / "one" / "ckpt.pt").read_bytes())
    fake_hub.add("me/two", tmp_path / "two")
    download(fake_hub, "me/two")
    with pytest.raises(CfmaeError, match=r"hf-hub:me/two: the repository holds 2 weights files \(a.pt, "
                                         r"b.safetensors\)"):
        check_weights_file("hf-hub:me/two")


# ----------------------------------------------------------------------------------------------------------
# finetune and pretrain from an export on the hub


@pytest.fixture
def encoder_on_hub(fake_hub: FakeHub, tmp_path: Path) -> tuple[FakeHub, Path]:
    """A tiny pre-trained CFMAE exported (`cfmae export`) and published as me/cfmae-tiny, in the cache."""
    _, ckpt = _ours(tmp_path / "pre")
    code, text = export(ckpt, tmp_path / "exp")
    assert code == 0, text
    fake_hub.add("me/cfmae-tiny", tmp_path / "exp", revisions=("main", "v1"))
    download(fake_hub, "me/cfmae-tiny")
    download(fake_hub, "me/cfmae-tiny", "v1")
    return fake_hub, tmp_path / "exp"


def assert_encoder_is(state: dict[str, torch.Tensor], exported: Path) -> None:
    timm_state = load_file(str(exported / "model.safetensors"))
    keys = [k for k in timm_state if k.startswith(("blocks.", "patch_embed.", "cls_token", "norm."))]
    assert keys and all(torch.equal(state[f"encoder.{k}"], timm_state[k]) for k in keys)


def test_finetune_from_the_hub_cache_offline(encoder_on_hub: tuple[FakeHub, Path], tmp_path: Path) -> None:
    """A linear probe keeps the encoder: the fine-tuned checkpoint holds the exported encoder's tensors, read from
    the cache with no request; the run's config keeps the spec, its log names it."""
    from cfmae_cli.eval.finetune import finetune

    fake, exported = encoder_on_hub
    data = make_dataset(tmp_path / "data", n_per_class=4)
    cfg = load_config("ft-demo", [*FT_SETS, f"data.root={data}", "data.val_fraction=0.25",
                                  "model.init=hf-hub:me/cfmae-tiny"], FinetuneConfig, mode="linear")
    with no_requests(fake):
        finetune(cfg, out=tmp_path / "run")
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert_encoder_is(ckpt["model"], exported)
    assert ckpt["config"]["model"]["init"] == "hf-hub:me/cfmae-tiny"
    assert "hf-hub:me/cfmae-tiny (exported format)" in (tmp_path / "run/log.txt").read_text()


def test_finetune_cli_from_the_hub_cache_offline(encoder_on_hub: tuple[FakeHub, Path], tmp_path: Path) -> None:
    """`cfmae finetune -c hf-hub:…` (the command's own check of the checkpoint takes a hub spec)."""
    fake, exported = encoder_on_hub
    data = make_dataset(tmp_path / "data", n_per_class=4)
    sets = [x for item in [*FT_SETS, "data.val_fraction=0.25"] for x in ("--set", item)]
    with no_requests(fake):
        result = runner.invoke(app, ["finetune", "-c", "hf-hub:me/cfmae-tiny@v1", "--mode", "linear", "--data",
                                     str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *sets])
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    assert_encoder_is(ckpt["model"], exported)
    assert ckpt["config"]["model"]["init"] == "hf-hub:me/cfmae-tiny@v1"
    (tmp_path / "ft").mkdir()  # the fine-tuned checkpoint published as it is, then evaluated from the cache
    shutil.copy(tmp_path / "run/checkpoints/best.pt", tmp_path / "ft" / "best.pt")
    fake.add("me/ft-tiny", tmp_path / "ft")
    download(fake, "me/ft-tiny")
    with no_requests(fake):
        result = runner.invoke(app, ["finetune", "--eval-only", "-c", "hf-hub:me/ft-tiny", "--data", str(data),
                                     "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    recorded = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    best = max(r["top1"] for r in recorded if r["type"] == "epoch")
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"]["top1"] == pytest.approx(best, abs=1e-9)


def test_pretrain_init_from_an_export_keeps_the_encoder_and_names_what_starts_fresh(
        encoder_on_hub: tuple[FakeHub, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cfmae_cli.train.pretraining import PretrainTask
    from cfmae_cli.train.distributed import DistInfo

    fake, exported = encoder_on_hub
    data = make_dataset(tmp_path / "data", n_per_class=2)
    from tests.conftest import tiny_config

    cfg = tiny_config(f"data.root={data}", "train.monitor.enabled=false")
    task = PretrainTask(cfg, DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"), bf16=False))
    with no_requests(fake), caplog.at_level("INFO"):
        task.load_weights("hf-hub:me/cfmae-tiny")
    assert_encoder_is(task.model.state_dict(), exported)
    said = caplog.text
    assert "initialised from hf-hub:me/cfmae-tiny (exported format)" in said
    assert "has no weights for adapters.instance, adapters.semantic, decoder" in said and "from random weights" in said


# ----------------------------------------------------------------------------------------------------------
# eval-robustness and the alignment teacher


def test_eval_robustness_reads_a_classifier_from_the_hub_offline(fake_hub: FakeHub, tmp_path: Path) -> None:
    """An exported fine-tuned classifier as -c hf-hub:… and as --model hf-hub:… gives the numbers of its local
    folder, read from the cache with no request, in a subprocess that has only the environment (HF_HUB_OFFLINE,
    HF_HUB_CACHE) to find it."""
    make_sketch(tmp_path / "ood")
    ckpt = tiny_classifier(tmp_path, SYNSETS)
    code, text = export(ckpt, tmp_path / "exp")
    assert code == 0, text
    fake_hub.add("me/classifier", tmp_path / "exp")
    download(fake_hub, "me/classifier")
    common = ["--data", str(tmp_path / "ood"), "--datasets", "sketch", "--workers", "0", "--gpus", "0"]
    code, text = robustness("-c", str(tmp_path / "exp"), *common, "--out", str(tmp_path / "local"))
    assert code == 0, text
    local = json.loads((tmp_path / "local/results.json").read_text())["datasets"]["imagenet-sketch"]
    with no_requests(fake_hub):
        code, text = robustness("-c", "hf-hub:me/classifier", *common, "--out", str(tmp_path / "c"))
        assert code == 0, text
        code, text = robustness("--model", "hf-hub:me/classifier", *common, "--out", str(tmp_path / "m"))
        assert code == 0, text
        assert "timm hub repository hf-hub:me/classifier" in text
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
               "HF_ENDPOINT": "http://127.0.0.1:9", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "cfmae_cli", "eval-robustness", "--model",
                               "hf-hub:me/classifier", *common, "--out", str(tmp_path / "sub")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    for run in ("c", "m", "sub"):
        got = json.loads((tmp_path / run / "results.json").read_text())
        assert got["datasets"]["imagenet-sketch"] == pytest.approx(local)
    assert "hf-hub:me/classifier" in json.loads((tmp_path / "m/results.json").read_text())["model"]
    code, text = robustness("--model", "hf-hub:me/classifier", "-c", str(ckpt), *common)
    assert code == 2 and "brings its own weights; give no --checkpoint" in text


def test_the_alignment_teacher_from_the_hub(fake_hub: FakeHub, tmp_path: Path) -> None:
    """model.align.teacher=hf-hub:… builds the teacher of the local folder (the same features); a timm name with
    model.align.weights=hf-hub:… of a repository holding one state dict too."""
    folder = tiny_teacher(tmp_path / "t")
    fake_hub.add("me/teacher", folder)
    download(fake_hub, "me/teacher")
    (tmp_path / "sd").mkdir()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                              embed_dim=24, depth=1, num_heads=2)
    torch.save(model.state_dict(), tmp_path / "sd" / "weights.pth")
    fake_hub.add("me/state-dict", tmp_path / "sd")
    download(fake_hub, "me/state-dict")
    x = torch.randn(2, 3, 32, 32)
    local = Teacher(AlignConfig(enabled=True, teacher=str(folder)), torch.device("cpu"))
    with no_requests(fake_hub):
        ours = Teacher(AlignConfig(enabled=True, teacher="hf-hub:me/teacher"), torch.device("cpu"))
        assert "vit_tiny_patch16_224 from hf-hub:me/teacher" in ours.describe()
        assert torch.equal(ours(x, 4), local(x, 4))
        module, said = build_teacher(AlignConfig(enabled=True, teacher="vit_tiny_patch16_224",
                                                 weights="hf-hub:me/state-dict"), img_size=32, patch_size=8,
                                     embed_dim=24, depth=1, num_heads=2)
        assert said == "timm vit_tiny_patch16_224 with hf-hub:me/state-dict"
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in module.state_dict().items())
        with pytest.raises(CfmaeError, match="hf-hub:me/state-dict: the repository holds a weights file but no "
                                             "config.json"):
            build_teacher(AlignConfig(enabled=True, teacher="hf-hub:me/state-dict"))


# ----------------------------------------------------------------------------------------------------------
# export --push-to-hub


def test_push_offline_says_so_and_keeps_the_export(tmp_path: Path, fake_hub: FakeHub) -> None:
    _, ckpt = _ours(tmp_path)
    code, text = export(ckpt, tmp_path / "exp", "--push-to-hub", "me/pushed", "--private")
    assert code == 2, text
    assert "--push-to-hub me/pushed: nothing was uploaded; HF_HUB_OFFLINE=1 forbids any request to the hub" in text
    assert f"the export in {tmp_path / 'exp'} is complete" in text
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "exp/README.md").read_text()
    assert "timm.create_model('hf-hub:me/pushed', pretrained=True)" in card and "library_name: timm" in card
    assert fake_hub.requests == []
    for bad, why in [("me", "owner/name"), ("me/x@v1", "main branch")]:
        code, text = export(ckpt, tmp_path / "never", "--push-to-hub", bad)
        assert code == 2 and why in text and not (tmp_path / "never").exists()
    code, text = export(ckpt, tmp_path / "never", "--private")
    assert code == 2 and "give --push-to-hub OWNER/NAME" in text


def test_push_uploads_the_three_files_to_a_hub_server(tmp_path: Path, fake_hub: FakeHub,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Online, against the fake hub: the repository is made private, the commit holds the export's three files
    as written; without a token nothing is sent and the message says how to log in."""
    _, ckpt = _ours(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
    code, text = export(ckpt, tmp_path / "exp", "--push-to-hub", "me/pushed")
    assert code == 2 and "--push-to-hub me/pushed: nothing was uploaded; the hub refused the token" in text, text
    assert "401" in text and "log in with `hf auth login`" in text and "HF_TOKEN" in text
    assert fake_hub.created == [] and (tmp_path / "exp/model.safetensors").is_file()
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    code, text = export(ckpt, tmp_path / "exp", "--push-to-hub", "hf-hub:me/pushed", "--private")
    assert code == 0, text
    assert "uploaded to me/pushed (private)" in text and "timm.create_model('hf-hub:me/pushed'" in text
    assert fake_hub.created == [{"name": "pushed", "organization": "me", "visibility": "private"}]
    assert fake_hub.commits["me/pushed"] == {p.name: p.read_bytes() for p in (tmp_path / "exp").iterdir()}
