"""What the ServerApp writes into the run directory, for the coordinator to read.

The layout and the models are ``protocols.training``'s: ``status.json`` (a
``RunState``), ``rounds.jsonl`` (one ``RoundRecord`` per line, appended; when a
run is resumed the rounds after its checkpoint are appended again, so the last
line for a round number is the one that counts), ``checkpoints/round-<r>.safetensors``
after every round and ``model.safetensors`` at the end.

Every file is replaced atomically (written beside, then renamed), so a reader
never sees half a file or half a line. Checkpoints and the model are
safetensors files of the model's ``state_dict`` with string metadata: the
format, the round, the run, the task, the label and the image size — what
``resume-from`` needs to continue and to refuse a checkpoint of another model.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Final

import torch
from safetensors import safe_open
from safetensors.torch import save

from protocols.storage import write_private
from protocols.training import (
    RUN_CHECKPOINTS_DIR,
    RUN_MODEL_FILE,
    RUN_ROUNDS_FILE,
    RUN_STATUS_FILE,
    RoundRecord,
    RunPhase,
    RunState,
)

#: ``format`` metadata of the checkpoints this app writes.
CHECKPOINT_FORMAT: Final = "radfed-cxr/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, and why."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (private to the coordinator's user)."""
    write_private(path, data, 0o600)


class RunDirectory:
    """The run directory of one run (an absolute path from the run config)."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f'Run config "run-dir" must be an absolute path, not {str(root)!r}.')
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def status_file(self) -> Path:
        return self.root / RUN_STATUS_FILE

    @property
    def rounds_file(self) -> Path:
        return self.root / RUN_ROUNDS_FILE

    @property
    def model_file(self) -> Path:
        return self.root / RUN_MODEL_FILE

    def checkpoint_file(self, round_number: int) -> Path:
        return self.root / RUN_CHECKPOINTS_DIR / f"round-{round_number}.safetensors"

    def write_status(
        self, phase: RunPhase, round_number: int, rounds: int, error: str | None = None
    ) -> RunState:
        state = RunState(
            phase=phase, round=round_number, rounds=rounds, error=error, updated_at=_now()
        )
        atomic_write(self.status_file, state.model_dump_json(indent=2).encode("utf-8"))
        return state

    def append_round(self, record: RoundRecord) -> None:
        existing = self.rounds_file.read_bytes() if self.rounds_file.exists() else b""
        if existing and not existing.endswith(b"\n"):
            existing += b"\n"
        atomic_write(self.rounds_file, existing + record.model_dump_json().encode("utf-8") + b"\n")

    def save_checkpoint(
        self, round_number: int, state: dict[str, torch.Tensor], metadata: dict[str, str]
    ) -> str:
        """Write the round's checkpoint; returns its path relative to the run directory."""
        path = self.checkpoint_file(round_number)
        write_weights(path, state, {**metadata, "round": str(round_number)})
        return path.relative_to(self.root).as_posix()

    def save_model(self, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        write_weights(self.model_file, state, metadata)


def write_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, save(tensors, metadata={"format": CHECKPOINT_FORMAT, **metadata}))


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a checkpoint or model file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({exc})") from exc
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    return tensors, metadata
