"""The user docs stay in step with the code: every config key and every preset is documented."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

from cfmae_cli.config import PRESET_DIR, Config
from cfmae_cli.eval.config import FinetuneConfig

PRESETS_DOC = Path(__file__).resolve().parents[1] / "docs" / "presets.md"
FINETUNE_REFERENCE = "## Reference: the fine-tuning config"


def _sections(annotation: typing.Any) -> list[type[BaseModel]]:
    """The config sections an annotation holds: ``Section`` itself, or the ``Section`` of ``Optional[Section]``."""
    candidates = [annotation, *typing.get_args(annotation)]
    return [t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)]


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of ``model`` as a dotted path; nested sections (also optional ones) give their own path and
    their fields'."""
    keys = []
    for name, field in model.model_fields.items():
        path = prefix + name
        keys.append(path)
        for section in _sections(field.annotation):
            keys.extend(dotted_keys(section, path + "."))
    return keys


def test_walk_finds_nested_keys() -> None:
    keys = dotted_keys(Config)
    assert "model.decoder" in keys and "model.decoder.cascade" in keys and "data.img_size" in keys
    ft = dotted_keys(FinetuneConfig)
    assert "mode" in ft and "aug.mixup" in ft and "optim.layer_decay" in ft
    assert "model.encoder" in ft and "model.encoder.num_heads" in ft  # Optional[EncoderArch] is walked into


def test_every_config_key_is_documented() -> None:
    text = PRESETS_DOC.read_text()
    missing = [key for key in dotted_keys(Config) if f"`{key}`" not in text]
    assert not missing, f"docs/presets.md lacks these config keys (in backticks): {missing}"


def test_every_finetune_key_is_documented() -> None:
    text = PRESETS_DOC.read_text()
    assert FINETUNE_REFERENCE in text, f"docs/presets.md lacks the section '{FINETUNE_REFERENCE}'"
    reference = text.split(FINETUNE_REFERENCE, 1)[1]  # many keys share names with pre-training: look here only
    missing = [key for key in dotted_keys(FinetuneConfig) if f"`{key}`" not in reference]
    assert not missing, f"docs/presets.md ({FINETUNE_REFERENCE}) lacks these fine-tuning keys (in backticks): " \
                        f"{missing}"


def test_every_preset_is_documented() -> None:
    text = PRESETS_DOC.read_text()
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert names, "no presets found"
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/presets.md lacks these presets: {missing}"
