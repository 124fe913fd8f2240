"""The `lethe` command: one entry point whose sub-commands call into the parts.

Each command parses its options, calls one function of `client`,
`coordinator`, `edge_models` or `lethe.bench`, and prints the result; no
behaviour lives here that a test could not reach through those functions.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.paths import DataDir, default_data_dir

if TYPE_CHECKING:
    from coordinator.deletions.client import DeletionClient
    from shared.flower_cli import FlowerConnection

app = typer.Typer(
    help="Lethe: federated continual learning for edge devices that can also forget.",
    no_args_is_help=True,
)
model_app = typer.Typer(help="Build and inspect edge models.", no_args_is_help=True)
corpus_app = typer.Typer(help="The synthetic corpus.", no_args_is_help=True)
client_app = typer.Typer(help="The edge device: records and inference.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that write JSON.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(corpus_app, name="corpus")
app.add_typer(client_app, name="client")
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (default: $LETHE_DATA_DIR or ~/.lethe)."),
]
DeviceOption = Annotated[str, typer.Option(help="Compute device: auto, cpu, cuda or cuda:N.")]
RootCertificatesOption = Annotated[
    Path | None,
    typer.Option(help="CA of the SuperLink's TLS (default: DATA_DIR/certs/ca.crt).", exists=True),
]
SuperLinkOption = Annotated[str, typer.Option(help="The SuperLink's address (host:port).")]
DEFAULT_SUPERLINK = "127.0.0.1:9093"


def _data_dir(path: Path | None) -> DataDir:
    return DataDir(path or default_data_dir()).ensure()


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=1)


def _model_dir(model: str, data_dir: Path | None) -> Path:
    """The directory of `model`: a model stored under the data directory, or a model directory;
    one clear error (saying how to build or import it) when it is neither."""
    from edge_models.model_store import ModelStoreError, resolve_model

    try:
        return resolve_model(model, _data_dir(data_dir).models)
    except ModelStoreError as exc:
        raise _fail(str(exc)) from exc


@model_app.command("build")
def model_build(
    data_dir: DataDirOption = None,
    seed: Annotated[int, typer.Option(help="Seed of the corpus and of training.")] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Training steps (default: the build config's).")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Train the default model on the synthetic corpus and publish it as a new version."""
    from edge_models.default_model import BuildConfig, build_default_model

    config = BuildConfig(seed=seed, device=device)
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    version, report = build_default_model(_data_dir(data_dir).models, config, log=err_console.print)
    table = Table(title=f"default model v{version.version}  ({version.path})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in dataclasses.asdict(report).items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    table.add_row("checksum", version.checksum[:16])
    console.print(table)


@model_app.command("import")
def model_import(
    name: Annotated[str, typer.Argument(help="Packaged model to import (smollm2).")],
    data_dir: DataDirOption = None,
    force: Annotated[bool, typer.Option(help="Import again even if this file is stored.")] = False,
) -> None:
    """Turn a pretrained model shipped by a registry package into a stored model, once."""
    from edge_models.pretrained import ModelImportError, import_packaged

    try:
        version, new = import_packaged(name, _data_dir(data_dir).models, force, err_console.print)
    except ModelImportError as exc:
        raise _fail(str(exc)) from exc
    state = "imported" if new else "already imported"
    console.print(f"{name} v{version.version} {state}: {version.path}")


@model_app.command("info")
def model_info(
    name: Annotated[str, typer.Argument(help="Stored model name.")] = "default",
    data_dir: DataDirOption = None,
) -> None:
    """Show the current version of a stored model and verify its checksums."""
    from edge_models.model_store import ModelStoreError, current, verify

    try:
        version = current(_data_dir(data_dir).models, name)
        verify(version)
    except ModelStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print_json(
        json.dumps(
            {
                "name": version.name,
                "version": version.version,
                "path": str(version.path),
                "checksum": version.checksum,
                "metadata": version.metadata,
            }
        )
    )


@corpus_app.command("stream")
def corpus_stream(
    out: Annotated[Path, typer.Option(help="JSON-lines file to write.")],
    device: Annotated[int, typer.Option(help="Which device's stream (0-based).")] = 0,
    devices: Annotated[int, typer.Option(help="How many devices share the private subjects.")] = 3,
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration of domain skew.")] = 0.5,
    seed: int = 0,
) -> None:
    """Write one device's record stream (ingest format) from the synthetic corpus."""
    from edge_models.corpus import build_corpus, device_stream, partition

    corpus = build_corpus(seed)
    parts = partition(corpus, devices, alpha=alpha, seed=seed)
    if not 0 <= device < devices:
        raise _fail(f"--device must be in 0..{devices - 1}")
    records = device_stream(corpus, parts[device], seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    console.print(
        f"wrote {len(records)} records of {len(parts[device].subject_ids)} subjects to {out}"
    )


@client_app.command("ingest")
def client_ingest(
    file: Annotated[
        Path, typer.Argument(help="JSON-lines file of records.", exists=True, dir_okay=False)
    ],
    data_dir: DataDirOption = None,
) -> None:
    """Store a file of records, each encrypted under its subject's key (all or nothing)."""
    from client.record_store import RecordStore, RecordStoreError
    from shared.records import RecordFileError

    paths = _data_dir(data_dir)
    try:
        with RecordStore.open(paths.record_db, paths.master_key) as store:
            report = store.ingest_file(file)
            total = store.count()
    except RecordFileError as exc:
        for line, reason in exc.errors:
            err_console.print(f"{file}:{line}: {reason}")
        raise _fail(f"{file} rejected: {exc.bad_lines} bad line(s); nothing was stored") from exc
    except RecordStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"stored {report.accepted} new record(s) of {report.subjects} subject(s) "
        f"({report.duplicates} duplicate(s) skipped); the device holds {total} record(s)"
    )


@client_app.command("delete-subject")
def client_delete_subject(
    subject_id: Annotated[str, typer.Argument(help="The subject whose records to destroy.")],
    data_dir: DataDirOption = None,
) -> None:
    """Destroy a subject's key and records on this device (crypto-shredding)."""
    from client.record_store import RecordStore, RecordStoreError

    paths = _data_dir(data_dir)
    try:
        with RecordStore.open(paths.record_db, paths.master_key) as store:
            report = store.delete_subject(subject_id)
    except RecordStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print(
        f"destroyed subject {report.subject_hash[:16]}: {report.records_deleted} record(s), "
        f"key epoch now {report.key_epoch}"
    )


@client_app.command("generate")
def client_generate(
    prompt: Annotated[list[str], typer.Argument(help="One or more prompts (batched together).")],
    data_dir: DataDirOption = None,
    model: Annotated[
        str,
        typer.Option(help="Stored model name or HF model directory, exported if none is served."),
    ] = "default",
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 is greedy; above 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed of sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Generate with ONNX Runtime from what the device serves (base + shared + personal).

    The device's current export is used as it is (the daemon keeps it up to
    date); only a device that has never exported anything exports `--model`.
    """
    from client.inference import SamplingParams
    from client.serving import ServedModel, current_export, ensure_export
    from edge_models.loading import ModelLoadError, load_causal_lm
    from edge_models.model_store import ModelStoreError, resolve_model

    paths = _data_dir(data_dir)
    try:
        params = SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_strings=tuple(stop or ()),
        )
        if current_export(paths.onnx_exports) is None:
            loaded = load_causal_lm(resolve_model(model, paths.models), device=device)
            ensure_export(loaded.model, [], paths.onnx_exports, device, loaded.tokenizer)
        completions = ServedModel(paths.onnx_exports, device).generator().generate(prompt, params)
    except (ValueError, ModelStoreError, ModelLoadError) as exc:
        raise _fail(str(exc)) from exc
    for text, completion in zip(prompt, completions, strict=True):
        console.print(f"[bold]{text}[/]{completion.text}  [dim]({completion.finish_reason})[/]")


@client_app.command("run")
def client_run(
    data_dir: DataDirOption = None,
    model: Annotated[str, typer.Option(help="Stored model name or a local HF model directory.")] = (
        "default"
    ),
    poll: Annotated[float, typer.Option(help="Seconds between looks at the inbox.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the personal adapter and its training.")] = 0,
    threads: Annotated[
        int, typer.Option(help="CPU threads for training (0: torch's default).")
    ] = 0,
    epochs_per_burst: Annotated[
        float | None,
        typer.Option(
            help="A fixed schedule: passes over each burst's records, new and replayed "
            "(default: none, train until the records are learned or learning stalls)."
        ),
    ] = None,
    max_steps_per_burst: Annotated[
        int | None,
        typer.Option(help="A burst's safety ceiling in steps (default: 3000)."),
    ] = None,
    device: DeviceOption = "auto",
    superlink: Annotated[
        str | None,
        typer.Option(help="Join the federation at this SuperLink (HOST:PORT) with a SuperNode."),
    ] = None,
    node_key: Annotated[
        Path | None,
        typer.Option(help="This device's private key (default: DATA_DIR/certs/node.key)."),
    ] = None,
    root_certificates: RootCertificatesOption = None,
    insecure: Annotated[
        bool, typer.Option(help="Plain HTTP to the SuperLink, no node key (tests).")
    ] = False,
    node_config: Annotated[
        str, typer.Option(help="More SuperNode config, 'key=value ...' (TOML values).")
    ] = "",
    served_weights: Annotated[
        str, typer.Option(help="Serve float32, or a quantised export: int8 or int4.")
    ] = "float32",
) -> None:
    """The device daemon: ingest the inbox, learn continually, serve the local channel and,
    with --superlink, take part in federated rounds through a SuperNode it keeps running.

    Runs until SIGINT or SIGTERM. Drop record files into DATA_DIR/device/inbox
    (write NAME.jsonl.part, then rename to NAME.jsonl).
    """
    import logging
    import signal
    import threading

    from client.daemon import DaemonConfig, DaemonError, DeviceDaemon
    from client.device_channel import socket_path
    from client.device_service import serve
    from client.supernode import SuperNodeKeeper
    from shared.flower_cli import parse_address

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    paths = _data_dir(data_dir)
    supernode = None
    if superlink is not None:
        supernode = _supernode_command(
            superlink, node_key, root_certificates, insecure, node_config, paths
        )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        given = {"epochs_per_burst": epochs_per_burst, "max_steps_per_burst": max_steps_per_burst}
        burst = {name: value for name, value in given.items() if value is not None}
        if served_weights not in ("float32", "int8", "int4"):
            raise ValueError(f"--served-weights must be float32, int8 or int4: {served_weights!r}")
        config = DaemonConfig(
            model=model,
            device=device,
            seed=seed,
            poll_s=poll,
            served_weights=served_weights,  # type: ignore[arg-type]
            **burst,
        )
        daemon = DeviceDaemon(paths, config)
    except (ValueError, DaemonError) as exc:
        raise _fail(str(exc)) from exc
    with daemon:
        server = serve(daemon, paths.device)
        err_console.print(
            f"device daemon ready: inbox {daemon.inbox}, local channel {socket_path(paths.device)}"
        )
        keeper = None
        if supernode is not None:
            address = parse_address(superlink)
            keeper = SuperNodeKeeper(supernode, address, paths.device / "supernode.log").start()
            err_console.print(f"SuperNode for {superlink} started (log {keeper.log_path})")
        try:
            daemon.run(stop)
        finally:
            if keeper is not None:
                keeper.stop()
            server.stop(grace=5).wait()
    err_console.print("device daemon stopped")


def _supernode_command(
    superlink: str,
    node_key: Path | None,
    root_certificates: Path | None,
    insecure: bool,
    node_config: str,
    paths: DataDir,
) -> Callable[[int], list[str]]:
    """The SuperNode's command line for a port, its files checked now (not at first start)."""
    from shared.flower_cli import parse_address, supernode_command
    from shared.pki import CertFiles, CertificateError

    try:
        parse_address(superlink)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    key = None
    trusted = _trusted_ca(root_certificates, insecure, paths.root)
    if not insecure:
        key = node_key or CertFiles(paths.certs).directory / "node.key"
        try:
            CertFiles(paths.certs).require(key)
        except CertificateError as exc:
            message = f"{exc}; copy the node key from the coordinator's `lethe certs init`"
            raise _fail(message) from exc
    config = f"data-dir='{paths.root}' {node_config}".strip()
    return lambda port: supernode_command(superlink, port, config, trusted, key)


@bench_app.command("inference")
def bench_inference(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    runs: Annotated[int, typer.Option(help="Timed runs per engine and config (median).")] = 20,
    model: Annotated[
        list[str] | None,
        typer.Option(help="Also a stored model or HF directory, with quantised exports."),
    ] = None,
    model_runs: Annotated[int, typer.Option(help="Timed runs for each --model.")] = 8,
    data_dir: DataDirOption = None,
    device: DeviceOption = "auto",
) -> None:
    """Per-token latency: PyTorch eager against ONNX Runtime, both with KV cache."""
    from lethe.bench.inference import run_inference_bench

    models = {name: _model_dir(name, data_dir) for name in model or []}
    results = run_inference_bench(
        json_path, runs=runs, device=device, models=models, model_runs=model_runs
    )
    console.print_json(json.dumps(results))


@bench_app.command("continual")
def bench_continual(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of corpus, model and training.")] = 0,
    model: Annotated[
        str | None,
        typer.Option(
            help="A stored model's name or a model directory (default: the default model, "
            "built from the seed); a pretrained model runs on a smaller stream."
        ),
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Five domains learned in order: naive, replay and Lethe's method side by side."""
    from lethe.bench.continual import run_continual_bench, settings_for

    if model is None:
        results = run_continual_bench(json_path, device=device, seed=seed, log=err_console.print)
    else:
        model_dir = _model_dir(model, data_dir)
        results = run_continual_bench(
            json_path,
            device=device,
            seed=seed,
            settings=settings_for(model),
            log=err_console.print,
            model=model_dir,
            model_name=model,
        )
    console.print_json(json.dumps(results))


@bench_app.command("learning")
def bench_learning(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    model: Annotated[str, typer.Option(help="Stored model name or a local HF model directory.")] = (
        "default"
    ),
    people: Annotated[
        int | None, typer.Option(help="Only the first N people of the set (default: all 40).")
    ] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for torch (0: torch's default).")] = 0,
    device: DeviceOption = "cpu",
    data_dir: DataDirOption = None,
) -> None:
    """A fresh device daemon learns records written apart from the corpus; every fact asked."""
    from lethe.bench.learning import run_learning_bench

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    model_dir = _model_dir(model, data_dir)
    results = run_learning_bench(
        json_path, model_dir, model, device, people=people, log=err_console.print
    )
    console.print_json(json.dumps(results))


@bench_app.command("unlearning")
def bench_unlearning(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of corpus, model and training.")] = 0,
    model: Annotated[
        str,
        typer.Option(
            help="`default` (built from the seed, as `lethe bench continual` caches it), or a "
            "stored model's name or a model directory (e.g. `smollm2`), at its own scale."
        ),
    ] = "default",
    data_dir: DataDirOption = None,
) -> None:
    """Forgetting 1%, 5% and 10% of a device's people: STAMP (full, low rank), gradient
    ascent, NPO and retraining, with relapse after five federated groups (a stored model
    such as smollm2 at its own scale: 1 and 3 of 5 people; see `lethe.bench.unlearning`)."""
    from edge_models.model_store import ModelStoreError
    from lethe.bench.unlearning import DEFAULT_MODEL, run_unlearning_bench

    models = None if model == DEFAULT_MODEL else DataDir(data_dir or default_data_dir()).models
    try:
        results = run_unlearning_bench(
            json_path,
            device=device,
            seed=seed,
            log=err_console.print,
            model=model,
            models_root=models,
        )
    except ModelStoreError as exc:
        raise _fail(str(exc)) from exc
    console.print_json(json.dumps(results))


@bench_app.command("scheduling")
def bench_scheduling(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    thousand: Annotated[
        bool, typer.Option(help="Also time a 1,000-client run through Flower's simulation.")
    ] = True,
) -> None:
    """FedAvg, FedAsync, FedBuff and FedCompass on the same simulated fleets."""
    from lethe.bench.scheduling import run_scheduling_bench

    results = run_scheduling_bench(json_path, log=err_console.print, thousand=thousand)
    console.print_json(json.dumps(results))


@bench_app.command("robust")
def bench_robust(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    seeds: Annotated[int, typer.Option(help="Reported seeds: 1 to this.")] = 3,
    workers: Annotated[
        int, typer.Option(help="Processes running the cells (results do not depend on it).")
    ] = 2,
) -> None:
    """Robust aggregation (clipping, trimmed mean) against poisoned clients, simulated."""
    from lethe.bench.robust import BenchSettings, run_robust_bench

    if seeds < 1 or workers < 1:
        raise _fail("--seeds and --workers must be at least 1")
    settings = BenchSettings(seeds=tuple(range(1, seeds + 1)))
    results = run_robust_bench(json_path, err_console.print, settings, workers)
    console.print_json(json.dumps(results))


@bench_app.command("clientapp")
def bench_clientapp(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    model: Annotated[str, typer.Option(help="Stored model name or a local HF model directory.")] = (
        "default"
    ),
    steps: Annotated[int, typer.Option(help="Local steps per message.")] = 10,
    repeats: Annotated[int, typer.Option(help="Runs (median).")] = 5,
    data_dir: DataDirOption = None,
) -> None:
    """Per-message cost of the ClientApp on top of training: warm daemon against cold start."""
    from lethe.bench.device_channel import run_clientapp_bench

    model_dir = _model_dir(model, data_dir)
    results = run_clientapp_bench(json_path, model_dir, steps, repeats, log=err_console.print)
    console.print_json(json.dumps(results))


@bench_app.command("api")
def bench_api(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the results.")],
    requests: Annotated[int, typer.Option(help="Deletion requests to submit in all.")] = 10_000,
    rps: Annotated[float, typer.Option(help="Submissions per second, in all.")] = 200.0,
    clients: Annotated[int, typer.Option(help="Concurrent clients, one app token each.")] = 8,
    crash: Annotated[
        bool, typer.Option(help="SIGKILL the API halfway and start it again at once.")
    ] = True,
) -> None:
    """The deletion API under a paced load, killed halfway: requests lost or duplicated,
    throughput, submit latency and the time to come back."""
    from lethe.bench.api import run_api_bench

    try:
        results = run_api_bench(
            json_path,
            requests=requests,
            rps=rps,
            clients=clients,
            crash=crash,
            log=err_console.print,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    console.print_json(json.dumps(results))


@app.command("demo")
def demo(
    data_dir: DataDirOption = None,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the corpus and of training.")] = 0,
    show_console: Annotated[
        bool | None,
        typer.Option(
            "--console/--no-console",
            help="Open the operator console (default: when run on a terminal).",
        ),
    ] = None,
    summary_json: Annotated[
        Path | None, typer.Option("--summary-json", help="Write the outcome here as JSON.")
    ] = None,
    model: Annotated[
        str, typer.Option(help="Base model: default (built), or a packaged one (smollm2).")
    ] = "default",
) -> None:
    """The main job: a local fleet learns together, then forgets a person on request."""
    from edge_models.default_model import BuildConfig
    from lethe.demo import forgotten, fresh, run_printed, run_with_console
    from lethe.fleet.local import FleetPlan

    root = DataDir(data_dir or default_data_dir()).root / "fleet"
    plan = FleetPlan(
        root, seed=seed, device=device, build=BuildConfig(seed=seed, device=device), model=model
    )
    fresh(plan)
    interactive = sys.stdout.isatty() if show_console is None else show_console
    try:
        outcome = run_with_console(plan, console) if interactive else run_printed(plan, console)
    except KeyboardInterrupt:
        err_console.print("interrupted: every process the demo started was stopped")
        raise typer.Exit(code=130) from None
    except TimeoutError as error:
        raise _fail(f"{error} (the processes' logs are in {root / 'logs'})") from error
    if outcome is not None and summary_json is not None:
        summary_json.write_text(json.dumps(dataclasses.asdict(outcome), indent=2) + "\n")
    if outcome is None or not forgotten(outcome):
        raise typer.Exit(code=1)


@app.command("simulate")
def simulate(
    policy: Annotated[str, typer.Option(help="fedavg, fedasync, fedbuff or fedcompass.")] = (
        "fedcompass"
    ),
    clients: Annotated[int, typer.Option(help="Virtual clients (SuperNodes).")] = 10,
    speeds: Annotated[
        str, typer.Option(help="Client speeds: homogeneous, normal or exponential.")
    ] = "exponential",
    partition: Annotated[str, typer.Option(help="dirichlet:ALPHA or iid.")] = "dirichlet:0.5",
    seed: Annotated[int, typer.Option(help="Seed of data, speeds and training.")] = 1,
    budget: Annotated[float, typer.Option(help="Virtual seconds to simulate.")] = 4000.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the run's curve here.")
    ] = None,
    run_config: Annotated[
        list[str] | None, typer.Option(help="More policy settings, KEY=VALUE (TOML values).")
    ] = None,
) -> None:
    """A simulated fleet through Flower's simulation runtime, on a virtual clock."""
    from coordinator.simulation.flower_run import SimulationRequest, simulate_with_flower

    try:
        request = SimulationRequest.create(
            policy, clients, speeds, partition, seed, budget, run_config or []
        )
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    result = simulate_with_flower(request)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    curve = result["accuracies"]
    console.print(
        f"{policy}: {result['updates']} updates, {result['aggregations']} aggregations, "
        f"accuracy {curve[0]:.3f} -> {curve[-1]:.3f} in {budget:g} virtual s "
        f"({result['wall_s']:.1f} s wall, {result['overhead_ms_per_update']:.2f} ms/update)"
    )


@app.command("coordinator")
def coordinator(
    listen: Annotated[
        str | None,
        typer.Option(help=f"Start a SuperLink on this HOST:PORT (default {DEFAULT_SUPERLINK})."),
    ] = None,
    superlink: Annotated[
        str | None, typer.Option(help="Use the SuperLink already running at this HOST:PORT.")
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(help="Plain HTTP and no SuperNode authentication (tests on loopback)."),
    ] = False,
    root_certificates: RootCertificatesOption = None,
    policy: Annotated[str, typer.Option(help="fedavg, fedasync, fedbuff or fedcompass.")] = (
        "fedcompass"
    ),
    run_name: Annotated[str, typer.Option(help="Lethe run to start or resume.")] = "default",
    max_versions: Annotated[int, typer.Option(help="Stop after this version (0: never).")] = 0,
    time_limit: Annotated[float, typer.Option(help="Stop after this many seconds (0: never).")] = (
        0.0
    ),
    state_url: Annotated[
        str, typer.Option(help="SQLAlchemy URL of the state (default: SQLite in the data dir).")
    ] = "",
    run_config: Annotated[
        list[str] | None, typer.Option(help="More settings, KEY=VALUE (TOML values).")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Run Lethe's coordinator: start a SuperLink (TLS, SuperNode authentication with the keys
    of DATA_DIR/certs) or reach one, submit the FedCompass run and follow it until it ends."""
    from coordinator.launch import CoordinatorLaunch, launch
    from shared.pki import CertFiles, CertificateError

    paths = _data_dir(data_dir)
    settings = {
        "policy": policy,
        "run-name": run_name,
        "max-versions": max_versions,
        "time-limit-s": time_limit,
        "state-url": state_url,
        "data-dir": str(paths.root),
    }
    if superlink is None and listen is None:
        listen = DEFAULT_SUPERLINK
    certs = None if insecure else CertFiles(paths.certs)
    try:
        request = CoordinatorLaunch.create(
            superlink, listen, certs, root_certificates, settings, run_config or [], paths.root
        )
        code = launch(request)
    except (ValueError, CertificateError, RuntimeError) as exc:
        raise _fail(str(exc)) from exc
    raise typer.Exit(code=code)


# -- the deletion-request API and receipts -----------------------------------------------------

api_app = typer.Typer(
    help="The deletion-request API (gRPC): serve, tokens, calls.", no_args_is_help=True
)
api_token_app = typer.Typer(help="Bearer tokens of the deletion API.", no_args_is_help=True)
receipt_app = typer.Typer(help="Signed deletion receipts.", no_args_is_help=True)
api_app.add_typer(api_token_app, name="token")
app.add_typer(api_app, name="api")
app.add_typer(receipt_app, name="receipt")

AddressOption = Annotated[str, typer.Option(help="The deletion API's address (host:port).")]
TokenOption = Annotated[
    str, typer.Option(envvar="LETHE_API_TOKEN", help="Bearer token (or $LETHE_API_TOKEN).")
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option(
        help="CA certificate of the API's TLS (default: DATA_DIR/certs/ca.crt).", exists=True
    ),
]
InsecureClientOption = Annotated[
    bool, typer.Option("--insecure", help="Plain gRPC, no TLS (a test API on loopback).")
]
DEFAULT_API_ADDRESS = "127.0.0.1:50061"


@api_app.command("serve")
def api_serve(
    data_dir: DataDirOption = None,
    address: AddressOption = DEFAULT_API_ADDRESS,
    state_url: Annotated[
        str,
        typer.Option(help="SQLAlchemy URL (default: SQLite DATA_DIR/coordinator/deletions.db)."),
    ] = "",
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="TLS certificate chain (default: DATA_DIR/certs/server.crt).", exists=True
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="TLS private key (default: DATA_DIR/certs/server.key).", exists=True),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain gRPC, no TLS (tests on loopback only).")
    ] = False,
    workers: Annotated[int, typer.Option(help="Threads serving calls.")] = 16,
    rate: Annotated[float, typer.Option(help="Calls per second each token may sustain.")] = 100.0,
    burst: Annotated[int, typer.Option(help="Calls each token may make at once.")] = 200,
) -> None:
    """Serve the deletion-request API (TLS, bearer tokens) until SIGINT or SIGTERM."""
    import signal
    import threading

    from coordinator.deletions.access import TokenFileError
    from coordinator.deletions.layout import ApiFiles
    from coordinator.deletions.limits import RateLimit
    from coordinator.deletions.service import serve
    from coordinator.deletions.store import DeletionStore
    from shared.pki import CertFiles, CertificateError

    paths = _data_dir(data_dir)
    files = ApiFiles(paths.root)
    if not files.tokens.exists():
        raise _fail(f"no tokens file {files.tokens}; make a token with `lethe api token add`")
    try:
        limit = RateLimit(rate, burst)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    tls = None
    if not insecure:
        certs = CertFiles(paths.certs)
        cert, key = tls_cert or certs.server_cert, tls_key or certs.server_key
        try:
            certs.require(cert, key)
        except CertificateError as exc:
            raise _fail(str(exc)) from exc
        tls = (cert.read_bytes(), key.read_bytes())
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    files.directory.mkdir(parents=True, exist_ok=True)
    with DeletionStore(state_url or files.url()) as store:
        try:
            server = serve(store, address, files.tokens, tls=tls, workers=workers, rate_limit=limit)
        except (TokenFileError, OSError, RuntimeError) as exc:
            raise _fail(str(exc)) from exc
        err_console.print(f"deletion API listening on {address} ({'TLS' if tls else 'plain'})")
        stop.wait()
        server.stop(grace=2).wait()
    err_console.print("deletion API stopped")


@api_token_app.command("add")
def api_token_add(
    app_name: Annotated[str, typer.Option("--app", help="The app the token belongs to.")],
    scope: Annotated[str, typer.Option(help="app (its own subjects) or operator (all).")] = "app",
    subjects: Annotated[
        list[str] | None, typer.Option(help="Subject-id glob the app owns (repeatable).")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make a token; it is printed once (only its sha256 is stored)."""
    from coordinator.deletions.access import Scope, TokenFileError, add_token
    from coordinator.deletions.layout import ApiFiles

    if scope not in {s.value for s in Scope}:
        raise _fail(f"--scope must be one of {[s.value for s in Scope]}")
    files = ApiFiles(_data_dir(data_dir).root)
    try:
        token = add_token(files.tokens, app_name, Scope(scope), subjects or [])
    except TokenFileError as exc:
        raise _fail(str(exc)) from exc
    err_console.print(
        f"token for {scope} {app_name!r} stored as a hash in {files.tokens}; it is shown only now:"
    )
    print(token)


@api_token_app.command("list")
def api_token_list(data_dir: DataDirOption = None) -> None:
    """The tokens the API accepts: id, app, scope, subjects, made when (never the token)."""
    from datetime import UTC, datetime

    from coordinator.deletions.access import TokenFileError, list_tokens
    from coordinator.deletions.layout import ApiFiles

    try:
        entries = list_tokens(ApiFiles(_data_dir(data_dir).root).tokens)
    except TokenFileError as exc:
        raise _fail(str(exc)) from exc
    table = Table("id", "app", "scope", "subjects", "created (UTC)")
    for entry in entries:
        made = entry.created_at
        table.add_row(
            entry.token_id,
            entry.grant.app,
            entry.grant.scope.value,
            " ".join(entry.grant.subjects) or "(all)",
            "" if made is None else datetime.fromtimestamp(made, UTC).strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@api_token_app.command("revoke")
def api_token_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (`lethe api token list`).")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a token: the running API refuses it from its next call."""
    from coordinator.deletions.access import TokenFileError, revoke_token
    from coordinator.deletions.layout import ApiFiles

    try:
        revoked = revoke_token(ApiFiles(_data_dir(data_dir).root).tokens, token_id)
    except TokenFileError as exc:
        raise _fail(str(exc)) from exc
    err_console.print(f"revoked token {revoked.token_id} of app {revoked.grant.app!r}")


def _trusted_ca(tls_ca: Path | None, insecure: bool, data_dir: Path | None) -> Path | None:
    """The CA a client of a Lethe service trusts: given, or the data directory's; None only
    with --insecure. Refused when there is none (no silent fall back to plain gRPC)."""
    if insecure:
        return None
    if tls_ca is not None:
        return tls_ca
    from shared.pki import CertFiles, CertificateError

    certs = CertFiles(DataDir(data_dir or default_data_dir()).certs)
    try:
        certs.require(certs.ca_cert)
    except CertificateError as exc:
        raise _fail(f"{exc}; or give --tls-ca") from exc
    return certs.ca_cert


@contextmanager
def _api_client(
    address: str, token: str, tls_ca: Path | None, insecure: bool, data_dir: Path | None
) -> Iterator[DeletionClient]:
    """A client of the API for one command; a gRPC error becomes the command's error."""
    import grpc

    from coordinator.deletions.client import DeletionClient

    if not token:
        raise _fail("give --token or set LETHE_API_TOKEN")
    trusted = _trusted_ca(tls_ca, insecure, data_dir)
    certificates = None if trusted is None else trusted.read_bytes()
    with DeletionClient(address, token, root_certificates=certificates) as client:
        try:
            yield client
        except grpc.RpcError as exc:
            raise _fail(f"{exc.code().name}: {exc.details()}") from exc


@api_app.command("submit")
def api_submit(
    subject_id: Annotated[str, typer.Argument(help="The subject to forget.")],
    idempotency_key: Annotated[
        str, typer.Option(help="Your id for this request: resubmitting it never duplicates.")
    ],
    kind: Annotated[list[str] | None, typer.Option(help="Only records of this kind.")] = None,
    from_ts: Annotated[float | None, typer.Option(help="Only records from this time.")] = None,
    to_ts: Annotated[float | None, typer.Option(help="Only records before this time.")] = None,
    address: AddressOption = DEFAULT_API_ADDRESS,
    token: TokenOption = "",
    tls_ca: TlsCaOption = None,
    insecure: InsecureClientOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Ask the coordinator to forget a subject (all records, or the selected ones)."""
    from coordinator.deletions.client import as_json
    from coordinator.deletions.records import InvalidDeletion, RecordSelector

    try:
        narrowed = kind or from_ts is not None or to_ts is not None
        selectors = [RecordSelector(tuple(kind or ()), from_ts, to_ts)] if narrowed else []
    except InvalidDeletion as exc:
        raise _fail(str(exc)) from exc
    with _api_client(address, token, tls_ca, insecure, data_dir) as client:
        request = client.submit(subject_id, idempotency_key, selectors)
    console.print_json(json.dumps(as_json(request)))


@api_app.command("get")
def api_get(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    receipt_out: Annotated[
        Path | None, typer.Option(help="Write the signed receipt to this file (if there is one).")
    ] = None,
    address: AddressOption = DEFAULT_API_ADDRESS,
    token: TokenOption = "",
    tls_ca: TlsCaOption = None,
    insecure: InsecureClientOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Show a request: status, history, details and its receipt."""
    from coordinator.deletions.client import as_json, signed_receipt
    from shared.durable import atomic_write_bytes
    from shared.receipts import receipt_file_bytes

    with _api_client(address, token, tls_ca, insecure, data_dir) as client:
        request = client.get(request_id)
    console.print_json(json.dumps(as_json(request)))
    if receipt_out is not None:
        receipt = signed_receipt(request)
        if receipt is None:
            raise _fail("the request has no receipt yet")
        atomic_write_bytes(receipt_out, receipt_file_bytes(receipt))
        err_console.print(f"receipt written to {receipt_out}")


@api_app.command("list")
def api_list(
    status: Annotated[str, typer.Option(help="Only requests in this status.")] = "",
    page_size: Annotated[int, typer.Option(help="Requests per page (1 to 500).")] = 50,
    page_token: Annotated[str, typer.Option(help="From a previous page.")] = "",
    address: AddressOption = DEFAULT_API_ADDRESS,
    token: TokenOption = "",
    tls_ca: TlsCaOption = None,
    insecure: InsecureClientOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """List requests, oldest first (an app sees its own, an operator all)."""
    from coordinator.deletions.client import as_json
    from shared.proto.lethe.v1 import deletion_pb2

    try:
        wanted = deletion_pb2.Status.Value(status.upper()) if status else 0
    except ValueError as exc:
        raise _fail(f"unknown status {status!r}") from exc
    with _api_client(address, token, tls_ca, insecure, data_dir) as client:
        page = client.list(wanted, page_size, page_token)
    shown = {
        "requests": [as_json(r) for r in page.requests],
        "next_page_token": page.next_page_token,
    }
    console.print_json(json.dumps(shown))


@api_app.command("watch")
def api_watch(
    request_id: Annotated[str, typer.Argument(help="The request's id.")],
    address: AddressOption = DEFAULT_API_ADDRESS,
    token: TokenOption = "",
    tls_ca: TlsCaOption = None,
    insecure: InsecureClientOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Follow a request until it is VERIFIED (exit 0) or has failed for good (exit 1)."""
    from coordinator.deletions.client import as_json
    from shared.proto.lethe.v1 import deletion_pb2

    last = None
    with _api_client(address, token, tls_ca, insecure, data_dir) as client:
        for change in client.watch(request_id):
            print(json.dumps(as_json(change), sort_keys=True), flush=True)
            last = change
    if last is None or last.status != deletion_pb2.VERIFIED:
        raise typer.Exit(code=1)


@receipt_app.command("verify")
def receipt_verify(
    file: Annotated[Path, typer.Argument(help="Receipt file (`lethe api get --receipt-out`).")],
    public_key: Annotated[Path, typer.Option(help="The coordinator's public key (PEM).")],
) -> None:
    """Check a receipt's signature and body; print its fields if it is genuine."""
    from shared.receipts import ReceiptError, load_public_key, read_receipt_file, verify_receipt

    try:
        fields = verify_receipt(read_receipt_file(file.read_bytes()), load_public_key(public_key))
    except (OSError, ReceiptError) as exc:
        raise _fail(f"receipt not valid: {exc}") from exc
    console.print_json(json.dumps(fields))
    err_console.print(f"valid receipt, signed by key {fields['key_id']}")


# -- keys, certificates and device enrolment ---------------------------------------------------

certs_app = typer.Typer(
    help="The private CA, server certificates and node keys.", no_args_is_help=True
)
node_app = typer.Typer(help="Enrol and revoke devices at the SuperLink.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")
app.add_typer(node_app, name="node")


@certs_app.command("init")
def certs_init(
    host: Annotated[
        list[str] | None,
        typer.Option(help="A DNS name or IP the coordinator is reached at (repeatable)."),
    ] = None,
    node: Annotated[
        list[str] | None, typer.Option(help="Make a key pair for this device (repeatable).")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make DATA_DIR/certs: a CA (kept if it exists), a server certificate for the hosts and
    loopback, and node keys. Copy ca.crt and a node's .key to its device; never ca.key."""
    from datetime import UTC, datetime

    from shared.pki import CertFiles, CertificateError, init_folder

    files = CertFiles(_data_dir(data_dir).certs)
    try:
        written = init_folder(files, host or [], node or [], datetime.now(UTC))
    except CertificateError as exc:
        raise _fail(str(exc)) from exc
    for path in written:
        err_console.print(f"wrote {path}")
    if not written:
        err_console.print(f"{files.directory} already has everything asked for")


def _flower_connection(
    superlink: str, insecure: bool, root_certificates: Path | None, data_dir: Path | None
) -> tuple[FlowerConnection, Path]:
    """A `flwr` connection to the SuperLink and the Flower home to run it from."""
    from shared.flower_cli import FlowerConnection

    trusted = None if insecure else _trusted_ca(root_certificates, False, data_dir)
    try:
        connection = FlowerConnection(superlink, trusted)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    return connection, _data_dir(data_dir).root / "coordinator" / "flwr-home"


InsecureFlowerOption = Annotated[
    bool, typer.Option("--insecure", help="The SuperLink runs without TLS (tests).")
]


@node_app.command("register")
def node_register(
    node: Annotated[
        str, typer.Argument(help="A node name from `lethe certs init --node`, or a .pub file.")
    ],
    superlink: SuperLinkOption = DEFAULT_SUPERLINK,
    insecure: InsecureFlowerOption = False,
    root_certificates: RootCertificatesOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Enrol a device's public key: the SuperLink admits its SuperNode from now on."""
    from shared.flower_cli import register_node
    from shared.pki import CertFiles, CertificateError

    key = Path(node)
    if not key.is_file():
        try:
            key = CertFiles(_data_dir(data_dir).certs).node_public_key(node)
        except CertificateError as exc:
            raise _fail(str(exc)) from exc
        if not key.is_file():
            raise _fail(f"no public key {key}; run `lethe certs init --node {node}`")
    connection, home = _flower_connection(superlink, insecure, root_certificates, data_dir)
    try:
        node_id = register_node(connection, home, key, name=key.stem)
    except RuntimeError as exc:
        raise _fail(str(exc)) from exc
    err_console.print(f"node {key.stem} registered as Flower node {node_id}")
    print(node_id)


@node_app.command("revoke")
def node_revoke(
    node_id: Annotated[int, typer.Argument(help="The Flower node id (`lethe node list`).")],
    superlink: SuperLinkOption = DEFAULT_SUPERLINK,
    insecure: InsecureFlowerOption = False,
    root_certificates: RootCertificatesOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Unregister a device: the SuperLink refuses its SuperNode from its next call on."""
    from shared.flower_cli import revoke_node

    connection, home = _flower_connection(superlink, insecure, root_certificates, data_dir)
    try:
        revoke_node(connection, home, node_id)
    except RuntimeError as exc:
        raise _fail(str(exc)) from exc
    err_console.print(f"node {node_id} revoked")


@node_app.command("list")
def node_list(
    superlink: SuperLinkOption = DEFAULT_SUPERLINK,
    insecure: InsecureFlowerOption = False,
    root_certificates: RootCertificatesOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The SuperLink's nodes: id, name, status."""
    from shared.flower_cli import list_nodes

    connection, home = _flower_connection(superlink, insecure, root_certificates, data_dir)
    try:
        nodes = list_nodes(connection, home)
    except RuntimeError as exc:
        raise _fail(str(exc)) from exc
    table = Table("node id", "name", "status", "online at")
    for entry in nodes:
        table.add_row(
            str(entry.get("node-id", "")),
            str(entry.get("name", "") or entry.get("owner-name", "")),
            str(entry.get("status", "")),
            str(entry.get("online-at", "")),
        )
    console.print(table)


@app.command("tui")
def tui(
    data_dir: DataDirOption = None,
    state_url: Annotated[
        str, typer.Option(help="Coordinator state URL (default: SQLite in DATA_DIR/coordinator).")
    ] = "",
    deletions_url: Annotated[
        str, typer.Option(help="Deletion store URL (default: SQLite in DATA_DIR/coordinator).")
    ] = "",
    run: Annotated[str | None, typer.Option(help="Run to show (default: the newest).")] = None,
    api_address: Annotated[
        str, typer.Option(help="Deletion API to file new requests through (host:port).")
    ] = DEFAULT_API_ADDRESS,
    token: TokenOption = "",
    tls_ca: TlsCaOption = None,
    insecure: InsecureClientOption = False,
    refresh: Annotated[float, typer.Option(help="Seconds between reads of the stores.")] = 0.5,
) -> None:
    """The operator console: the fleet, arrival groups, model metrics and deletion requests."""
    from coordinator.console.app import ApiAccess, LetheConsole
    from coordinator.console.source import StoreLocation, StoreSource

    if refresh <= 0:
        raise _fail("--refresh must be positive")
    root = DataDir(data_dir or default_data_dir()).root
    defaults = StoreLocation.in_data_dir(root, run)
    location = StoreLocation(
        state_url or defaults.state_url, deletions_url or defaults.deletions_url, run
    )
    api = None
    if token:
        api = ApiAccess(api_address, token, _trusted_ca(tls_ca, insecure, data_dir))
    LetheConsole(StoreSource(location), api, refresh_s=refresh).run()


def main() -> None:
    """Run the command; a data directory that cannot be written (full disk, read-only mount)
    is one clear line and exit code 1, never a traceback."""
    from shared.storage import storage_problem

    try:
        app()
    except Exception as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        err_console.print(f"[bold red]error:[/] {problem}")
        sys.exit(1)
