"""Snapshots of the console's main screens, compared with the stored SVGs.

The stores are written with fixed times and seeded ids (`conftest.py`), so a
screen only changes when the console's drawing does. After an intended change,
look at the new screens and store them: `LETHE_UPDATE_SNAPSHOTS=1 ./run tests
tests/console/test_snapshots.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coordinator.console.app import LetheConsole
from coordinator.console.source import StoreLocation, StoreSource
from tests.console.conftest import NOW

STORED = Path(__file__).parent / "snapshots"
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def settled(pilot) -> None:  # noqa: ANN001
    """Until layout and animations are done (a busy machine needs more than one pause)."""
    for _ in range(5):
        await pilot.wait_for_scheduled_animations()
        await pilot.pause(0.2)


def matches_stored(svg: str, name: str, tmp_path: Path) -> bool:
    stored = STORED / f"{name}.svg"
    if os.environ.get("LETHE_UPDATE_SNAPSHOTS"):
        STORED.mkdir(exist_ok=True)
        stored.write_text(svg, encoding="utf-8")
    (tmp_path / f"{name}.svg").write_text(svg, encoding="utf-8")  # to look at on a failure
    return stored.exists() and stored.read_text(encoding="utf-8") == svg


@pytest.mark.parametrize(
    ("key", "name", "size"),
    [
        ("1", "fleet-80x24", (80, 24)),
        ("2", "groups-80x24", (80, 24)),
        ("3", "model-80x24", (80, 24)),
        ("4", "deletions-80x24", (80, 24)),
        ("4", "deletions-140x40", (140, 40)),
    ],
)
async def test_screen_matches_its_snapshot(
    coordinator_dir: Path, tmp_path: Path, key: str, name: str, size: tuple[int, int]
) -> None:
    source = StoreSource(StoreLocation.in_data_dir(coordinator_dir), clock=lambda: NOW)
    app = LetheConsole(source, refresh_s=3600)  # one read: the screen holds still
    async with app.run_test(size=size) as pilot:
        for _ in range(100):  # the one read runs on a worker thread: wait for it to be drawn
            if app.view.run is not None:
                break
            await pilot.pause(0.1)
        # Read once more, as the live console does every half second: on a loaded machine
        # the first drawing of a table can keep columns sized before its rows arrived.
        app.action_read()
        await pilot.press(key)
        await settled(pilot)
        # The screen may still be changing: take it once it is the same twice.
        svg, previous = app.export_screenshot(title="Lethe"), ""
        for _ in range(30):
            if svg == previous:
                break
            await pilot.pause(0.3)
            svg, previous = app.export_screenshot(title="Lethe"), svg
    assert matches_stored(svg, name, tmp_path), (
        f"screen {name} differs from tests/console/snapshots/{name}.svg; the new one is in "
        f"{tmp_path} (store it with LETHE_UPDATE_SNAPSHOTS=1 if the change is intended)"
    )
