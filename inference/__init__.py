"""Inference backends: one module each, all with ``run(model, *args, seed=..., **options) -> Posterior``.

A new backend starts as a copy of ``TEMPLATE.py`` (a working one-file backend and the steps to
register and test it).
"""
