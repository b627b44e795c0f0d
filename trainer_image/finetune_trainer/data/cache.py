"""The tokenised data set, cached on the output volume so that a job tokenises its data once.

The recipe builds the data on each node's first worker while the others wait (`main_process_first`); the
first one stores the result here and every other worker, and every later attempt of the job (a restart
after preemption, a resume), memory-maps these Arrow files instead of reading and tokenising again.

An entry is keyed by everything its contents depend on: the data's bytes, the tokenizer (vocabulary,
merges, normalisation, special tokens, post-processor and chat template), every dataset setting, the
seed, and the source of this package, so an entry written by other code is never read. Only local data
with a fast tokenizer is cached: a hub data set has no content digest before it is downloaded, and a
slow tokenizer no complete serialisation to hash. Writing goes to a temporary directory renamed into
place, so a reader sees a whole entry or none, and two nodes writing the same entry on a shared volume
both succeed. Storing a new entry removes the job's older ones: a changed spec never needs them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from finetune_trainer.data.bundle import DataBundle
from finetune_trainer.data.sources import data_files

if TYPE_CHECKING:
    from finetune_operator.api.models import DatasetSpec

#: Under the job's output directory.
CACHE_DIR = ".tokenized"
META_FILE = "meta.json"
#: A temporary directory older than this was left by a worker that died while writing it.
STALE_AFTER_S = 3600.0

log = logging.getLogger(__name__)

Collator = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def cache_key(
    spec: DatasetSpec, tokenizer: PreTrainedTokenizerBase, seed: int, data_path: str | None
) -> str | None:
    """The entry for this data, tokenizer and settings; None when they cannot be identified (see above)."""
    if data_path is None or not tokenizer.is_fast:
        return None
    digest = hashlib.sha256()
    for part in (_code_digest(), _tokenizer_digest(tokenizer), _data_digest(Path(data_path))):
        digest.update(part.encode())
    settings = {"dataset": spec.model_dump(mode="json", exclude={"uri"}), "seed": seed}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def load_or_build(
    root: str | Path, key: str, collator: Collator, build: Callable[[], DataBundle]
) -> DataBundle:
    """The entry `key` if it is there; else `build()`, stored, and read back memory-mapped (as every other
    worker will have it, instead of Python lists in this one's memory)."""
    cached = load(root, key, collator)
    if cached is not None:
        log.info("data: tokenised before, loaded from %s", Path(root) / CACHE_DIR / key)
        return cached
    built = build()
    if not store(root, key, built):
        return built
    return load(root, key, collator) or built


def load(root: str | Path, key: str, collator: Collator) -> DataBundle | None:
    """The cached entry, memory-mapped; None when there is none or it cannot be read."""
    entry = Path(root) / CACHE_DIR / key
    if not (entry / META_FILE).is_file():
        return None
    try:
        meta = json.loads((entry / META_FILE).read_text())
        train = datasets.load_from_disk(str(entry / "train"))
        held_out = datasets.load_from_disk(str(entry / "eval")) if meta["eval"] else None
        if not isinstance(train, datasets.Dataset) or not isinstance(held_out, datasets.Dataset | None):
            raise ValueError("not a single data set")
        return DataBundle(
            train=train,
            eval=held_out,
            collator=collator,
            num_tokens=int(meta["numTokens"]),
            label_names=tuple(meta["labelNames"]),
            dropped=int(meta["dropped"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("data cache %s unreadable, tokenising again: %s", entry, err)
        return None


def store(root: str | Path, key: str, bundle: DataBundle) -> bool:
    """Write `bundle` as the entry `key`; False (and a warning) when the volume refuses it."""
    cache = Path(root) / CACHE_DIR
    entry = cache / key
    if (entry / META_FILE).is_file():
        return True
    partial = cache / f".{key}.{uuid.uuid4().hex}"
    meta = {
        "eval": bundle.eval is not None,
        "numTokens": bundle.num_tokens,
        "labelNames": list(bundle.label_names),
        "dropped": bundle.dropped,
    }
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per save is noise in a pod's log
    try:
        partial.mkdir(parents=True)
        bundle.train.save_to_disk(str(partial / "train"))
        if bundle.eval is not None:
            bundle.eval.save_to_disk(str(partial / "eval"))
        (partial / META_FILE).write_text(json.dumps(meta))
        os.rename(partial, entry)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        if (entry / META_FILE).is_file():  # another node renamed the same entry into place first
            return True
        log.warning("could not cache the tokenised data in %s: %s", cache, err)
        return False
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    _remove_others(cache, keep=key)
    return True


def _remove_others(cache: Path, keep: str) -> None:
    """Remove older entries, and partial ones (dot-named) whose writer has been gone a while."""
    for path in cache.iterdir():
        try:
            writing = path.name.startswith(".") and time.time() - path.stat().st_mtime < STALE_AFTER_S
        except FileNotFoundError:  # another worker removed it meanwhile
            continue
        if path.name != keep and not writing:
            shutil.rmtree(path, ignore_errors=True)


def _code_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return digest.hexdigest()


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    # the last call's truncation and padding settings, not the tokenizer (encode_classification sets them)
    backend.pop("truncation", None)
    backend.pop("padding", None)
    parts = [
        type(tokenizer).__name__,
        json.dumps(backend, sort_keys=True),
        str(getattr(tokenizer, "chat_template", None)),
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(tokenizer.truncation_side),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _data_digest(path: Path) -> str:
    """Every file's name and bytes: a file, or a directory's files in name order."""
    digest = hashlib.sha256()
    for file in data_files(path):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()
