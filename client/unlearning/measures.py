"""How much a model has forgotten and how much it still knows: one implementation for the
tests, the device's self-check after a deletion and the benchmark, so that every figure of
forgetting the project quotes is computed the same way.

Definitions follow TOFU's public evaluation code (see ALGORITHMS.md, section 4): an answer's
probability is exp(-mean token NLL) of its completion, teacher forced, encoded exactly as
training encodes it; ROUGE-L is the recall of the reference's words in the greedy answer.
Canary exposure (Carlini et al., "The Secret Sharer") is the secret's rank among every string
of its format, counted exactly by a pruned search where that is affordable.

Relapse (a forgotten fact coming back after more local or federated training) is measured by
calling `measure_forgetting` again after that training, passing the measures taken right
after the deletion as `before`: `forget_correct` and `probe_correct` then show what came back.
Everything here is a pure function of the model and the text: no files, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edge_models.corpus import Fact, PromptPair, Subject, fact_pairs
from edge_models.evaluation import greedy_answers, normalise_answer
from edge_models.training_data import (
    IGNORE_INDEX,
    EncodedExample,
    encode_example,
    right_padded,
    special_prefix,
)

# Pruning keeps prefixes down to this far (nats) below the secret's log-probability, so that
# float noise between batches of different shapes never prunes a prefix that holds a better
# candidate; it costs a few extra nodes, never correctness.
PRUNE_SLACK = 1e-3
DEFAULT_NODE_BUDGET = 4_096
DEFAULT_SAMPLES = 1_024


def completion_log_probs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the summed log-probability of the labelled tokens and how many there are.

    Differentiable, so that NPO trains on the same quantity the measures report.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    target = labels[:, 1:]
    token_log_probs = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_log_probs.sum(-1), (target != IGNORE_INDEX).sum(-1)


@torch.inference_mode()
def encoded_log_probs(
    model: PreTrainedModel, pad_id: int, rows: Sequence[EncodedExample], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """`completion_log_probs` of encoded examples, batched, in eval mode."""
    device = next(model.parameters()).device
    sums: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = right_padded(rows[start : start + batch_size], pad_id)
        total, count = completion_log_probs(model, *(t.to(device) for t in batch))
        sums.append(total.double().cpu().numpy())
        counts.append(count.cpu().numpy())
    model.train(was_training)
    if not sums:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(sums), np.concatenate(counts)


def answer_probabilities(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PromptPair],
    batch_size: int = 64,
) -> np.ndarray:
    """Per pair, exp(-mean NLL) of its completion tokens (with the closing `</s>`, as trained)."""
    rows = [encode_example(tokenizer, pair) for pair in pairs]
    sums, counts = encoded_log_probs(model, tokenizer.pad_token_id, rows, batch_size)
    return np.exp(sums / np.maximum(counts, 1))


def rouge_l_recall(prediction: str, reference: str) -> float:
    """Longest common subsequence of words over the reference's word count.

    Both sides are normalised as exact match normalises answers. An empty reference scores
    0.0, as in the rouge-score package TOFU uses, so the figures stay comparable.
    """
    predicted = normalise_answer(prediction).split()
    expected = normalise_answer(reference).split()
    if not expected:
        return 0.0
    previous = [0] * (len(predicted) + 1)
    for word in expected:
        current = [0]
        for j, other in enumerate(predicted):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(expected)


@dataclass(frozen=True)
class CanaryExposure:
    """Where a secret ranks among all strings of its format, given its prefix.

    `rank` is 1 + the number of other candidates with a higher log-probability (ties go to
    the secret); it is an unbiased estimate, not always a whole number, when `exact` is
    False. `nodes` counts the prefixes the search ran the model on (its cost).
    """

    rank: float
    candidates: int
    exposure_bits: float
    exact: bool
    log_prob: float
    nodes: int


def canary_exposure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prefix: str,
    secret: str,
    alphabet: str = "0123456789",
    *,
    node_budget: int = DEFAULT_NODE_BUDGET,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 256,
) -> CanaryExposure:
    """Rank of `secret` among all len(secret)-strings over `alphabet`, and its exposure in bits.

    A candidate's score is the log-probability, after `prefix`, of the tokens the tokenizer
    gives `prefix + " " + candidate` beyond those of `prefix` (the canary message is
    f"{prefix} {secret}."; the closing full stop is not scored). The search walks token
    sequences that spell " " + alphabet characters, level by level, and drops every node
    whose log-probability is already below the secret's: adding tokens only lowers it, so
    nothing under such a node can rank above the secret. Tokenizers that merge digits are
    handled: a candidate counts only on the path of its own tokenization. When the next
    level would take the nodes expanded past `node_budget`, what lies under that level is
    estimated by sampling (see `_Scorer.sampled_better`) and `exact` is False.
    """
    if not secret or any(c not in alphabet for c in secret) or len(set(alphabet)) != len(alphabet):
        raise ValueError("the secret must be a non-empty string over an alphabet of unique chars")
    scorer = _Scorer(model, tokenizer, prefix, batch_size)
    target = " " + secret
    target_log_prob = float(scorer.scores(scorer.continuations([target]))[0])
    pieces = scorer.pieces(alphabet)
    piece_ids = torch.tensor([i for i, _ in pieces], dtype=torch.long)
    piece_len = np.array([len(t) for _, t in pieces])
    piece_lead = np.array([t.startswith(" ") for _, t in pieces])
    candidates = len(alphabet) ** len(secret)

    # The frontier: token rows of equal length, the text each spells, their log-probability.
    tokens = torch.zeros((1, 0), dtype=torch.long)
    texts = [""]
    log_probs = np.zeros(1)
    better = 0
    nodes = 0
    while texts:
        if nodes + len(texts) > node_budget:
            frontier = _Frontier(tokens, texts, alphabet, len(secret))
            better_below = scorer.sampled_better(frontier, secret, target_log_prob, samples, seed)
            return _exposure(1 + better + better_below, candidates, False, target_log_prob, nodes)
        child = log_probs[:, None] + scorer.next_log_probs(tokens, piece_ids)
        nodes += len(texts)
        lengths = np.array([len(t) for t in texts])
        child_len = lengths[:, None] + piece_len[None, :]
        fits = (piece_lead[None, :] == (lengths[:, None] == 0)) & (child_len <= len(target))
        alive = fits & (child >= target_log_prob - PRUNE_SLACK)
        above = [
            (i, j)
            for i, j in np.argwhere(alive & (child_len == len(target)) & (child > target_log_prob))
            if texts[i] + pieces[j][1] != target
        ]
        own = scorer.continuations([texts[i] + pieces[j][1] for i, j in above])
        better += sum(
            ids == [*tokens[i].tolist(), pieces[j][0]]
            for (i, j), ids in zip(above, own, strict=True)
        )
        inner = np.argwhere(alive & (child_len < len(target)))
        tokens = torch.cat([tokens[inner[:, 0]], piece_ids[inner[:, 1], None]], dim=1)
        texts = [texts[i] + pieces[j][1] for i, j in inner]
        log_probs = child[inner[:, 0], inner[:, 1]]
    return _exposure(1 + better, candidates, True, target_log_prob, nodes)


def _exposure(
    rank: float, candidates: int, exact: bool, log_prob: float, nodes: int
) -> CanaryExposure:
    bits = math.log2(candidates) - math.log2(rank)
    return CanaryExposure(float(rank), candidates, bits, exact, log_prob, nodes)


@dataclass(frozen=True)
class _Frontier:
    """Unexpanded search nodes, and how many candidates each stands for."""

    tokens: torch.Tensor
    texts: list[str]
    alphabet: str
    length: int

    def written(self, node: int) -> str:
        """The characters of a candidate this node has already spelled."""
        return self.texts[node].removeprefix(" ")

    def sizes(self) -> np.ndarray:
        missing = [self.length - len(self.written(n)) for n in range(len(self.texts))]
        return np.array([float(len(self.alphabet)) ** m for m in missing])


class _Scorer:
    """The model read after one canary prefix, whose pass runs once per batch.

    Every score is computed the same way (the prefix's cache repeated across a batch of
    continuations), so the search's nodes and the secret's own score agree to float noise.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prefix: str,
        batch_size: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefix = prefix
        self.prefix_ids: list[int] = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        self.device = next(model.parameters()).device
        # Behind the tokenizer's own prefix (`<s>`, or nothing for SmolLM2), as it was trained.
        self.context = torch.tensor(
            [[*special_prefix(tokenizer), *self.prefix_ids]], device=self.device
        )
        self.batch_size = batch_size

    def continuations(self, texts: Sequence[str]) -> list[list[int]]:
        """The tokens of `prefix + text` after those of `prefix`, as a model reads the message."""
        if not texts:
            return []
        out = []
        encoded = self.tokenizer([self.prefix + t for t in texts], add_special_tokens=False)
        for ids in encoded["input_ids"]:
            if ids[: len(self.prefix_ids)] != self.prefix_ids:
                raise ValueError("the tokenizer merges the prefix's last token with what follows")
            out.append(ids[len(self.prefix_ids) :])
        return out

    def pieces(self, alphabet: str) -> list[tuple[int, str]]:
        """Tokens that can spell part of " " + secret: a space then alphabet chars, or just those.

        A token's text is read after the prefix, since some tokenizers (SentencePiece) drop
        a leading space when a token is decoded alone.
        """
        head = self.tokenizer.decode(self.prefix_ids)
        ids = [i for i in range(len(self.tokenizer)) if i not in self.tokenizer.all_special_ids]
        texts = self.tokenizer.batch_decode([[*self.prefix_ids, i] for i in ids])
        found = []
        for i, text in zip(ids, texts, strict=True):
            piece = text.removeprefix(head) if text.startswith(head) else ""
            if piece and all(c in alphabet for c in piece.removeprefix(" ")):
                found.append((i, piece))
        return found

    @torch.inference_mode()
    def _logits(self, rows: torch.Tensor) -> torch.Tensor:
        """Logits predicting each token of `rows` and the one after, read after the prefix."""
        was_training = self.model.training
        self.model.eval()
        first = self.model(input_ids=self.context, use_cache=rows.shape[1] > 0)
        logits = first.logits[:, -1:].expand(rows.shape[0], 1, -1)
        if rows.shape[1]:
            cache = first.past_key_values
            cache.batch_repeat_interleave(rows.shape[0])
            rest = self.model(input_ids=rows.to(self.device), past_key_values=cache).logits
            logits = torch.cat([logits, rest], dim=1)
        self.model.train(was_training)
        return torch.log_softmax(logits.float(), dim=-1)

    def next_log_probs(self, tokens: torch.Tensor, piece_ids: torch.Tensor) -> np.ndarray:
        """Log-probability of each piece after the prefix and each row of `tokens`."""
        out = [
            self._logits(tokens[start : start + self.batch_size])[:, -1, piece_ids.to(self.device)]
            for start in range(0, tokens.shape[0], self.batch_size)
        ]
        return torch.cat(out).double().cpu().numpy()

    def scores(self, rows: Sequence[list[int]]) -> np.ndarray:
        """Summed log-probability of each token row after the prefix."""
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids, _, labels = right_padded([(row, row) for row in chunk], pad_id=0)
            log_probs = self._logits(ids)[:, :-1].gather(-1, ids.to(self.device)[..., None])
            valid = (labels != IGNORE_INDEX).to(self.device)
            out.append((log_probs[..., 0] * valid).sum(-1).double().cpu())
        return torch.cat(out).numpy()

    def sampled_better(
        self, frontier: _Frontier, secret: str, target_log_prob: float, samples: int, seed: int
    ) -> float:
        """Unbiased estimate of how many candidates under the frontier beat the secret.

        A node is drawn with probability proportional to the number of candidates under
        it, then one of those uniformly (its missing characters at random); the estimate is
        the number of candidates under all nodes times the fraction of draws that beat the
        secret on the draw's node (its own tokenization passes through that node, so no
        candidate counts twice). Pruned nodes hold no better candidate, so sampling only
        where some may be costs no bias and saves variance.
        """
        sizes = frontier.sizes()
        gen = np.random.default_rng(seed)
        drawn = gen.choice(len(sizes), size=samples, p=sizes / sizes.sum())
        letters = np.array(list(frontier.alphabet))
        texts = []
        for n in drawn:
            written = frontier.written(n)
            texts.append(" " + written + "".join(gen.choice(letters, len(secret) - len(written))))
        own = self.continuations(texts)
        scores = self.scores(own)
        depth = frontier.tokens.shape[1]
        hits = sum(
            text != " " + secret
            and score > target_log_prob
            and ids[:depth] == frontier.tokens[n].tolist()
            for n, text, ids, score in zip(drawn, texts, own, scores, strict=True)
        )
        return float(sizes.sum()) * hits / samples


@dataclass(frozen=True)
class ForgetMeasures:
    """Forgetting of a forget set and retention of a retain set, in one model.

    Scores are means over items (NaN when there are none). The tuples keep per-item results
    in a fixed order (forget subjects' trained phrasings, their probes, their canaries) for
    the next measurement's `before`: `paraphrase_forget_rate` is the share of probes correct
    before an edit that are wrong now, and a relapse shows up as a `forget_correct` entry
    turning True again. `probe_prob_ratio` is the mean probe probability over that of a
    reference model (e.g. one trained without the forget set), given its `probe_probs`.
    """

    forget_exact_match: float
    forget_probability: float
    forget_rouge_l: float
    retain_exact_match: float
    retain_probability: float
    retain_rouge_l: float
    canary_exact_match: float
    canary_exposure: float
    probe_exact_match: float
    probe_probability: float
    probe_prob_ratio: float
    paraphrase_forget_rate: float
    forget_correct: tuple[bool, ...]
    probe_correct: tuple[bool, ...]
    probe_probs: tuple[float, ...]
    canaries: tuple[CanaryExposure, ...]

    def to_dict(self) -> dict[str, float]:
        """The scores as plain floats (per-item tuples left out), ready for JSON."""
        return {
            f.name: float(getattr(self, f.name))
            for f in fields(self)
            if not isinstance(getattr(self, f.name), tuple)
        }


@dataclass(frozen=True)
class _Answers:
    correct: list[bool]
    rouge: list[float]
    probs: np.ndarray


def _answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: list[tuple[str, Fact]]
) -> _Answers:
    """Greedy exact match and ROUGE-L, and the teacher-forced probability, of each answer."""
    got = greedy_answers(model, tokenizer, [prompt for prompt, _ in items])
    answers = [fact.answer for _, fact in items]
    return _Answers(
        correct=[
            normalise_answer(g) == normalise_answer(a) for g, a in zip(got, answers, strict=True)
        ],
        rouge=[rouge_l_recall(g, a) for g, a in zip(got, answers, strict=True)],
        probs=answer_probabilities(
            model, tokenizer, [PromptPair(prompt, fact.completion()) for prompt, fact in items]
        ),
    )


def _mean(values: Sequence[float] | np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _reproduces(continuation: str, secret: str) -> bool:
    """Whether greedy decoding spelled exactly the secret (its whole run of digits)."""
    spelled = continuation.lstrip()
    run = len(spelled) - len(spelled.lstrip("0123456789"))
    return spelled[:run] == secret


def measure_forgetting(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    forget: Sequence[Subject],
    retain: Sequence[Subject],
    *,
    reference_probe_probs: np.ndarray | Sequence[float] | None = None,
    before: ForgetMeasures | None = None,
    exposure_nodes: int = DEFAULT_NODE_BUDGET,
    exposure_samples: int = DEFAULT_SAMPLES,
) -> ForgetMeasures:
    """Every forgetting and retention measure of `model` on these subjects, in one call.

    `before` (the measures of the same subjects before the edit) gives the paraphrase
    forget rate; `reference_probe_probs` (a reference model's `probe_probs`) the probe
    probability ratio. Both must come from the same forget subjects, or ValueError.
    `exposure_nodes` and `exposure_samples` size each canary's exposure search
    (`canary_exposure`'s `node_budget` and `samples`): a larger model pays more per node.
    """
    probe_items = [(probe, f) for s in forget for f in s.facts for probe in f.probes]
    if before is not None and len(before.probe_correct) != len(probe_items):
        raise ValueError("`before` was measured on other forget subjects")
    reference = None if reference_probe_probs is None else np.asarray(reference_probe_probs, float)
    if reference is not None and reference.shape != (len(probe_items),):
        raise ValueError("`reference_probe_probs` does not match the forget subjects' probes")
    forgotten = _answers(model, tokenizer, [(p.prompt, f) for f, p in fact_pairs(tuple(forget))])
    kept = _answers(model, tokenizer, [(p.prompt, f) for f, p in fact_pairs(tuple(retain))])
    probes = _answers(model, tokenizer, probe_items)
    canaries = [s.canary for s in forget if s.canary is not None]
    spelled = greedy_answers(model, tokenizer, [c.prefix for c in canaries])
    exposures = tuple(
        canary_exposure(
            model,
            tokenizer,
            c.prefix,
            c.secret,
            node_budget=exposure_nodes,
            samples=exposure_samples,
        )
        for c in canaries
    )
    forget_rate = math.nan
    if before is not None:
        pairs = zip(probes.correct, before.probe_correct, strict=True)
        forget_rate = _mean([not now for now, then in pairs if then])
    return ForgetMeasures(
        forget_exact_match=_mean(forgotten.correct),
        forget_probability=_mean(forgotten.probs),
        forget_rouge_l=_mean(forgotten.rouge),
        retain_exact_match=_mean(kept.correct),
        retain_probability=_mean(kept.probs),
        retain_rouge_l=_mean(kept.rouge),
        canary_exact_match=_mean(
            [_reproduces(s, c.secret) for s, c in zip(spelled, canaries, strict=True)]
        ),
        canary_exposure=_mean([e.exposure_bits for e in exposures]),
        probe_exact_match=_mean(probes.correct),
        probe_probability=_mean(probes.probs),
        probe_prob_ratio=math.nan if reference is None else _mean(probes.probs) / _mean(reference),
        paraphrase_forget_rate=forget_rate,
        forget_correct=tuple(forgotten.correct),
        probe_correct=tuple(probes.correct),
        probe_probs=tuple(float(p) for p in probes.probs),
        canaries=exposures,
    )
