"""The main job on one device: model, records, ONNX inference, end to end.

`lethe demo` is what a newcomer runs first. It uses only the embedded
defaults (no download): it builds the default model unless a verified version
is stored, ingests one device's synthetic record stream into the encrypted
record store, exports the model to ONNX and answers questions with ONNX
Runtime next to the true answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from client.inference import SamplingParams
from client.record_store import RecordStore
from client.serving import ServedModel, ensure_export
from edge_models.corpus import build_corpus, device_stream, partition
from edge_models.default_model import DEFAULT_MODEL_NAME, BuildConfig, build_default_model
from edge_models.evaluation import normalise_answer
from edge_models.loading import load_causal_lm
from edge_models.model_store import ModelStoreError, current, verify
from shared.paths import DataDir

DEMO_DEVICES = 3
DEMO_QUESTIONS = 6


@dataclass(frozen=True)
class DemoSummary:
    model_version: int
    records_stored: int
    subjects_stored: int
    export_dir: Path
    answered_correctly: int
    questions: int


def run_demo(data: DataDir, console: Console, device: str = "auto", seed: int = 0) -> DemoSummary:
    """Run the single-device scenario and print what happens at each step."""
    console.rule("1. the default model")
    try:
        version = current(data.models, DEFAULT_MODEL_NAME)
        verify(version)
        console.print(f"using stored default model v{version.version} (checksums verified)")
    except ModelStoreError:
        console.print("no verified default model stored: training one (under 2 minutes)")
        version, report = build_default_model(
            data.models, BuildConfig(seed=seed, device=device), log=console.print
        )
        console.print(
            f"built v{version.version}: fact exact match {report.fact_exact_match:.1%}, "
            f"held-out next-token accuracy {report.heldout_next_token_accuracy:.1%}"
        )

    console.rule("2. records on the device")
    corpus = build_corpus(seed)
    part = partition(corpus, DEMO_DEVICES, seed=seed)[0]
    stream_file = data.device / "inbox" / "stream.jsonl"
    stream_file.parent.mkdir(parents=True, exist_ok=True)
    records = device_stream(corpus, part, seed=seed)
    stream_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with RecordStore.open(data.record_db, data.master_key) as store:
        ingest = store.ingest_file(stream_file)
        stored, subjects = store.count(), len(store.subjects())
    console.print(
        f"ingested {stream_file}: {ingest.accepted} new, {ingest.duplicates} already stored; "
        f"the device holds {stored} encrypted records of {subjects} subjects"
    )

    console.rule("3. inference with ONNX Runtime")
    loaded = load_causal_lm(version.path, device=device)
    export_dir = ensure_export(loaded.model, [], data.onnx_exports, device, loaded.tokenizer)
    console.print(
        f"serving export {export_dir.name[:16]} (re-exported only when the weights change)"
    )
    generator = ServedModel(data.onnx_exports, device).generator()
    facts = [f for s in corpus.split("base")[:DEMO_QUESTIONS] for f in s.facts[:1]]
    prompts = [f.prompts[0] for f in facts]
    completions = generator.generate(prompts, SamplingParams(max_new_tokens=12))
    table = Table(title="the model answers (greedy, ONNX Runtime)")
    for column in ("question", "answer", "truth", "ok"):
        table.add_column(column)
    correct = 0
    for prompt, fact, completion in zip(prompts, facts, completions, strict=True):
        ok = normalise_answer(completion.text) == normalise_answer(fact.answer)
        correct += ok
        table.add_row(prompt, completion.text.strip(), fact.answer, "yes" if ok else "no")
    console.print(table)
    return DemoSummary(version.version, stored, subjects, export_dir, correct, len(prompts))
