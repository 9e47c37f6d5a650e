"""The learning task: model, data from a training manifest, split, and the loops.

* Labels: ``task = "binary"`` maps ``"Negative for Pneumonia"`` to 0 and any
  other appearance to 1; ``task = "ricord4"`` maps the four RICORD appearances
  to 0..3 in :data:`RICORD4` order. Samples without the requested label, or
  with a value the task does not know, are left out.
* Split: a study is in the validation split when the first 8 bytes of the
  SHA-256 of its (de-identified) Study Instance UID, as an integer, modulo 100
  fall below :data:`VALIDATION_PERCENT`. The split is the same on every run and
  every node, and all images of a study land on the same side.
* Images go through :func:`protocols.imaging.load_image` (standardised,
  ``image-size`` square) and are kept in a per-process cache.
* The model is a small plain-torch CNN without batch statistics, so its
  state is its parameters only (averaging, clipping and secure aggregation
  all see the same tensors).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from protocols.imaging import load_image
from protocols.training import TrainingManifest

log = logging.getLogger(__name__)

NEGATIVE: Final = "Negative for Pneumonia"
#: ``ricord4`` class order.
RICORD4: Final = (
    "Negative for Pneumonia",
    "Typical Appearance",
    "Indeterminate Appearance",
    "Atypical Appearance",
)
KNOWN_APPEARANCES: Final = frozenset(RICORD4)
VALIDATION_PERCENT: Final = 20
#: The gradient norm each step is clipped to. With Adam (a fresh one each round) and
#: this clip, small-data training does not swing between all-one-class predictions as
#: SGD with momentum did (measured on generated cohorts: bench and tests).
GRAD_CLIP: Final = 1.0
#: Decoded images kept per process (64×64 float32 is 16 KiB).
CACHE_ENTRIES: Final = 8192

Split = Literal["train", "validation", "all"]


class NoSamplesError(ValueError):
    """A node's manifest has no usable sample for the requested label and split."""


@dataclass(frozen=True)
class Example:
    """One image, its class and its study."""

    path: str
    target: int
    study: str


def num_classes(task: str) -> int:
    return 2 if task == "binary" else len(RICORD4)


def target_of(task: str, value: str) -> int | None:
    """The class of a label value, None when the task does not know the value."""
    if value not in KNOWN_APPEARANCES:
        return None
    if task == "binary":
        return 0 if value == NEGATIVE else 1
    return RICORD4.index(value)


def is_validation(study: str) -> bool:
    """Whether a study belongs to the validation split (see the module docstring)."""
    digest = hashlib.sha256(study.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT


def read_manifest(path: str | os.PathLike[str]) -> TrainingManifest:
    """Read and validate a ``TrainingManifest`` JSON file."""
    return TrainingManifest.model_validate_json(Path(path).read_bytes())


def examples(manifest: TrainingManifest, label: str, task: str, split: Split) -> list[Example]:
    """The manifest's samples that carry ``label``, mapped to classes, in ``split``.

    Raises
    ------
    NoSamplesError
        No sample carries the label with a value the task knows, or none falls
        into the split.
    """
    labelled: list[Example] = []
    unknown: set[str] = set()
    for sample in manifest.samples:
        value = sample.labels.get(label)
        if value is None:
            continue
        target = target_of(task, value)
        if target is None:
            unknown.add(value)
            continue
        labelled.append(Example(path=sample.path, target=target, study=sample.study))
    if unknown:
        log.warning("site %s: label values the task does not know: %s", manifest.site, unknown)
    if not labelled:
        raise NoSamplesError(
            f"site {manifest.site}: none of its {len(manifest.samples)} samples for run "
            f"{manifest.run} has the label {label!r} with a value task {task!r} knows"
        )
    if split == "all":
        return labelled
    chosen = [e for e in labelled if is_validation(e.study) == (split == "validation")]
    if not chosen:
        raise NoSamplesError(
            f"site {manifest.site}: none of its {len(labelled)} samples labelled {label!r} "
            f"falls into the {split} split"
        )
    return chosen


_cache: OrderedDict[tuple[str, int, int], npt.NDArray[np.float32]] = OrderedDict()


def _image(path: str, size: int) -> npt.NDArray[np.float32]:
    key = (path, size, os.stat(path).st_mtime_ns)
    found = _cache.get(key)
    if found is not None:
        _cache.move_to_end(key)
        return found
    image = load_image(path, size)
    _cache[key] = image
    while len(_cache) > CACHE_ENTRIES:
        _cache.popitem(last=False)
    return image


def tensors(items: Sequence[Example], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N×1×size×size, float32) and targets (N, int64) of ``items``."""
    images = np.stack([_image(item.path, size) for item in items])[:, None]
    targets = np.asarray([item.target for item in items], dtype=np.int64)
    return torch.from_numpy(images), torch.from_numpy(targets)


class Net(nn.Module):
    """A small CNN: three conv blocks with group norm, global pooling, a linear head."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.GroupNorm(4, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.flatten(self.features(x), 1))
        return out


def new_model(task: str, seed: int) -> Net:
    """A freshly initialised model (the same for the same seed)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Net(num_classes(task))
    finally:
        torch.random.set_rng_state(generator_state)


def device() -> torch.device:
    """CUDA when this machine has a GPU, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_ndarrays(model: nn.Module) -> list[npt.NDArray[np.float32]]:
    """The model's state as NumPy arrays, in ``state_dict`` order."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def from_ndarrays(model: nn.Module, arrays: Iterable[npt.NDArray[np.generic]]) -> None:
    """Load arrays given in ``state_dict`` order into ``model``."""
    keys = list(model.state_dict().keys())
    values = list(arrays)
    if len(values) != len(keys):
        raise ValueError(f"expected {len(keys)} arrays for the model, got {len(values)}")
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in zip(keys, values, strict=True)}
    model.load_state_dict(state, strict=True)


def fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``model`` in place: Adam (a fresh optimiser each round) and gradient-norm clipping.

    With ``proximal_mu`` > 0 the FedProx term ``mu/2 * ||w - w_global||^2`` is
    added to the loss (``w_global``: the weights the round started from).

    Returns the last epoch's mean loss and accuracy as ``train-loss`` and
    ``train-accuracy``.
    """
    where = device()
    model.to(where)
    model.train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x, y = images[batch].to(where), targets[batch].to(where)
            optimizer.zero_grad()
            logits = model(x)
            loss = criterion(logits, y)
            if anchor:
                drift = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + (proximal_mu / 2.0) * drift
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            loss_sum += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(batch)
    model.to("cpu")
    return {"train-loss": loss_sum / max(seen, 1), "train-accuracy": correct / max(seen, 1)}


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 64
) -> dict[str, float]:
    """Mean cross-entropy and accuracy as ``eval-loss`` and ``eval-accuracy``."""
    where = device()
    model.to(where)
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        x = images[start : start + batch_size].to(where)
        y = targets[start : start + batch_size].to(where)
        logits = model(x)
        loss_sum += float(criterion(logits, y))
        correct += int((logits.argmax(1) == y).sum())
    model.to("cpu")
    count = max(len(targets), 1)
    return {"eval-loss": loss_sum / count, "eval-accuracy": correct / count}
