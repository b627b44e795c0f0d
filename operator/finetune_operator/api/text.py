"""How numbers read in messages, `kubectl describe` and ftctl: they are sentences and human units."""

from __future__ import annotations

GIB = 1024**3


def count(number: int, noun: str) -> str:
    """`1 GPU`, `2 GPUs`, `1 worker`, `2 relaunches`: never `1 GPUs` or `worker(s)`."""
    if number == 1:
        return f"{number} {noun}"
    return f"{number} {noun}{'es' if noun.endswith(('s', 'x', 'ch', 'sh')) else 's'}"


def gib(size: int) -> str:
    """Bytes as `14.7 GiB`: what `nvidia-smi` users compare with."""
    return f"{size / GIB:.1f} GiB"
