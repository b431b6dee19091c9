"""The box's configuration: TOML read once, at the edge, into the typed model.

daemon/config_model.py says what every key is (type, default); this module reads the
file, checks it against that model and speaks for it. Every problem in a file is
collected and reported together, each naming the key, the bad value and what is
allowed, because the person reading it is a technician at a counter with a laptop, not
a Python developer: pydantic's errors are turned into those lines here, and a section
with a bad key is checked again without it so that the files it names (keys, the MQTT
password) are still read and their problems reported in the same run. With no file at
all the daemon runs on a built-in default: offline, standard-input scanner, state under
$STATE_DIRECTORY (systemd's StateDirectory=) or /var/lib/redeemd.
"""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from cards import keys
from daemon.config_model import (
    OPTIONAL_SECTIONS,
    SECTIONS,
    Api,
    Box,
    Dispense,
    Hooks,
    Places,
    Scan,
    ScannerBlock,
    ScannerConfig,
    Sync,
    Trust,
    file_keys,
)
from drivers.settings import SCANNER_SETTINGS, PrinterSettings, StdinSettings

__all__ = ["Config", "ConfigError", "ScannerConfig", "load", "parse", "resolve_path"]

DEFAULT_PATH = Path("/etc/redeemd/config.toml")

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """The configuration is unusable; `problems` lists every reason, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class Config:
    source: str
    box: Box
    trust: Trust
    scan: Scan
    scanners: tuple[ScannerConfig, ...]
    api: Api
    sync: Sync
    hooks: Hooks
    dispense: Dispense = Dispense()
    printer: PrinterSettings | None = None
    """None without a [printer] table: no receipt printer."""


def default_config_dir() -> str:
    """{config_dir}: /etc/redeemd, or $CONFIGURATION_DIRECTORY as systemd names it."""
    return Places.from_environment().config_dir


def resolve_path(explicit: str | None) -> Path | None:
    """Which file to read: -c PATH, then $REDEEMD_CONFIG, then the default if it exists."""
    if explicit:
        return Path(explicit)
    if os.environ.get("REDEEMD_CONFIG"):
        return Path(os.environ["REDEEMD_CONFIG"])
    return DEFAULT_PATH if DEFAULT_PATH.exists() else None


def load(explicit: str | None = None) -> Config:
    """Load the configuration the CLI should use; ConfigError lists every problem."""
    path = resolve_path(explicit)
    if path is None:
        return parse({}, source="built-in defaults (no config file)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(path), ["file does not exist (use -c PATH or $REDEEMD_CONFIG)"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read it: {exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse(data, source=str(path))


def parse(data: dict, source: str) -> Config:
    """The Config for parsed TOML `data`; ConfigError lists every problem at once."""
    problems: list[str] = []
    _outside_sections(data, problems)
    places = Places.from_environment()
    given: dict[str, dict] = {}
    sections: dict[str, Any] = {}
    for name, model in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            problems.append(f"[{name}]: must be a table, got {table!r}")
            table = {}
        given[name] = table
        sections[name] = _checked(f"[{name}]", model, table, problems, places)
        if name == "box":  # {state_dir} in the other sections is the box's
            places = replace(places, state_dir=str(sections["box"].state_dir))

    for name, optional in OPTIONAL_SECTIONS.items():
        table = data.get(name)
        if table is not None and not isinstance(table, dict):
            problems.append(f"[{name}]: must be a table, got {table!r}")
        elif table is not None:
            sections[name] = _checked(f"[{name}]", optional, table, problems, places)

    scanners = _scanners(data.get("scanner"), problems, places)
    trust = _with_keys(sections["trust"], problems)
    sync = _with_password(sections["sync"], given["sync"], problems)
    _check_hook(sections["hooks"], given["hooks"], problems)

    if problems:
        raise ConfigError(source, problems)
    return Config(
        source=source,
        box=sections["box"],
        trust=trust,
        scan=sections["scan"],
        scanners=scanners,
        api=sections["api"],
        sync=sync,
        hooks=sections["hooks"],
        dispense=sections["dispense"],
        printer=sections.get("printer"),
    )


def _outside_sections(data: dict, problems: list[str]) -> None:
    """Unknown [sections], and keys written above every [section] line."""
    names = sorted([*SECTIONS, *OPTIONAL_SECTIONS, "scanner"])
    for name in sorted(set(data) - set(SECTIONS) - set(OPTIONAL_SECTIONS) - {"scanner"}):
        if isinstance(data[name], dict):
            problems.append(f"[{name}]: unknown section; allowed: {', '.join(names)}")
            continue
        # `debounce = "1s"` above every [section] line is a key of no section.
        owners = " or ".join(f"[{s}]" for s, model in SECTIONS.items() if name in file_keys(model))
        where = (
            f"it belongs under {owners}: move the line below the {owners} line"
            if owners
            else "no section has this key; sections: " + ", ".join(f"[{s}]" for s in names)
        )
        value = json.dumps(data[name], default=str)  # as TOML writes it: true, "1s"
        problems.append(f"{name} = {value}: a key outside any section; {where}")


def _checked(
    where: str,
    model: type[M],
    given: dict,
    problems: list[str],
    places: Places,
    also: tuple[str, ...] = (),
) -> M | None:
    """`given` checked against `model`, each problem added to `problems`.

    A bad value is reported and then left out, so the section still comes back with the
    default in its place and what depends on it is checked too; None only when a
    required key is missing or bad. `also`: keys of the same table checked elsewhere
    (a [[scanner]]'s type and name), named among the allowed ones.
    """
    allowed = (*also, *file_keys(model))
    for key in given:
        if key not in allowed:
            problems.append(f"{where} {key}: unknown key; allowed: {', '.join(allowed)}")
    table = {k: v for k, v in given.items() if k in file_keys(model)}
    context = {"places": places}
    try:
        return model.model_validate(table, context=context)
    except ValidationError as exc:
        bad = set()
        for error in exc.errors():
            problems.append(_problem(where, model, table, error))
            bad.add(error["loc"][0] if error["loc"] else None)
    try:
        return model.model_validate(
            {k: v for k, v in table.items() if k not in bad}, context=context
        )
    except ValidationError:
        return None


def _problem(where: str, model: type[BaseModel], given: dict, error: Any) -> str:
    """One of pydantic's errors as the technician reads it: key, value, what is allowed."""
    key = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "missing":
        return f"{where} {key}: missing; it is required"
    if error["type"] == "value_error":  # our validators' "what is allowed"
        allowed = str(error["ctx"]["error"])
    elif error["type"] == "literal_error":
        choices = get_args(model.model_fields[key].annotation)
        allowed = "one of " + ", ".join(repr(c) for c in choices)
    else:  # a type none of our validators covers: pydantic's own words
        allowed = error["msg"][0].lower() + error["msg"][1:]
    return f"{where} {key} = {given.get(key, error['input'])!r}: must be {allowed}"


def _scanners(given: object, problems: list[str], places: Places) -> tuple[ScannerConfig, ...]:
    if given is None:
        return (ScannerConfig("stdin", "stdin", StdinSettings()),)
    if not isinstance(given, list):
        problems.append("[[scanner]]: must be an array of tables ([[scanner]] blocks)")
        return ()
    result = []
    names = []  # also of blocks with other problems: a clash is worth knowing at once
    for index, table in enumerate(given):
        where = f"[[scanner]] #{index + 1}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        head_keys = tuple(ScannerBlock.model_fields)
        head = _checked(
            where,
            ScannerBlock,
            {k: v for k, v in table.items() if k in head_keys},
            problems,
            places,
        )
        if head is not None:
            names.append(head.name)
        kind = table.get("type")
        model = SCANNER_SETTINGS.get(kind) if isinstance(kind, str) else None
        if model is None:  # no type, or an unknown one: reported above
            continue
        rest = {k: v for k, v in table.items() if k not in head_keys}
        settings = _checked(where, model, rest, problems, places, also=head_keys)
        if head is not None and settings is not None:
            result.append(ScannerConfig(head.type, head.name, settings))  # type: ignore[arg-type]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"[[scanner]] name = {name!r}: used twice; names must be unique")
    return tuple(result)


def _with_keys(trust: Trust, problems: list[str]) -> Trust:
    """The [trust] section with the root keys and the code key read from their files."""
    roots = dict(trust.root_keys)
    for path in trust.root_key_files:
        try:
            key = keys.unb64(path.read_bytes(), f"root key file {path}", 32)
        except FileNotFoundError:
            problems.append(
                f"[trust] root_key_files: {path} does not exist; copy the root public key "
                "from the backend (redeemd-backend keygen writes root.pub)"
            )
            continue
        except keys.TrustError as exc:
            problems.append(
                f"[trust] root_key_files: {exc}; copy root.pub again from the backend "
                "(redeemd-backend keygen wrote it: one line of base64)"
            )
            continue
        except OSError as exc:
            problems.append(f"[trust] root_key_files: {path}: {exc}")
            continue
        roots[keys.key_id(key)] = key
    if not roots and not any("root_key" in p for p in problems):
        problems.append(
            "[trust] root_keys / root_key_files: no root key configured; batches cannot be trusted"
        )
    code_key = _code_key(trust.code_key_file, problems)
    return trust.model_copy(update={"root_keys": roots, "code_key": code_key})


def _code_key(path: Path, problems: list[str]) -> bytes:
    try:
        key = keys.unb64(path.read_bytes(), f"code key file {path}")
    except FileNotFoundError:
        problems.append(
            f"[trust] code_key_file: {path} does not exist; copy code.key from the backend "
            "(redeemd-backend keygen writes it)"
        )
        return b""
    except keys.TrustError as exc:
        problems.append(
            f"[trust] code_key_file: {exc}; copy code.key again from the backend "
            "(redeemd-backend keygen wrote it: one line of base64)"
        )
        return b""
    except OSError as exc:
        problems.append(f"[trust] code_key_file: {path}: {exc}")
        return b""
    if len(key) < 16:
        problems.append(f"[trust] code_key_file: {path}: key is {len(key)} bytes; need at least 16")
    return key


def _with_password(sync: Sync, given: dict, problems: list[str]) -> Sync:
    """The [sync] section with the password read from password_file; the files it names
    must exist, and keys that do not go together are named."""
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        path = getattr(sync, key)
        if path is not None and not path.is_file():
            problems.append(f"[sync] {key} = {given.get(key)!r}: {path} does not exist")
    password = None
    if sync.password_file is not None and sync.password_file.is_file():
        try:
            password = sync.password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"[sync] password_file: cannot read {sync.password_file}: {exc}")
    problems += [f"[sync] {conflict}" for conflict in sync.conflicts()]
    return sync.model_copy(update={"password": password})


def _check_hook(hooks: Hooks, given: dict, problems: list[str]) -> None:
    if hooks.on_verdict and shutil.which(hooks.on_verdict[0]) is None:
        problems.append(
            f"[hooks] on_verdict = {given.get('on_verdict')!r}: {hooks.on_verdict[0]} is not "
            "an executable file (give its absolute path, and make it executable)"
        )
