"""Layered configuration: files, environment and --set, validated by pydantic models."""

from relayd.config.load import DEFAULT_CONFIG, LoadedConfig, load_config
from relayd.config.sources import ConfigError, Problem

__all__ = ["DEFAULT_CONFIG", "ConfigError", "LoadedConfig", "Problem", "load_config"]
