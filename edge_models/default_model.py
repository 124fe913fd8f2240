"""The default edge model: a small Llama trained from scratch on the synthetic corpus.

Read top to bottom: the architecture (a transformers LlamaConfig), then the
training that `lethe model build` runs, then how it is published.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edge_models.corpus import Corpus, PromptPair, build_corpus, fact_pairs
from edge_models.evaluation import exact_match, next_token_accuracy
from edge_models.model_store import ModelVersion, publish
from edge_models.tokenizer import train_tokenizer
from edge_models.training_data import encode_example, padded_batches
from shared.devices import resolve_torch_device

DEFAULT_MODEL_NAME = "default"
FACT_REPEATS = 2


def default_llama_config(vocab_size: int) -> LlamaConfig:
    """The default architecture: about a million parameters, the most that learns the
    base corpus to exact recall within the 2-minute build budget on 2 CPU cores."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
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

    The learning rate warms up over `warmup_steps`, then follows a cosine to
    2% of its peak. The schedule's progress is the larger of steps done over
    `steps` and seconds spent over `time_budget_s`, so a build completes its
    whole schedule (the late, low-rate phase is when exact recall appears)
    within the budget, doing fewer steps on a slower machine. Time counts
    only up to the share of `min_steps` done: a machine too busy to fit them
    takes longer rather than publishing a model that knows nothing (a loaded
    machine once fitted 200 steps, for 6% exact match).
    `time_budget_s=None` makes progress count steps only: equal configs then
    give equal models, whatever the machine.
    """

    seed: int = 0
    vocab_size: int = 2048
    steps: int = 1800
    batch_size: int = 64
    lr: float = 5e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    time_budget_s: float | None = 100.0
    min_steps: int = 900
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
    ended_by_time_budget: bool  # fewer than `steps` steps fitted in the budget


def training_examples(corpus: Corpus) -> list[PromptPair]:
    """The pre-training set: base subjects' facts and messages, and the trained refusals.

    A message is a pair with an empty prompt: the whole text is its target.
    """
    base = corpus.split("base")
    facts = [pair for _, pair in fact_pairs(base)]
    # Facts twice per epoch: they are what the model must know exactly, while
    # messages only teach each domain's language.
    examples = facts * FACT_REPEATS
    examples += [PromptPair("", m.text) for s in base for m in s.messages]
    examples += list(corpus.refusals_train)
    return examples


def train_default_model(
    corpus: Corpus, config: BuildConfig, log: Callable[[str], None] = lambda _: None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, BuildReport]:
    """Train tokenizer and model from scratch on the corpus; return both and a report."""
    torch.manual_seed(config.seed)
    device = resolve_torch_device(config.device)
    examples = training_examples(corpus)
    tokenizer = train_tokenizer([e.prompt + e.completion for e in examples], config.vocab_size)
    model = LlamaForCausalLM(default_llama_config(len(tokenizer))).to(device)
    encoded = [encode_example(tokenizer, e) for e in examples]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )

    gen = torch.Generator().manual_seed(config.seed)
    batches = padded_batches(encoded, config.batch_size, tokenizer.pad_token_id, gen)
    model.train()
    started = time.perf_counter()
    loss_value = float("nan")
    step = 0
    progress = 0.0
    while progress < 1.0:
        lr_factor = (
            (step + 1) / config.warmup_steps
            if step < config.warmup_steps
            else 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))
        )
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor
        ids, mask, labels = (t.to(device) for t in next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_value = loss.detach().item()
        elapsed = time.perf_counter() - started
        progress = step / config.steps
        if config.time_budget_s is not None:
            by_time = elapsed / config.time_budget_s
            progress = max(progress, min(by_time, step / config.min_steps))
        if step % 100 == 0:
            log(f"step {step} ({progress:.0%} of schedule) loss {loss_value:.3f} ({elapsed:.0f}s)")
    seconds = time.perf_counter() - started
    model.eval()
    report = _measure(model, tokenizer, corpus, step, seconds, loss_value, step < config.steps)
    return model, tokenizer, report


def _measure(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    corpus: Corpus,
    steps: int,
    seconds: float,
    loss: float,
    ended_early: bool,
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
        ended_by_time_budget=ended_early,
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
