"""Training in two parts: the in-memory loop (``trainer``) and the run folder it writes (``run_folder``)."""

from hiercls.training.trainer import (
    CHECK_EVERY,
    Callback,
    Dist,
    ResumeState,
    Trainer,
    TrainingData,
    TrainingError,
    TrainingUnit,
    build_units,
    validation_metrics,
)

__all__ = [
    "CHECK_EVERY",
    "Callback",
    "Dist",
    "ResumeState",
    "Trainer",
    "TrainingData",
    "TrainingError",
    "TrainingUnit",
    "build_units",
    "validation_metrics",
]
