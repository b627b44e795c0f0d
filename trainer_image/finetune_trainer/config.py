"""Reading the trainer config the operator rendered (its schema is `finetune_operator.api.trainer`)."""

from __future__ import annotations

from pathlib import Path

from finetune_operator.api.trainer import TrainerConfig


def load_config(path: str | Path) -> TrainerConfig:
    """Read a trainer config file; raises pydantic.ValidationError or yaml.YAMLError (a config error)."""
    return TrainerConfig.from_yaml(Path(path).read_text())
