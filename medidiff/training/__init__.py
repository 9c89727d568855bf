"""Training, one module per job (import from the module, nothing is re-exported).

- `medidiff.training.trainer`: the one training loop of every task (`Trainer`, `run_training`),
  checkpoints, exact resume and the MLflow run it logs to.
- `medidiff.training.loss`: what a step minimises, a small callable (`VPLoss`).
- `medidiff.training.preview`: the grid of few-step samples logged while training.
- `medidiff.training.distributed`: torchrun / DistributedDataParallel support.

Nothing here imports a task: the caller passes the task object (`medidiff.tasks.registry`).
"""
