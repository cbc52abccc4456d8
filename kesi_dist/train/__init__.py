"""The training engine's plain-PyTorch core: one epoch of training/evaluation, optimizers, schedules."""

from kesi_dist.train.loop import DivergedError, evaluate, train_epoch, unwrap
from kesi_dist.train.optim import build_optimizer, build_scheduler, current_lr
from kesi_dist.train.tasks import Classification, Distillation, Task
from kesi_dist.train.tensorboard import ScalarWriter

__all__ = [
    "DivergedError", "train_epoch", "evaluate", "unwrap",
    "build_optimizer", "build_scheduler", "current_lr", "ScalarWriter",
    "Task", "Classification", "Distillation",
]
