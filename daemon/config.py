"""The box's configuration: TOML parsed once, at the edge, into typed objects.

Every problem in a file is collected and reported together, each naming the key, the
bad value and what is allowed, because the person reading it is a technician at a
counter with a laptop, not a Python developer. With no file at all the daemon runs on
a built-in default: offline, standard-input scanner, state under $STATE_DIRECTORY
(systemd's StateDirectory=) or /var/lib/redeemd.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cards import keys
from drivers.serial_framing import TERMINATORS

DEFAULT_PATH = Path("/etc/redeemd/config.toml")


class ConfigError(ValueError):
    """The configuration is unusable; `problems` lists every reason, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class BoxConfig:
    id: str
    merchant: str
    store: str
    state_dir: Path
    database: Path
    timezone: str


@dataclass(frozen=True)
class TrustConfig:
    root_keys: dict[str, bytes] = field(repr=False)
    code_key: bytes = field(repr=False)
    max_staleness: float
    stale_policy: str
    max_batch_bytes: int
    # Where the keys were read from, for `doctor`'s owner and mode checks.
    code_key_file: Path | None = None
    root_key_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ScanConfig:
    debounce: float
    max_code_length: int
    payment_codes: str


@dataclass(frozen=True)
class ScannerConfig:
    """One [[scanner]] block. `settings` holds the type's keys, already validated and
    with defaults filled in (see SCANNER_SCHEMAS)."""

    type: str
    name: str
    settings: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ApiConfig:
    """[api]: the local Unix socket for the POS application (docs/local-api.md)."""

    enabled: bool = True
    socket: Path = Path("/run/redeemd/api.sock")
    group: str = ""
    """Group that may connect; "" keeps the daemon's own (redeemd under the shipped unit)."""
    mode: int = 0o660
    confirm_within: float = 600.0
    """How long a two-phase `checked` scan may be confirmed with `redeem`."""


@dataclass(frozen=True)
class SyncConfig:
    """[sync]: the MQTT link to the backend (docs/protocol.md section 16)."""

    enabled: bool = False
    broker: str = "mqtt://127.0.0.1:1883"
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    topic_prefix: str = "redeemd/v1"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 60
    max_inflight: int = 8
    max_records: int = 200
    status_every: float = 60.0
    request_retry: float = 30.0
    password_file: Path | None = None


@dataclass(frozen=True)
class HooksConfig:
    """[hooks]: a command run after each verdict, for a light or a relay."""

    on_verdict: tuple[str, ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True)
class Config:
    source: str
    box: BoxConfig
    trust: TrustConfig
    scan: ScanConfig
    scanners: tuple[ScannerConfig, ...]
    api: ApiConfig = ApiConfig()
    sync: SyncConfig = SyncConfig()
    hooks: HooksConfig = HooksConfig()


# section -> key -> (checker, default). A checker returns the typed value or raises
# ValueError with "what is allowed".
Checker = Callable[[object], object]


def _string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty string")
    return value


def _identifier(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("1-64 characters from A-Z a-z 0-9 _ . - (it appears in MQTT topics)")
    return value


def _duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
        if match:
            scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
            return float(match.group(1)) * scale
    raise ValueError('a duration such as 2, "2s", "100ms", "15m", "12h" or "7d"')


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("a positive integer")
    return value


def _choice(*allowed: str) -> Checker:
    def check(value: object) -> str:
        if value not in allowed:
            raise ValueError("one of " + ", ".join(repr(a) for a in allowed))
        return value  # type: ignore[return-value]

    return check


def _timezone(value: object) -> str:
    if value == "local":
        return "local"
    try:
        ZoneInfo(_string(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError('"local" or an IANA zone such as "Asia/Shanghai"') from None
    return value  # type: ignore[return-value]


def _string_list(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _optional(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError('a string ("" for none)')
    return value.strip()


def _broker_url(value: object) -> str:
    parts = urlsplit(_string(value).strip())
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        parts = urlsplit("")
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError('a URL such as "mqtt://127.0.0.1:1883" or "mqtts://broker.example:8883"')
    return value.strip()  # type: ignore[union-attr]


def _file_mode(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value.strip()):
        return int(value, 8)
    raise ValueError('octal permission bits as a string, such as "0660"')


def _topic_prefix(value: object) -> str:
    if (
        not isinstance(value, str)
        or not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", value)
        or value.startswith("$")
    ):
        raise ValueError('topic levels of A-Z a-z 0-9 _ . - separated by "/", e.g. "redeemd/v1"')
    return value


SCHEMA: dict[str, dict[str, tuple[Checker, object]]] = {
    "box": {
        "id": (_identifier, "demo-box"),
        "merchant": (_identifier, "demo"),
        "store": (_identifier, "demo-store"),
        "state_dir": (_string, None),
        "database": (_string, "{state_dir}/redeemd.db"),
        "timezone": (_timezone, "local"),
    },
    "trust": {
        "root_keys": (_string_list, []),
        # Root's, read-only to the daemon: never under state_dir, which the daemon owns
        # and could swap trust anchors in (issue 17.4; docs/decisions.md).
        "root_key_files": (_string_list, ["{config_dir}/keys/root.pub"]),
        "code_key_file": (_string, "{config_dir}/keys/code.key"),
        "max_staleness": (_duration, "7d"),
        "stale_policy": (_choice("accept", "reject"), "accept"),
        "max_batch_bytes": (_positive_int, 512 << 20),
    },
    "scan": {
        "debounce": (_duration, 2.0),
        "max_code_length": (_positive_int, 512),
        "payment_codes": (_choice("pass", "reject"), "pass"),
    },
    "api": {
        "enabled": (_boolean, True),
        "socket": (_string, "{runtime_dir}/api.sock"),
        "group": (_optional, ""),
        "mode": (_file_mode, "0660"),
        "confirm_within": (_duration, "10m"),
    },
    "sync": {
        "enabled": (_boolean, False),
        "broker": (_broker_url, "mqtt://127.0.0.1:1883"),
        "topic_prefix": (_topic_prefix, "redeemd/v1"),
        "username": (_optional, ""),
        "password_file": (_optional, ""),
        "ca_file": (_optional, ""),
        "cert_file": (_optional, ""),
        "key_file": (_optional, ""),
        "keepalive": (_duration, "60s"),
        "max_inflight": (_positive_int, 8),
        "max_records": (_positive_int, 200),
        "status_every": (_duration, "60s"),
        "request_retry": (_duration, "30s"),
    },
    "hooks": {
        "on_verdict": (_optional, ""),
        "timeout": (_duration, "5s"),
    },
}


def _hex_bytes(value: object) -> bytes:
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise ValueError('hex bytes such as "16 07 0d" ("" for none)')


def _int_choice(*allowed: int | float) -> Checker:
    def check(value: object) -> int | float:
        if isinstance(value, bool) or value not in allowed:
            raise ValueError("one of " + ", ".join(str(a) for a in allowed))
        return value  # type: ignore[return-value]

    return check


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


REQUIRED = None  # a scanner key without a default must be given

# Keys of each scanner type, beside `type` and `name`. docs/scanners.md explains them.
SCANNER_SCHEMAS: dict[str, dict[str, tuple[Checker, object]]] = {
    "stdin": {
        # "-" is standard input; a path is a FIFO or file read line by line.
        "path": (_string, "-"),
    },
    "serial": {
        "port": (_string, REQUIRED),
        "baudrate": (_positive_int, 9600),
        "bytesize": (_int_choice(5, 6, 7, 8), 8),
        "parity": (_choice("none", "even", "odd", "mark", "space"), "none"),
        "stopbits": (_int_choice(1, 1.5, 2), 1),
        "flow": (_choice("none", "rtscts", "xonxoff"), "none"),
        "terminator": (_choice(*TERMINATORS), "auto"),
        "idle_gap": (_duration, "50ms"),
        "prefix": (_text, ""),
        "suffix": (_text, ""),
        "feedback": (_choice("none", "honeywell", "zebra-ssi", "raw"), "none"),
        "good_read": (_hex_bytes, ""),
        "bad_read": (_hex_bytes, ""),
    },
    "hid": {
        "device": (_string, REQUIRED),
        "layout": (_choice("us", "uk", "de", "fr"), "us"),
        "grab": (_boolean, True),
        "gap": (_duration, "100ms"),
        "min_length": (_positive_int, 3),
    },
    "camera": {
        "device": (_string, REQUIRED),
        "width": (_positive_int, 640),
        "height": (_positive_int, 480),
        "fps": (_positive_int, 10),
        "ffmpeg": (_string, "ffmpeg"),
        "rescan_after": (_duration, "2s"),
        # A camera silent this long is restarted (a hung camera, a USB power problem).
        "no_frame_timeout": (_duration, "15s"),
        "min_sightings_1d": (_positive_int, 2),
        # ffmpeg's -input_format for V4L2 ("mjpeg", "yuyv422"); "" lets ffmpeg choose.
        "input_format": (_text, ""),
    },
}
SCANNER_SCHEMA: dict[str, tuple[Checker, object]] = {
    "type": (_choice(*SCANNER_SCHEMAS), REQUIRED),
    "name": (_identifier, REQUIRED),
}


def default_config_dir() -> str:
    # {config_dir}: /etc/redeemd, or $CONFIGURATION_DIRECTORY as systemd names it (the
    # quick start sets it to its own directory).
    return os.environ.get("CONFIGURATION_DIRECTORY", "").split(":")[0] or "/etc/redeemd"


def default_state_dir() -> str:
    # systemd sets STATE_DIRECTORY for units with StateDirectory=; the quick start sets it too.
    return os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/redeemd"


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
    problems: list[str] = []
    values: dict[str, dict[str, object]] = {}
    sections = sorted([*SCHEMA, "scanner"])
    for name in sorted(set(data) - set(SCHEMA) - {"scanner"}):
        if isinstance(data[name], dict):
            problems.append(f"[{name}]: unknown section; allowed: {', '.join(sections)}")
            continue
        # `debounce = "1s"` above every [section] line is a key of no section.
        owners = " or ".join(f"[{s}]" for s, schema in SCHEMA.items() if name in schema)
        where = (
            f"it belongs under {owners}: move the line below the {owners} line"
            if owners
            else "no section has this key; sections: " + ", ".join(f"[{s}]" for s in sections)
        )
        value = json.dumps(data[name], default=str)  # as TOML writes it: true, "1s"
        problems.append(f"{name} = {value}: a key outside any section; {where}")
    for section, schema in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            problems.append(f"[{section}]: must be a table, got {given!r}")
            given = {}
        values[section] = _check_table(f"[{section}]", given, schema, problems)

    state_dir = str(values["box"]["state_dir"] or default_state_dir())
    values["box"]["state_dir"] = state_dir

    def expand(text: str) -> Path:
        text = text.replace("{state_dir}", state_dir)
        return Path(text.replace("{config_dir}", default_config_dir())).expanduser()

    scanners = _scanners(data.get("scanner"), problems)
    root_keys = _root_keys(values["trust"], expand, problems)
    code_key = _code_key(expand(str(values["trust"]["code_key_file"])), problems)
    api = _api(values["api"], expand)
    sync = _sync(values["sync"], expand, problems)
    hooks = _hooks(values["hooks"], problems)

    if problems:
        raise ConfigError(source, problems)
    box, trust, scan = values["box"], values["trust"], values["scan"]
    return Config(
        source=source,
        box=BoxConfig(
            id=box["id"],
            merchant=box["merchant"],
            store=box["store"],
            state_dir=Path(state_dir),
            database=expand(str(box["database"])),
            timezone=box["timezone"],
        ),  # type: ignore[arg-type]
        trust=TrustConfig(
            root_keys=root_keys,
            code_key=code_key,
            code_key_file=expand(str(trust["code_key_file"])),
            root_key_files=tuple(expand(str(n)) for n in trust["root_key_files"] or []),
            max_staleness=trust["max_staleness"],
            stale_policy=trust["stale_policy"],
            max_batch_bytes=trust["max_batch_bytes"],
        ),  # type: ignore[arg-type]
        scan=ScanConfig(**scan),  # type: ignore[arg-type]
        scanners=scanners,
        api=api,
        sync=sync,
        hooks=hooks,
    )


def _check_table(
    where: str, given: dict, schema: dict[str, tuple[Checker, object]], problems: list[str]
) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in given:
        if key not in schema:
            problems.append(f"{where} {key}: unknown key; allowed: {', '.join(schema)}")
    for key, (check, default) in schema.items():
        if key not in given:
            if default is None and where.startswith("[[scanner"):
                problems.append(f"{where} {key}: missing; it is required")
            out[key] = check(default) if default is not None else None
            continue
        try:
            out[key] = check(given[key])
        except ValueError as exc:
            problems.append(f"{where} {key} = {given[key]!r}: must be {exc}")
            out[key] = check(default) if default is not None else None
    return out


def _scanners(given: object, problems: list[str]) -> tuple[ScannerConfig, ...]:
    if given is None:
        return (ScannerConfig("stdin", "stdin", MappingProxyType({"path": "-"})),)
    if not isinstance(given, list):
        problems.append("[[scanner]]: must be an array of tables ([[scanner]] blocks)")
        return ()
    result = []
    for index, table in enumerate(given):
        where = f"[[scanner]] #{index + 1}"
        if not isinstance(table, dict):
            problems.append(f"{where}: must be a table")
            continue
        kind = table.get("type")
        schema = {**SCANNER_SCHEMA, **SCANNER_SCHEMAS.get(kind, {})}  # type: ignore[arg-type]
        checked = _check_table(where, table, schema, problems)
        if checked["type"] and checked["name"]:
            settings = {k: v for k, v in checked.items() if k not in SCANNER_SCHEMA}
            result.append(
                ScannerConfig(
                    type=checked["type"],  # type: ignore[arg-type]
                    name=checked["name"],  # type: ignore[arg-type]
                    settings=MappingProxyType(settings),
                )
            )
    names = [s.name for s in result]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"[[scanner]] name = {name!r}: used twice; names must be unique")
    return tuple(result)


def default_runtime_dir() -> str:
    # systemd sets RUNTIME_DIRECTORY for units with RuntimeDirectory= (/run/redeemd).
    return os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or "/run/redeemd"


def _api(api: dict, expand: Callable[[str], Path]) -> ApiConfig:
    # Whether the socket's directory is usable is found out when the daemon binds it:
    # a missing /run/redeemd disables the API with a log line, it does not stop the box.
    socket = str(api["socket"]).replace("{runtime_dir}", default_runtime_dir())
    return ApiConfig(
        enabled=api["enabled"],  # type: ignore[arg-type]
        socket=expand(socket),
        group=api["group"],  # type: ignore[arg-type]
        mode=api["mode"],  # type: ignore[arg-type]
        confirm_within=api["confirm_within"],  # type: ignore[arg-type]
    )


def _root_keys(trust: dict, expand: Callable[[str], Path], problems: list[str]) -> dict[str, bytes]:
    roots: dict[str, bytes] = {}
    for text in trust["root_keys"] or []:
        try:
            key = keys.unb64(text, "root key", 32)
        except keys.TrustError as exc:
            problems.append(f"[trust] root_keys {text!r}: {exc} (base64 of a 32-byte Ed25519 key)")
            continue
        roots[keys.key_id(key)] = key
    for name in trust["root_key_files"] or []:
        path = expand(name)
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
    return roots


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


def _sync(sync: dict, expand: Callable[[str], Path], problems: list[str]) -> SyncConfig:
    url = urlsplit(str(sync["broker"]))
    tls = url.scheme == "mqtts"
    files: dict[str, Path | None] = {}
    for key in ("password_file", "ca_file", "cert_file", "key_file"):
        files[key] = expand(str(sync[key])) if sync[key] else None
        if files[key] is not None and not files[key].is_file():  # type: ignore[union-attr]
            problems.append(f"[sync] {key} = {sync[key]!r}: {files[key]} does not exist")
    password = None
    if files["password_file"] is not None and files["password_file"].is_file():
        try:
            password = files["password_file"].read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"[sync] password_file: cannot read {files['password_file']}: {exc}")
    if url.password:
        problems.append(
            "[sync] broker: do not put a password in the URL (it shows in logs and status); "
            "use password_file"
        )
    if not tls and any(files[k] for k in ("ca_file", "cert_file", "key_file")):
        problems.append(
            "[sync] ca_file / cert_file / key_file: TLS files need an mqtts:// broker URL"
        )
    if bool(files["cert_file"]) != bool(files["key_file"]):
        problems.append(
            "[sync] cert_file and key_file: give both (a client certificate and its key)"
        )
    keepalive = int(sync["keepalive"])  # type: ignore[call-overload]
    if sync["keepalive"] and not 5 <= keepalive <= 65535:
        problems.append(f"[sync] keepalive = {keepalive}: must be between 5 s and 65535 s")
    return SyncConfig(
        enabled=sync["enabled"],  # type: ignore[arg-type]
        broker=str(sync["broker"]),
        host=url.hostname or "",
        port=url.port or (8883 if tls else 1883),
        tls=tls,
        topic_prefix=sync["topic_prefix"],  # type: ignore[arg-type]
        username=(sync["username"] or (unquote(url.username) if url.username else None)) or None,  # type: ignore[arg-type]
        password=password,
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        keepalive=keepalive,
        max_inflight=sync["max_inflight"],  # type: ignore[arg-type]
        max_records=sync["max_records"],  # type: ignore[arg-type]
        status_every=sync["status_every"],  # type: ignore[arg-type]
        request_retry=sync["request_retry"],  # type: ignore[arg-type]
        password_file=files["password_file"],
    )


def _hooks(hooks: dict, problems: list[str]) -> HooksConfig:
    command = str(hooks["on_verdict"] or "")
    try:
        argv = tuple(shlex.split(command))
    except ValueError as exc:
        problems.append(f"[hooks] on_verdict = {command!r}: must be a command line ({exc})")
        argv = ()
    if argv and shutil.which(argv[0]) is None:
        problems.append(
            f"[hooks] on_verdict = {command!r}: {argv[0]} is not an executable file "
            "(give its absolute path, and make it executable)"
        )
    return HooksConfig(on_verdict=argv, timeout=hooks["timeout"])  # type: ignore[arg-type]
