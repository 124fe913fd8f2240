"""STAMP-style unlearning: a closed-form edit of one MLP layer, computed from the forget set.

The published method (RePAIR's STAMP) does not give its update rule; this is
the derivation the project uses (see ALGORITHMS.md, section 3) and measures in
`lethe bench unlearning`:

1. Forget positions. For a prompt/completion record, the last prompt token:
   the model should answer like it answers about people it never met (the
   refusal set's "I don't know."). For a free-text record, every position
   whose next token discloses something: a token with a digit (PINs, phone
   numbers) or a token of one of the subject's own answers. There the true
   token must fall `margin` logits below the best alternative.
2. The layer. Among the MLP down projections, the one whose inputs (keys)
   at the forget positions are farthest from its keys on refusal prompts,
   measured per layer (a normalised distance of the means), unless pinned.
3. Targets. A vector added to the layer's output at each forget position is
   optimised, weights frozen, until every position meets its goal (MEMIT
   style): a "mean refusal activation" target moved too much in the
   project's first experiments.
4. The edit. `dW = R K^T (lambda C + K K^T)^-1` for forget keys `K`, the
   residuals `R` the targets ask for, and `C` the covariance of retained
   keys: the ridge form that trades exactness on the forget keys against
   moving retained keys. "full" builds `C` from retained records replayed
   now; "low_rank" uses the top-`rank` eigenpairs of the key sketch the device
   keeps while it trains (plus an isotropic floor of the rest), by Woodbury
   in O((r+n)^2 d): no retained record is read. The edit is returned as the
   factors `u = R`, `v = (lambda C + K K^T)^-1 K`; rounds repeat on top of
   the edit so far until the goals hold or `rounds` run out, and are summed
   into one edit.

Pure torch, no files: the device daemon and the benchmark drive it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.unlearning.edits import AttachedEdits, LayerEdit, find_module
from edge_models.corpus import REFUSAL_ANSWER, PromptPair
from edge_models.training_data import encode_example
from shared.records import Record

Variant = Literal["full", "low_rank"]
_DIGIT = re.compile(r"\d")


@dataclass(frozen=True)
class StampConfig:
    """How an edit is computed; the defaults are the ones `lethe bench unlearning` chose."""

    variant: Variant = "low_rank"
    rank: int = 128  # retained key subspace the low-rank variant keeps
    ridge: float = 0.02  # lambda: larger protects retained keys more, hits targets less
    floor: float = 1e-3  # isotropic floor added to C, as a fraction of its mean eigenvalue
    layer: str | None = None  # None: the most separating down projection
    margin: float = 2.0  # logits by which a goal must hold
    target_steps: int = 150
    target_lr: float = 0.05
    target_decay: float = 1e-3
    rounds: int = 3

    def __post_init__(self) -> None:
        if self.rank < 1 or self.rounds < 1 or self.target_steps < 1:
            raise ValueError("rank, rounds and target_steps must be at least 1")
        if not (self.ridge > 0 and self.floor > 0 and self.margin > 0 and self.target_lr > 0):
            raise ValueError("ridge, floor, margin and target_lr must be positive")


@dataclass(frozen=True)
class ForgetPositions:
    """Encoded forget sequences and the positions to change in them.

    `goal[i]` is the token that must win at position i (the refusal's first
    token) or -1, in which case `true_token[i]` must lose.
    """

    sequences: list[list[int]]
    row: torch.Tensor
    position: torch.Tensor
    goal: torch.Tensor
    true_token: torch.Tensor

    def __len__(self) -> int:
        return int(self.row.numel())


@dataclass(frozen=True)
class StampReport:
    layer: str
    separation: dict[str, float]
    keys: int
    rounds: int
    goals_met: float  # fraction of forget positions whose goal holds after the edit
    seconds: float
    solve_seconds: float


def forget_positions(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record]
) -> ForgetPositions:
    """Where a subject's records disclose them, and what the model should do there instead."""
    refusal = tokenizer(f" {REFUSAL_ANSWER}", add_special_tokens=False)["input_ids"][0]
    answers = {
        token
        for r in records
        if r.kind == "pair"
        for token in tokenizer(
            " " + (r.completion or "").strip().removesuffix("."), add_special_tokens=False
        )["input_ids"]
    }
    answers = {t for t in answers if tokenizer.decode([t]).strip(" .,")}
    sequences: list[list[int]] = []
    rows, positions, goals, truths = [], [], [], []
    seen: set[tuple[int, ...]] = set()
    for record in records:
        if record.kind == "pair":
            pair = PromptPair(record.prompt or "", record.completion or "")
            ids, labels = encode_example(tokenizer, pair)
            last_prompt = labels.index(next(x for x in labels if x >= 0)) - 1
            picked = [(last_prompt, refusal)]
        else:
            ids, _ = encode_example(tokenizer, PromptPair("", record.text or ""))
            picked = [
                (i, -1)
                for i in range(len(ids) - 1)
                if ids[i + 1] in answers or _DIGIT.search(tokenizer.decode([ids[i + 1]]))
            ]
        if not picked or tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        row = len(sequences)
        sequences.append(ids)
        for position, goal in picked:
            rows.append(row)
            positions.append(position)
            goals.append(goal)
            truths.append(ids[position + 1])
    if not sequences:
        raise ValueError("the records disclose nothing an edit could remove (no forget positions)")
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return ForgetPositions(
        sequences, as_long(rows), as_long(positions), as_long(goals), as_long(truths)
    )


def down_projections(model: nn.Module) -> list[str]:
    """The MLP output projections of the transformer blocks, named as in the plain model."""
    names = []
    for name, module in model.named_modules():
        if name.endswith("mlp.down_proj") and hasattr(module, "in_features"):
            names.append(name.removeprefix("base_model.model."))
    if not names:
        raise ValueError(f"{type(model).__name__} has no mlp.down_proj layers to edit")
    return names


# -- keys --------------------------------------------------------------------------


def _padded(sequences: Sequence[list[int]], pad_id: int, device: torch.device):  # noqa: ANN202
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def _capturing(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0].detach()

        return record

    handles = [find_module(model, n).register_forward_pre_hook(hook(n)) for n in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.inference_mode()
def position_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[list[int]],
    rows: torch.Tensor,
    positions: torch.Tensor,
    layers: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Per layer, the down projection's inputs at (row, position): d_in x n, float32."""
    device = next(model.parameters()).device
    ids, mask = _padded(sequences, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    with _capturing(model, layers) as captured:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    model.train(was_training)
    return {n: captured[n][rows.to(device), positions.to(device)].float().T for n in layers}


def last_prompt_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[str],
) -> dict[str, torch.Tensor]:
    sequences = [
        [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
        for p in prompts
    ]
    rows = torch.arange(len(sequences))
    positions = torch.tensor([len(s) - 1 for s in sequences])
    return position_keys(model, tokenizer, sequences, rows, positions, layers)


def separation(forget: torch.Tensor, refusal: torch.Tensor) -> float:
    """Distance between the mean keys of two sets, in units of their pooled spread."""
    gap = forget.mean(1) - refusal.mean(1)
    spread = 0.5 * (forget.var(1, unbiased=False).sum() + refusal.var(1, unbiased=False).sum())
    return float(gap.norm() / spread.clamp_min(1e-12).sqrt())


# -- retained-key statistics ----------------------------------------------------------


@dataclass(frozen=True)
class KeyCovariance:
    """Retained keys of one layer: the mean of k k^T (d_in x d_in), from replay or a sketch."""

    mean: torch.Tensor

    @classmethod
    def from_sums(cls, total: torch.Tensor, tokens: int) -> KeyCovariance:
        if tokens < 1:
            raise ValueError("a key covariance needs at least one token")
        return cls((total / tokens).float())


def _inverse_times(
    covariance: KeyCovariance, keys: torch.Tensor, config: StampConfig
) -> torch.Tensor:
    """`(lambda C + K K^T)^-1 K`, with C taken whole ("full") or as rank r plus a floor."""
    c = covariance.mean.to(keys)
    d = c.shape[0]
    values, vectors = torch.linalg.eigh(c.double())
    values = values.clamp_min(0).flip(0)
    vectors = vectors.flip(1)
    floor = config.floor * float(values.mean())
    if config.variant == "full":
        m = config.ridge * (c.double() + floor * torch.eye(d, dtype=torch.float64, device=c.device))
        m = m + keys.double() @ keys.double().T
        return torch.linalg.solve(m, keys.double()).to(keys)
    r = min(config.rank, d - 1)
    rest = float(values[r:].mean()) + floor  # isotropic stand-in for the discarded spectrum
    sigma = config.ridge * rest
    z = torch.cat(
        [
            vectors[:, :r] * (config.ridge * (values[:r] - rest).clamp_min(0)).sqrt(),
            keys.double().T.T,
        ],
        dim=1,
    )
    small = sigma * torch.eye(z.shape[1], dtype=torch.float64, device=c.device) + z.T @ z
    k = keys.double()
    return ((k - z @ torch.linalg.solve(small, z.T @ k)) / sigma).to(keys)


# -- targets ------------------------------------------------------------------------


def _goal_losses(
    logits: torch.Tensor, goal: torch.Tensor, truth: torch.Tensor, margin: float
) -> torch.Tensor:
    """Per position, how far it is from its goal (0 when met by `margin`)."""
    wants = goal >= 0
    token = torch.where(wants, goal, truth)
    chosen = logits.gather(1, token[:, None]).squeeze(1)
    others = logits.scatter(1, token[:, None], float("-inf")).amax(1)
    return torch.where(wants, others - chosen + margin, chosen - others + margin).clamp_min(0)


@contextmanager
def _adding_at(
    module: nn.Module, rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor
) -> Iterator[None]:
    def hook(
        _module: nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return output.index_put((rows, positions), delta, accumulate=True)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _position_logits(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    return (
        model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, positions].float()
    )


def optimise_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    layer: str,
    config: StampConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output vectors to add at the forget positions so every goal holds: (d_out x n, outputs).

    Returns the additions and the layer's outputs at those positions now.
    """
    device = next(model.parameters()).device
    module = find_module(model, layer)
    ids, mask = _padded(forget.sequences, tokenizer.pad_token_id, device)
    rows, positions = forget.row.to(device), forget.position.to(device)
    goal, truth = forget.goal.to(device), forget.true_token.to(device)
    outputs: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _a: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        outputs["now"] = output.detach()[rows, positions].float()

    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    handle = module.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    d_out = outputs["now"].shape[1]
    # Steps in units of the layer's own output scale: a fixed step size that suits one
    # layer is far too small for another (output norms grow with depth).
    scale = outputs["now"].pow(2).mean().sqrt()
    z = torch.zeros(len(forget), d_out, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([z], lr=config.target_lr)
    import os

    deepfool = os.environ.get("TGT") == "df"
    try:
        for _ in range(config.target_steps):
            delta = scale * z
            with _adding_at(module, rows, positions, delta.to(outputs["now"].dtype)):
                logits = _position_logits(model, ids, mask, rows, positions)
            losses = _goal_losses(logits, goal, truth, config.margin)
            if not bool((losses > 0).any()):
                break
            if deepfool:
                (grad,) = torch.autograd.grad(losses.sum(), z)
                with torch.no_grad():
                    norm2 = grad.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
                    z -= config.target_lr * (losses[:, None] / norm2) * grad
                continue
            loss = losses.sum() + config.target_decay * z.pow(2).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return (scale * z).detach().T, outputs["now"].T


@torch.inference_mode()
def goals_met(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, forget: ForgetPositions, margin: float
) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, mask = _padded(forget.sequences, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    logits = _position_logits(model, ids, mask, forget.row.to(device), forget.position.to(device))
    model.train(was_training)
    return _goal_losses(logits, forget.goal.to(device), forget.true_token.to(device), margin) == 0


# -- the edit -----------------------------------------------------------------------


def choose_layer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    refusal_prompts: Sequence[str],
) -> tuple[str, dict[str, float]]:
    """The down projection whose forget keys stand farthest from its refusal keys."""
    layers = down_projections(model)
    forget_keys = position_keys(
        model, tokenizer, forget.sequences, forget.row, forget.position, layers
    )
    refusal_keys = last_prompt_keys(model, tokenizer, refusal_prompts, layers)
    scores = {n: separation(forget_keys[n], refusal_keys[n]) for n in layers}
    return max(scores, key=scores.__getitem__), scores


def stamp_edit(
    model: PreTrainedModel,
    attached: AttachedEdits,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    retained: Callable[[str], KeyCovariance],
    refusal_prompts: Sequence[str],
    edit_id: str,
    config: StampConfig = StampConfig(),
) -> tuple[LayerEdit, StampReport]:
    """Compute the edit that makes `model` forget `records` (it is not attached here).

    `attached` holds the edits the model serves with now; the new edit is
    computed on top of them. `retained(layer)` gives that layer's retained key
    covariance (from replay or the sketch, per the variant).
    """
    started = time.perf_counter()
    forget = forget_positions(tokenizer, records)
    if config.layer is not None:
        layer, scores = config.layer, {}
    else:
        layer, scores = choose_layer(model, tokenizer, forget, refusal_prompts)
    keys = position_keys(model, tokenizer, forget.sequences, forget.row, forget.position, [layer])[
        layer
    ]
    covariance = retained(layer)
    solve_seconds = 0.0
    before = list(attached.edits)
    edit: LayerEdit | None = None
    rounds = 0
    try:
        while rounds < config.rounds:
            rounds += 1
            delta, outputs = optimise_targets(model, tokenizer, forget, layer, config)
            tic = time.perf_counter()
            v = _inverse_times(covariance, keys, config)
            u = delta
            import os
            if os.environ.get("EXACT"):
                gram = (v.T @ keys).double()
                u = torch.linalg.lstsq(gram.T, delta.double().T).solution.T.to(delta)
            solve_seconds += time.perf_counter() - tic
            targets = outputs + delta
            if edit is None:
                edit = LayerEdit(edit_id, layer, u, v, keys, targets)
            else:
                edit = LayerEdit(
                    edit_id,
                    layer,
                    torch.cat([edit.u, u], 1),
                    torch.cat([edit.v, v], 1),
                    keys,
                    targets,
                )
            attached.replace([*before, edit])
            met = goals_met(model, tokenizer, forget, config.margin)
            if bool(met.all()):
                break
    finally:
        attached.replace(before)
    assert edit is not None
    report = StampReport(
        layer=layer,
        separation=scores,
        keys=len(forget),
        rounds=rounds,
        goals_met=float(met.float().mean()),
        seconds=time.perf_counter() - started,
        solve_seconds=solve_seconds,
    )
    return edit, report


def replayed_covariance(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[PromptPair],
    layer: str,
    batch_size: int = 32,
) -> KeyCovariance:
    """The "full" variant's C: keys of every token of retained examples, replayed now."""
    total = None
    tokens = 0
    for start in range(0, len(examples), batch_size):
        sequences = [encode_example(tokenizer, e)[0] for e in examples[start : start + batch_size]]
        rows = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sequences)])
        positions = torch.cat([torch.arange(len(s)) for s in sequences])
        keys = position_keys(model, tokenizer, sequences, rows, positions, [layer])[layer].double()
        part = keys @ keys.T
        total = part if total is None else total + part
        tokens += keys.shape[1]
    if total is None:
        raise ValueError("no retained examples to build a key covariance from")
    return KeyCovariance.from_sums(total, tokens)
