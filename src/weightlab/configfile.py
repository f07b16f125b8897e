"""Reading YAML config files into pydantic models with one clear error message."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from .errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def describe_validation_error(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} '{p}' does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} '{p}' is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{p}' must be a YAML mapping")
    return data


def build(model: type[M], data: dict, what: str) -> M:
    try:
        return model(**data)
    except ValidationError as e:
        raise ConfigError(f"{what} is invalid: {describe_validation_error(e)}") from None
