"""Distribution metrics of generated pictures and sounds against real ones, in pretrained feature spaces.

Pictures are embedded with TF's Inception-v3 (``nn.inception``, 2048-d pool3), sounds
with the aiSFX sound-effects CNN (``nn.audio_features``, 512-d). In a feature space:

- ``fd``: the Frechet distance between Gaussians fitted to the two feature sets, computed
  by torchmetrics (its FrechetInceptionDistance over a pass-through ``feature`` module, in
  float64). Keys name the space, ``fd_inception`` and ``fd_aisfx``: published image numbers
  use the same Inception network, but compare with ours only on their reference set at
  their sample count.
- ``precision`` / ``recall``: improved precision and recall (Kynkaanniemi et al. 2019). Each
  set spans a manifold of balls around its points, radius the distance to the point's k-th
  nearest neighbour in its own set (k = 3). Precision is the share of generated points
  inside the real manifold (fidelity), recall the share of real points inside the generated
  one (coverage).

Small samples bias the Frechet distance upward (the bias shrinks like 1/n; Chong and
Forsyth 2020), and below the feature dimension the covariances are rank-deficient. With
200 items a perfect generator does not score 0, and numbers are comparable only at the
same count against the same reference. ``report`` therefore gives, beside the scores of the
generated items, the floor: the same metrics between a second real set (e.g. train
pictures) and the same reference at the same count. The k-NN radii also grow as the sets
shrink, so precision and recall have their floor too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ..nn.audio_features import audio_features
from ..nn.inception import inception_features

K = 3
SPACES = {"image": "inception", "audio": "aisfx"}  # modality -> feature space, as named in keys
SCORES = ("fd", "precision", "recall")  # the keys that name their feature space
ROWS = 1024  # distance rows computed at once


class PassThrough(nn.Module):
    """A torchmetrics ``feature`` module for features computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: Tensor) -> Tensor:
        return features


def check_features(real: Tensor, fake: Tensor, minimum: int = 2) -> None:
    """Two (N, D) feature sets of one dimension, each with at least ``minimum`` rows."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < minimum:
        raise ValueError(f"need at least {minimum} items per set, got {len(real)} real and {len(fake)} generated")


def shared_span(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets in orthonormal coordinates of the space their points span (float64).

    A rotation restricted to a subspace holding both means and both covariances' column
    spaces leaves the Frechet distance unchanged; with fewer points than dimensions it turns
    torchmetrics' D x D eigenproblem (D = 2048 for Inception: slow on a CPU) into an
    (n_real + n_fake)-sized one.
    """
    real, fake = real.double(), fake.double()
    if len(real) + len(fake) >= real.shape[1]:
        return real, fake
    centre = torch.cat([real, fake]).mean(dim=0)
    basis, _ = torch.linalg.qr(torch.cat([real, fake]).sub(centre).T)  # (D, n_real + n_fake)
    return (real - centre) @ basis, (fake - centre) @ basis


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets (torchmetrics, float64)."""
    check_features(real, fake)
    real, fake = shared_span(real, fake)
    metric = FrechetInceptionDistance(feature=PassThrough(real.shape[1]), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def distances(a: Tensor, b: Tensor) -> Tensor:
    """(len(a), len(b)) Euclidean distances in float64."""
    return torch.cdist(a.double(), b.double())


def knn_radii(features: Tensor, k: int = K) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in its own set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} items, got {len(features)}")
    radii = []
    for start in range(0, len(features), ROWS):
        d = distances(features[start : start + ROWS], features)
        rows = torch.arange(len(d))
        d[rows, rows + start] = 0.0  # itself, exactly 0, is the first of the k + 1 smallest
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_share(points: Tensor, manifold: Tensor, radii: Tensor) -> float:
    """Share of ``points`` inside at least one ball (centre in ``manifold``, radius in ``radii``)."""
    inside = [(distances(points[i : i + ROWS], manifold) <= radii[None]).any(dim=1)
              for i in range(0, len(points), ROWS)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real``."""
    check_features(real, fake, minimum=k + 1)
    precision = manifold_share(fake, real, knn_radii(real, k))
    recall = manifold_share(real, fake, knn_radii(fake, k))
    return precision, recall


def feature_scores(real: Tensor, fake: Tensor, k: int = K) -> dict[str, float | int]:
    """{"fd", "precision", "recall", "n", "n_reference"} of generated features against real ones."""
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "precision": precision, "recall": recall,
            "n": len(fake), "n_reference": len(real)}


def features_of(items: Sequence[Any], modality: str, sample_rate: int | None = None) -> Tensor:
    """Features of pictures (uint8 (H, W, C)) or sounds (float (T,) at ``sample_rate``) in the modality's space."""
    if modality == "image":
        return inception_features(items)
    if modality == "audio":
        if not sample_rate:
            raise ValueError("sounds need their sample_rate to be embedded")
        return audio_features(items, sample_rate)
    raise ValueError(f"no feature space for modality {modality!r}; expected one of {sorted(SPACES)}")


def item_scores(generated: Sequence[Any], reference: Sequence[Any], modality: str, sample_rate: int | None = None,
                k: int = K) -> dict[str, float | int]:
    """{"fd", "precision", "recall", "n", "n_reference"} of generated items against real reference items."""
    real = features_of(reference, modality, sample_rate)
    return feature_scores(real, features_of(generated, modality, sample_rate), k)


def first_n(second_real: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` items of a second real set: the floor is measured at the generated count."""
    if len(second_real) < n:
        raise ValueError(f"the floor needs {n} items of a second real set (as many as were generated), "
                         f"got {len(second_real)}")
    return list(second_real[:n])


def floor_scores(second_real: Sequence[Any], reference: Sequence[Any], modality: str, n: int,
                 sample_rate: int | None = None, k: int = K) -> dict[str, float | int]:
    """The real-vs-real floor: the first ``n`` items of a second real set scored like generated ones."""
    return item_scores(first_n(second_real, n), reference, modality, sample_rate, k)


def named(scores: dict[str, float | int], modality: str, suffix: str = "") -> dict[str, float | int]:
    """Scores with the feature space in their names: fd -> fd_inception (plus ``suffix``, e.g. "_floor")."""
    space = SPACES[modality]
    return {(f"{key}_{space}{suffix}" if key in SCORES else f"{key}{suffix}"): value for key, value in scores.items()}


def report(generated: Sequence[Any], reference: Sequence[Any], modality: str, sample_rate: int | None = None,
           second_real: Sequence[Any] | None = None, k: int = K) -> dict[str, float | int]:
    """Named scores of generated items, and with ``second_real`` the floor at the same count
    (``fd_inception``, ..., ``fd_inception_floor``, ...); the reference is embedded once."""
    reference_features = features_of(reference, modality, sample_rate)
    out = named(feature_scores(reference_features, features_of(generated, modality, sample_rate), k), modality)
    if second_real is not None:
        second = features_of(first_n(second_real, len(generated)), modality, sample_rate)
        floor = feature_scores(reference_features, second, k)
        out |= named({key: floor[key] for key in SCORES}, modality, "_floor")
    return out
