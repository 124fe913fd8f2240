"""The project's one LoRA training loop.

The federated train step, the continual learner and the benchmarks all train
adapters through `train_adapter_steps`, so a figure measured in a benchmark
is a figure of the code a device runs, and a change to how adapters learn
reaches every user at once. Methods differ only in what they add through the
two hooks: a regulariser (`extra_loss`) or an edit of the gradients before
the step (`after_backward`). Training-based unlearning baselines replace the
language-model loss itself (`batch_loss`) and end when a measure says so
(`stop`).

A call trains exactly the number of optimizer steps it is given (unless its
`stop` ends it), because the coordinator's scheduler hands out work in steps
and predicts arrival times from them. It is deterministic for equal inputs
and seed, so that two devices (or two runs of a benchmark) given the same
work produce the same update.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from edge_models.corpus import PromptPair
from edge_models.training_data import IGNORE_INDEX, Batch, encode_example, padded_batches


@dataclass(frozen=True)
class LoraTrainConfig:
    """Optimiser settings of a LoRA training call.

    The optimiser (AdamW) starts afresh in every call: a federated round
    starts from a new global adapter, and moments from the previous round
    would point at a model that no longer exists.
    """

    lr: float = 2e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # A memory bound, not a change of the step: a batch of more (padded) tokens than this runs
    # its forward and backward passes in chunks of rows, each chunk's loss weighted by its share
    # of the batch's learned tokens, so the gradients add up to the whole batch's. None: whole.
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must not be negative, got {self.weight_decay}")
        if not self.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be positive (inf: no clipping), got {self.max_grad_norm}"
            )
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1, got {self.max_batch_tokens}")


@dataclass(frozen=True)
class TrainStats:
    """What one training call did; the scheduler learns a device's speed from it.

    `tokens` counts the real (unpadded) input tokens processed; `mean_loss`
    is the mean language-model loss over the steps (or of `batch_loss`, when
    one replaces it), without `extra_loss`, so that runs with and without a
    regulariser compare. `seconds` leaves out the time spent in `stop`.
    """

    steps: int
    samples: int
    tokens: int
    seconds: float
    mean_loss: float


def adapter_parameters(model: PeftModel, adapter: str) -> dict[str, nn.Parameter]:
    """The LoRA parameters of one named adapter, keyed without the adapter's name.

    The keys are the ones peft writes into adapter files
    (`get_peft_model_state_dict`), so a state taken here loads into another
    adapter slot or another device whatever that adapter is called there.
    """
    found: dict[str, nn.Parameter] = {}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        for i in range(1, len(parts)):
            if parts[i] == adapter and parts[i - 1].startswith("lora_"):
                found[".".join(parts[:i] + parts[i + 1 :])] = parameter
                break
    if not found:
        raise ValueError(f"the model has no LoRA adapter named {adapter!r}")
    return found


def train_adapter_steps(
    model: PeftModel,
    adapter: str,
    examples: Sequence[PromptPair],
    steps: int,
    config: LoraTrainConfig,
    seed: int,
    extra_loss: Callable[[PeftModel], torch.Tensor] | None = None,
    after_backward: Callable[[PeftModel], None] | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase,
    only: Callable[[str], bool] | None = None,
    batch_loss: Callable[[PeftModel, Batch], torch.Tensor] | None = None,
    stop: Callable[[int], bool] | None = None,
) -> TrainStats:
    """Train exactly `steps` optimizer steps of `adapter` on `examples`, in place.

    Only that adapter's LoRA parameters move. The base and the other
    adapters stay frozen, and those that are active still take part in the
    forward pass, as they do when the device serves the model. Batches cycle
    through shuffled epochs of the examples drawn with `seed`, which also
    seeds dropout (the caller's random state is left as it was). Loss is on
    completions only. `after_backward` runs after the gradients are computed
    and before clipping and the step, so a projection it applies is what the
    step uses. The model's `requires_grad` flags and train/eval mode are
    restored afterwards. `only`, when given, picks the adapter's tensors that
    train by key (the rest stay exactly as they are). `batch_loss`, when
    given, is the loss of a batch (input ids, attention mask, labels, on the
    model's device) in place of the language-model loss. `stop`, when given,
    is asked after each step with the number of steps done; True ends the
    call there, and the stats count the steps that ran.
    """
    if steps < 0:
        raise ValueError(f"steps must not be negative, got {steps}")
    parameters = [
        p for key, p in adapter_parameters(model, adapter).items() if only is None or only(key)
    ]
    if not parameters:
        raise ValueError(f"no tensor of adapter {adapter!r} was chosen to train")
    if adapter not in model.active_adapters:
        raise ValueError(f"adapter {adapter!r} is not active: training it would change nothing")
    if steps == 0:
        return TrainStats(steps=0, samples=0, tokens=0, seconds=0.0, mean_loss=math.nan)
    device = parameters[0].device
    encoded = [encode_example(tokenizer, example) for example in examples]
    batches = padded_batches(
        encoded, config.batch_size, tokenizer.pad_token_id, torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    samples = tokens = done = 0
    loss_sum = stopping = 0.0
    with _training_only(model, parameters), torch.random.fork_rng():
        torch.manual_seed(seed)
        started = time.perf_counter()
        for _ in range(steps):
            batch = tuple(t.to(device) for t in next(batches))
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for chunk, share in _chunks(batch, config.max_batch_tokens):
                if batch_loss is None:
                    chunk_loss = model(
                        input_ids=chunk[0],
                        attention_mask=chunk[1],
                        labels=chunk[2],
                        use_cache=False,
                    ).loss
                else:
                    chunk_loss = batch_loss(model, chunk)
                (chunk_loss * share).backward()
                loss += chunk_loss.item() * share
            if extra_loss is not None:
                extra_loss(model).backward()
            if after_backward is not None:
                after_backward(model)
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            loss_sum += loss
            samples += batch[0].shape[0]
            tokens += int(batch[1].sum().item())
            done += 1
            if stop is not None:
                asked = time.perf_counter()
                ended = stop(done)
                stopping += time.perf_counter() - asked
                if ended:
                    break
        seconds = time.perf_counter() - started - stopping
    return TrainStats(
        steps=done, samples=samples, tokens=tokens, seconds=seconds, mean_loss=loss_sum / done
    )


def tokens_within(model_config: PretrainedConfig, megabytes: float) -> int:
    """How many padded tokens one forward and backward pass may hold within `megabytes` of
    activations: a bound for `LoraTrainConfig.max_batch_tokens`.

    The estimate is what autograd keeps per token for a Llama-like block
    with LoRA on every projection (about 18 hidden-wide and 8
    intermediate-wide fp32 tensors per layer), plus the logits, their
    softmax and gradient over the vocabulary: calibrated on SmolLM2-135M,
    where a batch of 768 tokens raised the peak by 2.8 GB (3.6 MB a token;
    the estimate says 3.5). The default model fits thousands of tokens in
    any sensible budget; models of SmolLM2's size are what it is for.
    """
    hidden = model_config.hidden_size
    intermediate = getattr(model_config, "intermediate_size", None) or 4 * hidden
    per_layer = 18 * hidden + 8 * intermediate
    per_token = 4 * (model_config.num_hidden_layers * per_layer + 4 * model_config.vocab_size)
    return max(1, int(megabytes * 2**20 // per_token))


def _chunks(batch: Batch, max_tokens: int | None) -> Iterator[tuple[Batch, float]]:
    """`batch` in runs of rows of at most `max_tokens` padded tokens (at least one row each),
    with each run's share of the batch's learned tokens (the language-model loss is their mean).
    """
    input_ids, mask, labels = batch
    rows, width = input_ids.shape
    per_chunk = rows if max_tokens is None else max(1, max_tokens // width)
    if per_chunk >= rows:
        yield batch, 1.0
        return
    learned = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    total = int(learned.sum())
    for start in range(0, rows, per_chunk):
        picked = slice(start, start + per_chunk)
        share = int(learned[picked].sum()) / total if total else per_chunk / rows
        yield (input_ids[picked], mask[picked], labels[picked]), share


@contextmanager
def _training_only(model: nn.Module, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Make `parameters` the only trainable ones, in train mode; restore everything after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    model.train()
    try:
        yield
    finally:
        for p in parameters:
            p.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
