"""The app's run config: the keys of ``[tool.flwr.app.config]``, parsed and checked.

Flower hands both apps ``context.run_config`` (the pyproject defaults with the
coordinator's ``--run-config`` overrides). :data:`DEFAULTS` repeats the
pyproject's values (a test keeps them equal) so that a runtime that passes no
run config, such as the Python simulation API, gets the same defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from flwr.app import UserConfigValue

STRATEGIES: Final = ("fedavg", "fedprox")
TASKS: Final = ("binary", "ricord4")

DEFAULTS: Final[dict[str, UserConfigValue]] = {
    "radfed-run": "",
    "run-dir": "",
    "num-rounds": 3,
    "min-nodes": 2,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "secagg": False,
    "dp-clip": 0.0,
    "dp-noise": 0.0,
    "local-epochs": 1,
    "batch-size": 16,
    "learning-rate": 0.002,
    "image-size": 64,
    "label": "ricord:appearance",
    "task": "binary",
    "round-timeout": 600.0,
    "resume-from": "",
    "central-eval": "",
    "cohort-release": "",
    "cohort-filter": "",
    "seed": 0,
}


class SettingsError(ValueError):
    """A run-config value the app cannot use; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """One run's settings (see the pyproject for what each key means)."""

    radfed_run: str
    run_dir: str
    num_rounds: int
    min_nodes: int
    strategy: str
    proximal_mu: float
    secagg: bool
    dp_clip: float
    dp_noise: float
    local_epochs: int
    batch_size: int
    learning_rate: float
    image_size: int
    label: str
    task: str
    round_timeout: float
    resume_from: str
    central_eval: str
    seed: int

    @property
    def fedprox(self) -> bool:
        return self.strategy == "fedprox"

    @property
    def dp(self) -> bool:
        return self.dp_clip > 0.0

    @classmethod
    def from_run_config(cls, config: Mapping[str, UserConfigValue]) -> Settings:
        """Parse ``context.run_config``; missing keys take :data:`DEFAULTS`."""
        merged = {**DEFAULTS, **config}
        settings = cls(
            radfed_run=_text(merged, "radfed-run"),
            run_dir=_text(merged, "run-dir"),
            num_rounds=_integer(merged, "num-rounds", minimum=0),
            min_nodes=_integer(merged, "min-nodes", minimum=1),
            strategy=_choice(merged, "strategy", STRATEGIES),
            proximal_mu=_number(merged, "proximal-mu", minimum=0.0),
            secagg=_flag(merged, "secagg"),
            dp_clip=_number(merged, "dp-clip", minimum=0.0),
            dp_noise=_number(merged, "dp-noise", minimum=0.0),
            local_epochs=_integer(merged, "local-epochs", minimum=1),
            batch_size=_integer(merged, "batch-size", minimum=1),
            learning_rate=_number(merged, "learning-rate", minimum=0.0),
            image_size=_integer(merged, "image-size", minimum=16),
            label=_text(merged, "label"),
            task=_choice(merged, "task", TASKS),
            round_timeout=_number(merged, "round-timeout", minimum=0.0),
            resume_from=_text(merged, "resume-from"),
            central_eval=_text(merged, "central-eval"),
            seed=_integer(merged, "seed", minimum=0),
        )
        if not settings.label:
            raise SettingsError('Run config "label" must name a label, e.g. "ricord:appearance".')
        if settings.round_timeout <= 0:
            raise SettingsError('Run config "round-timeout" must be positive.')
        return settings


def _text(config: Mapping[str, UserConfigValue], key: str) -> str:
    value = config[key]
    if not isinstance(value, str):
        raise SettingsError(f'Run config "{key}" must be a string, not {value!r}.')
    return value.strip()


def _integer(config: Mapping[str, UserConfigValue], key: str, *, minimum: int) -> int:
    value = config[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f'Run config "{key}" must be an integer, not {value!r}.')
    if value < minimum:
        raise SettingsError(f'Run config "{key}" must be at least {minimum}, not {value}.')
    return value


def _number(config: Mapping[str, UserConfigValue], key: str, *, minimum: float) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f'Run config "{key}" must be a number, not {value!r}.')
    if value < minimum:
        raise SettingsError(f'Run config "{key}" must be at least {minimum}, not {value}.')
    return float(value)


def _flag(config: Mapping[str, UserConfigValue], key: str) -> bool:
    value = config[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SettingsError(f'Run config "{key}" must be true or false, not {value!r}.')


def _choice(config: Mapping[str, UserConfigValue], key: str, choices: tuple[str, ...]) -> str:
    value = _text(config, key).lower()
    if value not in choices:
        raise SettingsError(
            f'Run config "{key}" must be one of {", ".join(choices)}, not {value!r}.'
        )
    return value
