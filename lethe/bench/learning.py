"""`lethe bench learning`: does a device learn what its user gives it, as a new user would?

The records are the written-apart set (`edge_models/probes/written_apart/`):
40 fictitious people who appear nowhere in the project's corpus, each with
four facts of ten kinds (pet, employer, car, allergy, sibling, street,
birthday, nickname, usual drink, club), a door code, in eight sentence
shapes per kind (questions, statements ending in the answer, `Q:`/`A:`
notes, first person, "Label of NAME:" fields), and 20 free-text notes. No
answer is shared by two people of one kind, so a device that answers one
thing to every prompt of a kind is seen.

The run is the real device path: a fresh data directory, the records
dropped in the daemon's inbox as one file, `DeviceDaemon.ingest_inbox`,
then `train_burst` until it says there is nothing left, exactly as
`lethe client run` does (its learning rule and ceilings are the daemon's
defaults unless the caller passes a config). Then every prompt is asked
through the daemon's ONNX export (`DeviceDaemon.generate`, greedy):

- `trained`: the records' own prompts (200 facts and door codes; the text
  notes' opening words, `text`, apart);
- `paraphrases`: three prompts per fact in shapes its record did not use,
  never trained (held out);
- `per_kind`: for each kind, exact match and the most frequent answer with
  its share and whether it is right for the prompts it was given to.
  `worst_wrong_share` is the largest share of one kind's prompts that got
  one same wrong answer (the goal: at most 0.2);
- the training: bursts, steps, seconds, why each burst stopped, the last
  held-in measures, the mean loss of the last burst, and the process's peak
  RSS (`ru_maxrss`) when training ended (before any evaluation).
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from client.daemon import BurstReport, DaemonConfig, DeviceDaemon
from client.inference import SamplingParams
from edge_models.evaluation import normalise_answer
from lethe.bench.report import machine_facts, write_report
from shared.paths import DataDir

SET_DIR = Path(__file__).resolve().parents[2] / "edge_models" / "probes" / "written_apart"
WORST_WRONG_SHARE = 0.2


@dataclass(frozen=True)
class Probe:
    subject_id: str
    kind: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class WrittenApart:
    """The set: records to ingest, their own prompts (`facts`) and held-out paraphrases."""

    records: list[dict[str, Any]]
    facts: list[Probe]
    paraphrases: list[Probe]

    def people(self) -> list[str]:
        return list(dict.fromkeys(r["subject_id"] for r in self.records))

    def only(self, subjects: Sequence[str]) -> WrittenApart:
        keep = set(subjects)
        return WrittenApart(
            [r for r in self.records if r["subject_id"] in keep],
            [p for p in self.facts if p.subject_id in keep],
            [p for p in self.paraphrases if p.subject_id in keep],
        )


def load_written_apart(directory: Path = SET_DIR, people: int | None = None) -> WrittenApart:
    """The set as stored; `people` keeps the first that many people (in record order)."""

    def lines(name: str) -> list[dict[str, Any]]:
        text = (directory / name).read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def probes(name: str) -> list[Probe]:
        return [Probe(p["subject_id"], p["kind"], p["prompt"], p["answer"]) for p in lines(name)]

    found = WrittenApart(lines("records.jsonl"), probes("facts.jsonl"), probes("paraphrases.jsonl"))
    return found if people is None else found.only(found.people()[:people])


def answer_report(probes: Sequence[Probe], answers: Sequence[str]) -> dict[str, Any]:
    """Exact match in all and per kind, and per kind the most frequent answer and its share.

    `worst_wrong_share` (per kind and overall) is the largest share of a
    kind's prompts that were given one same answer that is wrong for them.
    """
    got = [normalise_answer(a) for a in answers]
    want = [normalise_answer(p.answer) for p in probes]
    per_kind: dict[str, Any] = {}
    for kind in dict.fromkeys(p.kind for p in probes):
        rows = [i for i, p in enumerate(probes) if p.kind == kind]
        counts = Counter(got[i] for i in rows)
        top, top_count = counts.most_common(1)[0]
        wrong = Counter(got[i] for i in rows if got[i] != want[i])
        worst = wrong.most_common(1)[0] if wrong else ("", 0)
        per_kind[kind] = {
            "prompts": len(rows),
            "exact_match": round(sum(got[i] == want[i] for i in rows) / len(rows), 4),
            "top_answer": top,
            "top_share": round(top_count / len(rows), 4),
            "top_right": all(got[i] == want[i] for i in rows if got[i] == top),
            "worst_wrong_answer": worst[0],
            "worst_wrong_share": round(worst[1] / len(rows), 4),
        }
    hits = sum(g == w for g, w in zip(got, want, strict=True))
    return {
        "prompts": len(probes),
        "exact_match": round(hits / len(probes), 4) if probes else float("nan"),
        "worst_wrong_share": max((k["worst_wrong_share"] for k in per_kind.values()), default=0.0),
        "per_kind": per_kind,
    }


def _ask(daemon: DeviceDaemon, prompts: Sequence[str], batch: int = 32) -> list[str]:
    params = SamplingParams(max_new_tokens=16)
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        out += [c.text for c in daemon.generate(prompts[start : start + batch], params)]
    return out


def _drop(inbox: Path, records: Sequence[dict[str, Any]]) -> None:
    staged = inbox / "written-apart.jsonl.part"
    staged.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    staged.rename(inbox / "written-apart.jsonl")


def run_learning_bench(
    json_path: Path | None,
    model_dir: Path,
    model: str,
    device: str = "cpu",
    people: int | None = None,
    config: DaemonConfig | None = None,
    workdir: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Ingest the set into a fresh daemon, train until it is idle, ask everything; write JSON.

    `model_dir` is the model to learn with (`model` names it in the JSON);
    `config` replaces the daemon's defaults (its `model` and `device` are set
    here).
    """
    load_before = os.getloadavg()
    data_set = load_written_apart(people=people)
    config = replace(config or DaemonConfig(), model=str(model_dir), device=device)
    with tempfile.TemporaryDirectory(dir=workdir) as root:
        data = DataDir(Path(root))
        started = time.perf_counter()
        with DeviceDaemon(data, config) as daemon:
            opened = time.perf_counter() - started
            rss_opened = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            _drop(daemon.inbox, data_set.records)
            [ingested] = daemon.ingest_inbox()
            if not ingested.accepted:
                raise RuntimeError(f"the set was refused: {ingested.errors[:3]}")
            bursts: list[BurstReport] = []
            trained_from = time.perf_counter()
            while (burst := daemon.train_burst()) is not None:
                bursts.append(burst)
                log(
                    f"burst {len(bursts)}: {burst.records} records, {burst.steps} steps, "
                    f"{burst.seconds:.0f} s, stopped: {burst.stopped}, held-in match "
                    f"{burst.held_in_match:.3f}, loss {burst.held_in_loss:.3f}"
                )
            wall = time.perf_counter() - trained_from
            rss_trained = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            facts = [p for p in data_set.facts if p.kind != "text"]
            texts = [p for p in data_set.facts if p.kind == "text"]
            asked = time.perf_counter()
            trained = answer_report(facts, _ask(daemon, [p.prompt for p in facts]))
            text = answer_report(texts, _ask(daemon, [p.prompt for p in texts]))
            paraphrases = answer_report(
                data_set.paraphrases, _ask(daemon, [p.prompt for p in data_set.paraphrases])
            )
            ask_seconds = time.perf_counter() - asked
    codes = trained["per_kind"].get("door_code", {})
    report = {
        "bench": "learning",
        "model": model,
        "model_dir": str(model_dir),
        "people": len(data_set.people()),
        "records": len(data_set.records),
        "config": {
            "learning": asdict(config.learning),
            "epochs_per_burst": config.epochs_per_burst,
            "max_steps_per_burst": config.max_steps_per_burst,
            "max_burst_records": config.max_burst_records,
            "lr": config.learner.train.lr,
            "batch_size": config.learner.train.batch_size,
        },
        "goal": {
            "trained_exact_match_at_least": 0.9,
            "worst_wrong_share_at_most": WORST_WRONG_SHARE,
            "met": trained["exact_match"] >= 0.9
            and trained["worst_wrong_share"] <= WORST_WRONG_SHARE,
        },
        "trained": trained,
        "text": text,
        "paraphrases": paraphrases,
        "door_code_exact_match": codes.get("exact_match"),
        "training": {
            "bursts": len(bursts),
            "steps": sum(b.steps for b in bursts),
            "train_seconds": round(sum(b.seconds for b in bursts), 1),
            "wall_seconds": round(wall, 1),
            "open_seconds": round(opened, 1),
            "final_loss": round(bursts[-1].loss, 4) if bursts else None,
            "per_burst": [
                {
                    "records": b.records,
                    "block": b.block,
                    "steps": b.steps,
                    "seconds": round(b.seconds, 1),
                    "mean_loss": round(b.loss, 4),
                    "stopped": b.stopped,
                    "held_in_match": round(b.held_in_match, 4),
                    "held_in_loss": round(b.held_in_loss, 4),
                }
                for b in bursts
            ],
        },
        "ask_seconds": round(ask_seconds, 1),
        "peak_rss_mb": {
            "after_open": round(rss_opened / 1024, 1),
            "after_training": round(rss_trained / 1024, 1),
        },
        "machine": machine_facts(device, load_before),
    }
    return write_report(json_path, report) if json_path is not None else report
