"""Composable TOML job configs on top of torchtitan's ConfigManager.

What this adds to torchtitan 0.2.2 (which loads exactly one TOML file):
- `extends = "base.toml"` or `extends = ["a.toml", "b.toml"]` at the top of a file:
  parents (paths relative to the file) are loaded first, in order, chains allowed,
  cycles reported; tables merge key by key, the child winning;
- every key is checked against the JobConfig dataclasses before torchtitan sees it:
  unknown sections/keys name the file and the closest valid names, wrong types name
  the expected type;
- the `[diffusion_blocks]` section is always available (no custom_config_module needed);
  a user's `[job] custom_config_module` is merged on top before the check, so its
  sections are checked like ours;
- `[experimental] custom_import` is imported right after parsing, so what it registers
  (datasets, tokenizers, train specs) is there for our checks;
- torchtitan-style `--section.key value` CLI overrides apply last (tyro, as upstream).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import io
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - python < 3.11
    import tomli as tomllib

from torchtitan.config import ConfigManager
from torchtitan.config import JobConfig as TitanJobConfig

from ..errors import ConfigError, origin_in
from . import checks, sections

EXTENDS_KEY = "extends"
CLI_ORIGIN = "command line"  # origins of --section.key flags read "command line (--flag)"
CUSTOM_CONFIG_MODULE = "diffusion_blocks.config"


# keys that existed once and now live elsewhere: a config that sets them is told where
MOVED_KEYS = {
    ("diffusion_blocks", "max_grad_norm"): (
        "is gone: gradients are clipped by torchtitan's own key, [training] max_norm "
        "(default 1.0); set that instead"
    ),
}


# ---------------------------------------------------------------------------
# Loading and merging files


def load_composed_toml(path: str | os.PathLike) -> tuple[dict, dict[tuple[str, ...], str]]:
    """Load `path` with its `extends` parents merged in.

    Returns the merged table and, for every leaf key path, the file that set it.
    """
    return _load_with_parents(Path(path).resolve(), stack=[])


def _load_with_parents(path: Path, stack: list[Path]):
    if path in stack:
        chain = " -> ".join(str(p) for p in [*stack, path])
        raise ConfigError(f"{stack[-1]}: cyclic 'extends' chain: {chain}")
    if path.is_dir():
        where = f"{stack[-1]}: 'extends' names {path}" if stack else f"config file {path}"
        raise ConfigError(f"{where}, which is a directory; name a TOML file")
    if not path.is_file():
        if stack:
            raise ConfigError(f"{stack[-1]}: 'extends' names {path}, which does not exist")
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None

    parents = table.pop(EXTENDS_KEY, [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(
            f"{path}: '{EXTENDS_KEY}' must be a path or a list of paths, got {parents!r}"
        )

    merged: dict = {}
    origins: dict[tuple[str, ...], str] = {}
    for parent in parents:
        parent_table, parent_origins = _load_with_parents(
            (path.parent / parent).resolve(), [*stack, path]
        )
        _deep_merge(merged, parent_table)
        origins.update(parent_origins)
    _deep_merge(merged, table)
    origins.update({key: str(path) for key in _leaf_keys(table)})
    return merged, origins


def _deep_merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _leaf_keys(table: dict, prefix: tuple[str, ...] = ()):
    for key, value in table.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, (*prefix, key))
        else:
            yield (*prefix, key)


# ---------------------------------------------------------------------------
# Checking keys and types against the dataclasses


def check_against_dataclass(
    cls: type, table: dict, origins: dict[tuple[str, ...], str], prefix=()
) -> None:
    """Raise ConfigError for the first unknown key or wrongly typed value in `table`."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key, value in table.items():
        key_path = (*prefix, key)
        where = origin_in(key_path, origins)
        if key_path in MOVED_KEYS:
            raise ConfigError(f"{where}: '{'.'.join(key_path)}' {MOVED_KEYS[key_path]}")
        if key not in valid:
            kind = "section" if not prefix else "key"
            owner = f"[{'.'.join(prefix)}]" if prefix else "the job config"
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"{where}: unknown {kind} '{'.'.join(key_path)}' in {owner}{hint} "
                f"Valid names: {', '.join(valid)}."
            )
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: '{'.'.join(key_path)}' must be a table [{key}], "
                    f"got {type(value).__name__} {value!r}"
                )
            check_against_dataclass(expected, value, origins, key_path)
        elif not _value_matches(value, expected):
            raise ConfigError(
                f"{where}: '{'.'.join(key_path)}' = {value!r} has type "
                f"{type(value).__name__}, expected {_type_name(expected)}"
            )


def _value_matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_value_matches(value, arm) for arm in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list) and (
            not args or all(_value_matches(v, args[0]) for v in value)
        )
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return f"a list of {_type_name(arg)}"
    return {bool: "bool", int: "int", float: "float (or int)", str: "string"}.get(
        tp, "None" if tp is type(None) else getattr(tp, "__name__", str(tp))
    )


# ---------------------------------------------------------------------------
# The ConfigManager


def job_config_class() -> type:
    """torchtitan's JobConfig merged with our `[diffusion_blocks]` section."""
    return ConfigManager._merge_configs(TitanJobConfig, sections.JobConfig)


class DiffusionBlocksConfigManager(ConfigManager):
    """torchtitan's ConfigManager with composable, checked TOML files."""

    def __init__(self):
        super().__init__(config_cls=job_config_class())
        self.origins: dict[tuple[str, ...], str] = {}

    def _maybe_load_toml(self, args: list[str]) -> dict[str, Any] | None:
        file_path = _cli_value(args, "job", "config_file")
        table: dict = {}
        if file_path:
            table, self.origins = load_composed_toml(file_path)
        # the user's JobConfig must be merged before the check knows their sections
        self.config_cls = self._merge_custom_config(args, table)
        check_against_dataclass(self.config_cls, table, self.origins)
        return table or None

    def _maybe_add_custom_config(self, args: list[str], toml_values) -> type:
        return self.config_cls  # merged already, in _maybe_load_toml

    def _merge_custom_config(self, args: list[str], table: dict) -> type:
        """self.config_cls with `[job] custom_config_module`'s JobConfig merged in (CLI first)."""
        module_path = _cli_value(args, "job", "custom_config_module")
        job = table.get("job")
        if not module_path and isinstance(job, dict):
            module_path = job.get("custom_config_module")
        if not module_path or not isinstance(module_path, str):
            return self.config_cls  # a non-string TOML value is reported by the check
        where = _where(args, self.origins, "job", "custom_config_module")
        module = _import_for(module_path, "[job] custom_config_module", where)
        custom = getattr(module, "JobConfig", None)
        if not (isinstance(custom, type) and dataclasses.is_dataclass(custom)):
            raise ConfigError(
                f"{where}: [job] custom_config_module {module_path!r} has no JobConfig dataclass"
            )
        return self._merge_configs(self.config_cls, custom)


def _cli_value(args: list[str], section: str, key: str) -> str | None:
    """The value of `--section.key value` or `--section.key=value` (either spelling)."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag.replace("-", "_") == f"__{section}.{key}":
            if eq:
                return value
            return args[i + 1] if i + 1 < len(args) else None
    return None


def _cli_origin(args: list[str], section: str, key: str) -> str | None:
    for arg in args:
        name = arg.split("=", 1)[0].replace("-", "_")
        if name == f"__{section}.{key}":
            return f"{CLI_ORIGIN} ({arg.split('=', 1)[0]})"
    return None


def _where(args: list[str], origins, section: str, key: str) -> str:
    """The CLI flag, else the file, that set `[section] key`."""
    return _cli_origin(args, section, key) or origin_in((section, key), origins)


def _import_for(module_path: str, setting: str, where: str):
    try:
        return importlib.import_module(module_path)
    except ImportError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"{where}: {setting} {module_path!r} cannot be imported: {reason}"
        ) from None


def parse_job_config(args: list[str] | None = None, *, reads_data: bool = False):
    """Parse CLI args (with --job.config_file) into a validated JobConfig.

    Raises ConfigError with a one-paragraph message for any user mistake.
    reads_data: the caller reads the dataset (training, scoring): its local files must
    exist. Tools that only build the model (sizes, memory, sampling) pass False.
    """
    args = list(sys.argv[1:] if args is None else args)
    for (section, key), message in MOVED_KEYS.items():
        flag = _cli_origin(args, section, key)
        if flag:
            raise ConfigError(f"{flag}: '{section}.{key}' {message}")
    if _cli_value(args, "job", "config_file") is None and _cli_value(args, "model", "name") is None:
        raise ConfigError(
            "no job config given: add --job.config_file FILE.toml (e.g. "
            "train_configs/llama3_debug.toml); torchtitan's defaults name no DiffusionBlocks model"
        )
    manager = DiffusionBlocksConfigManager()
    job_config = _parse_args(manager, args)
    # kept for checks and for later ones that need the model (e.g. num_blocks vs n_layers)
    origins = {**manager.origins, **_cli_origins(args)}
    job_config.config_origins = origins
    # as torchtitan's Trainer does, but before our checks read the registries
    if job_config.experimental.custom_import:
        where = _where(args, origins, "experimental", "custom_import")
        _import_for(job_config.experimental.custom_import, "[experimental] custom_import", where)
    resolve_paths(job_config, origins)
    for section_name, check in checks.SECTION_CHECKS.items():
        problems = [(section_name, key, problem) for key, problem in check(getattr(job_config, section_name))]
        _raise_first(problems, origins)
    for check in checks.JOB_CHECKS:
        _raise_first(check(job_config), origins)
    if reads_data:
        _raise_first(checks.dataset_path_problems(job_config), origins)
    return job_config


def _parse_args(manager: DiffusionBlocksConfigManager, args: list[str]):
    """torchtitan's parse (TOML, then tyro for the flags) with its user errors as one
    ConfigError line: tyro's boxed CLI errors (an unknown flag, a bad value), and the
    checks in torchtitan's dataclasses' __post_init__ (e.g. [validation] steps)."""
    out, err = io.StringIO(), io.StringIO()

    def replay():
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())

    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            job_config = manager.parse_args(args)
    except ConfigError:
        replay()
        raise
    except SystemExit as e:
        if e.code in (0, None):  # --help
            replay()
            raise
        raise ConfigError(f"{CLI_ORIGIN}: {_one_line(err.getvalue() + out.getvalue())}") from None
    except (AssertionError, ValueError) as e:
        replay()
        section = _post_init_section(e, manager.config_cls)
        if section is None:
            raise
        where = next(
            (origin for key, origin in _cli_origins(args).items() if key[0] == section),
            origin_in((section,), manager.origins),
        )
        raise ConfigError(f"{where}: [{section}] {e}") from None
    replay()
    return job_config


def _one_line(box: str) -> str:
    """tyro's error box (captured, so drawn with ASCII rules: a title, the message, maybe
    'Perhaps you meant:' flags, a help hint) as one line: the message and the flags."""
    parts, part = [], []
    for line in box.splitlines() + [""]:
        text = line.strip().strip("│╭╮╰╯|").strip()
        if not text or set(text) <= set("─━-=+ "):
            if part:
                parts.append(part)
            part = []
        else:
            part.append(text)
    parts = [p for p in parts if not p[0].startswith("For full helptext")]
    if not parts:
        return "invalid command line"
    suggestions = [p for p in parts if p[0].startswith("Perhaps you meant")]
    message = " ".join((parts[1] if len(parts) > 1 else parts[0]))
    flags = [t.split()[0] for p in suggestions for t in p[1:] if t.startswith("--")]
    if flags:
        message += f"; perhaps you meant {', '.join(flags)}"
    return message


def _post_init_section(error: BaseException, config_cls: type) -> str | None:
    """The section whose dataclass __post_init__ raised `error`, if one did."""
    tb, failing = error.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__post_init__":
            failing = type(tb.tb_frame.f_locals.get("self"))
        tb = tb.tb_next
    if failing is None:
        return None
    hints = typing.get_type_hints(config_cls)
    return next((name for name, tp in hints.items() if tp is failing), None)


def _raise_first(problems: list[tuple[str, str, str]], origins) -> None:
    """ConfigError for the first (section, key, problem), naming the file or flag that
    set the key ('dataloader.num_workers' is the nested key [training.dataloader])."""
    if problems:
        section, key, problem = problems[0]
        where = origin_in((section, *key.split(".")), origins)
        raise ConfigError(f"{where}: [{section}] {key} {problem}")


# keys that name local files: a relative value is read from the folder of the config
# file that sets it (the working directory for a command-line value). Only where
# the dataset is one of ours that reads local files: torchtitan's own datasets keep
# torchtitan's meaning of dataset_path (a hub name or a path from the working directory).
def _local_dataset_path_keys(job_config) -> list[tuple[str, str]]:
    local = checks.local_datasets()
    return [
        (section, "dataset_path") for section in ("training", "validation")
        if getattr(job_config, section).dataset in local
    ]


def resolve_paths(job_config, origins: dict[tuple[str, ...], str]) -> None:
    """Make the path-valued keys absolute, in place (see _local_dataset_path_keys)."""
    for section, key in _local_dataset_path_keys(job_config):
        value = getattr(getattr(job_config, section), key)
        if not value:
            continue
        origin = origins.get((section, key), "")
        set_in_file = origin and not origin.startswith(CLI_ORIGIN)
        folder = Path(origin).parent if set_in_file else Path.cwd()
        resolved = os.path.normpath(folder / Path(value).expanduser())
        setattr(getattr(job_config, section), key, resolved)


def _cli_origins(args: list[str]) -> dict[tuple[str, ...], str]:
    """Every `--section.key` flag on the command line, as the origin of that key."""
    found = {}
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and "." in flag:
            key_path = tuple(flag[2:].replace("-", "_").split("."))
            found[key_path] = f"{CLI_ORIGIN} ({flag})"
    return found
