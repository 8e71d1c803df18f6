"""The TOML config file: a ``[daemon]`` table and one ``[[project]]`` table per dataset.

Relative paths are resolved against the config file's folder. Every mistake is a
:class:`ConfigError` that names the file and the key.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from service import export
from service.augment import AugmentSettings
from service.finetune import FinetuneSettings
from service.pipeline import Job
from service.training import HeadSettings
from service.weights import DEFAULT_WEIGHTS_URL

DEFAULT_SCHEDULE = "0 2 * * *"  # nightly at 02:00 local time
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(ValueError):
    def __init__(self, file: Path, key: str, message: str):
        super().__init__(f"{file}: {key}: {message}")
        self.file, self.key = file, key


@dataclass(frozen=True)
class Project:
    job: Job
    schedule: str = DEFAULT_SCHEDULE
    debounce_seconds: float = 10.0


@dataclass(frozen=True)
class Config:
    path: Path
    state_dir: Path
    log_level: str
    projects: tuple[Project, ...]
    rescan_seconds: float = 300.0
    retry_seconds: float = 60.0  # first retry after a failed run; doubles up to an hour


def default_state_dir() -> Path:
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "watchtrain"
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "watchtrain"


DAEMON_KEYS = {"state_dir", "weights", "weights_url", "log_level", "rescan_seconds", "retry_seconds"}
PROJECT_KEYS = {
    "name", "dataset", "validation", "output", "schedule", "debounce_seconds", "validation_fraction",
    "keep_versions", "precision", "weight_bits", "minimum_deployment_target", "weights", "head",
    "quality_tolerance", "verify_photos", "author", "license", "description", "finetune", "settle_seconds",
}
HEAD_KEYS = {f.name for f in fields(HeadSettings)}
AUGMENT_KEYS = {"augment", "views", "flip", "jitter", "crop_min_scale"}
FINETUNE_KEYS = {f.name for f in fields(FinetuneSettings)} - {"augment"} | AUGMENT_KEYS


def _unknown(file: Path, table: str, data: dict, allowed: set[str]) -> None:
    for key in data:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(file, f"{table}{key}", f"unknown key (known keys: {known})")


def _path(file: Path, key: str, value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(file, key, "must be a non-empty path string")
    path = Path(os.path.expandvars(value)).expanduser()
    return (file.parent / path).resolve() if not path.is_absolute() else path


def _typed(file: Path, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds += (int,)
    ok = isinstance(value, bool) if bool in kinds else not isinstance(value, bool) and isinstance(value, kinds)
    if not ok:
        names = "number" if float in kinds else " or ".join(k.__name__ for k in kinds)
        raise ConfigError(file, key, f"must be a {names}, not {value!r}")
    return float(value) if float in kinds and int in kinds and kind is float else value


# (low, high, low_inclusive): allowed ranges of numeric settings, by key.
RANGES = {
    "debounce_seconds": (0, None, True), "settle_seconds": (0, None, True), "verify_photos": (1, None, True),
    "quality_tolerance": (0, 1, True), "keep_versions": (1, None, True), "epochs": (1, None, True),
    "learning_rate": (0, None, False), "weight_decay": (0, None, True), "batch_size": (1, None, True),
    "dropout": (0, 0.99, True), "label_smoothing": (0, 0.99, True), "patience": (1, None, True),
    "warmup_epochs": (0, None, True), "views": (1, None, True), "jitter": (0, 0.99, True),
    "crop_min_scale": (0, 1, False), "validation_fraction": (0, 0.99, True),
}


def _check_ranges(file: Path, where: str, table: dict) -> None:
    for key, value in table.items():
        if key in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high, inclusive = RANGES[key]
            if (value < low or (value == low and not inclusive)) or (high is not None and value > high):
                bound = f">= {low}" if inclusive else f"> {low}"
                raise ConfigError(file, where + key, f"must be {bound}" + (f" and <= {high}" if high else "")
                                  + f", not {value!r}")


def _inside(child: Path, parent: Path) -> bool:
    return child.resolve() == parent.resolve() or parent.resolve() in child.resolve().parents


def load(file: Path) -> Config:
    file = Path(file).expanduser().resolve()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(file, "file", "config file does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "file", f"not valid TOML ({exc})") from None
    _unknown(file, "", data, {"daemon", "project"})
    daemon = data.get("daemon", {})
    _unknown(file, "daemon.", daemon, DAEMON_KEYS)
    state_dir = _path(file, "daemon.state_dir", daemon["state_dir"]) if "state_dir" in daemon else default_state_dir()
    weights = _path(file, "daemon.weights", daemon["weights"]) if "weights" in daemon else None
    weights_url = daemon.get("weights_url", DEFAULT_WEIGHTS_URL)
    log_level = daemon.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(file, "daemon.log_level", "must be debug, info, warning or error")
    entries = data.get("project", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(file, "project", "at least one [[project]] table is required")
    rescan = float(_typed(file, "daemon.rescan_seconds", daemon.get("rescan_seconds", 300), (int, float)))
    retry = float(_typed(file, "daemon.retry_seconds", daemon.get("retry_seconds", 60), (int, float)))
    for key, value in (("rescan_seconds", rescan), ("retry_seconds", retry)):
        if value <= 0:
            raise ConfigError(file, f"daemon.{key}", "must be positive")
    projects = tuple(_project(file, i, e, state_dir, weights, weights_url) for i, e in enumerate(entries))
    _check_overlaps(file, projects)
    return Config(file, state_dir, log_level, projects, rescan, retry)


def _project(file: Path, i: int, entry: dict, state_dir: Path, weights: Path | None,
             weights_url: str) -> Project:
    where = f"project[{i}]."
    _unknown(file, where, entry, PROJECT_KEYS)
    _check_ranges(file, where, entry)
    _check_ranges(file, where + "head.", entry.get("head", {}) if isinstance(entry.get("head"), dict) else {})
    _check_ranges(file, where + "finetune.", entry.get("finetune", {}) if isinstance(entry.get("finetune"), dict) else {})
    for key in ("name", "dataset", "output"):
        if key not in entry:
            raise ConfigError(file, where + key, "is required")
    name = entry["name"]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ConfigError(file, where + "name", "must be letters, digits, '_', '-' or '.' (it names the .mlpackage)")
    dataset = _path(file, where + "dataset", entry["dataset"])
    if not dataset.is_dir():
        raise ConfigError(file, where + "dataset", f"folder {dataset} does not exist")
    validation = _path(file, where + "validation", entry["validation"]) if "validation" in entry else None
    if validation is not None and not validation.is_dir():
        raise ConfigError(file, where + "validation", f"folder {validation} does not exist")
    if validation is not None and (_inside(validation, dataset) or _inside(dataset, validation)):
        raise ConfigError(file, where + "validation", f"{validation} overlaps the dataset folder {dataset}; "
                          "validation photos must not be training photos (leave `validation` out for a split)")
    output = _path(file, where + "output", entry["output"])
    for key, folder in (("dataset", dataset), ("validation", validation)):
        if folder is not None and _inside(output, folder):
            raise ConfigError(file, where + "output", f"{output} is inside the {key} folder {folder}; "
                              "watchtrain would train on its own output")
    schedule = entry.get("schedule", DEFAULT_SCHEDULE)
    try:
        CronTrigger.from_crontab(schedule)
    except (ValueError, TypeError) as exc:
        raise ConfigError(file, where + "schedule", f"invalid cron expression {schedule!r} ({exc})") from None
    head_table = entry.get("head", {})
    _unknown(file, where + "head.", head_table, HEAD_KEYS)
    head = HeadSettings(**{k: _typed(file, where + "head." + k, v, type(getattr(HeadSettings(), k)))
                           for k, v in head_table.items()})
    finetune = _finetune(file, where + "finetune.", entry.get("finetune", {}))
    precision = entry.get("precision", "float16")
    if precision not in export.PRECISIONS:
        raise ConfigError(file, where + "precision", f"must be one of {sorted(export.PRECISIONS)}")
    bits = _typed(file, where + "weight_bits", entry.get("weight_bits", 16), int)
    if bits not in (8, 16):
        raise ConfigError(file, where + "weight_bits", "must be 16 (float weights) or 8 (int8 weights)")
    # 8-bit weights need the iOS16 opset; that becomes the default target for them.
    target = entry.get("minimum_deployment_target", "iOS16" if bits == 8 else "iOS15")
    if target not in export.TARGETS:
        raise ConfigError(file, where + "minimum_deployment_target", f"must be one of {sorted(export.TARGETS)}")
    if bits == 8 and target == "iOS15":
        raise ConfigError(file, where + "minimum_deployment_target", "8-bit weights need iOS16 or later")
    texts = {k: _typed(file, where + k, entry[k], str) for k in ("author", "license", "description") if k in entry}
    fraction = _typed(file, where + "validation_fraction", entry.get("validation_fraction", 0.1), (int, float))
    if not 0 <= fraction < 1:
        raise ConfigError(file, where + "validation_fraction", "must be in [0, 1)")
    job = Job(
        name=name, dataset=dataset, output=output, state_dir=state_dir, validation=validation,
        weights=_path(file, where + "weights", entry["weights"]) if "weights" in entry else weights,
        weights_url=weights_url, validation_fraction=float(fraction),
        keep_versions=_typed(file, where + "keep_versions", entry.get("keep_versions", 5), int),
        quality_tolerance=float(_typed(file, where + "quality_tolerance", entry.get("quality_tolerance", 0.01),
                                       (int, float))),
        verify_photos=_typed(file, where + "verify_photos", entry.get("verify_photos", 16), int),
        settle_seconds=float(_typed(file, where + "settle_seconds", entry.get("settle_seconds", 2.0), (int, float))),
        head=head, finetune=finetune, export=export.ExportOptions(precision=precision, weight_bits=bits, minimum_target=target, **texts),
    )
    debounce = _typed(file, where + "debounce_seconds", entry.get("debounce_seconds", 10.0), (int, float))
    return Project(job=job, schedule=schedule, debounce_seconds=float(debounce))


def _finetune(file: Path, where: str, table: dict) -> FinetuneSettings:
    _unknown(file, where, table, FINETUNE_KEYS)
    defaults, aug = FinetuneSettings(), AugmentSettings()
    values = {k: _typed(file, where + k, v, type(getattr(defaults, k))) for k, v in table.items()
              if k not in AUGMENT_KEYS}
    if values.get("blocks", defaults.blocks) not in range(1, 4):
        raise ConfigError(file, where + "blocks", "must be 1, 2 or 3 (the blocks after the last 14x14 stage)")
    augment = AugmentSettings(
        enabled=_typed(file, where + "augment", table.get("augment", aug.enabled), bool),
        views=_typed(file, where + "views", table.get("views", aug.views), int),
        flip=_typed(file, where + "flip", table.get("flip", aug.flip), bool),
        jitter=float(_typed(file, where + "jitter", table.get("jitter", aug.jitter), (int, float))),
        crop_scale=(float(_typed(file, where + "crop_min_scale", table.get("crop_min_scale", aug.crop_scale[0]),
                                 (int, float))), 1.0),
    )
    return FinetuneSettings(**values, augment=augment)


def _check_overlaps(file: Path, projects: tuple[Project, ...]) -> None:
    seen_names: dict[str, int] = {}
    seen_outputs: dict[Path, int] = {}
    for i, p in enumerate(projects):
        if p.job.name in seen_names:
            raise ConfigError(file, f"project[{i}].name", f"{p.job.name!r} is also project[{seen_names[p.job.name]}]'s name")
        seen_names[p.job.name] = i
        key = p.job.output.resolve()
        if key in seen_outputs:
            raise ConfigError(file, f"project[{i}].output", f"shared with project[{seen_outputs[key]}]")
        seen_outputs[key] = i
        for j, other in enumerate(projects[:i]):
            if _inside(p.job.output, other.job.dataset) or _inside(other.job.output, p.job.dataset):
                raise ConfigError(file, f"project[{i}].output", f"overlaps project[{j}]'s dataset")
