"""Stage configs: one dataclass per stage, help on every field, YAML file + `--field value` overrides.

Every field carries `metadata={"help": ...}`; `validate()` returns a list of problems, each saying what
to change, and `load_config` raises one `ConfigError` listing all of them (TRL's config style).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from pipeline.core.errors import ConfigError

C = TypeVar("C", bound="StageConfig")


def hfield(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class Validated:
    """The one validation style of configs: `validate()` lists every problem as 'field: what is wrong; what to
    do', and `check()` raises them together as one ConfigError naming the config. Stage configs, ZoomConfig,
    AgentConfig and TinySpec use it."""

    #: how the error names the config (empty: the class name)
    config_label: ClassVar[str] = ""

    def validate(self) -> list[str]:
        """Return problems as 'field: what is wrong; what to do' (none by default). Subclasses extend."""
        return []

    def check(self) -> None:
        problems = self.validate()
        if problems:
            raise ConfigError(
                f"invalid {self.config_label or type(self).__name__}:\n" + "\n".join(f"  - {p}" for p in problems)
            )


@dataclass
class StageConfig(Validated):
    """Fields every stage has."""

    output_dir: str = hfield("runs/tiny/stage", help="Folder for this stage's outputs, resolved config and manifest.")
    seed: int = hfield(0, help="Random seed (python, numpy, torch).")

    def validate(self) -> list[str]:
        """Return problems as 'field: what is wrong; what to do'. Subclasses extend."""
        problems = []
        if not str(self.output_dir).strip():
            problems.append("output_dir: empty; give a folder path")
        else:
            problems += output_dir_problems(str(self.output_dir))
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, exclude: tuple[str, ...] = ()) -> str:
        """Stable hash of the config (for skip/resume decisions and prediction caches)."""
        d = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# kernel-provided trees: nothing a stage writes belongs there (writes fail or, worse, change the system)
_VIRTUAL_FS = ("/proc", "/sys", "/dev")


def output_dir_problems(path: str) -> list[str]:
    """Why `path` cannot be a stage's output folder (empty list when it can): an existing file, a kernel
    tree (/proc, /sys, /dev), or a parent that is a file or not writable."""
    import os

    p = Path(path).expanduser()
    try:
        absolute = p.resolve(strict=False)
    except (OSError, RuntimeError) as e:
        return [f"output_dir: {path} cannot be resolved ({e}); give a folder path"]
    for v in _VIRTUAL_FS:
        if absolute == Path(v) or Path(v) in absolute.parents:
            return [f"output_dir: {path} is inside {v}, a kernel file system; give a folder on disk, e.g. runs/x"]
    if absolute.exists():
        if not absolute.is_dir():
            return [f"output_dir: {path} exists and is not a folder; give a folder path (or remove that file)"]
        return [] if os.access(absolute, os.W_OK) else [f"output_dir: {path} is not writable; give a folder you can write"]
    parent = absolute.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return [f"output_dir: {parent} is a file, so {path} cannot be created; give another folder path"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"output_dir: cannot create {path}: {parent} is not writable"]
    return []


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Coerce a YAML/CLI value to the annotated type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, value)
            except ConfigError as e:
                last = e
        raise ConfigError(str(last))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            f = float(value)
            if f != f:  # NaN passes every `<`/`>` check silently; no field means anything by it
                raise ConfigError(f"{name}: NaN is not a valid value; give a number")
            return f
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [
                    v for v in value.split(",") if v.strip()
                ]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            inner = args[0] if args else Any
            return [v if inner is Any else _coerce(name, inner, v) for v in value]
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        return value
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{name}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from e


# fields renamed across stages: old name -> (new name, how to convert)
RENAMED = {
    "max_turns": ("max_zooms", "replaced by max_zooms, the zoom calls per episode with the answer turn on top; "
                               "the old eval/mine-hard max_turns N is max_zooms N-1, the old rl max_turns N is "
                               "max_zooms N"),
    "zoom_max_calls": ("max_zooms", "replaced by max_zooms (zoom calls per episode)"),
    # the zoom settings have one name in every stage (pipeline/core/zoom_settings.py)
    "frame": ("zoom_frame", "renamed zoom_frame, as in every stage"),
    "max_pixels": ("zoom_max_pixels", "renamed zoom_max_pixels, as in every stage"),
    "min_pixels": ("zoom_min_pixels", "renamed zoom_min_pixels, as in every stage"),
    "tool_read_timeout_s": ("zoom_read_timeout_s", "renamed zoom_read_timeout_s, as in every stage"),
}


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config", check: bool = True) -> C:
    """Build and validate a config; unknown keys and bad types are all reported together.

    check=False builds it without `validate()` (the pipeline runner checks each stage again right before it
    runs, once the stages before it have written its inputs)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    problems = []
    kwargs: dict[str, Any] = {}
    for k, v in (data or {}).items():
        if k not in fields:
            close = [n for n in fields if n.split("_")[0] == k.split("_")[0]][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            if k in RENAMED and RENAMED[k][0] in fields:
                hint = f" ({RENAMED[k][1]})"
            problems.append(f"{k}: unknown field in {source}{hint}")
            continue
        try:
            kwargs[k] = _coerce(k, hints[k], v)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError(f"invalid {cls.__name__} ({source}):\n" + "\n".join(f"  - {p}" for p in problems))
    cfg = cls(**kwargs)
    if check:
        cfg.check()
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file under configs/")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; pass --config with a YAML file, e.g. configs/tiny/eval.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); pass a YAML config") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e}); pass a readable YAML file") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: binary file (NUL bytes); pass a YAML config")
    try:
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e)[:300]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of field: value")
    return data


def parse_overrides(cls: type, argv: list[str]) -> dict[str, Any]:
    """Parse `--field value` / `--field=value` / `--flag` (bools) against the dataclass fields."""
    parser = argparse.ArgumentParser(prog=cls.__name__, add_help=False, allow_abbrev=False)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        opt = "--" + f.name
        alt = "--" + f.name.replace("_", "-")
        names = [opt] if alt == opt else [opt, alt]
        if hints[f.name] is bool:
            parser.add_argument(*names, dest=f.name, nargs="?", const="true", default=argparse.SUPPRESS)
        else:
            parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS)
    ns, rest = parser.parse_known_args(argv)
    if rest:
        raise ConfigError(
            f"unknown arguments {rest}; valid fields: " + ", ".join(f.name for f in dataclasses.fields(cls))
        )
    return vars(ns)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> C:
    """YAML file (optional) then CLI/dict overrides, validated."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        data.update(load_yaml(path))
        source = str(path)
    if overrides:
        data.update(overrides if isinstance(overrides, dict) else parse_overrides(cls, list(overrides)))
    return config_from_dict(cls, data, source)


def config_help(cls: type) -> str:
    """Human-readable field list with types, defaults and help (for `knowzoom STAGE --help`)."""
    hints = _field_types(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "REQUIRED"
        )
        tp = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name} ({tp}, default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)


def save_config(cfg: StageConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
