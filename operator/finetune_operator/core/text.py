"""How messages read: they go to `kubectl describe`, events and ftctl, so they are sentences."""

from __future__ import annotations


def count(number: int, noun: str) -> str:
    """`1 GPU`, `2 GPUs`, `1 worker`: never `1 GPUs` or `worker(s)`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
