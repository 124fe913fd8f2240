"""Continual learning of the personal adapter: replay, and protection of earlier subspaces.

The device trains its personal adapter in small steps as records arrive. Two
things keep it from forgetting what it learned before:

- Replay: each training set mixes the new records with a sample of the
  records still in the record store. The sample is drawn from the store at
  the moment of mixing, never from a buffer kept on the side, so a subject
  deleted a moment ago cannot be replayed into the adapter again.
- A subspace method. The adapter's rank is split into blocks, one per stretch
  of the stream (a "task": in the bench, a domain); only the current block
  trains, so earlier blocks keep what they learned, and the current block is
  kept from disturbing earlier inputs. Two ways to do the latter, as the
  continual-learning literature has them:
  * InfLoRA-style (`design_block` + `BlockMask(train_a=False)`): the
    block's A rows are chosen inside the orthogonal complement of the
    principal subspace of earlier inputs at each LoRA layer (from a running
    input covariance per layer, `InputCovariance`), as the directions the new
    data uses most there, and frozen; only B trains. For an earlier input x
    in that subspace `B_t A_t x = 0` whatever B_t becomes, so the protection
    holds exactly under any optimiser (a projected gradient would not: Adam's
    per-coordinate scaling moves the step out of the allowed subspace).
  * O-LoRA-style (`OrthogonalityPenalty` + `BlockMask(train_a=True)`): A and
    B of the block both train, with a penalty on the overlap between the
    block's A rows and the earlier blocks' A rows.
  `lethe bench continual` measured both (and InfLoRA with A trained under
  `ComplementProjection`): only the InfLoRA-style block with a frozen A kept
  forgetting within 2 points, so it is the one Lethe uses; the bench's
  docstring has the figures.

Everything here is pure (tensors in, tensors out, no files): the daemon and
the bench drive it around `client.lora_training.train_adapter_steps`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from client.lora_training import adapter_parameters
from edge_models.corpus import PromptPair
from edge_models.training_data import encode_example, padded_batches
from shared.records import Record

_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"


class RecordSource(Protocol):
    """Where replay comes from: the record store, read when the mix is made."""

    def records(self) -> Iterable[Record]: ...


@dataclass(frozen=True)
class ReplayConfig:
    """`fraction`: the share of replayed records in each training set, in [0, 1).

    A share rather than a count, so that a burst of new records brings
    proportionally more replay with it and the balance of old and new
    knowledge does not depend on how records happen to be batched.
    """

    fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ValueError(f"replay fraction must be in [0, 1), got {self.fraction}")

    def replay_count(self, new: int) -> int:
        """How many replayed records go with `new` new ones (when the store has that many)."""
        return round(new * self.fraction / (1 - self.fraction))


def mix_replay(
    new: Sequence[Record], source: RecordSource, config: ReplayConfig, rng: random.Random
) -> list[Record]:
    """The new records, then a uniform sample of the other records the source holds now.

    The source is read once, by reservoir sampling, so a store larger than
    memory is fine; records equal to a new one are not counted as replay.
    When the store holds fewer than the share asks for, all of them are used.
    """
    wanted = config.replay_count(len(new))
    fresh = set(new)
    reservoir: list[Record] = []
    seen = 0
    if wanted:
        for record in source.records():
            if record in fresh:
                continue
            seen += 1
            if len(reservoir) < wanted:
                reservoir.append(record)
            else:
                slot = rng.randrange(seen)
                if slot < wanted:
                    reservoir[slot] = record
    return [*new, *reservoir]


@dataclass(frozen=True)
class LoraFactors:
    """One LoRA layer of an adapter: A (rank x d_in) and B (d_out x rank), and its module."""

    name: str
    module: nn.Module
    a: nn.Parameter
    b: nn.Parameter


def lora_factors(model: PeftModel, adapter: str) -> list[LoraFactors]:
    """The (A, B) pairs of one adapter, one per adapted layer, in the model's order."""
    parameters = adapter_parameters(model, adapter)
    modules = dict(model.named_modules())
    factors = []
    for key, a in parameters.items():
        if key.endswith(_A_SUFFIX):
            layer = key.removesuffix(_A_SUFFIX)
            factors.append(
                LoraFactors(
                    name=layer,
                    module=modules[_module_name(modules, layer)],
                    a=a,
                    b=parameters[layer + _B_SUFFIX],
                )
            )
    return factors


def _module_name(modules: dict[str, nn.Module], layer: str) -> str:
    """The full module name of an adapted layer; adapter keys may lack peft's wrapper prefix."""
    for prefix in ("", "base_model.model."):
        if prefix + layer in modules:
            return prefix + layer
    raise KeyError(f"no module {layer!r} in the model")


@dataclass(frozen=True)
class BlockLayout:
    """The adapter's rank split into equal blocks of `block_rank`; block t serves task t."""

    block_rank: int
    blocks: int

    def __post_init__(self) -> None:
        if self.block_rank < 1 or self.blocks < 1:
            raise ValueError(f"need positive block rank and count, got {self}")

    @property
    def rank(self) -> int:
        return self.block_rank * self.blocks

    def rows(self, block: int) -> slice:
        """Block `block`'s rows of A (and columns of B)."""
        if not 0 <= block < self.blocks:
            raise ValueError(f"block {block} outside 0..{self.blocks - 1}")
        return slice(block * self.block_rank, (block + 1) * self.block_rank)


class BlockMask:
    """`after_backward` hook: only block `block` of the adapter learns.

    Zeroing a gradient freezes an entry under AdamW only when the optimiser
    starts without moments and without weight decay, which is how
    `train_adapter_steps` runs (a fresh AdamW per call, weight decay 0 by
    default); with `train_a=False` the A factors stay as designed.
    """

    def __init__(self, factors: Sequence[LoraFactors], rows: slice, train_a: bool) -> None:
        self._factors = factors
        self._rows = rows
        self._train_a = train_a

    def __call__(self, _model: PeftModel) -> None:
        for f in self._factors:
            _keep_only(f.b.grad, self._rows, dim=1)
            if self._train_a:
                _keep_only(f.a.grad, self._rows, dim=0)
            elif f.a.grad is not None:
                f.a.grad.zero_()


def _keep_only(grad: torch.Tensor | None, rows: slice, dim: int) -> None:
    if grad is None:
        return
    kept = grad.narrow(dim, rows.start, rows.stop - rows.start).clone()
    grad.zero_()
    grad.narrow(dim, rows.start, rows.stop - rows.start).copy_(kept)


@dataclass(frozen=True)
class OrthogonalityConfig:
    """`weight`: the O-LoRA penalty's weight (the paper's lambda_1)."""

    weight: float = 0.5


class OrthogonalityPenalty:
    """`extra_loss` hook: weight * sum over layers of ||A_old A_t^T||_F^2 (O-LoRA).

    `A_old` are the rows of the blocks before `block`, taken as constants; the
    penalty is zero when the block's rows are orthogonal to all of them and
    its gradient turns them away from the earlier blocks' subspace.
    """

    def __init__(
        self,
        factors: Sequence[LoraFactors],
        layout: BlockLayout,
        block: int,
        config: OrthogonalityConfig,
    ) -> None:
        self._factors = factors
        self._rows = layout.rows(block)
        self._weight = config.weight

    def __call__(self, _model: PeftModel) -> torch.Tensor:
        total = self._factors[0].a.new_zeros(())
        for f in self._factors:
            old = f.a[: self._rows.start].detach()
            total = total + (old @ f.a[self._rows].T).pow(2).sum()
        return self._weight * total


class InputCovariance:
    """A running sketch of what each LoRA layer has seen: sum of x x^T over real tokens.

    The device keeps it for the data it has learned (the unlearning edit
    needs the same statistics of retained inputs); its principal subspace is
    what a new block must leave alone.
    """

    def __init__(self, factors: Sequence[LoraFactors]) -> None:
        self._factors = factors
        self.sums = {
            f.name: torch.zeros(f.a.shape[1], f.a.shape[1], dtype=torch.float64) for f in factors
        }
        self.tokens = 0

    @torch.inference_mode()
    def observe(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[PromptPair],
        batch_size: int = 32,
    ) -> None:
        """Add the layer inputs of one pass over `examples` in the model as it is now.

        Every token counts, prompt included: attention reads all of them.
        """
        encoded = [encode_example(tokenizer, e) for e in examples]
        device = self._factors[0].a.device
        was_training = model.training
        model.eval()
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            # A batch of the whole chunk, so every example is seen exactly once.
            ids, mask, _labels = next(
                padded_batches(chunk, len(chunk), tokenizer.pad_token_id, torch.Generator())
            )
            with self._recording(mask.to(device).bool()):
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            self.tokens += int(mask.sum())
        model.train(was_training)

    @contextmanager
    def _recording(self, mask: torch.Tensor) -> Iterator[None]:
        def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
            def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0][mask].double()
                self.sums[name] += (x.T @ x).cpu()

            return record

        handles = [f.module.register_forward_pre_hook(hook(f.name)) for f in self._factors]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def complement(self, energy: float) -> dict[str, torch.Tensor]:
        """Per layer, an orthonormal basis (d_in x m) of the directions outside the protected
        subspace: the top eigenvectors holding `energy` of the inputs' total energy."""
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        out = {}
        for name, total in self.sums.items():
            values, vectors = _eigh(total)  # ascending
            values = values.clamp_min(0).flip(0)
            vectors = vectors.flip(1)
            if self.tokens == 0 or values.sum() == 0:
                out[name] = vectors.float()
                continue
            share = values.cumsum(0) / values.sum()
            protected = int((share < energy - 1e-9).sum()) + 1  # tolerance: cumsum rounding
            out[name] = vectors[:, protected:].float()
        return out


class ComplementProjection:
    """`after_backward` hook: the A rows `rows` (one block) learn, but only inside the complement.

    It projects the rows' gradient onto the complement, and the rows
    themselves too: AdamW scales each coordinate of a step separately, which
    moves a projected gradient's step slightly out of the complement, and
    projecting the parameters at the next step (and with `settle` after the
    last one) takes that drift back out. Combine with `BlockMask(train_a=True)`.
    """

    def __init__(
        self, factors: Sequence[LoraFactors], rows: slice, complement: dict[str, torch.Tensor]
    ) -> None:
        self._factors = factors
        self._rows = rows
        self._projectors = {name: basis @ basis.T for name, basis in complement.items()}

    def __call__(self, _model: PeftModel) -> None:
        self.settle()
        for f in self._factors:
            if f.a.grad is not None:
                f.a.grad[self._rows] = f.a.grad[self._rows] @ self._projector(f)

    @torch.no_grad()
    def settle(self) -> None:
        """Put the block's A rows back inside the complement (after a training call)."""
        for f in self._factors:
            f.a[self._rows] = f.a[self._rows] @ self._projector(f)

    def _projector(self, f: LoraFactors) -> torch.Tensor:
        return self._projectors[f.name].to(device=f.a.device, dtype=f.a.dtype)


def design_block(
    factors: Sequence[LoraFactors],
    layout: BlockLayout,
    block: int,
    complement: dict[str, torch.Tensor],
    new_inputs: InputCovariance,
) -> None:
    """InfLoRA's initialisation of block `block`: B = 0, and A's rows the top eigenvectors
    of the new inputs' covariance restricted to the complement of the protected subspace.

    Rows are orthonormal and lie exactly in the complement (rows left over when
    the complement is smaller than the block are zero), so the block cannot
    act on earlier inputs; choosing the directions the new data uses most
    keeps as much of the block's capacity useful as that allows.
    """
    rows = layout.rows(block)
    with torch.no_grad():
        for f in factors:
            basis = complement[f.name].double()  # d_in x m
            inside = basis.T @ new_inputs.sums[f.name] @ basis
            _values, vectors = _eigh(inside)
            top = vectors.flip(1)[:, : layout.block_rank]
            a = torch.zeros(layout.block_rank, f.a.shape[1], dtype=torch.float64)
            a[: top.shape[1]] = (basis @ top).T
            f.a[rows] = a.to(f.a.dtype)
            f.b[:, rows] = 0


def _eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric eigendecomposition on one thread.

    At these sizes (at most a layer's input width) LAPACK's threaded path
    gains nothing and, when another process holds a core, stalls: 0.5 to 5 s
    per 128- or 384-wide matrix on two busy cores, against 15 ms on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(matrix)
    finally:
        torch.set_num_threads(threads)
