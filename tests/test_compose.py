"""compose.yaml agrees with the code: every command is a real entry point with flags it
accepts, every volume is declared and used, health checks look where the code listens,
and the Dockerfile installs every package the project has."""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import click
import pytest
import typer
import yaml

from client.device_channel import socket_path
from lethe.cli import app
from lethe.fleet.processes import BIN

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict] = COMPOSE["services"]


def command_of(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def lethe_command(words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command a `lethe ...` line runs, and the words after its name."""
    command: click.Command = typer.main.get_command(app)
    rest = words[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        command = command.commands[rest[0]]
        rest = rest[1:]
    return command, rest


def flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def lethe_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for name, service in SERVICES.items():
        words = command_of(service)
        if words[:2] == ["sh", "-c"]:
            lines += [(name, shlex.split(part)) for part in re.split(r"\|\||&&", words[2])]
        elif words[0] == "lethe":
            lines.append((name, words))
    return lines


@pytest.mark.parametrize(("service", "words"), lethe_lines(), ids=lambda v: str(v)[:40])
def test_lethe_commands_exist_with_the_flags_given(service: str, words: list[str]) -> None:
    command, rest = lethe_command(words)
    assert not isinstance(command, click.Group), f"{service}: {words} names no command"
    known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
    unknown = [f for f in flags(rest) if f not in known]
    assert not unknown, f"{service}: {command.name} has no {unknown}"


@pytest.mark.parametrize("program", ["flower-superlink", "flower-supernode"])
def test_flower_commands_take_the_flags_given(program: str) -> None:
    helped = subprocess.run(
        [str(BIN / program), "--help"], capture_output=True, text=True, check=True
    ).stdout
    used = [
        (name, flag)
        for name, service in SERVICES.items()
        if command_of(service)[0] == program
        for flag in flags(command_of(service))
    ]
    assert used, f"no service runs {program}"
    for name, flag in used:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", helped), f"{name}: {program} has no {flag}"


def test_volumes_are_declared_used_and_mounted_where_the_code_looks() -> None:
    declared = set(COMPOSE["volumes"])
    used = set()
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if not source.startswith("."):
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
            if source == "models":
                assert target == "/data/models", f"{name}: the model store is DATA_DIR/models"
        if "lethe" in str(service.get("command")):
            assert service["environment"]["LETHE_DATA_DIR"] == "/data"
    assert used == declared, f"declared but unused: {declared - used}"


def test_every_device_has_a_daemon_and_a_supernode_on_one_volume() -> None:
    daemons = {n: s for n, s in SERVICES.items() if command_of(s)[:3] == ["lethe", "client", "run"]}
    nodes = {n: s for n, s in SERVICES.items() if command_of(s)[0] == "flower-supernode"}
    assert len(daemons) == len(nodes) == 3
    slowdowns = set()
    for node in nodes.values():
        config = next(w for w in command_of(node) if w.startswith("--node-config="))
        assert "data-dir='/data'" in config
        slowdowns.add(re.search(r"slowdown=([\d.]+)", config).group(1))
        volume = node["volumes"][0].split(":")[0]
        [daemon] = [d for d in daemons.values() if d["volumes"][0].split(":")[0] == volume]
        assert node["depends_on"] and daemon is not None
    assert len(slowdowns) == 3, "the devices must differ in speed"
    socket = str(socket_path(Path("/data/device")))
    for daemon in daemons.values():
        assert daemon["healthcheck"]["test"][-1] == socket


def test_services_wait_for_services_that_exist_and_tls_is_mounted() -> None:
    for name, service in SERVICES.items():
        for needed in service.get("depends_on", {}):
            assert needed in SERVICES, f"{name} waits for unknown {needed}"
        words = " ".join(command_of(service))
        for path in re.findall(r"/certs/[\w.]+", words):
            assert any(m.startswith("./certs:/certs") for m in service["volumes"]), (name, path)
    assert "console" in SERVICES and SERVICES["console"]["profiles"] == ["console"]


def test_the_dockerfile_installs_every_package_of_the_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for package in packages:
        assert f"COPY {package} ./{package}" in dockerfile, package
    assert "torch==2.13.0" in dockerfile and "pip install -e ." in dockerfile
