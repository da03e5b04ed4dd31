"""Judging generated images without downloads: a small CNN trained here on the same
data plays the role of Inception. Two numbers, as in the FID literature:

- sample accuracy: the share of class-conditional samples the CNN assigns to the class
  they were conditioned on;
- Frechet distance between Gaussians fitted to the CNN's penultimate features of the
  samples and of held-out real images:
  ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import ImageSplit


class FeatureCNN(nn.Module):
    """Three 3x3 convolutions, global average pooling, a feature layer and a classifier."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128, feature_dim), nn.GELU())
        self.classifier = nn.Linear(feature_dim, num_classes)

    def embed(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv(images_BCHW))

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(images_BCHW))


@dataclass
class ClassifierTraining:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    """Random translation by up to this many pixels (light augmentation)."""
    seed: int = 0


def random_shift(images_BCHW: torch.Tensor, max_shift: int, generator) -> torch.Tensor:
    if max_shift == 0:
        return images_BCHW
    padded = F.pad(images_BCHW, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    height, width = images_BCHW.shape[-2:]
    return padded[..., dy : dy + height, dx : dx + width]


def train_feature_cnn(
    train: ImageSplit, num_classes: int, config: ClassifierTraining = ClassifierTraining()
) -> FeatureCNN:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = FeatureCNN(train.images_NCHW.shape[1], num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=config.epochs * steps_per_epoch
    )
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), config.batch_size):
            idx = order[start : start + config.batch_size]
            images = random_shift(train.images_NCHW[idx], config.max_shift, generator)
            loss = F.cross_entropy(model(images), train.labels_N[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def features_and_predictions(
    model: FeatureCNN, images_NCHW: torch.Tensor, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    features, predictions = [], []
    for start in range(0, len(images_NCHW), batch_size):
        f = model.embed(images_NCHW[start : start + batch_size].float().clamp(-1, 1))
        features.append(f)
        predictions.append(model.classifier(f).argmax(-1))
    return torch.cat(features).double(), torch.cat(predictions)


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, F) feature sets (float64)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    # (F, F) even for F = 1 (torch.cov of a single variable is 0-d)
    cov_a, cov_b = torch.atleast_2d(torch.cov(features_a.T)), torch.atleast_2d(torch.cov(features_b.T))
    root_a = _sqrtm_psd(cov_a)
    # tr((S_a^1/2 S_b S_a^1/2)^1/2) = tr((S_a S_b)^1/2); the symmetric form is stable
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


@dataclass
class SampleQuality:
    sample_accuracy: float    # CNN agrees with the conditioning class
    frechet_distance: float   # samples vs held-out real images, CNN features
    num_samples: int


def judge_samples(
    judge: FeatureCNN, samples_NCHW: torch.Tensor, sample_classes_N: torch.Tensor,
    reference: ImageSplit,
) -> SampleQuality:
    sample_features, predicted = features_and_predictions(judge, samples_NCHW)
    reference_features, _ = features_and_predictions(judge, reference.images_NCHW)
    return SampleQuality(
        sample_accuracy=float((predicted == sample_classes_N.cpu()).float().mean()),
        frechet_distance=frechet_distance(sample_features, reference_features),
        num_samples=len(samples_NCHW),
    )
