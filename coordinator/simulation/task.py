"""The workload of simulated fleets: a small LoRA classifier that trains in microseconds.

Scheduling policies are compared on thousands of updates, so the model must
be cheap while keeping the two properties that matter here: updates are LoRA
B factors on a fixed fleet-wide A (what the real fleet exchanges, aggregated
by the same code), and the data are non-IID across clients (a Dirichlet
split of classes). Concretely: 10 classes of points around random prototypes
in 32 dimensions, a fixed random ReLU feature layer (32 -> 64), and logits
h (W0 + B A)^T with a frozen random W0, A (rank 16, from the seed) and a
trained B. Local training is plain SGD on cross-entropy with batch 32.

Everything is a pure function of the seed (numpy's PCG64), so a policy's
result depends on the seed and the schedule only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

B_KEY = "head.lora_B.weight"


@dataclass(frozen=True)
class TaskConfig:
    classes: int = 10
    dim: int = 32
    hidden: int = 64
    rank: int = 16
    samples_per_client: int = 300
    test_samples: int = 2000
    noise: float = 1.0
    lr: float = 0.1
    batch_size: int = 32


@dataclass(frozen=True)
class Task:
    """The frozen parts of the model and the test set; clients' data come from `client_data`."""

    config: TaskConfig
    seed: int
    prototypes: np.ndarray
    features: np.ndarray  # hidden x dim
    w0: np.ndarray  # classes x hidden
    a: np.ndarray  # rank x hidden
    test_x: np.ndarray
    test_y: np.ndarray

    @classmethod
    def create(cls, seed: int, config: TaskConfig = TaskConfig()) -> Task:
        rng = np.random.default_rng([seed, 0])
        prototypes = rng.normal(size=(config.classes, config.dim))
        features = rng.normal(size=(config.hidden, config.dim)) / np.sqrt(config.dim)
        w0 = 0.01 * rng.normal(size=(config.classes, config.hidden))
        a = rng.normal(size=(config.rank, config.hidden)) / np.sqrt(config.hidden)
        test_y = np.arange(config.test_samples) % config.classes
        test_x = prototypes[test_y] + config.noise * rng.normal(size=(len(test_y), config.dim))
        return cls(config, seed, prototypes, features, w0, a, test_x, test_y)

    def initial_model(self) -> dict[str, np.ndarray]:
        return {B_KEY: np.zeros((self.config.classes, self.config.rank), np.float32)}

    def client_data(self, client: int, clients: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Client `client`'s samples: class shares drawn from Dirichlet(alpha) for this client.

        alpha <= 0 means IID (equal shares). Each client's draw depends only on
        (seed, client), so a client's data do not change with the fleet size.
        """
        cfg = self.config
        rng = np.random.default_rng([self.seed, 1, client])
        shares = (
            np.full(cfg.classes, 1 / cfg.classes)
            if alpha <= 0
            else rng.dirichlet(np.full(cfg.classes, alpha))
        )
        y = rng.choice(cfg.classes, size=cfg.samples_per_client, p=shares)
        x = self.prototypes[y] + cfg.noise * rng.normal(size=(len(y), cfg.dim))
        return x, y

    def hidden(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.features.T, 0.0)

    def logits(self, model: dict[str, np.ndarray], h: np.ndarray) -> np.ndarray:
        return h @ (self.w0 + model[B_KEY].astype(np.float64) @ self.a).T

    def accuracy(self, model: dict[str, np.ndarray]) -> float:
        predicted = self.logits(model, self.hidden(self.test_x)).argmax(axis=1)
        return float((predicted == self.test_y).mean())

    def train(
        self,
        model: dict[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        steps: int,
        seed: int,
    ) -> dict[str, np.ndarray]:
        """`steps` SGD steps on B from `model`; returns the B delta (float32)."""
        cfg = self.config
        rng = np.random.default_rng(seed)
        h_all = self.hidden(x)
        b = model[B_KEY].astype(np.float64)
        start = b.copy()
        for _ in range(steps):
            rows = rng.integers(0, len(y), size=cfg.batch_size)
            h, target = h_all[rows], y[rows]
            logits = h @ (self.w0 + b @ self.a).T
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            probs[np.arange(len(target)), target] -= 1.0
            grad_w = probs.T @ h / len(target)  # classes x hidden
            b -= cfg.lr * grad_w @ self.a.T
        return {B_KEY: (b - start).astype(np.float32)}
