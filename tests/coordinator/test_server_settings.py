"""The run config Flower hands the ServerApp: every key declared, checked, and split right."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from coordinator.run_config import RunConfig
from coordinator.server_app import ServerSettings

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_flower_app_declares_every_setting_with_its_default() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    expected = {
        f.name.replace("_", "-"): f.default
        for cls in (ServerSettings, RunConfig)
        for f in dataclasses.fields(cls)
    }
    assert declared == expected


def test_settings_and_policy_config_are_split_and_checked() -> None:
    settings, config = ServerSettings.from_mapping(
        {"mode": "virtual", "budget": 100, "policy": "fedasync", "fedasync-alpha": 0.5}
    )
    assert settings.mode == "virtual" and settings.budget == 100.0
    assert config.policy == "fedasync" and config.fedasync_alpha == 0.5
    with pytest.raises(ValueError, match="mode must be"):
        ServerSettings.from_mapping({"mode": "cloud"})
    with pytest.raises(ValueError, match="unknown run config key"):
        ServerSettings.from_mapping({"polcy": "fedavg"})
    with pytest.raises(ValueError, match="must be a float"):
        ServerSettings.from_mapping({"ttl-s": "soon"})
