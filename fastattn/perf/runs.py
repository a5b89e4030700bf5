"""Saved benchmark runs: load, check and write pytest-benchmark JSON files.

A run is what `pytest bench --benchmark-json FILE --benchmark-save-data` writes. The gate needs
three things from it, and refuses a file without them, with a one-line reason
(:class:`RunError`): every case's per-round times (``stats.data``), a case identity
(``fullname``, the pytest node id) and a device identity (``machine_info.fastattn.device_slug``,
else the CPU brand that pytest-benchmark records).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class RunError(ValueError):
    """A run file the gate cannot use; ``str(err)`` is a one-line reason naming the file."""


@dataclass(frozen=True)
class Case:
    fullname: str
    name: str
    group: str
    samples: np.ndarray  # seconds per call, one per round, in the order the rounds ran
    extra_info: dict = field(default_factory=dict)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))


@dataclass(frozen=True)
class Run:
    path: str
    device: str  # slug, the key of bench/baselines/<device>.json
    device_name: str
    commit: str
    commit_time: str  # ISO time of the commit ("" when unknown)
    run_time: str  # ISO time the run was saved ("" when unknown)
    dirty: bool
    cases: dict[str, Case]
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the JSON object it was parsed from

    @property
    def short_commit(self) -> str:
        return self.commit[:8] + ("+dirty" if self.dirty else "")


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_of(machine_info: dict) -> tuple[str, str]:
    """(slug, full name) of the device a run was timed on; ("", "") when the file has neither."""
    fa = machine_info.get("fastattn") or {}
    if fa.get("device_slug"):
        return str(fa["device_slug"]), str(fa.get("device") or fa["device_slug"])
    brand = (machine_info.get("cpu") or {}).get("brand_raw") or ""
    if brand:
        return "cpu-" + slugify(brand), brand
    return "", ""


def parse_run(text: str, path: str = "<run>") -> Run:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("benchmarks"), list):
        raise RunError(f"{path} has no 'benchmarks' list: not a pytest-benchmark --benchmark-json file")
    if not raw["benchmarks"]:
        raise RunError(f"{path} holds no benchmark (its 'benchmarks' list is empty)")
    machine_info = raw.get("machine_info") if isinstance(raw.get("machine_info"), dict) else {}
    device, device_name = device_of(machine_info)
    if not device:
        raise RunError(f"{path} names no device (machine_info has neither fastattn.device_slug nor cpu.brand_raw)")
    commit_info = raw.get("commit_info") if isinstance(raw.get("commit_info"), dict) else {}
    commit = str(commit_info.get("id") or (machine_info.get("fastattn") or {}).get("commit") or "unknown")

    cases: dict[str, Case] = {}
    for i, bench in enumerate(raw["benchmarks"]):
        case = _parse_case(bench, i, path)
        if case.fullname in cases:
            raise RunError(f"{path} holds case {case.fullname!r} twice")
        cases[case.fullname] = case
    return Run(
        path=path,
        device=device,
        device_name=device_name,
        commit=commit,
        commit_time=str(commit_info.get("time") or ""),
        run_time=str(raw.get("datetime") or ""),
        dirty=bool(commit_info.get("dirty")),
        cases=cases,
        raw=raw,
    )


def _parse_case(bench, i: int, path: str) -> Case:
    if not isinstance(bench, dict) or not isinstance(bench.get("fullname"), str):
        raise RunError(f"{path}: benchmark #{i} has no 'fullname'")
    fullname = bench["fullname"]
    data = (bench.get("stats") or {}).get("data") if isinstance(bench.get("stats"), dict) else None
    if not isinstance(data, list) or not data:
        raise RunError(
            f"{path}: case {fullname!r} has no per-round samples (stats.data); "
            "save runs with --benchmark-save-data"
        )
    try:
        samples = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise RunError(f"{path}: case {fullname!r} has a non-numeric sample") from None
    if samples.ndim != 1 or not np.all(np.isfinite(samples)) or np.any(samples <= 0):
        raise RunError(f"{path}: case {fullname!r} has a sample that is not a positive finite time")
    return Case(
        fullname=fullname,
        name=str(bench.get("name") or fullname),
        group=str(bench.get("group") or bench.get("name") or fullname),
        samples=samples,
        extra_info=bench.get("extra_info") if isinstance(bench.get("extra_info"), dict) else {},
    )


# Keys of pytest-benchmark's `stats` that are times (and so scale with every sample).
_TIME_STATS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "ld15iqr", "hd15iqr", "total")


def scaled(raw: dict, factor: float, impl: str | None = None) -> dict:
    """A copy of a run's JSON object with every time (each round and each statistic) times
    `factor`; with `impl`, only the cases of that implementation (``extra_info["impl"]``)."""
    out = copy.deepcopy(raw)
    for bench in out["benchmarks"]:
        if impl is not None and (bench.get("extra_info") or {}).get("impl") != impl:
            continue
        stats = bench["stats"]
        stats["data"] = [t * factor for t in stats["data"]]
        for key in _TIME_STATS:
            if isinstance(stats.get(key), (int, float)):
                stats[key] *= factor
        if isinstance(stats.get("ops"), (int, float)) and stats["ops"]:
            stats["ops"] /= factor
    return out


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same folder (same file system), are flushed to disk,
    and the temporary file is renamed over `path` (``os.replace`` is atomic on POSIX and Windows).
    A failure at any step removes the temporary file and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_run(path: str | os.PathLike) -> tuple[Run, bytes]:
    """The checked run and the exact bytes it was read from (to copy them without a second read)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise RunError(f"cannot read {os.fspath(path)}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunError(f"{os.fspath(path)} is not UTF-8 text (corrupt?)") from None
    return parse_run(text, os.fspath(path)), data


def load_run(path: str | os.PathLike) -> Run:
    return read_run(path)[0]
