"""Inference backends: one module each, all with ``run(model, *args, seed=..., **options) -> Posterior``."""
