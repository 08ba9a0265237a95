"""Typed configuration: the schema (``schema.py``) and loading it (``load.py``)."""

from ..errors import ConfigError
from .load import (CONF_DIR, all_keys, apply_overrides, config_hash, load_config, load_saved, override, save_config,
                   saved_config, to_yaml, validate)
from .schema import DataConfig, Stage1Config, Stage2Config

__all__ = ["CONF_DIR", "ConfigError", "DataConfig", "Stage1Config", "Stage2Config", "all_keys", "apply_overrides",
           "config_hash", "load_config", "load_saved", "override", "save_config", "saved_config", "to_yaml", "validate"]
