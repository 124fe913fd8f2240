"""STAMP-style unlearning: a closed-form edit of one MLP layer, computed from the forget set.

The published method (RePAIR's STAMP) does not give its update rule; this is
the derivation the project uses (see ALGORITHMS.md, section 3), with the
choices `lethe bench unlearning` measured on its device (30 people, the
default model; mean / worst retained exact-match drop over 9 forget sets of
1 to 3 people, each with a canary holder; the bench's docstring has more):

1. Forget positions: where a record discloses its subject, and the token that
   must stop winning there. For a prompt/completion record, every answer
   position (the last prompt token and the completion's own tokens), of which
   the edit later keeps ONE: the position whose true token is cheapest to
   beat in the model now. Greedy decoding follows the true answer up to that
   token and then leaves it, so the answer is gone; and a late answer token
   is person-specific where the first one often is not (every birth year
   starts with "1" or "2"), so moving it leaves other people alone. Asking
   for the refusal's first token at the last prompt token instead (the
   original design) cost 4.5 / 14.4 points, since it moved everyone asked in
   the same template; suppressing every answer position cost 9.3 / 14.3. For
   a free-text record, every position whose next token has a digit or is one
   of the subject's answers. The true token must fall `margin` logits below
   the best other token (margin 0.5: 0.6 / 1.6 points; 1.0: 1.1 / 2.1; the
   goal is greedy decoding, which any positive margin changes). At a digit
   of a secret (five or more digits: a PIN, a phone number) that is not
   enough: the secret stays the second choice at every digit and so ranks
   near the top of all strings of its format (exposure 16 of 19.9 bits).
   There the true digit must come down to the mean of the other digits plus
   `secret_slack` (exposure 4.7 bits; with no slack 2.4 bits but 1.2 / 2.6
   points, since the push reaches the digits of retained birth years).
2. The layer. Among the down projections of the upper half of the blocks,
   the one whose outputs (its activations) at the decision positions, the
   last prompt tokens, point farthest from its outputs on refusal prompts
   (questions about people nobody knows), measured as the cosine distance of
   the means. The lower half is not a candidate: an edit there reaches every
   later attention and cost 2.8 to 7.4 retained points on average (up to 20)
   against about 0 for the upper blocks.
3. Targets. The change of the layer's output at each forget position that
   meets its goal, found with the weights frozen by minimal linearised steps
   (each step the smallest change that would close the position's gap if the
   logits were linear in it, as DeepFool does), so the targets ask for no
   more than they must: an optimiser with a fixed step size moved every
   coordinate and raised the retained cost.
4. The edit. `dW = R K^T (lambda C + K K^T)^-1` for the forget keys `K`, the
   residuals `R` the targets ask for, and `C` the covariance of retained
   keys: the ridge form that trades exactness on the forget keys against
   moving retained keys (lambda 0.2 to 200 moved the mean retained drop by
   under 0.15 points once the targets asked for little). "full" builds `C`
   from retained records replayed now; "low_rank" uses the top-`rank`
   eigenpairs of the key sketch the device keeps while it trains (plus an
   isotropic floor of the rest), by Woodbury
   in O((r+n)^2 d): no retained record is read. The edit is returned as the
   factors `u = R`, `v = (lambda C + K K^T)^-1 K`. Rounds repeat on top of the
   edit so far until every goal holds or `rounds` run out; they share `v`
   (same keys, same `C`), so their `u` add up and the edit keeps rank n.

Pure torch, no files: the device daemon and the benchmark drive it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from client.unlearning.edits import AttachedEdits, LayerEdit, find_module
from edge_models.corpus import PromptPair
from edge_models.training_data import encode_example, prompt_ids, special_prefix
from shared.records import Record

Variant = Literal["full", "low_rank"]
_DIGIT = re.compile(r"\d")
SECRET_SLACK = 1.0
# A secret: five or more digits, perhaps grouped by single dashes or spaces (a PIN, a card or
# phone number); a year or a time of day is not one.
_SECRET = re.compile(r"\d(?:[- ]?\d){4,}")


@dataclass(frozen=True)
class StampConfig:
    """How an edit is computed; the defaults are the ones `lethe bench unlearning` chose."""

    variant: Variant = "low_rank"
    rank: int = 128  # retained key subspace the low-rank variant keeps
    ridge: float = 2.0  # lambda: larger protects retained keys more, hits targets less
    floor: float = 1e-3  # isotropic floor added to C, as a fraction of its mean eigenvalue
    layer: str | None = None  # None: the most separating down projection
    margin: float = 0.5  # logits by which the true token must lose
    secret_slack: float = SECRET_SLACK  # logits a secret's digit may stay above its rivals' mean
    target_steps: int = 100
    target_lr: float = 1.0  # fraction of each linearised step taken
    rounds: int = 6

    def __post_init__(self) -> None:
        if self.rank < 1 or self.rounds < 1 or self.target_steps < 1:
            raise ValueError("rank, rounds and target_steps must be at least 1")
        if not (self.ridge > 0 and self.floor > 0 and self.margin > 0 and self.target_lr > 0):
            raise ValueError("ridge, floor, margin and target_lr must be positive")


@dataclass(frozen=True)
class ForgetPositions:
    """Encoded forget sequences and the positions to change in them.

    At each position the token `true_token` must lose. Where `either` is
    True (the answer positions of a prompt/completion record), one position
    of the row losing is enough: greedy decoding leaves the answer there.
    Where `secret` is True (a digit of a secret), it must come down to the
    mean of the other digits (plus a slack), not just below the best one
    (see `_gaps`).
    """

    sequences: list[list[int]]
    row: torch.Tensor
    position: torch.Tensor
    true_token: torch.Tensor
    either: torch.Tensor
    secret: torch.Tensor

    def __len__(self) -> int:
        return int(self.row.numel())

    def subset(self, keep: torch.Tensor) -> ForgetPositions:
        return ForgetPositions(
            self.sequences,
            self.row[keep],
            self.position[keep],
            self.true_token[keep],
            self.either[keep],
            self.secret[keep],
        )


@dataclass(frozen=True)
class StampReport:
    layer: str
    separation: dict[str, float]
    keys: int
    rounds: int
    goals_met: float  # fraction of forget positions whose goal holds after the edit
    seconds: float
    solve_seconds: float


class NothingToForget(ValueError):
    """The records have no position an edit could act on (free text without digits or the
    subject's answers): shredding them is all there is to do."""


def forget_positions(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record]
) -> ForgetPositions:
    """Where a subject's records disclose them: every candidate position (see the module doc).

    Identical records (a note kept twice) give one sequence: a duplicate key
    adds nothing to the edit but a singular direction.
    """
    answers = {
        token
        for r in records
        if r.kind == "pair"
        for token in tokenizer(
            " " + (r.completion or "").strip().removesuffix("."), add_special_tokens=False
        )["input_ids"]
    }
    answers = {t for t in answers if _discloses(tokenizer, t)}
    sequences: list[list[int]] = []
    rows, positions, either, secret = [], [], [], []
    seen: set[tuple[int, ...]] = set()
    for record in records:
        if record.kind == "pair":
            pair = PromptPair(record.prompt or "", record.completion or "")
            ids, labels = encode_example(tokenizer, pair)
            first = next(i for i, label in enumerate(labels) if label >= 0)
            picked = [
                i for i in range(first - 1, len(ids) - 1) if _discloses(tokenizer, ids[i + 1])
            ]
            hidden = set()
        else:
            ids, _ = encode_example(tokenizer, PromptPair("", record.text or ""))
            picked = [
                i
                for i in range(len(ids) - 1)
                if ids[i + 1] in answers or _DIGIT.search(tokenizer.decode([ids[i + 1]]))
            ]
            hidden = _secret_positions(tokenizer, record.text or "", len(special_prefix(tokenizer)))
        if not picked or tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        rows += [len(sequences)] * len(picked)
        positions += picked
        either += [record.kind == "pair"] * len(picked)
        secret += [i in hidden for i in picked]
        sequences.append(ids)
    if not sequences:
        raise NothingToForget("the records disclose nothing an edit could remove")
    row, position = torch.tensor(rows), torch.tensor(positions)
    true_token = torch.tensor([sequences[r][p + 1] for r, p in zip(rows, positions, strict=True)])
    return ForgetPositions(
        sequences, row, position, true_token, torch.tensor(either), torch.tensor(secret)
    )


def _secret_positions(tokenizer: PreTrainedTokenizerBase, text: str, prefix: int) -> set[int]:
    """The positions of `encode_example(PromptPair("", text))` that predict a secret's digit.

    Token j of the text is token j + `prefix` of the example (behind the tokenizer's own
    prefix: `<s>` for the default model, nothing for SmolLM2), predicted one position
    earlier; a text's first token, with no prefix before it, is predicted nowhere.
    """
    spans = [match.span() for match in _SECRET.finditer(text)]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return {
        j + prefix - 1
        for j, (start, end) in enumerate(offsets["offset_mapping"])
        if any(a < end and start < b for a, b in spans)
        and _DIGIT.search(text[start:end])
        and j + prefix >= 1
    }


def _discloses(tokenizer: PreTrainedTokenizerBase, token: int) -> bool:
    """Whether a token carries content (not a space, punctuation or the end of the text)."""
    return token not in tokenizer.all_special_ids and bool(tokenizer.decode([token]).strip(" .,"))


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
def _capturing(
    model: nn.Module, layers: Sequence[str], outputs: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record each layer's input (its keys) or, with `outputs`, its output, per forward pass."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(
            _module: nn.Module, args: tuple[torch.Tensor, ...], *output: torch.Tensor
        ) -> None:
            captured[name] = (output[0] if outputs else args[0]).detach()

        return record

    modules = [find_module(model, n) for n in layers]
    handles = [
        m.register_forward_hook(hook(n)) if outputs else m.register_forward_pre_hook(hook(n))
        for m, n in zip(modules, layers, strict=True)
    ]
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
    outputs: bool = False,
) -> dict[str, torch.Tensor]:
    """Per layer, the down projection's inputs (or outputs) at (row, position): d x n, float32."""
    device = next(model.parameters()).device
    ids, mask = _padded(sequences, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    with _capturing(model, layers, outputs) as captured:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    model.train(was_training)
    return {n: captured[n][rows.to(device), positions.to(device)].float().T for n in layers}


def last_prompt_keys(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layers: Sequence[str],
    outputs: bool = False,
) -> dict[str, torch.Tensor]:
    sequences = [prompt_ids(tokenizer, p) for p in prompts]  # as generation reads them
    rows = torch.arange(len(sequences))
    positions = torch.tensor([len(s) - 1 for s in sequences])
    return position_keys(model, tokenizer, sequences, rows, positions, layers, outputs)


def separation(forget: torch.Tensor, refusal: torch.Tensor) -> float:
    """Cosine distance between the mean activations (columns) of two sets.

    A direction, not a length: activation norms grow with depth, so a length
    would rank layers by their scale rather than by what they say.
    """
    cosine = torch.nn.functional.cosine_similarity(forget.mean(1), refusal.mean(1), dim=0)
    return float(1 - cosine)


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
    c = covariance.mean.to(keys).double()
    k = keys.double()
    d = c.shape[0]
    values, vectors = torch.linalg.eigh(c)
    values = values.clamp_min(0).flip(0)
    vectors = vectors.flip(1)
    floor = config.floor * float(values.mean())
    if config.variant == "full":
        m = config.ridge * (c + floor * torch.eye(d, dtype=torch.float64, device=c.device))
        return torch.linalg.solve(m + k @ k.T, k).to(keys)
    r = min(config.rank, d - 1)
    rest = float(values[r:].mean()) + floor  # isotropic stand-in for the discarded spectrum
    sigma = config.ridge * rest
    z = torch.cat([vectors[:, :r] * (config.ridge * (values[:r] - rest).clamp_min(0)).sqrt(), k], 1)
    small = sigma * torch.eye(z.shape[1], dtype=torch.float64, device=c.device) + z.T @ z
    return ((k - z @ torch.linalg.solve(small, z.T @ k)) / sigma).to(keys)


# -- targets ------------------------------------------------------------------------


def _gaps(
    logits: torch.Tensor,
    truth: torch.Tensor,
    secret: torch.Tensor,
    digits: torch.Tensor,
    margin: float,
    slack: float,
) -> torch.Tensor:
    """Per position, how far the true token is from its goal (0 when it holds).

    The true token must fall `margin` below the best other token; at a secret's digit,
    to at most `slack` above the mean of the other digits instead. A digit pushed just
    below the runner-up leaves the secret near the top of all strings of its format (its
    exposure barely moves: 16 of 19.9 bits); one near the average of its rivals puts it
    among the common ones (about 5 bits), and the slack keeps the push from reaching the
    digits of retained facts (birth years) with similar keys.
    """
    chosen = logits.gather(1, truth[:, None]).squeeze(1)
    best = logits.scatter(1, truth[:, None], float("-inf")).amax(1)
    rivals = logits[:, digits]
    own = (digits[None, :] == truth[:, None]).float()
    mean = (rivals.sum(1) - (rivals * own).sum(1)) / (digits.numel() - own.sum(1)).clamp_min(1)
    return (chosen - torch.where(secret, mean + slack, best - margin)).clamp_min(0)


@cache
def _digit_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens that spell one digit (with or without a leading space)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, t in enumerate(texts) if len(t.strip()) == 1 and t.strip().isdigit())


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


@torch.inference_mode()
def _position_gaps(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    margin: float,
    slack: float,
) -> torch.Tensor:
    device = next(model.parameters()).device
    ids, mask = _padded(forget.sequences, tokenizer.pad_token_id, device)
    was_training = model.training
    model.eval()
    logits = _position_logits(model, ids, mask, forget.row.to(device), forget.position.to(device))
    model.train(was_training)
    digits = torch.tensor(_digit_tokens(tokenizer), device=device)
    truth, secret = forget.true_token.to(device), forget.secret.to(device)
    return _gaps(logits, truth, secret, digits, margin, slack).cpu()


def optimise_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    layer: str,
    config: StampConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output vectors to add at the forget positions so every goal holds: (d_out x n, outputs).

    Each step moves every position that misses its goal by the smallest change that would
    close its gap if the logits were linear in it (`target_lr` of that step). Returns the
    additions and the layer's outputs at those positions now.
    """
    device = next(model.parameters()).device
    module = find_module(model, layer)
    ids, mask = _padded(forget.sequences, tokenizer.pad_token_id, device)
    rows, positions = forget.row.to(device), forget.position.to(device)
    truth, secret = forget.true_token.to(device), forget.secret.to(device)
    digits = torch.tensor(_digit_tokens(tokenizer), device=device)
    outputs = position_keys(
        model, tokenizer, forget.sequences, forget.row, forget.position, [layer], outputs=True
    )[layer].T.clone()
    was_training = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    delta = torch.zeros_like(outputs, requires_grad=True)
    try:
        for _ in range(config.target_steps):
            with _adding_at(module, rows, positions, delta.to(outputs.dtype)):
                logits = _position_logits(model, ids, mask, rows, positions)
            gaps = _gaps(logits, truth, secret, digits, config.margin, config.secret_slack)
            if not bool((gaps > 0).any()):
                break
            (grad,) = torch.autograd.grad(gaps.sum(), delta)
            with torch.no_grad():
                length = grad.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
                delta -= config.target_lr * (gaps.detach()[:, None] / length) * grad
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return delta.detach().T, outputs.T


def goals_met(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    margin: float,
    secret_slack: float = SECRET_SLACK,
) -> torch.Tensor:
    """Per position, whether its goal holds; an `either` position holds when its row's does."""
    met = _position_gaps(model, tokenizer, forget, margin, secret_slack) == 0
    rows_met = torch.zeros(len(forget.sequences), dtype=torch.bool)
    rows_met.index_fill_(0, forget.row[met & forget.either], True)
    return torch.where(forget.either, rows_met[forget.row], met)


def cheapest_positions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    config: StampConfig,
) -> ForgetPositions:
    """Keep every position that must lose on its own, and of each `either` row only the
    position whose true token is closest to losing now (the smallest edit that removes it)."""
    gaps = _position_gaps(model, tokenizer, forget, config.margin, config.secret_slack)
    keep = ~forget.either
    for row in forget.row[forget.either].unique():
        candidates = torch.nonzero(forget.either & (forget.row == row)).flatten()
        keep[candidates[gaps[candidates].argmin()]] = True
    return forget.subset(keep)


# -- the edit -----------------------------------------------------------------------


def choose_layer(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: ForgetPositions,
    refusal_prompts: Sequence[str],
) -> tuple[str, dict[str, float]]:
    """The upper-half down projection whose outputs at the decision positions (the last
    prompt token of each forget question, else the forget positions) stand farthest from its
    outputs on refusal prompts."""
    layers = down_projections(model)
    layers = layers[len(layers) // 2 :]
    first = torch.ones(len(forget), dtype=torch.bool)
    first[1:] = forget.row[1:] != forget.row[:-1]
    decisions = forget.subset(first & forget.either) if bool(forget.either.any()) else forget
    forget_out = position_keys(
        model, tokenizer, forget.sequences, decisions.row, decisions.position, layers, True
    )
    refusal_out = last_prompt_keys(model, tokenizer, refusal_prompts, layers, outputs=True)
    scores = {n: separation(forget_out[n], refusal_out[n]) for n in layers}
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
    candidates = forget_positions(tokenizer, records)
    if config.layer is not None:
        layer, scores = config.layer, {}
    else:
        layer, scores = choose_layer(model, tokenizer, candidates, refusal_prompts)
    forget = cheapest_positions(model, tokenizer, candidates, config)
    keys = position_keys(model, tokenizer, forget.sequences, forget.row, forget.position, [layer])[
        layer
    ]
    covariance = retained(layer)
    tic = time.perf_counter()
    v = _inverse_times(covariance, keys, config)
    solve_seconds = time.perf_counter() - tic
    before = list(attached.edits)
    edit: LayerEdit | None = None
    rounds = 0
    try:
        while rounds < config.rounds:
            rounds += 1
            delta, outputs = optimise_targets(model, tokenizer, forget, layer, config)
            u = delta if edit is None else edit.u + delta
            edit = LayerEdit(edit_id, layer, u, v, keys, outputs + delta)
            attached.replace([*before, edit])
            met = goals_met(model, tokenizer, forget, config.margin, config.secret_slack)
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
