"""Own data gets its own defaults (issue 26): `cfmae pretrain --data FOLDER` without a preset scales the demo
preset's batch and warm-up to the folder (several optimizer steps per epoch, warm-up a tenth of the run at
most), keeps what `--set` gives, names the run after the folder and says what it chose."""

from __future__ import annotations

from pathlib import Path

from cfmae_cli.api.training import STEPS_PER_EPOCH, fit_to_data
from cfmae_cli.config import load_config
from cfmae_cli.train.setup import make_plan
from tests.conftest import make_dataset


def test_the_demo_preset_is_scaled_to_fifty_photos(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "myphotos", n_per_class=25)  # 50 images, as a newcomer's folder
    for epochs, world in ((40, 1), (5, 1), (40, 2)):
        cfg = load_config("demo", [f"train.epochs={epochs}"])
        fitted, said = fit_to_data(cfg, 50, str(data), [f"train.epochs={epochs}"], world)
        plan = make_plan(fitted, 50, world)
        assert plan.steps_per_epoch >= STEPS_PER_EPOCH, (epochs, world, plan)  # the preset's 32 gives 1
        assert plan.warmup_steps <= 0.1 * plan.total_steps + 1e-9, plan
        assert fitted.train.batch_size * world == fitted.optim.effective_batch
        assert f"scaled to the 50 training images of {data}" in said and "steps per epoch" in said
    assert make_plan(load_config("demo", ["train.epochs=5"]), 50, 1).steps_per_epoch == 1  # what it was
    kept, said = fit_to_data(load_config("demo", ["train.batch_size=16"]), 50, str(data), ["train.batch_size=16"], 1)
    assert kept.train.batch_size == 16 and "train.batch_size" not in said  # a key the user set stays


def test_the_batch_is_fitted_to_the_images_left_after_the_monitors_share(tmp_path: Path) -> None:
    from cfmae_cli.data.layout import list_samples
    from cfmae_cli.data.splits import held_out
    from cfmae_cli.train.pretraining import pretraining_images

    data = make_dataset(tmp_path / "myphotos", n_per_class=25)
    samples = list_samples(data, maps=[])[0]
    for share in (0.2, 0.5):  # 0.2 holds out fewer than 20 images: the monitor is off, every image pre-trains
        cfg = load_config("demo", [f"data.root={data}", f"train.monitor.val_fraction={share}"])
        left = sum(not held_out(s, share) for s in samples)
        assert pretraining_images(cfg) == (left if len(samples) - left >= 20 else 50), share


def test_the_run_is_named_after_the_data_folder(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from cfmae_cli.cli import app
    from tests.conftest import TINY_OVERRIDES

    data = make_dataset(tmp_path / "myphotos", n_per_class=4, size=32)
    monkeypatch.chdir(tmp_path)
    sets = [x for item in TINY_OVERRIDES if not item.startswith(("train.batch_size", "optim.effective_batch",
                                                                  "optim.warmup_epochs"))
            for x in ("--set", item)]
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--epochs", "1", *sets])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "scaled to the 8 training images" in text and "the run is named after the data: myphotos" in text, text
    assert (tmp_path / "runs" / "pretrain" / "myphotos" / "checkpoints" / "last.pt").is_file()
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--epochs", "1", "--out", "elsewhere", *sets])
    assert result.exit_code == 0 and "the run goes to elsewhere" in " ".join(result.output.split()), result.output


def test_finetuning_a_single_folder_of_own_photos_works_and_says_what_it_chose(tmp_path: Path, monkeypatch) -> None:
    """The demo's hold-out of 3/4 per class (for its 12 crops a class) and batch 32 left 19 of 50 photos to train
    on, fewer than one step: the run failed. Own data holds out 0.2 and gets a batch that fits."""
    from typer.testing import CliRunner

    from cfmae_cli.cli import app

    photos = make_dataset(tmp_path / "data", n_per_class=25, size=32) / "rgb"
    photos = photos.rename(tmp_path / "myphotos")  # a folder of class folders of photos
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["finetune", "--data", str(photos), "--checkpoint", "random",
                                      "--epochs", "1", "--set", "data.img_size=32"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "data.val_fraction 0.2 of each class held out" in text and "steps per epoch" in text, text
    assert "the run is named after the data: myphotos" in text  # it was runs/finetune/ft-demo
    assert (tmp_path / "runs" / "finetune" / "myphotos" / "checkpoints" / "last.pt").is_file()
