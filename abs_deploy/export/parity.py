"""The one count every parity check keeps: a model's logits against the labels and against a
reference's logits, batch by batch (accuracy, top-1 agreement, largest logit difference relative
to the reference's largest logit). Validation's two ORT modes and second runtimes, `abs
validate`, and the `.ort` check all count with it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Agreement:
    images: int = 0
    correct: int = 0
    agree: int = 0
    max_diff: float = 0.0
    scale: float = 0.0

    def add(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        top = logits.argmax(1)
        self.images += len(labels)
        self.correct += int((top == labels).sum())
        self.agree += int((top == reference.argmax(1)).sum())
        self.max_diff = max(self.max_diff, float(np.abs(logits - reference).max()))
        self.scale = max(self.scale, float(np.abs(reference).max()))

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)

    @property
    def top1_agreement(self) -> float:
        return self.agree / max(self.images, 1)

    @property
    def logits_rel(self) -> float:
        return self.max_diff / max(self.scale, 1e-30)
