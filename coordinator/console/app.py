"""`lethe tui`: the operator console (Textual).

Four tabs: the fleet (one row per device), the arrival groups as a timeline,
the shared model's metrics as charts, and the deletion requests (filter,
search, a detail view with measurements and receipt, and a form that files a
new request through the gRPC API). The stores are read on a worker thread
every `refresh_s` (`coordinator.console.source`), so the screen stays live
and responsive; a failed read is a banner, and the next read tries again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from rich.console import Group as RichGroup
from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    Markdown,
    Select,
    Static,
    TabbedContent,
    TabPane,
)
from textual_plotext import PlotextPlot

from coordinator.console.source import StoreSource
from coordinator.console.view import (
    DeletionView,
    FleetView,
    GroupView,
    integer_ticks,
    matching,
    pretty_json,
    series,
    short_node,
    timeline_row,
)
from coordinator.deletions.client import DeletionClient
from coordinator.deletions.records import RecordSelector
from coordinator.deletions.status import Status

STATUSES = tuple(status.value for status in Status)
STATUS_STYLE = {
    "RECEIVED": "cyan",
    "DISPATCHED": "blue",
    "APPLIED_ON_DEVICES": "magenta",
    "APPLIED_GLOBALLY": "magenta",
    "VERIFIED": "bold green",
    "FAILED": "bold red",
}
HELP = """\
# Lethe console: keys

| key | does |
|---|---|
| `1` `2` `3` `4` | fleet, groups, model, deletions |
| `/` | search deletion requests (id, app, subject hash, status, reason) |
| `n` | file a new deletion request (through the gRPC API) |
| `r` | read the stores now |
| `?` or `f1` | this help |
| `q` | quit |

The console reads the coordinator's state and deletion stores every half
second. When they cannot be read, a banner says why, and the console keeps
trying: it picks up by itself when the coordinator is back.
"""


@dataclass(frozen=True)
class ApiAccess:
    """Where new deletion requests are filed: the API's address and a bearer token."""

    address: str
    token: str
    root_certificates: Path | None = None


def _clock(moment: float | None) -> str:
    """UTC, so that operators on machines in different zones read the same times."""
    return "" if moment is None else datetime.fromtimestamp(moment, UTC).strftime("%H:%M:%SZ")


def _ago(moment: float, now: float) -> str:
    seconds = max(0.0, now - moment)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


class Timeline(Widget):
    """Arrival groups on a shared time axis, newest at the bottom (see `timeline_row`)."""

    DEFAULT_CSS = "Timeline { height: auto; }"

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.groups: tuple[GroupView, ...] = ()
        self.now = time.time()

    def show(self, groups: tuple[GroupView, ...], now: float) -> None:
        self.groups, self.now = groups, now
        self.refresh(layout=True)

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return max(2, len(self._shown()) + 2)

    def _shown(self) -> tuple[GroupView, ...]:
        return self.groups[-40:]

    def render(self) -> Text:
        groups = self._shown()
        if not groups:
            return Text("No arrival groups yet (FedCompass forms them as devices return).")
        label_width, members_width = 6, 22
        bar_width = max(10, self.size.width - label_width - members_width - 2)
        start = min(g.opened_at for g in groups)
        end = max(max(g.latest, g.closed_at or 0.0) for g in groups)
        if any(g.closed_at is None for g in groups):  # an open group runs up to now
            end = max(end, self.now)
        out = Text()
        axis = f"{_clock(start)}".ljust(bar_width - 8) + _clock(end)
        out.append(" " * label_width + axis[:bar_width] + "\n", style="dim")
        for group in groups:
            row = timeline_row(group, start, end, bar_width, self.now)
            style = "green" if group.closed_at is not None and not group.late else "yellow"
            if group.closed_at is None:
                style = "cyan"
            out.append(f"g{group.group:<4} ", style="bold")
            out.append(row, style=style)
            arrived = ",".join(short_node(n)[-4:] for n in group.arrived) or "-"
            waiting = group.late if group.closed_at is not None else group.training
            marker = "late " if group.closed_at is not None else "wait "
            late = ",".join(short_node(n)[-4:] for n in waiting)
            out.append(f" in {arrived}")
            if late:
                out.append(f" {marker}{late}", style="red" if group.closed_at else "cyan")
            out.append("\n")
        out.append("━ to expected  ┄ to latest  │ closed/now", style="dim")
        return out


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)
            yield Button("Close", id="close-help")

    @on(Button.Pressed, "#close-help")
    def close_help(self) -> None:
        self.dismiss()


class NewRequestScreen(ModalScreen[str | None]):
    """A form that files a deletion request through the API; dismissed with its id."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, api: ApiAccess | None) -> None:
        super().__init__()
        self.api = api

    def compose(self) -> ComposeResult:
        with Vertical(id="form"):
            yield Label("File a deletion request", id="form-title")
            yield Input(placeholder="subject id (e.g. notes:alice)", id="subject")
            yield Input(value=f"console-{uuid.uuid4().hex[:12]}", id="idempotency")
            yield Input(placeholder="only these record kinds (pair,text; empty: all)", id="kinds")
            yield Static("", id="form-message")
            with Horizontal(id="form-buttons"):
                yield Button("Submit", variant="primary", id="submit")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        if self.api is None:
            self._say(
                "No API to file through: start the console with --api-address and --token.",
                error=True,
            )
            self.query_one("#submit", Button).disabled = True
        self.query_one("#subject", Input).focus()

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    @on(Button.Pressed, "#submit")
    def submit(self) -> None:
        subject = self.query_one("#subject", Input).value.strip()
        key = self.query_one("#idempotency", Input).value.strip()
        kinds = tuple(
            k.strip() for k in self.query_one("#kinds", Input).value.split(",") if k.strip()
        )
        if not subject or not key:
            self._say("A subject id and an idempotency key are needed.", error=True)
            return
        if self.api is None:
            return
        self.query_one("#submit", Button).disabled = True
        self._say("Submitting...")
        self._file(subject, key, kinds)

    @work(thread=True, exclusive=True)
    def _file(self, subject: str, key: str, kinds: tuple[str, ...]) -> None:
        assert self.api is not None
        try:
            selectors = (RecordSelector(kinds=kinds),) if kinds else ()
            certificates = (
                self.api.root_certificates.read_bytes() if self.api.root_certificates else None
            )
            with DeletionClient(
                self.api.address, self.api.token, root_certificates=certificates
            ) as client:
                request = client.submit(subject, key, selectors)
        except grpc.RpcError as error:
            message = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            self.app.call_from_thread(self._failed, message)
        except (OSError, ValueError) as error:
            self.app.call_from_thread(self._failed, str(error))
        else:
            self.app.call_from_thread(self.dismiss, request.request_id)

    def _failed(self, message: str) -> None:
        self._say(message, error=True)
        self.query_one("#submit", Button).disabled = False

    def _say(self, message: str, error: bool = False) -> None:
        widget = self.query_one("#form-message", Static)
        widget.update(Text(message, style="bold red" if error else "dim"))


class LetheConsole(App[None]):
    """The operator console over the stores `source` reads."""

    TITLE = "Lethe"
    CSS_PATH = "console.tcss"
    BINDINGS = [
        Binding("1", "tab('fleet')", "Fleet"),
        Binding("2", "tab('groups')", "Groups"),
        Binding("3", "tab('model')", "Model"),
        Binding("4", "tab('deletions')", "Deletions"),
        Binding("slash", "search", "Search"),
        Binding("n", "new_request", "New request"),
        Binding("r", "read", "Refresh", show=False),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self, source: StoreSource, api: ApiAccess | None = None, refresh_s: float = 0.5
    ) -> None:
        super().__init__()
        self.source = source
        self.api = api
        self.refresh_s = refresh_s
        self.view = FleetView(taken_at=time.time())  # empty until the first read, in ms
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="banner")
        with TabbedContent(initial="fleet"):
            with TabPane("Fleet", id="fleet"):
                yield DataTable(id="nodes", cursor_type="row", zebra_stripes=True)
                yield Static("", id="fleet-summary")
            with TabPane("Groups", id="groups"), VerticalScroll():
                yield Timeline(id="timeline")
            with TabPane("Model", id="model"), Horizontal(id="charts"):
                yield PlotextPlot(id="loss")
                yield PlotextPlot(id="accuracy")
            with TabPane("Deletions", id="deletions"):
                with Horizontal(id="filters"):
                    yield Input(placeholder="/ search id, app, hash, status, reason", id="search")
                    yield Select(
                        [(s, s) for s in STATUSES], prompt="any status", id="status-filter"
                    )
                with Horizontal(id="deletion-panes"):
                    yield DataTable(id="requests", cursor_type="row", zebra_stripes=True)
                    with VerticalScroll(id="detail-pane"):
                        yield Static("Choose a request to see its detail.", id="detail")
        yield Footer()

    def on_mount(self) -> None:
        # Widgets are looked up on this screen, not on whichever is on top (a form, help).
        self._home = self.screen
        nodes = self._home.query_one("#nodes", DataTable)
        nodes.add_columns(
            "node", "status", "s/step", "group", "Q", "last seen", "stale", "updates", "rejected"
        )
        requests = self._home.query_one("#requests", DataTable)
        requests.add_columns("request", "app", "status", "updated")
        self._show(self.view)
        nodes.focus()
        self.action_read()
        self.set_interval(self.refresh_s, self.action_read)

    def on_unmount(self) -> None:
        self.source.close()

    # -- reading ------------------------------------------------------------------------

    def action_read(self) -> None:
        self._read()

    @work(thread=True, exclusive=True, group="read")
    def _read(self) -> None:
        view = self.source.read()
        self.call_from_thread(self._show, view)

    def _show(self, view: FleetView) -> None:
        try:
            self._draw(view)
        except NoMatches:  # a read that finished while the console closes: nothing to draw on
            return

    def _draw(self, view: FleetView) -> None:
        self.view = view
        banner = self._home.query_one("#banner", Static)
        banner.update(Text(f" ⚠ {view.problem} (retrying)", style="bold") if view.problem else "")
        banner.set_class(bool(view.problem), "shown")
        if view.run is not None:
            self.sub_title = f"run {view.run} · {view.policy} · version {view.version}"
        else:
            self.sub_title = "no run"
        self._show_nodes(view)
        self._home.query_one(Timeline).show(view.groups, view.taken_at)
        self._show_charts(view)
        self._show_requests()

    def _show_nodes(self, view: FleetView) -> None:
        table = self._home.query_one("#nodes", DataTable)
        kept = table.cursor_row
        table.clear()
        for node in view.nodes:
            speed = "" if node.seconds_per_step is None else f"{node.seconds_per_step:.3f}"
            stale = node.staleness(view.version)
            status = node.status(view.taken_at)
            table.add_row(
                short_node(node.node),
                Text(status, style={"training": "green", "idle": "cyan"}.get(status, "red")),
                speed,
                "" if node.group is None else f"g{node.group}",
                "" if node.steps is None else str(node.steps),
                _ago(node.last_seen, view.taken_at),
                "" if stale is None else str(stale),
                str(node.updates),
                Text(str(node.rejected), style="bold red" if node.rejected else ""),
                key=str(node.node),
            )
        if view.nodes:
            table.move_cursor(row=min(kept, len(view.nodes) - 1))
        summary = self._home.query_one("#fleet-summary", Static)
        if not view.nodes:
            summary.update("No devices have joined yet.")
        else:
            working = sum(n.status(view.taken_at) == "training" for n in view.nodes)
            summary.update(
                f"{len(view.nodes)} devices, {working} training · "
                f"{len(view.versions)} versions · {len(view.deletions)} deletion requests"
            )

    def _show_charts(self, view: FleetView) -> None:
        for widget_id, names, title in (
            ("loss", ("heldout_loss",), "held-out loss by version"),
            ("accuracy", ("heldout_next_token_accuracy",), "held-out next-token accuracy"),
        ):
            plot = self._home.query_one(f"#{widget_id}", PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            plt.clear_figure()
            plt.title(title)
            plt.xlabel("version")
            for name in names:
                x, y = series(view.versions, name)
                if x:
                    plt.plot(x, y, marker="braille")
                    plt.xticks(integer_ticks(x))
            plot.refresh()

    def _show_requests(self) -> None:
        table = self._home.query_one("#requests", DataTable)
        text = self._home.query_one("#search", Input).value
        chosen = self._home.query_one("#status-filter", Select).value
        status = chosen if isinstance(chosen, str) else None
        shown = matching(self.view.deletions, text, status)
        kept = table.cursor_row
        table.clear()
        for request in shown:
            table.add_row(
                request.request_id[:8],
                request.app,
                Text(request.status, style=STATUS_STYLE.get(request.status, "")),
                _ago(request.updated_at, self.view.taken_at),
                key=request.request_id,
            )
        if shown:
            table.move_cursor(row=min(kept, len(shown) - 1))
        if self.selected is None and shown:
            self.selected = shown[0].request_id
        self._show_detail()

    def _show_detail(self) -> None:
        # A highlight queued while the app shuts down arrives after the panes are gone.
        detail = next(iter(self._home.query("#detail").results(Static)), None)
        if detail is None:
            return
        request = next((d for d in self.view.deletions if d.request_id == self.selected), None)
        if request is None:
            detail.update(
                "No deletion requests yet. Press n to file one."
                if not self.view.deletions
                else "Choose a request to see its detail."
            )
            return
        detail.update(_detail(request))

    # -- actions -------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        self._home.query_one(TabbedContent).active = tab
        # The tab's list takes the keys at once (arrows move through it).
        focus = {"fleet": "#nodes", "deletions": "#requests"}.get(tab)
        if focus is not None:
            self._home.query_one(focus).focus()

    def action_search(self) -> None:
        self.action_tab("deletions")
        self._home.query_one("#search", Input).focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_new_request(self) -> None:
        def filed(request_id: str | None) -> None:
            if request_id:
                self.selected = request_id
                self.notify(f"Deletion request {request_id[:8]} filed.")
                self.action_tab("deletions")
                self.action_read()

        self.push_screen(NewRequestScreen(self.api), filed)

    @on(Input.Changed, "#search")
    @on(Select.Changed, "#status-filter")
    def refilter(self) -> None:
        self._show_requests()

    @on(DataTable.RowHighlighted, "#requests")
    def highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is not None:
            self.selected = event.row_key.value
            self._show_detail()


def _detail(request: DeletionView) -> RichGroup:
    """The detail pane: what happened to the request, what was measured, the receipt."""
    head = Table.grid(padding=(0, 1))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("request", request.request_id)
    head.add_row("app", request.app)
    head.add_row("subject hash", request.subject_hash[:32] + "…")
    head.add_row("status", Text(request.status, style=STATUS_STYLE.get(request.status, "")))
    head.add_row("attempts", str(request.attempts))
    if request.reason:
        head.add_row("reason", Text(request.reason, style="red"))
    history = Table("history", "at", "reason", box=None, padding=(0, 1), header_style="bold")
    for status, at, reason in request.history:
        history.add_row(Text(status, style=STATUS_STYLE.get(status, "")), _clock(at), reason or "")
    measures = Table("measurement", "value", box=None, padding=(0, 1), header_style="bold")
    for name, value in sorted(request.measurements.items()):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        measures.add_row(name, shown)
    parts: list[object] = [head, Text(""), history, Text("")]
    parts.append(measures if request.measurements else Text("No measurements yet.", style="dim"))
    parts.append(Text(""))
    if request.receipt is not None:
        parts.append(Text(f"Signed receipt (key {request.receipt_key_id}):", style="bold"))
        parts.append(Text(pretty_json(request.receipt)))
        parts.append(
            Text("Check it: lethe api get ID --receipt-out F; lethe receipt verify F", style="dim")
        )
    else:
        parts.append(
            Text("No receipt yet: one is signed when the request is VERIFIED.", style="dim")
        )
    return RichGroup(*parts)  # type: ignore[arg-type]
