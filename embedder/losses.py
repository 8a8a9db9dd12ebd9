"""ArcFace (additive angular margin, Deng et al. 2019): a training-only head over L2-normalised embeddings.

Only the embedding is exported; the class centres are thrown away, so the model is used open-set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ArcFaceHead(nn.Module):
    """logits = s * cos(theta + m) for the true class, s * cos(theta) otherwise; feed them to cross-entropy."""

    def __init__(self, embedding_dim: int, num_classes: int, *, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale, self.margin = scale, margin
        self._cos_m, self._sin_m = math.cos(margin), math.sin(margin)
        # Past theta = pi - m, cos(theta + m) stops decreasing; use the CosFace-style linear penalty there instead.
        self._threshold = math.cos(math.pi - margin)
        self._fallback = math.sin(math.pi - margin) * margin

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embeddings).clamp(-1 + 1e-7, 1 - 1e-7)
        sin = torch.sqrt(1.0 - cos * cos)
        cos_margin = cos * self._cos_m - sin * self._sin_m
        cos_margin = torch.where(cos > self._threshold, cos_margin, cos - self._fallback)
        one_hot = F.one_hot(labels, num_classes=self.weight.shape[0]).to(cos.dtype)
        return self.scale * (one_hot * cos_margin + (1.0 - one_hot) * cos)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(embeddings, labels), labels)
