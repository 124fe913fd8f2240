"""The served export: adapters merged, keyed by fingerprint, switched atomically."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from client import serving
from client.inference import KvCacheSession, OnnxGenerator, SamplingParams
from client.serving import (
    ServedModel,
    current_export,
    ensure_export,
    max_logit_difference,
    merge_adapters,
)
from edge_models.onnx_export import MODEL_FILE, ExportError, export_causal_lm

PROMPTS = [[11, 12, 13, 14, 15, 16], [40, 41, 42]]
GREEDY = SamplingParams(max_new_tokens=6, stop_at_eos=False)


def lora(base: PreTrainedModel, seed: int, targets: tuple[str, ...]) -> PeftModel:
    """A LoRA adapter with random (non-zero) factors, wrapping a copy of `base`."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(copy.deepcopy(base), config)


def exports(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def greedy_tokens(path: Path) -> list[tuple[int, ...]]:
    return [c.token_ids for c in OnnxGenerator.load(path, "cpu").generate_ids(PROMPTS, GREEDY)]


def test_two_adapters_are_both_merged(tiny_llama: LlamaForCausalLM, tmp_path: Path) -> None:
    """A shared adapter given as a PeftModel and a personal one as a directory."""
    shared = lora(tiny_llama, 1, ("q_proj", "v_proj", "down_proj"))
    personal = lora(tiny_llama, 2, ("k_proj", "o_proj", "up_proj", "q_proj"))
    personal.save_pretrained(tmp_path / "personal")
    path = ensure_export(tiny_llama, [shared, tmp_path / "personal"], tmp_path / "onnx", "cpu")

    # Reference without merging: peft runs both adapters side by side on the base.
    shared.save_pretrained(tmp_path / "shared")
    both = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "personal", "personal")
    both.load_adapter(tmp_path / "shared", "shared")
    both.base_model.set_adapter(["shared", "personal"])
    session = KvCacheSession(path, "cpu")
    assert max_logit_difference(both.eval(), session, PROMPTS, 4) < 1e-4
    assert max_logit_difference(tiny_llama, session, PROMPTS, 0) > 1e-2


def test_an_adapter_wrapping_the_base_itself_is_applied_once(tiny_llama: LlamaForCausalLM):
    """peft injects its layers into the model it wraps: the base given is then not clean."""
    base = copy.deepcopy(tiny_llama)
    adapter = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    )
    merged = merge_adapters(base, [adapter], "cpu")
    inputs = torch.tensor(PROMPTS[:1])
    with torch.inference_mode():
        assert torch.allclose(merged(inputs).logits, adapter(inputs).logits, atol=1e-5)
        assert not torch.allclose(merged(inputs).logits, tiny_llama(inputs).logits, atol=1e-2)


def test_unchanged_weights_reuse_the_export(
    tiny_llama: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    first = ensure_export(tiny_llama, [], tmp_path, "cpu", tiny_tokenizer)
    written = (first / MODEL_FILE).stat()
    again = ensure_export(copy.deepcopy(tiny_llama), [], tmp_path, "cpu", tiny_tokenizer)
    assert again == first == current_export(tmp_path)
    assert (again / MODEL_FILE).stat().st_ino == written.st_ino
    assert exports(tmp_path) == {first.name}
    # The export carries its tokenizer: text generation needs nothing else.
    assert OnnxGenerator.load(first, "cpu").generate(["alice"], GREEDY)[0].text


def test_new_weights_switch_the_pointer_and_old_exports_are_pruned(
    tiny_llama: LlamaForCausalLM, tmp_path: Path
) -> None:
    paths = [
        ensure_export(tiny_llama, [lora(tiny_llama, seed, ("q_proj",))], tmp_path, "cpu", keep=2)
        for seed in (1, 2, 3)
    ]
    assert len(set(paths)) == 3
    assert current_export(tmp_path) == paths[2]
    assert exports(tmp_path) == {paths[1].name, paths[2].name}


def test_an_export_that_fails_midway_leaves_the_previous_one_current(
    tiny_llama: LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = ensure_export(tiny_llama, [], tmp_path, "cpu")
    before = greedy_tokens(old)

    def export_then_fail(model: PreTrainedModel, directory: Path) -> None:
        export_causal_lm(model, directory)
        raise OSError("disk full")

    monkeypatch.setattr(serving, "export_causal_lm", export_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ensure_export(tiny_llama, [lora(tiny_llama, 1, ("q_proj",))], tmp_path, "cpu")
    assert current_export(tmp_path) == old
    assert exports(tmp_path) == {old.name}  # no temporary left behind
    assert greedy_tokens(old) == before


def test_an_export_that_differs_from_the_model_is_not_published(
    tiny_llama: LlamaForCausalLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = ensure_export(tiny_llama, [], tmp_path, "cpu")
    other = lora(tiny_llama, 5, ("v_proj",)).merge_and_unload()

    def export_other_weights(model: PreTrainedModel, directory: Path) -> None:
        export_causal_lm(other, directory)

    monkeypatch.setattr(serving, "export_causal_lm", export_other_weights)
    with pytest.raises(ExportError, match="differs"):
        ensure_export(tiny_llama, [lora(tiny_llama, 1, ("q_proj",))], tmp_path, "cpu")
    assert current_export(tmp_path) == old and exports(tmp_path) == {old.name}


KILLED_EXPORTER = """
import sys, time
from pathlib import Path
from transformers import LlamaForCausalLM
from client import serving

base, adapter, root, marker = map(Path, sys.argv[1:])

def stall_before_publishing(directory):
    # The export is fully written and verified; it is still a temporary.
    marker.touch()
    time.sleep(600)

serving.sync_tree = stall_before_publishing
serving.ensure_export(LlamaForCausalLM.from_pretrained(base), [adapter], root, "cpu")
"""


def test_an_exporter_killed_midway_leaves_the_previous_export_served(
    tiny_llama: LlamaForCausalLM, tmp_path: Path
) -> None:
    root, marker = tmp_path / "onnx", tmp_path / "stalled"
    old = ensure_export(tiny_llama, [], root, "cpu")
    before = greedy_tokens(old)
    tiny_llama.save_pretrained(tmp_path / "base")
    adapter = lora(tiny_llama, 1, ("q_proj", "v_proj"))
    adapter.save_pretrained(tmp_path / "adapter")
    args = [tmp_path / "base", tmp_path / "adapter", root, marker]
    script = textwrap.dedent(KILLED_EXPORTER)
    exporter = subprocess.Popen([sys.executable, "-c", script, *map(str, args)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert exporter.poll() is None, "the exporter died on its own"
            assert time.monotonic() < deadline, "the exporter never got halfway"
            time.sleep(0.1)
    finally:
        os.kill(exporter.pid, signal.SIGKILL)
        exporter.wait()

    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / MODEL_FILE).is_file()
    assert current_export(root) == old
    assert greedy_tokens(current_export(root)) == before

    new = ensure_export(tiny_llama, [tmp_path / "adapter"], root, "cpu")
    assert current_export(root) == new != old
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_a_server_keeps_its_export_until_a_new_one_is_current(
    tiny_llama: LlamaForCausalLM, tmp_path: Path
) -> None:
    served = ServedModel(tmp_path, "cpu")
    with pytest.raises(LookupError):
        served.generator()
    ensure_export(tiny_llama, [], tmp_path, "cpu")
    first = served.generator()
    assert served.generator() is first

    failures: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        """Requests keep coming while new exports are published."""
        while not stop.is_set():
            try:
                served.generator().generate_ids(PROMPTS, GREEDY)
            except BaseException as error:  # noqa: BLE001 - any failure fails the test
                failures.append(error)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for seed in (1, 2):
            ensure_export(tiny_llama, [lora(tiny_llama, seed, ("o_proj",))], tmp_path, "cpu")
    finally:
        stop.set()
        server.join()
    assert not failures
    assert served.generator() is not first
    assert served.path == current_export(tmp_path)
    assert first.generate_ids(PROMPTS, GREEDY)  # an old generator still answers
