"""`lethe demo`, the README's first command: a local fleet learns, then forgets a person.

It starts the fleet of `lethe.fleet.local` (model, SuperLink, three devices of
different speed, FedCompass coordinator, deletion API), lets the shared model
go through a few versions, files a deletion request for one of device 0's
people and follows it to VERIFIED. On a terminal the operator console shows it
all live (`q` leaves and stops the fleet); without one, progress bars and then
a summary table are printed. The exit status is 0 only when the person was
forgotten as promised: request VERIFIED, receipt signature valid, the device no
longer holds the person and no longer completes their canary.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lethe.fleet.local import FleetPlan, LocalFleet, Outcome
from lethe.fleet.processes import wait_until

DELETION_STEPS = ("RECEIVED", "DISPATCHED", "APPLIED_ON_DEVICES", "APPLIED_GLOBALLY", "VERIFIED")


def fresh(plan: FleetPlan) -> None:
    """Start from a clean fleet (the built model is kept: it takes the longest to make)."""
    for index in range(len(plan.slowdowns)):
        shutil.rmtree(plan.device_dir(index), ignore_errors=True)
    shutil.rmtree(plan.coordinator_dir, ignore_errors=True)
    shutil.rmtree(plan.root / "logs", ignore_errors=True)


def forgotten(outcome: Outcome) -> bool:
    return (
        outcome.status == "VERIFIED"
        and outcome.receipt_verified
        and not outcome.still_held
        and not outcome.after.canary_completed
    )


def summary(outcome: Outcome) -> Table:
    table = Table(title="Lethe demo: a person forgotten", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("deletion request", outcome.request_id)
    table.add_row("status", f"{outcome.status} after {outcome.seconds_to_verified:.0f} s")
    table.add_row("receipt", "signature valid" if outcome.receipt_verified else "NOT VALID")
    before, after = outcome.before, outcome.after
    table.add_row("facts answered", f"{before.facts_right}/{before.facts} → {after.facts_right}")
    table.add_row(
        "canary completed",
        f"{'yes' if before.canary_completed else 'no'} → "
        f"{'yes' if after.canary_completed else 'no'}",
    )
    table.add_row("device still holds them", "yes" if outcome.still_held else "no")
    table.add_row("shared model versions", str(outcome.versions))
    for node in outcome.nodes:
        speed = node["seconds_per_step"]
        table.add_row(
            f"node {node['node'] & 0xFFFFFF:06x}",
            f"{'?' if speed is None else f'{speed:.2f}'} s/step, mean Q {node['mean_q']:.1f}, "
            f"{node['updates']} updates",
        )
    return table


@dataclass
class _Bars:
    """The progress bars of a run without a terminal console."""

    progress: Progress
    versions_total: int

    def __post_init__(self) -> None:
        self.setup = self.progress.add_task("starting the fleet", total=None)
        self.versions = self.progress.add_task(
            "shared model versions", total=self.versions_total, visible=False
        )
        self.deletion = self.progress.add_task(
            "deletion request", total=len(DELETION_STEPS), visible=False
        )

    def say(self, stage: str, message: str) -> None:
        moment = time.strftime("%H:%M:%S")
        self.progress.console.print(f"[dim]{moment}[/] [bold]{stage}[/] {escape(message)}")
        if stage == "coordinator":
            self.progress.update(self.setup, total=1, completed=1)
            self.progress.update(self.versions, visible=True)
        elif stage == "training":
            version = int(message.rsplit(" ", 1)[-1])
            self.progress.update(self.versions, completed=min(version, self.versions_total))
        elif stage == "deletion":
            self.progress.update(self.deletion, visible=True)
            word = message.split(" ", 1)[0]
            if word in DELETION_STEPS:
                self.progress.update(self.deletion, completed=DELETION_STEPS.index(word) + 1)


def run_printed(plan: FleetPlan, console: Console) -> Outcome:
    """The demo without a console: progress bars while it runs, then the summary."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        bars = _Bars(progress, plan.versions_before_deletion)
        with LocalFleet(plan, bars.say) as fleet:
            fleet.start()
            outcome = fleet.forget_someone()
    console.print(summary(outcome))
    return outcome


def run_with_console(plan: FleetPlan, console: Console) -> Outcome | None:
    """The demo on a terminal: the fleet starts (printed), then the operator console opens
    and shows it live while the story runs; leaving the console stops the fleet."""
    from coordinator.console.app import ApiAccess, LetheConsole
    from coordinator.console.source import StoreLocation, StoreSource

    outcome: list[Outcome] = []
    with LocalFleet(
        plan, lambda stage, message: console.print(f"[bold]{stage}[/] {escape(message)}")
    ) as fleet:
        fleet.start()
        app = LetheConsole(
            StoreSource(StoreLocation.in_data_dir(plan.coordinator_dir)),
            ApiAccess(fleet.api_address, fleet.operator_token, fleet.certs.ca_cert),
        )

        def tell(stage: str, message: str, **style: object) -> None:
            with contextlib.suppress(RuntimeError):  # the console was closed meanwhile
                app.call_from_thread(app.notify, message, title=stage, timeout=8, **style)

        def story() -> None:
            wait_until(lambda: app.is_running, "the console", 60, every_s=0.1)
            fleet.say = tell
            try:
                outcome.append(fleet.forget_someone())
            except Exception as error:  # noqa: BLE001 (shown to the operator, not a traceback)
                tell("demo", str(error), severity="error")
                return
            done = "forgotten as promised" if forgotten(outcome[0]) else "NOT forgotten"
            tell("demo finished", f"{outcome[0].subject_id}: {done}. Press q to stop the fleet.")

        threading.Thread(target=story, name="demo-story", daemon=True).start()
        app.run()
        console.print("stopping the fleet...")
    if outcome:
        console.print(summary(outcome[0]))
        return outcome[0]
    return None
