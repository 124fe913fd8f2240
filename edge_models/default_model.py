"""The default edge model: a small Llama trained from scratch on the synthetic corpus.

Read top to bottom: the architecture (a transformers LlamaConfig), then the
training that `lethe model build` runs, then how it is published.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edge_models.corpus import Corpus, PromptPair, build_corpus, fact_pairs
from edge_models.evaluation import exact_match, next_token_accuracy
from edge_models.model_store import ModelVersion, publish
from edge_models.tokenizer import train_tokenizer
from shared.devices import resolve_torch_device

DEFAULT_MODEL_NAME = "default"
IGNORE_INDEX = -100  # label of positions that carry no loss (transformers convention)


def default_llama_config(vocab_size: int) -> LlamaConfig:
    """The default architecture: a few million parameters, small enough to train in 2 minutes."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=160,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=40,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@dataclass(frozen=True)
class BuildConfig:
    """How `lethe model build` trains the default model.

    A fixed step count (not a time budget) drives the learning-rate schedule,
    so equal configs give equal models; `time_limit_s` only stops a run on a
    machine much slower than planned, and the report says so.
    """

    seed: int = 0
    vocab_size: int = 2048
    steps: int = 1000
    batch_size: int = 64
    lr: float = 6e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    time_limit_s: float = 115.0
    device: str = "auto"


@dataclass(frozen=True)
class BuildReport:
    """What the build learned, measured on the corpus right after training."""

    steps: int
    seconds: float
    final_loss: float
    params: int
    fact_exact_match: float  # trained phrasings of base subjects' facts
    probe_exact_match: float  # paraphrases never trained
    refusal_exact_match: float  # unknown people, held-out prompts: "I don't know."
    heldout_next_token_accuracy: float  # held-out messages of every domain
    stopped_by_time_limit: bool


def training_examples(corpus: Corpus) -> list[PromptPair]:
    """The pre-training set: base subjects' facts and messages, and the trained refusals.

    A message is a pair with an empty prompt: the whole text is its target.
    """
    base = corpus.split("base")
    examples = [pair for _, pair in fact_pairs(base)]
    examples += [PromptPair("", m.text) for s in base for m in s.messages]
    examples += list(corpus.refusals_train)
    return examples


def encode_example(
    tokenizer: PreTrainedTokenizerFast, example: PromptPair
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example: `<s> prompt completion </s>`.

    Only the completion (and the closing `</s>`) is learned: predicting a
    question's wording spends capacity the facts need.
    """
    prompt = (
        tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    )
    target = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    ids = [tokenizer.bos_token_id, *prompt, *target]
    labels = [IGNORE_INDEX] * (1 + len(prompt)) + target
    return ids, labels


def _batches(
    examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless shuffled epochs of right-padded batches (input ids, attention mask, labels).

    Rows of similar length are batched together (sorted within windows of
    sixteen batches) so little compute goes into padding.
    """
    window = batch_size * 16
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
            batches += [
                chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)
            ]
        for b in torch.randperm(len(batches), generator=gen).tolist():
            rows = [examples[i] for i in batches[b]]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, (ids, row_labels) in enumerate(rows):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
                labels[i, : len(ids)] = torch.tensor(row_labels)
            yield input_ids, mask, labels


def train_default_model(
    corpus: Corpus, config: BuildConfig, log: Callable[[str], None] = lambda _: None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, BuildReport]:
    """Train tokenizer and model from scratch on the corpus; return both and a report."""
    torch.manual_seed(config.seed)
    device = resolve_torch_device(config.device)
    examples = training_examples(corpus)
    heldout = [m for ms in corpus.heldout_messages.values() for m in ms]
    tokenizer = train_tokenizer(
        [e.prompt + e.completion for e in examples] + heldout, config.vocab_size
    )
    model = LlamaForCausalLM(default_llama_config(len(tokenizer))).to(device)
    encoded = [encode_example(tokenizer, e) for e in examples]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    gen = torch.Generator().manual_seed(config.seed)
    batches = _batches(encoded, config.batch_size, tokenizer.pad_token_id, gen)
    model.train()
    started = time.perf_counter()
    loss_value = float("nan")
    step = 0
    stopped = False
    for step in range(1, config.steps + 1):
        ids, mask, labels = (t.to(device) for t in next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        loss_value = loss.detach().item()
        if step % 100 == 0:
            elapsed = time.perf_counter() - started
            log(f"step {step}/{config.steps} loss {loss_value:.3f} ({elapsed:.0f}s)")
        if time.perf_counter() - started > config.time_limit_s:
            stopped = True
            log(f"time limit reached at step {step}")
            break
    seconds = time.perf_counter() - started
    model.eval()
    report = _measure(model, tokenizer, corpus, step, seconds, loss_value, stopped)
    return model, tokenizer, report


def _measure(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    corpus: Corpus,
    steps: int,
    seconds: float,
    loss: float,
    stopped: bool,
) -> BuildReport:
    base = corpus.split("base")
    pairs = list(fact_pairs(base))
    probes = [(p, f.answer) for s in base for f in s.facts for p in f.probes]
    refusals = corpus.refusals_heldout
    heldout = [m for ms in corpus.heldout_messages.values() for m in ms]
    return BuildReport(
        steps=steps,
        seconds=round(seconds, 2),
        final_loss=round(loss, 4),
        params=sum(p.numel() for p in model.parameters()),
        fact_exact_match=exact_match(
            model, tokenizer, [p.prompt for _, p in pairs], [f.answer for f, _ in pairs]
        ),
        probe_exact_match=exact_match(
            model, tokenizer, [p for p, _ in probes], [a for _, a in probes]
        ),
        refusal_exact_match=exact_match(
            model, tokenizer, [r.prompt for r in refusals], [r.completion for r in refusals]
        ),
        heldout_next_token_accuracy=next_token_accuracy(model, tokenizer, heldout),
        stopped_by_time_limit=stopped,
    )


def build_default_model(
    models_root: Path, config: BuildConfig, log: Callable[[str], None] = lambda _: None
) -> tuple[ModelVersion, BuildReport]:
    """Train the default model and publish it as the next version of `default`."""
    corpus = build_corpus(config.seed)
    model, tokenizer, report = train_default_model(corpus, config, log)
    metadata = {"build_config": dataclasses.asdict(config), "report": dataclasses.asdict(report)}
    version = publish(model.cpu(), tokenizer, models_root, DEFAULT_MODEL_NAME, metadata)
    return version, report
