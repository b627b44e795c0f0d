"""Numbers in messages read as sentences: the plural follows English, not a blind `s`."""

from __future__ import annotations

import pytest

from finetune_operator.api.text import count, gib


@pytest.mark.parametrize(
    ("number", "noun", "shown"),
    [
        (1, "GPU", "1 GPU"),
        (0, "GPU", "0 GPUs"),
        (2, "worker", "2 workers"),
        (1, "relaunch", "1 relaunch"),
        (3, "relaunch", "3 relaunches"),
        (2, "pass", "2 passes"),
    ],
)
def test_count_agrees_in_number(number: int, noun: str, shown: str) -> None:
    assert count(number, noun) == shown


def test_gib_is_what_nvidia_smi_users_compare_with() -> None:
    assert gib(15 * 1024**3 + 1024**3 // 5) == "15.2 GiB"
