"""The autotune choices of the Triton kernels, kept on disk across processes.

Triton's autotuner times every candidate tile at each new key (shape bucket, widths,
dtypes) and keeps the winner in memory only; its own disk cache (``cache_results``)
skips any candidate list holding a config with a pre-launch hook, which the split-K
decode tiles have (they zero their arrival counters). So the choices live here: one
JSON file per kernel and tuning context (device name and compute capability, Triton
version, a digest of the kernel's source and its callees'), under
``$BITSCALE_CACHE_DIR/autotune`` (default ``~/.cache/bitscale/autotune``).

A file maps the call's autotune key to the candidates it weighed (a digest of their
records), the record of the config that won and every candidate's timings. An entry is
used only where its context, candidates digest and records match the live candidate
list exactly. An entry for other candidates (tiles or pruning changed) is not found; a
corrupt file, another version of this format, or an entry naming configs that are not
among the candidates is ignored with a warning. Either way the kernel re-tunes. Writers hold an exclusive lock on
a side file while they merge their entry into the file's current contents, and replace
the file atomically (temporary file, fsync, rename), so readers never see half a file
and concurrent writers lose no entry.

Imports triton: only the ``triton_*`` kernel modules import this, for :func:`autotune`
(and it reads no ``TRITON_INTERPRET``: each kernel says how it runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import triton
from triton.runtime.autotuner import Autotuner

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent writers may drop an entry
    fcntl = None

__all__ = [
    "CACHE_DIR_ENV",
    "FORMAT_VERSION",
    "CachedAutotuner",
    "TuningContext",
    "autotune",
    "autotune_cache_dir",
    "candidates_digest",
    "config_record",
    "lookup",
    "match_choice",
    "record",
]

FORMAT_VERSION = 1
"""The layout of a cache file; a file of any other version is ignored and rewritten."""

CACHE_DIR_ENV = "BITSCALE_CACHE_DIR"
"""bitscale's cache root; autotune files go to its ``autotune`` folder."""


def autotune_cache_dir() -> Path:
    """``$BITSCALE_CACHE_DIR/autotune``, or ``~/.cache/bitscale/autotune`` (read on each
    call, so a process may point it elsewhere at any time)."""
    root = os.environ.get(CACHE_DIR_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "bitscale"
    return base / "autotune"


@dataclasses.dataclass(frozen=True)
class TuningContext:
    """What a kernel's timings depend on besides its autotune key."""

    kernel: str
    """The kernel function's name."""
    device: str
    """The device's name (``torch.cuda.get_device_name``), or "interpreter"."""
    capability: str
    """Its compute capability, "9.0"; empty for the interpreter."""
    triton: str
    """``triton.__version__``."""
    source: str
    """A digest of the kernel's source and the sources of the functions it calls."""

    def file_name(self) -> str:
        fields = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"{self.kernel}-{hashlib.sha256(fields.encode()).hexdigest()[:16]}.json"


def config_record(config: Any) -> dict:
    """A ``triton.Config`` as JSON data: its meta-parameters, launch options and the name
    of its pre-launch hook (the hook itself cannot be stored: it is matched back by name
    on the live config)."""
    hook = config.pre_hook
    return {
        "kwargs": dict(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "num_ctas": config.num_ctas,
        "maxnreg": config.maxnreg,
        "pre_hook": None if hook is None else getattr(hook, "__qualname__", repr(hook)),
    }


def candidates_digest(records: Sequence[dict]) -> str:
    """A digest of the candidate list, in order: a change of tiles or of pruning re-tunes."""
    text = json.dumps(list(records), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _normal(record: dict) -> dict:
    """A record as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(record, sort_keys=True))


def match_choice(entry: dict, records: Sequence[dict]) -> tuple[int, dict[int, list]] | None:
    """The index of the entry's chosen config among the live candidates' ``records``, and
    the stored timings by candidate index; None where the entry does not fit them (a
    malformed entry, or a choice or timing of a config not among them)."""
    try:
        index = {json.dumps(_normal(r), sort_keys=True): i for i, r in enumerate(records)}
        chosen = index[json.dumps(entry["choice"], sort_keys=True)]
        timings = {
            index[json.dumps(candidate, sort_keys=True)]: [
                math.inf if ms is None else float(ms) for ms in times
            ]
            for candidate, times in entry["timings_ms"]
        }
    except (KeyError, TypeError, ValueError):
        return None
    return chosen, timings


def timings_record(timings: dict[int, Sequence[float]], records: Sequence[dict]) -> list:
    """Timings by candidate index as stored: [[record, [ms, ...]], ...], None for inf."""
    return [
        [records[i], [ms if math.isfinite(ms) else None for ms in times]]
        for i, times in sorted(timings.items())
    ]


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _read_entries(path: Path, context: TuningContext, *, quiet: bool = False) -> dict:
    """The entries of the file at ``path``; {} where it is missing, unreadable, corrupt,
    of another format version or of another context (warned about unless ``quiet``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        if not quiet:
            _warn(f"autotune cache {path} could not be read ({error}); re-tuning")
        return {}
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("entries"), dict):
        if not quiet:
            _warn(f"autotune cache {path} is corrupt; ignored, it is rewritten after re-tuning")
        return {}
    if document.get("version") != FORMAT_VERSION:
        if not quiet:
            _warn(
                f"autotune cache {path} has format version {document.get('version')!r}, this "
                f"bitscale reads {FORMAT_VERSION}; ignored, it is rewritten after re-tuning"
            )
        return {}
    if document.get("context") != dataclasses.asdict(context):
        if not quiet:
            _warn(f"autotune cache {path} belongs to another kernel build or device; ignored")
        return {}
    return document["entries"]


def lookup(directory: Path, context: TuningContext, key: str, digest: str) -> dict | None:
    """The entry stored for autotune ``key`` over the candidates of ``digest``, or None."""
    entry = _read_entries(directory / context.file_name(), context).get(key)
    if not isinstance(entry, dict) or entry.get("candidates") != digest:
        return None
    return entry


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``'s side file, held by one writer at a time."""
    if fcntl is None:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never part of either."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the rename itself durable, where the OS allows
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def record(directory: Path, context: TuningContext, key: str, entry: dict) -> None:
    """Store ``entry`` for autotune ``key``, merged into the file's current entries. A
    failure to write (a read-only or full disk) is warned about and leaves the file as it
    was: the choice stays in this process's memory."""
    path = directory / context.file_name()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = _read_entries(path, context, quiet=True)
            entries[key] = entry
            document = {
                "version": FORMAT_VERSION,
                "context": dataclasses.asdict(context),
                "entries": entries,
            }
            _write_atomically(path, json.dumps(document, indent=1, sort_keys=True))
    except OSError as error:
        _warn(f"autotune cache {path} could not be written ({error}); the choice is not kept")


class CachedAutotuner(Autotuner):
    """Triton's autotuner, whose choices persist across processes in our files.

    With ``cache_results`` on, Triton's ``run`` hands each new key's pruned candidates to
    ``check_disk_cache`` with the benchmark as a callback (Triton 3.4 on: 3.9 in the venv,
    3.6 on the GPU machines); this one answers from our files, or benchmarks and records.
    A single candidate needs no timing (Triton 3.9 skips it itself; 3.6 would time it)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Triton's flag routes each new key through check_disk_cache (ours, below); Triton
        # turns it off in the interpreter, whose kernels have one config and never ask.
        self.cache_results = True

    @cached_property
    def _build(self) -> tuple[str, bool]:
        """A digest of the kernel's source, and whether it runs in the interpreter: a JIT
        function's cache key covers its source and its callees'; an interpreted one has
        none, so there it is the kernel's own source."""
        fn = self.fn
        while not inspect.isfunction(fn):  # Heuristics, then the JIT or interpreted function
            if isinstance(fn, triton.runtime.JITFunction):
                return fn.cache_key, False
            fn = fn.fn
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest(), True

    def _context(self) -> TuningContext:
        source, interpreted = self._build
        if interpreted:
            device, capability = "interpreter", ""
        else:
            index = torch.cuda.current_device()  # where Triton launches
            device = torch.cuda.get_device_name(index)
            capability = "{}.{}".format(*torch.cuda.get_device_capability(index))
        return TuningContext(self.base_fn.__name__, device, capability, triton.__version__, source)

    def check_disk_cache(
        self, tuning_key: tuple, configs: list[triton.Config], bench_fn: Callable[[], None]
    ) -> bool:
        """Set ``self.cache[tuning_key]`` from the cache (True) or by ``bench_fn`` (False)."""
        if len(configs) == 1:
            self.cache[tuning_key] = configs[0]
            self.configs_timings = {}
            return True
        records = [config_record(config) for config in configs]
        digest = candidates_digest(records)
        directory = autotune_cache_dir()
        context = self._context()
        key = repr(tuning_key)
        entry = lookup(directory, context, key, digest)
        if entry is not None:
            match = match_choice(entry, records)
            if match is not None:
                chosen, timings = match
                self.cache[tuning_key] = configs[chosen]
                self.configs_timings = {configs[i]: times for i, times in timings.items()}
                return True
            warnings.warn(
                f"autotune cache entry of {context.kernel} for {key} names configs that are "
                "not among the candidates; ignored, re-tuning",
                RuntimeWarning,
                stacklevel=2,
            )
        bench_fn()
        chosen = configs.index(self.cache[tuning_key])
        timings = {configs.index(c): _quantiles(t) for c, t in self.configs_timings.items()}
        if math.isfinite(timings[chosen][0]):  # not where every candidate failed to build
            record(
                directory,
                context,
                key,
                {
                    "candidates": digest,
                    "choice": records[chosen],
                    "timings_ms": timings_record(timings, records),
                },
            )
        return False


def _quantiles(timing: float | list[float]) -> list[float]:
    """A benchmark's result (a float, or its quantiles) as a list."""
    return [float(t) for t in timing] if isinstance(timing, list | tuple) else [float(timing)]


def autotune(
    configs: list[triton.Config], key: list[str], **options: object
) -> Callable[[Callable], CachedAutotuner]:
    """``triton.autotune`` with :class:`CachedAutotuner`: ``options`` are its keyword
    arguments (``prune_configs_by``, ``do_bench``, ...)."""

    def decorator(fn: Callable) -> CachedAutotuner:
        return CachedAutotuner(
            fn, fn.arg_names, configs, key, reset_to_zero=None, restore_value=None, **options
        )

    return decorator
