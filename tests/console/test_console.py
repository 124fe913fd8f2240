"""The operator console, driven with Textual's pilot over real stores (and a real deletion
API on loopback for the form)."""

from __future__ import annotations

import io
import socket
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.text import Text
from textual.widgets import DataTable, Input, Select, Static, TabbedContent

from coordinator.console.app import ApiAccess, LetheConsole
from coordinator.console.source import StoreLocation, StoreSource
from coordinator.console.view import (
    DeletionView,
    GroupView,
    NodeView,
    integer_ticks,
    matching,
    timeline_row,
)
from coordinator.core import Coordinator
from coordinator.deletions.access import Scope, add_token
from coordinator.deletions.service import serve
from coordinator.deletions.store import DeletionStore
from coordinator.fedcompass import FedCompass
from coordinator.simulation.task import B_KEY
from tests.console.conftest import MODEL, NODES, NOW, T0, write_run

SMALL = (80, 24)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def console(root: Path, api: ApiAccess | None = None, clock=lambda: NOW) -> LetheConsole:
    return LetheConsole(StoreSource(StoreLocation.in_data_dir(root), clock=clock), api, 0.2)


def rows(app: LetheConsole, table_id: str) -> list[list[str]]:
    table = app.query_one(table_id, DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def text_of(node, widget_id: str) -> str:
    """What a Static shows, as plain text."""
    content = node.query_one(widget_id, Static).content
    if isinstance(content, str):
        return content
    if isinstance(content, Text):
        return content.plain
    printer = Console(width=200, record=True, file=io.StringIO())
    printer.print(content)
    return printer.export_text()


async def settle(pilot, seconds: float = 0.6) -> None:
    await pilot.pause(seconds)


# -- the pure rules ----------------------------------------------------------------------


def deletion(request_id: str, status: str, app: str = "notes", at: float = 0.0) -> DeletionView:
    return DeletionView(request_id, app, "ab" * 32, status, None, 1, at, at, (), None, None)


def test_the_filter_matches_status_and_text_newest_first() -> None:
    requests = [
        deletion("aaa1", "VERIFIED", at=1.0),
        deletion("bbb2", "FAILED", app="mail", at=2.0),
        deletion("ccc3", "VERIFIED", app="mail", at=3.0),
    ]
    assert [r.request_id for r in matching(requests)] == ["ccc3", "bbb2", "aaa1"]
    assert [r.request_id for r in matching(requests, "MAIL")] == ["ccc3", "bbb2"]
    assert [r.request_id for r in matching(requests, "", "VERIFIED")] == ["ccc3", "aaa1"]
    assert matching(requests, "mail", "VERIFIED")[0].request_id == "ccc3"
    assert matching(requests, "nothing") == []


def test_a_timeline_row_places_opening_expected_latest_and_close() -> None:
    group = GroupView(0, 0.0, 5.0, 7.5, 10.0, (), (1,), ())
    assert timeline_row(group, 0.0, 10.0, 11, now=99.0) == "━━━━━━┄┄┄ │"
    still_open = GroupView(1, 0.0, 5.0, 7.5, None, (2,), (), ())
    assert timeline_row(still_open, 0.0, 10.0, 11, now=2.0)[2] == "│"


def test_statuses_staleness_and_ticks() -> None:
    node = NodeView(1, True, 2.0, 0, 10, 3, 100.0, 1, 0)
    assert node.status(100.0 + 40.0) == "training"
    assert node.status(100.0 + 2 * 20.0 + 31.0) == "overdue"
    assert NodeView(1, False, 2.0, None, None, None, 0.0, 0, 0).status(1.0) == "gone"
    assert node.staleness(5) == 2
    assert integer_ticks([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == [0, 2, 4, 6, 8, 10]
    assert integer_ticks([3]) == [3]


# -- the console over real stores ---------------------------------------------------------


async def test_the_fleet_groups_and_model_tabs_show_the_run(coordinator_dir: Path) -> None:
    app = console(coordinator_dir)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        assert app.sub_title.startswith("run console · fedcompass · version ")
        fleet = rows(app, "#nodes")
        assert [row[0] for row in fleet] == [f"{n:06x}" for n in NODES]
        assert {row[1] for row in fleet} == {"training"}
        assert all(float(row[2]) > 0 for row in fleet)  # seconds per step, measured
        assert fleet[0][4] and int(fleet[0][4]) > int(fleet[2][4])  # the fast one has more Q
        assert "3 devices" in text_of(app, "#fleet-summary")
        await pilot.press("2")
        assert app.query_one(TabbedContent).active == "groups"
        timeline = str(app.query_one("#timeline").render())
        assert "g0" in timeline and f"late {NODES[1] & 0xFFFF:04x}" in timeline
        await pilot.press("3")
        assert app.query_one(TabbedContent).active == "model"
        assert not app.query_one("#banner").has_class("shown")


async def test_a_hostile_node_shows_its_rejections_and_its_quarantine(tmp_path: Path) -> None:
    store = write_run(tmp_path)
    hostile = 0xBAD
    core = Coordinator(FedCompass(), MODEL, journal=store)
    core.restore(store.start("fedcompass", {"policy": "fedcompass"}, MODEL))
    for attempt in range(3):  # NaN, a wrong shape, NaN: three in a row
        [work] = core.join(hostile, NOW - 30 + attempt)
        bad = (
            {B_KEY: np.full((3, 2), np.nan, np.float32)}
            if attempt != 1
            else {B_KEY: np.zeros((2, 3), np.float32)}
        )
        core.arrive(hostile, work.version, bad, 5, NOW - 29 + attempt)
    store.close()
    app = console(tmp_path)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        shown = {row[0]: row for row in rows(app, "#nodes")}
        assert shown[f"{hostile:06x}"][1] == "quarantined"
        assert shown[f"{hostile:06x}"][-1] == "3"  # rejected, counted per node
        assert {shown[f"{n:06x}"][1] for n in NODES} == {"training"}


async def test_deletions_filter_search_and_detail(coordinator_dir: Path) -> None:
    app = console(coordinator_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot)
        await pilot.press("4")
        statuses = [row[2] for row in rows(app, "#requests")]
        assert statuses == ["DISPATCHED", "FAILED", "VERIFIED"]  # newest first
        app.query_one("#status-filter", Select).value = "VERIFIED"
        await settle(pilot, 0.3)
        assert [row[2] for row in rows(app, "#requests")] == ["VERIFIED"]
        detail = text_of(app, "#detail")
        assert "Signed receipt" in detail and "onnx_forget_em.max" in detail
        assert "model_versions_after" in detail
        app.query_one("#status-filter", Select).clear()
        await pilot.press("slash")
        assert app.focused is app.query_one("#search", Input)
        await pilot.press(*"residual")
        await settle(pilot, 0.3)
        [failed] = rows(app, "#requests")
        assert failed[2] == "FAILED"
        assert "edit residual 0.400" in text_of(app, "#detail")


async def test_no_store_is_a_banner_then_the_console_picks_up_the_run(tmp_path: Path) -> None:
    root = tmp_path / "data"
    app = console(root, clock=time.time)
    async with app.run_test(size=SMALL) as pilot:
        await settle(pilot)
        banner = app.query_one("#banner")
        assert banner.has_class("shown") and "no coordinator has run here yet" in text_of(
            app, "#banner"
        )
        assert rows(app, "#nodes") == [] and "No devices" in text_of(app, "#fleet-summary")
        write_run(root).close()  # the coordinator starts: the console follows within a second
        await settle(pilot, 1.0)
        assert not banner.has_class("shown") and len(rows(app, "#nodes")) == 3
        database = root / "coordinator" / "coordinator.db"
        with sqlite3.connect(database) as db:  # the store breaks under the console
            db.execute("DROP TABLE coordinator_nodes")
        await settle(pilot, 1.0)
        assert banner.has_class("shown") and "coordinator state" in text_of(app, "#banner")


async def test_the_form_files_a_request_through_the_api(
    coordinator_dir: Path, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "notes", Scope.APP, ["notes:*"])
    url = f"sqlite:///{coordinator_dir / 'coordinator' / 'deletions.db'}"
    store = DeletionStore(url)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    server = serve(store, address, tokens)
    try:
        app = console(coordinator_dir, ApiAccess(address, token))
        async with app.run_test(size=SMALL) as pilot:
            await settle(pilot)
            before = len(store.list(None, None, 100).records)
            await pilot.press("n")
            await pilot.press(*"mail:eve")  # not this app's subject: refused, nothing stored
            await pilot.click("#submit")
            await settle(pilot, 1.0)
            assert "PERMISSION_DENIED" in text_of(app.screen, "#form-message")
            assert len(store.list(None, None, 100).records) == before
            app.screen.query_one("#subject", Input).value = "notes:dave"
            await pilot.click("#submit")
            await settle(pilot, 1.0)
            assert app.screen is app.screen_stack[0]  # the form closed
            filed = store.list(None, None, 100).records
            assert len(filed) == before + 1 and filed[-1].subject_id == "notes:dave"
            await settle(pilot, 0.5)
            assert app.selected == filed[-1].request_id
    finally:
        server.stop(None)
        store.close()


async def test_help_opens_and_closes(coordinator_dir: Path) -> None:
    app = console(coordinator_dir)
    async with app.run_test(size=SMALL) as pilot:
        await pilot.press("question_mark")
        assert type(app.screen).__name__ == "HelpScreen"
        await pilot.press("escape")
        assert app.screen is app.screen_stack[0]


@pytest.mark.parametrize("size", [(80, 24), (160, 50)])
async def test_every_tab_draws_at_small_and_large_sizes(coordinator_dir: Path, size) -> None:
    app = console(coordinator_dir)
    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        for key in "1234":
            await pilot.press(key)
            await settle(pilot, 0.2)
            assert app.screen.size == size  # drawn without error at this size


def test_the_fixture_story_is_what_the_tests_assume(coordinator_dir: Path) -> None:
    view = StoreSource(StoreLocation.in_data_dir(coordinator_dir), clock=lambda: NOW).read()
    assert view.problem is None and view.taken_at == NOW and view.versions[0].at >= T0
