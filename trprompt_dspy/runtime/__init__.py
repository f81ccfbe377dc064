"""Infrastructure under the loop: checkpoints, atomic writes, file locks, fault handling, usage, parallelism, input checks, MLflow tracking."""
