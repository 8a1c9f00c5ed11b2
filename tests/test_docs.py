"""The user docs stay in step with the code: every config key and every preset is documented."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from cfmae_cli.config import PRESET_DIR, Config

PRESETS_DOC = Path(__file__).resolve().parents[1] / "docs" / "presets.md"


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field of ``model`` as a dotted path; nested sections give their own path and their fields'."""
    keys = []
    for name, field in model.model_fields.items():
        path = prefix + name
        keys.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(dotted_keys(ann, path + "."))
    return keys


def test_walk_finds_nested_keys() -> None:
    keys = dotted_keys(Config)
    assert "model.decoder" in keys and "model.decoder.cascade" in keys and "data.img_size" in keys


def test_every_config_key_is_documented() -> None:
    text = PRESETS_DOC.read_text()
    missing = [key for key in dotted_keys(Config) if f"`{key}`" not in text]
    assert not missing, f"docs/presets.md lacks these config keys (in backticks): {missing}"


def test_every_preset_is_documented() -> None:
    text = PRESETS_DOC.read_text()
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert names, "no presets found"
    missing = [name for name in names if f"`{name}`" not in text]
    assert not missing, f"docs/presets.md lacks these presets: {missing}"
