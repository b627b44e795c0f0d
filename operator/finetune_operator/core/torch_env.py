"""The torchrun rendezvous environment, computed in exactly this one place.

Every worker gets the same static rendezvous (`MASTER_ADDR`/`MASTER_PORT`, rank 0's stable DNS name
through the headless Service) and its own `NODE_RANK`; the worker command passes them to torchrun as
`$(VAR)` references, which the kubelet expands, so no shell is needed in the image. The names are
reserved (`names.RESERVED_ENV`): a user env entry with one of them is rejected, not silently overridden.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from finetune_operator.core import names


@dataclass(frozen=True)
class Rendezvous:
    """What every worker of one gang agrees on."""

    master_addr: str
    master_port: int
    nnodes: int
    nproc_per_node: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def torch_env(rendezvous: Rendezvous, node_rank: int) -> list[dict[str, Any]]:
    """The env entries (core/v1 EnvVar dicts) for the worker with `node_rank`, in a stable order."""
    if not 0 <= node_rank < rendezvous.nnodes:
        raise ValueError(f"node rank {node_rank} outside 0..{rendezvous.nnodes - 1}")
    values = {
        names.ENV_MASTER_ADDR: rendezvous.master_addr,
        names.ENV_MASTER_PORT: str(rendezvous.master_port),
        names.ENV_NNODES: str(rendezvous.nnodes),
        names.ENV_NODE_RANK: str(node_rank),
        names.ENV_NPROC_PER_NODE: str(rendezvous.nproc_per_node),
        names.ENV_WORLD_SIZE: str(rendezvous.world_size),
    }
    return [{"name": key, "value": value} for key, value in values.items()]


def torchrun_args(command: str, config_path: str) -> list[str]:
    """torchrun's arguments, reading the rendezvous from the env above (kubelet `$(VAR)` expansion);
    each worker runs `command --config config_path` (`--no-python`: the command is an executable)."""
    return [
        f"--nnodes=$({names.ENV_NNODES})",
        f"--nproc_per_node=$({names.ENV_NPROC_PER_NODE})",
        f"--node_rank=$({names.ENV_NODE_RANK})",
        f"--master_addr=$({names.ENV_MASTER_ADDR})",
        f"--master_port=$({names.ENV_MASTER_PORT})",
        "--no-python",
        command,
        "--config",
        config_path,
    ]


def reserved_collisions(user_env_names: Iterable[str]) -> list[str]:
    """The user env names the operator owns, sorted; a non-empty answer makes the spec invalid."""
    return sorted(set(user_env_names) & names.RESERVED_ENV)
