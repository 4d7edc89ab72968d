"""Declarative model-and-condition scripts (``ppl-lm run NAME``)."""
