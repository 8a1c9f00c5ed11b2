"""Export to timm, and weights from MAE / MultiMAE / other-size / broken files."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from cfmae_cli.checkpoints import save_checkpoint
from cfmae_cli.cli import app
from cfmae_cli.config import load_config
from cfmae_cli.model import CFMAE
from cfmae_cli.model.convert import detect_format, to_cfmae
from tests.conftest import TINY_OVERRIDES, tiny_config

runner = CliRunner()


def _ours(tmp_path: Path, *extra: str) -> tuple[CFMAE, Path]:
    torch.manual_seed(0)
    cfg = tiny_config(*extra)
    model = CFMAE.from_config(cfg, 3)
    with torch.no_grad():  # non-trivial norms and tokens so that a wrong mapping shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.model_dump(mode="json"),
                           "semantic_classes": ["a", "b", "c"]})
    return model, path


def test_exported_encoder_gives_the_same_features_in_timm(tmp_path: Path) -> None:
    model, path = _ours(tmp_path)
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    timm_model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                                   **config["model_args"]).eval()  # strict key matching
    x = torch.randn(2, 3, 32, 32)
    ours = model.encoder(model.encoder.patch_embed(x) + model.encoder.patch_pos)
    with torch.no_grad():
        theirs = timm_model.forward_features(x)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("size, name", [(["model.embed_dim=384", "model.depth=12", "model.num_heads=6",
                                           "model.patch_size=16", "model.map_stride=4", "data.img_size=64",
                                           "masking.num_visible=8"],
                                          "vit_small_patch16_224"),
                                         ([], "vit_tiny_patch16_224")])
def test_export_names_the_timm_architecture_of_its_size(size: list[str], name: str, tmp_path: Path) -> None:
    """A ViT-S-sized encoder is exported as timm's vit_small_patch16_224; the demo's width 128 (no standard
    size) as the nearest, tiny; timm builds either from the name and model_args and loads it strictly, and from
    the folder with the printed call, whose preprocessing (timm's resolve_data_config + create_transform) gives
    a photo the encoder takes (before: 224 px, which the demo's 64 px encoder refused)."""
    cfg = load_config("demo", size)
    model = CFMAE.from_config(cfg, 3)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.model_dump(mode="json"),
                           "semantic_classes": ["a", "b", "c"]})
    result = runner.invoke(app, ["export", str(path), "--out", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["architecture"] == name
    printed = result.output.strip().splitlines()[-1]
    assert printed == f"timm.create_model('local-dir:{tmp_path / 'export'}', pretrained=True)"
    loaded = eval(printed, {"timm": timm})  # noqa: S307 (the line the command prints for the user to run)
    data, transform = _preprocessing(loaded)
    assert tuple(data["input_size"]) == (3, cfg.data.img_size, cfg.data.img_size)
    with torch.no_grad():
        assert loaded.eval().forward_features(transform(_photo())[None]).shape[-1] == cfg.model.embed_dim
    timm_model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / "export/model.safetensors")),
                                   **config["model_args"])
    assert timm_model.embed_dim == cfg.model.embed_dim and len(timm_model.blocks) == cfg.model.depth


def _mae_state(model: CFMAE) -> dict[str, torch.Tensor]:
    enc = {k: v for k, v in model.encoder.state_dict().items()}
    return {**enc, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32)}


def multimae_sincos(h: int, w: int, dim: int) -> torch.Tensor:
    """MultiMAE's fixed table, written out after ``build_2d_sincos_posemb`` (EPFL-VILAB/MultiMAE,
    multimae/multimae_utils.py): ``torch.meshgrid(grid_w, grid_h)`` ('ij'), channels [sin, cos] of the first
    grid then of the second, then ``rearrange('b (h w) d -> b d h w')``. Shape (1, D, h, w)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    flat = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # ((h w), d)
    out = torch.empty(1, dim, h, w)
    for k in range(h * w):  # '(h w) -> h w': flat index k is row k // w, column k % w
        out[0, :, k // w, k % w] = flat[k]
    return out


def _multimae_state(dim: int = 32, depth: int = 2, patch: int = 8, grid: int = 4, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """A MultiMAE checkpoint's model dict in MultiMAE's own layout and formula, with random weights: blocks
    ``encoder.{i}.*`` (the same parameters as timm's ``Block``), the RGB adapter's patch projection and
    sin-cos table, global tokens, and an output adapter (dropped by the conversion)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [timm.models.vision_transformer.Block(dim, 2, qkv_bias=True) for _ in range(depth)]
    out = {f"encoder.{i}.{k}": 0.2 * torch.randn(v.shape, generator=gen) + (1.0 if k.endswith("norm1.weight") or
                                                                          k.endswith("norm2.weight") else 0.0)
           for i, b in enumerate(blocks) for k, v in b.state_dict().items()}
    out.update({"input_adapters.rgb.proj.weight": 0.1 * torch.randn(dim, 3, patch, patch, generator=gen),
                "input_adapters.rgb.proj.bias": 0.1 * torch.randn(dim, generator=gen),
                "input_adapters.rgb.pos_emb": multimae_sincos(grid, grid, dim),
                "global_tokens": torch.randn(1, 1, dim, generator=gen),
                "output_adapters.rgb.out_proj.weight": torch.randn(48, dim, generator=gen)})
    return out


def multimae_patch_tokens(state: dict[str, torch.Tensor], x: torch.Tensor, depth: int = 2) -> torch.Tensor:
    """MultiMAE's encoder on RGB alone, as its forward does it: patch tokens row by row with the table added,
    the global token after them, the blocks; returns the patch tokens (B, N, D) in row-major order."""
    feat = torch.nn.functional.conv2d(x, state["input_adapters.rgb.proj.weight"], state["input_adapters.rgb.proj.bias"],
                                      stride=state["input_adapters.rgb.proj.weight"].shape[-1])
    pos = state["input_adapters.rgb.pos_emb"]
    _, _, gh, gw = feat.shape
    tokens = torch.stack([feat[:, :, r, c] + pos[:, :, r, c] for r in range(gh) for c in range(gw)], dim=1)
    h = torch.cat([tokens, state["global_tokens"].expand(x.shape[0], -1, -1)], dim=1)
    for i in range(depth):
        block = timm.models.vision_transformer.Block(tokens.shape[-1], 2, qkv_bias=True)
        block.load_state_dict({k.removeprefix(f"encoder.{i}."): v for k, v in state.items()
                               if k.startswith(f"encoder.{i}.")})
        h = block.eval()(h)
    return h[:, : gh * gw]


def test_multimae_weights_keep_the_positions_they_were_trained_with() -> None:
    """A MultiMAE encoder loaded as the initial weights of a classifier computes MultiMAE's patch features:
    MultiMAE's sin-cos halves are in the other order than ours (row first), so its own table must come along."""
    from cfmae_cli.eval.classifier import ViTClassifier, load_encoder_weights
    from cfmae_cli.model.weights import arch_from_state

    state = _multimae_state()
    assert detect_format(state) == "multimae"
    converted = to_cfmae(state)
    arch, _ = arch_from_state(converted)
    model = ViTClassifier(arch.model_copy(update={"num_heads": 2}), 32, 5, ["rgb"]).eval()
    load_encoder_weights(model, converted, "multimae.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encoder(model.encoder.patch_embed(x) + model.encoder.patch_pos)[:, 1:]  # avg pool: no norm
        theirs = multimae_patch_tokens(state, x)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("layout", ["mae", "multimae"])
def test_init_from_mae_and_multimae_files(layout: str, tiny_data: Path, tmp_path: Path) -> None:
    source, _ = _ours(tmp_path)
    state = _mae_state(source) if layout == "mae" else _multimae_state()
    if layout == "multimae":
        source.load_state_dict(to_cfmae(state), strict=False)  # what the run must start from
    assert detect_format(state) == layout
    file = tmp_path / f"{layout}.pth"
    torch.save({"model": state}, file)
    converted = to_cfmae(state)
    assert torch.equal(converted["encoder.blocks.1.mlp.fc2.weight"], source.encoder.blocks[1].mlp.fc2.weight)
    out = tmp_path / "run"
    sets = [x for item in TINY_OVERRIDES + ["optim.base_lr=1e-12", "optim.warmup_epochs=0"] for x in ("--set", item)]
    result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(out), "--epochs", "1",
                                 "--init", str(file), *sets])
    assert result.exit_code == 0, result.output
    trained = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    for key in ("encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "encoder.cls_token"):
        assert torch.allclose(trained[key], source.state_dict()[key], atol=1e-6), key
    if layout == "multimae":  # the pre-training encoder sees MultiMAE's table: patch (r, c) at row 1 + 4r + c
        table = state["input_adapters.rgb.pos_emb"]
        for r, c in [(0, 1), (1, 0), (2, 3)]:
            assert torch.equal(trained["encoder.pos_embed"][0, 1 + 4 * r + c], table[0, :, r, c]), (r, c)


def test_init_from_another_size_or_a_bad_file(tiny_data: Path, tmp_path: Path) -> None:
    sets = [x for item in TINY_OVERRIDES for x in ("--set", item)]

    def init(file: Path, out: str) -> str:
        result = runner.invoke(app, ["pretrain", "--data", str(tiny_data), "--out", str(tmp_path / out), "--epochs",
                                     "1", "--init", str(file), *sets])
        return f"{result.exit_code}|{' '.join(result.output.split())}"

    (tmp_path / "big").mkdir()
    _, bigger = _ours(tmp_path / "big", "data.img_size=48")  # another image size: positions are ours
    assert init(bigger, "r1").startswith("0|")
    (tmp_path / "wide").mkdir()
    _, wide = _ours(tmp_path / "wide", "model.embed_dim=48", "model.num_heads=2")
    out = init(wide, "r2")
    assert out.startswith("2|") and "do not match this model's shapes" in out and "encoder." in out
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x80\x02garbage")
    out = init(broken, "r3")
    assert out.startswith("2|") and f"{broken}: the file is damaged" in out and "weights_only=False" not in out
    pickled = tmp_path / "args.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, pickled)
    out = init(pickled, "r4")
    assert out.startswith("2|") and "holds Python objects besides tensors" in out and "weights_only=False" not in out


# ----------------------------------------------------------------------------------------------------------
# an export is published whole


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".export-" in p.name)


def test_an_export_that_fails_between_its_files_keeps_the_previous_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped after model.safetensors (a full disk), or after model.safetensors and config.json (a full disk,
    Ctrl-C): the previous export is byte for byte as it was, nothing is left beside it, and the same command then
    replaces it."""
    from types import SimpleNamespace

    import cfmae_cli.model.export as export

    _, first = _ours(tmp_path)
    (tmp_path / "b").mkdir()
    _, second = _ours(tmp_path / "b", "model.depth=3")
    out = tmp_path / "export"
    assert runner.invoke(app, ["export", str(first), "--out", str(out)]).exit_code == 0
    before = _files(out)
    full = OSError(errno.ENOSPC, "No space left on device")
    for second_file, failure, code in (("config.json", full, 2), ("README.md", full, 2),
                                       ("README.md", KeyboardInterrupt(), 130)):
        def fail(*args: object, failure: BaseException = failure, **kwargs: object) -> str:
            raise failure

        monkeypatch.undo()
        if second_file == "config.json":  # config.json's text is made after model.safetensors is written
            monkeypatch.setattr(export, "json", SimpleNamespace(dumps=fail, loads=json.loads))
        else:
            monkeypatch.setattr(export, "model_card", fail)
        result = runner.invoke(app, ["export", str(second), "--out", str(out)])
        assert result.exit_code == code, result.output
        if code == 2:
            assert "could not be written (No space left on device); the export that was there is intact" in \
                " ".join(result.output.split())
        assert _files(out) == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    result = runner.invoke(app, ["export", str(second), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["model_args"]["depth"] == 3
    assert sorted(_files(out)) == ["README.md", "config.json", "model.safetensors"] and _leftovers(tmp_path) == []


def test_what_a_killed_export_left_does_not_block_the_rerun(tmp_path: Path) -> None:
    """A process killed while it wrote the export leaves its temporary folder beside --out; killed between its
    two renames, the previous export set aside and --out missing; an earlier cfmae left a .tmp file inside the
    export. The rerun removes the first, puts the second back (and then replaces it), and goes on; folders of
    a running process, or with other files in them, are left alone."""
    _, ckpt = _ours(tmp_path)
    out = tmp_path / "export"
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid
    partial = tmp_path / f".export.export-{dead}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"cut off")
    running = tmp_path / f".export.export-{os.getppid()}"
    running.mkdir()
    (running / "config.json").write_text("{}")
    other = tmp_path / f".export.export-{dead + 1 if dead + 1 != os.getppid() else dead + 2}"
    other.mkdir()
    (other / "notes.txt").write_text("mine")

    def export() -> None:
        result = runner.invoke(app, ["export", str(ckpt), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert sorted(_files(out)) == ["README.md", "config.json", "model.safetensors"]

    export()
    assert _leftovers(tmp_path) == sorted([running.name, other.name]) and (other / "notes.txt").is_file()
    good = _files(out)
    os.rename(out, tmp_path / f".export.export-{dead}.old")  # killed between the renames
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    export()
    assert _files(out) == {**good, "README.md": _files(out)["README.md"]}
    assert _leftovers(tmp_path) == sorted([running.name, other.name])
    (out / ".config.json.a1b2c3d4.tmp").write_text("{")  # an earlier cfmae's interrupted atomic write
    export()
    assert ".config.json.a1b2c3d4.tmp" not in _files(out)


# ----------------------------------------------------------------------------------------------------------
# fine-tuning checkpoints given to export


def _finetuned(path: Path, kind: str = "classification", drop: str = "", data: dict | None = None,
               **top: object) -> Path:
    """A `cfmae finetune` checkpoint of the tiny encoder without training it: the model of ``kind`` (a detection
    model as its backbone's keys) with its weights moved off their initial values (a zero head would give equal
    logits), its stored config (``data``: entries of its data section; ``drop``: a dotted key left out, as in a
    file of another version) and the top-level entries a run writes."""
    from cfmae_cli.config import EncoderArch
    from cfmae_cli.eval.classifier import ViTClassifier
    from cfmae_cli.eval.config import FinetuneConfig
    from cfmae_cli.eval.segmentation import ViTSegmenter

    arch = EncoderArch(patch_size=8, embed_dim=32, depth=2, num_heads=2, map_stride=2, map_embed_dim=8)
    cfg = FinetuneConfig.model_validate({"kind": kind, "data": {"img_size": 32, "max_size": 32, **(data or {})},
                                         "model": {"encoder": arch.model_dump(), "init": "runs/pretrain/demo",
                                                   "out_indices": [0, 0, 1, 1]}})
    if kind == "classification":
        state = ViTClassifier(arch, 32, 3, ["rgb"]).state_dict()
    else:
        state = ViTSegmenter(arch, 32, 3, [0, 0, 1, 1], channels=8).state_dict()
        if kind == "detection":
            state = {f"backbone.{k}": v for k, v in state.items() if k.startswith("encoder.")}
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and "running" not in k else v
             for k, v in state.items()}
    raw = cfg.model_dump(mode="json")
    if drop:
        *sections, key = drop.split(".")
        node = raw
        for section in sections:
            node = node[section]
        del node[key]
    entries = {"task": "finetune", "kind": kind, "classes": ["a", "b", "c"], "epoch": 1, "step": 3, **top}
    save_checkpoint(path, {"model": state, "config": raw, **{k: v for k, v in entries.items() if v is not None}})
    return path


def test_fine_tuning_checkpoints_export_or_say_what_to_export_instead(tmp_path: Path) -> None:
    """A classifier exports with its head; a segmentation or detection model, a classifier from another version
    that lacks a key the export needs (KeyError exit 1 before), a checkpoint without class names and the bare
    weights of a classifier are refused in one line naming the file and what to give instead."""
    def export(file: Path) -> tuple[int, str]:
        result = runner.invoke(app, ["export", str(file), "--out", str(tmp_path / f"x-{file.stem}")])
        assert "Traceback" not in result.output
        return result.exit_code, " ".join(result.output.split())

    assert export(_finetuned(tmp_path / "cls.pt"))[0] == 0
    config = json.loads((tmp_path / "x-cls/config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["a", "b", "c"]
    instead = "export the pre-training checkpoint it was fine-tuned from: cfmae export runs/pretrain/demo --out DIR"
    cases = {"seg": ({"kind": "segmentation"}, ["segmentation model (the encoder under UperNet", instead]),
             "seg-old": ({"kind": "segmentation", "drop": "kind"}, ["segmentation model", instead]),
             "det": ({"kind": "detection"}, ["detection model (the encoder under Mask R-CNN", instead]),
             "old": ({"drop": "data.crop_pct"}, ["its config has no data.crop_pct", instead]),
             "nameless": ({"classes": None}, ["holds no class names", instead])}
    for name, (how, words) in cases.items():
        file = _finetuned(tmp_path / f"{name}.pt", **how)
        code, text = export(file)
        assert code == 2 and text.startswith(f"error: {file}:") and all(w in text for w in words), (name, text)
        assert not (tmp_path / f"x-{name}").exists()
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(tmp_path / "cls.pt", weights_only=True)["model"], bare)
    code, text = export(bare)
    assert code == 2 and "bare weights of a fine-tuned classifier" in text and "checkpoints/best.pt" in text, text


# ----------------------------------------------------------------------------------------------------------
# the docs' loading snippets, and timm's transform path on an export

EXPORT_DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def doc_snippets(folder: str) -> list[str]:
    """The Python blocks of docs/export.md that load the export in ``folder``, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", EXPORT_DOC.read_text(encoding="utf-8"), re.S)
    return [b for b in blocks if re.search(rf"[:\"]{re.escape(folder)}[\"/]", b)]


def _photo() -> Image.Image:
    """A real photograph, not square (451 x 300), so that resizing and cropping both show."""
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


def _preprocessing(model: torch.nn.Module) -> tuple[dict, object]:
    """What timm's standard path reads off a loaded model: its data config and the transform made from it."""
    data = timm.data.resolve_data_config({}, model=model)
    return data, timm.data.create_transform(**data)


def test_the_docs_load_an_encoder_export_with_the_runs_preprocessing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Every snippet of docs/export.md that loads an encoder export runs as written on one (the command's last
    line is the snippet's call); timm's resolve_data_config + create_transform then give the run's input size,
    mean and std and cfmae's own view of an image (bilinear, crop_pct 1.0: the centred square resized, as the
    k-NN monitor sees it), and the encoder's features of a transformed photo are cfmae's. Before, the documented
    load kept vit_tiny's 224 px and mean/std 0.5."""
    from cfmae_cli.data.transforms import JointTransform
    from cfmae_cli.model.convert import ENCODER_VIEW

    model, path = _ours(tmp_path, "data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]")
    d = tiny_config("data.mean=[0.5,0.4,0.3]", "data.std=[0.2,0.25,0.3]").data
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", str(path), "--out", "vitb-cfmae"])
    assert result.exit_code == 0, result.output
    snippets = doc_snippets("vitb-cfmae")
    assert len(snippets) == 2, snippets  # local-dir, and by architecture name
    printed = result.output.strip().splitlines()[-1]
    assert printed == "timm.create_model('local-dir:vitb-cfmae', pretrained=True)"
    assert printed.replace("'", '"') in snippets[0]
    photo = _photo()
    view, _ = JointTransform(d.img_size, 2, 16, d.crop_scale, d.crop_ratio, 0.0, d.mean, d.std, train=False)(
        torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous(), {})
    for code in snippets:
        names: dict = {}
        exec(code, names)  # noqa: S102 (the documentation's own code)
        encoder = names["encoder"].eval()
        data, transform = _preprocessing(encoder)
        assert tuple(data["input_size"]) == (3, d.img_size, d.img_size), (code, data)
        assert tuple(data["mean"]) == tuple(d.mean) and tuple(data["std"]) == tuple(d.std), data
        assert data["interpolation"] == ENCODER_VIEW["interpolation"] and data["crop_pct"] == ENCODER_VIEW["crop_pct"]
        x = transform(photo)[None]
        assert (x[0] - view).abs().mean() < 0.025  # PIL's resize of the whole image vs torch's of its square
        with torch.no_grad():
            ours = model.encoder(model.encoder.patch_embed(x) + model.encoder.patch_pos)
            theirs = encoder.forward_features(x)
        assert (ours - theirs).abs().max() < 1e-5
        if "model" in names:  # the same with a new 1000-class head
            assert names["model"].num_classes == 1000 and _preprocessing(names["model"])[0] == data


def test_the_docs_load_a_classifier_export_with_its_evaluation_transform(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The classifier snippet of docs/export.md runs as written on the export of a classifier fine-tuned with a
    non-default crop_pct, interpolation, mean and std: timm's resolve_data_config + create_transform give cfmae's
    evaluation transform exactly, the class names come along, and timm's logits on a transformed photo are
    those of cfmae's own classifier (loaded as `cfmae eval-robustness` loads it)."""
    from cfmae_cli.eval.models import load_eval_model

    data_cfg = {"crop_pct": 0.8, "interpolation": "bilinear", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    ckpt = _finetuned(tmp_path / "cls.pt", data=data_cfg)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", str(ckpt), "--out", "vitb-cfmae-in1k"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "timm.create_model('local-dir:vitb-cfmae-in1k', pretrained=True)"
    [code] = doc_snippets("vitb-cfmae-in1k")
    names: dict = {}
    exec(code, names)  # noqa: S102 (the documentation's own code)
    model, transform = names["model"].eval(), names["transform"]
    assert names["classes"] == ["a", "b", "c"]
    data, _ = _preprocessing(model)
    assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 0.8
    assert data["interpolation"] == "bilinear" and list(data["mean"]) == [0.5, 0.4, 0.3]
    assert list(data["std"]) == [0.2, 0.25, 0.3]
    ours = load_eval_model(str(ckpt), None, torch.device("cpu"))
    photo = _photo()
    x = transform(photo)[None]
    assert torch.equal(x[0], ours.resize_transform()(photo))
    with torch.no_grad():
        theirs, expected = model(x), ours.forward(x)
    assert expected.std() > 0.01 and (theirs - expected).abs().max() < 1e-5
