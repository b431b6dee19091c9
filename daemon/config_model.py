"""The configuration file's model: every section, key, type and default, written once.

Each class is one `[section]` of /etc/redeemd/config.toml; a field is a key, its type
says what is allowed (drivers/settings.py holds the value types and what each
`[[scanner]]` type takes) and its default is the one the box runs with.
config.example.toml shows the same keys with the same defaults, and a test holds them
together. The objects are immutable and are what the rest of the daemon reads
(`config.scan.debounce`, `config.sync.port`); daemon/config.py loads the file, turns
pydantic's errors into the technician's messages and reads the files the model names
(keys, the MQTT password).

Paths may use {state_dir}, {config_dir} and {runtime_dir}; they are expanded while the
model is validated, from `Places` passed as the validation context.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, PlainValidator, ValidationInfo

from cards import keys
from drivers.settings import (
    SCANNER_SETTINGS,
    Boolean,
    Duration,
    Identifier,
    PositiveInt,
    PrinterSettings,
    ScannerSettings,
    Settings,
    check_duration,
    check_string,
    check_string_list,
)


@dataclass(frozen=True)
class Places:
    """What {config_dir}, {state_dir} and {runtime_dir} in a path stand for."""

    config_dir: str
    state_dir: str
    runtime_dir: str

    @classmethod
    def from_environment(cls) -> Places:
        """systemd's ConfigurationDirectory=, StateDirectory= and RuntimeDirectory= set
        these variables (the quick start sets them too); else the FHS places."""

        def first(name: str, default: str) -> str:
            return os.environ.get(name, "").split(":")[0] or default

        return cls(
            config_dir=first("CONFIGURATION_DIRECTORY", "/etc/redeemd"),
            state_dir=first("STATE_DIRECTORY", "/var/lib/redeemd"),
            runtime_dir=first("RUNTIME_DIRECTORY", "/run/redeemd"),
        )

    def expand(self, text: str) -> Path:
        for name in ("state_dir", "config_dir", "runtime_dir"):
            text = text.replace("{" + name + "}", getattr(self, name))
        return Path(text).expanduser()


def places_of(info: ValidationInfo) -> Places:
    """The Places this validation runs with (daemon/config.py passes them)."""
    context = info.context or {}
    return context.get("places") or Places.from_environment()


def _path(value: object, info: ValidationInfo) -> Path:
    return places_of(info).expand(check_string(value))


def _optional_path(value: object, info: ValidationInfo) -> Path | None:
    if not isinstance(value, str):
        raise ValueError('a path as a string ("" for none)')
    return places_of(info).expand(value.strip()) if value.strip() else None


def _path_list(value: object, info: ValidationInfo) -> tuple[Path, ...]:
    return tuple(places_of(info).expand(text) for text in check_string_list(value))


def _state_dir(value: object, info: ValidationInfo) -> Path:
    return Path(places_of(info).state_dir) if value is None else _path(value, info)


def _database(value: object, info: ValidationInfo) -> Path:
    # {state_dir} is this section's state_dir, which is validated first.
    places = places_of(info)
    state_dir = (info.data or {}).get("state_dir") or places.state_dir
    return replace(places, state_dir=str(state_dir)).expand(check_string(value))


def _timezone(value: object) -> str:
    if value == "local":
        return "local"
    try:
        ZoneInfo(check_string(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError('"local" or an IANA zone such as "Asia/Shanghai"') from None
    return value  # type: ignore[return-value]


def _optional(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError('a string ("" for none)')
    return value.strip()


def _broker_url(value: object) -> str:
    parts = urlsplit(check_string(value).strip())
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


def _keepalive(value: object) -> int:
    seconds = int(check_duration(value))
    if seconds and not 5 <= seconds <= 65535:
        raise ValueError('a duration between "5s" and 65535 s (0 for none)')
    return seconds


def _root_keys(value: object) -> dict[str, bytes]:
    roots: dict[str, bytes] = {}
    for text in check_string_list(value):
        try:
            key = keys.unb64(text, "root key", 32)
        except keys.TrustError as exc:
            raise ValueError(
                f"base64 of a 32-byte Ed25519 key each; {text!r}: {exc} (copy root.pub's "
                "one line from the backend)"
            ) from None
        roots[keys.key_id(key)] = key
    return roots


def _command(value: object) -> tuple[str, ...]:
    command = _optional(value)
    try:
        return tuple(shlex.split(command))
    except ValueError as exc:
        raise ValueError(f"a command line ({exc})") from None


Path_ = Annotated[Path, PlainValidator(_path)]
"""A path; {state_dir}, {config_dir} and {runtime_dir} are expanded."""
OptionalPath = Annotated[Path | None, PlainValidator(_optional_path)]
"""A path, or "" for none."""
PathList = Annotated[tuple[Path, ...], PlainValidator(_path_list)]
OptionalText = Annotated[str, PlainValidator(_optional)]
"""A string, stripped; "" for none."""


class Section(Settings):
    """A [section]: typed, immutable; keys it does not name are refused. `default(key)`
    gives a key's default to code that takes it as a parameter."""


def loaded(default: Any) -> Any:
    """A field that is not a key of the file: daemon/config.py fills it from a file
    the section names (a key, a password). It is never shown or dumped."""
    return Field(default, repr=False, exclude=True, json_schema_extra={"loaded": True})


def file_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """The keys a technician may write in this section, in the model's order."""
    return tuple(
        name
        for name, field in model.model_fields.items()
        if not (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("loaded"))
    )


class Box(Section):
    id: Identifier = "demo-box"
    """This box's id: unique in the fleet; in MQTT topics and every ledger record."""
    merchant: Identifier = "demo"
    store: Identifier = "demo-store"
    state_dir: Annotated[Path, PlainValidator(_state_dir)] = Field(None)
    """$STATE_DIRECTORY (systemd's StateDirectory=), else /var/lib/redeemd."""
    database: Annotated[Path, PlainValidator(_database)] = Field("{state_dir}/redeemd.db")
    timezone: Annotated[str, PlainValidator(_timezone)] = "local"


class Trust(Section):
    root_keys: Annotated[dict[str, bytes], PlainValidator(_root_keys)] = Field([], repr=False)
    """Root public keys by key id: those written inline (base64) and, once loaded,
    those read from root_key_files."""
    # Root's, read-only to the daemon: never under state_dir, which the daemon owns
    # and could swap trust anchors in (issue 17.4; docs/decisions.md).
    root_key_files: PathList = Field(["{config_dir}/keys/root.pub"])
    code_key_file: Path_ = Field("{config_dir}/keys/code.key")
    max_staleness: Duration = Field("7d")
    stale_policy: Literal["accept", "reject"] = "accept"
    max_batch_bytes: PositiveInt = 512 << 20
    code_key: bytes = loaded(b"")
    """The merchant's code key, read from code_key_file."""


class Scan(Section):
    debounce: Duration = Field("2s")
    max_code_length: PositiveInt = 512
    payment_codes: Literal["pass", "reject"] = "pass"


class Api(Section):
    """The local Unix socket for the POS application (docs/local-api.md)."""

    enabled: Boolean = True
    socket: Path_ = Field("{runtime_dir}/api.sock")
    group: OptionalText = ""
    """Group that may connect; "" keeps the daemon's own (redeemd under the shipped unit)."""
    mode: Annotated[int, PlainValidator(_file_mode)] = Field("0660")
    confirm_within: Duration = Field("10m")
    """How long a two-phase `checked` scan may be confirmed with `redeem`."""


def _username(value: object, info: ValidationInfo) -> str | None:
    # "" falls back to a user in the broker URL (mqtt://user@host), else none.
    url = urlsplit(str((info.data or {}).get("broker", "")))
    return _optional(value) or (unquote(url.username) if url.username else None) or None


class Sync(Section):
    """The MQTT link to the backend (docs/protocol.md section 16)."""

    enabled: Boolean = False
    broker: Annotated[str, PlainValidator(_broker_url)] = "mqtt://127.0.0.1:1883"
    topic_prefix: Annotated[str, PlainValidator(_topic_prefix)] = "redeemd/v1"
    username: Annotated[str | None, PlainValidator(_username)] = ""
    password_file: OptionalPath = Field("")
    ca_file: OptionalPath = Field("")
    cert_file: OptionalPath = Field("")
    key_file: OptionalPath = Field("")
    keepalive: Annotated[int, PlainValidator(_keepalive)] = Field("60s")
    max_inflight: PositiveInt = 8
    max_records: PositiveInt = 200
    status_every: Duration = Field("60s")
    request_retry: Duration = Field("30s")
    password: str | None = loaded(None)
    """Read from password_file."""

    @property
    def tls(self) -> bool:
        return urlsplit(self.broker).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.broker).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.broker).port or (8883 if self.tls else 1883)

    def conflicts(self) -> list[str]:
        """Keys that are each fine but do not go together, each with what to do."""
        found = []
        if urlsplit(self.broker).password:
            found.append(
                "broker: do not put a password in the URL (it shows in logs and status); "
                "use password_file"
            )
        if not self.tls and (self.ca_file or self.cert_file or self.key_file):
            found.append("ca_file / cert_file / key_file: TLS files need an mqtts:// broker URL")
        if bool(self.cert_file) != bool(self.key_file):
            found.append("cert_file and key_file: give both (a client certificate and its key)")
        return found


class Hooks(Section):
    """A command run after each verdict, for a light or a relay."""

    on_verdict: Annotated[tuple[str, ...], PlainValidator(_command)] = Field("")
    """The command line, split as a shell would (no shell runs it)."""
    timeout: Duration = Field("5s")


MAX_CARD_ID = 0xFFFFFFFF
MAX_DISPENSE_COUNT = 10
"""Claim codes one request or rule may dispense at once (the local API's `count`)."""


class DispenseRule(Settings):
    """One [[dispense.rules]] table: after an accepted redemption of `after_card`,
    dispense `count` claim codes for `card` ("come back next week")."""

    after_card: PositiveInt
    card: PositiveInt
    count: PositiveInt = 1


def _claim_url(value: object) -> str:
    text = check_string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname or " " in text:
        raise ValueError(
            'an http(s) URL the claim code is appended to, such as "https://claim.example.com/c/"'
        )
    return text


def _rules(value: object) -> tuple[DispenseRule, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError("[[dispense.rules]] tables")
    rules = []
    for index, table in enumerate(value, start=1):
        where = f"[[dispense.rules]] #{index}"
        if isinstance(table, DispenseRule):
            rules.append(table)
            continue
        if not isinstance(table, dict):
            raise ValueError(f"tables ({where} is not one)")
        unknown = sorted(set(table) - set(DispenseRule.model_fields))
        if unknown:
            raise ValueError(
                f"tables of after_card, card and count ({where} has {', '.join(unknown)})"
            )
        for key in ("after_card", "card", "count"):
            got = table.get(key, 1 if key == "count" else None)
            limit = MAX_DISPENSE_COUNT if key == "count" else MAX_CARD_ID
            if isinstance(got, bool) or not isinstance(got, int) or not 1 <= got <= limit:
                what = "a count 1.." if key == "count" else "a card id 1.."
                raise ValueError(f"tables whose {key} is {what}{limit} ({where}: {key} = {got!r})")
        rules.append(DispenseRule.model_validate(table))
    return tuple(rules)


class Dispense(Section):
    """Dispensing claim codes (issue 12; docs/operations.md, "Dispensing")."""

    claim_url: Annotated[str, PlainValidator(_claim_url)] = "https://claim.invalid/c/"
    """The claim service's address; the claim code is appended to it. The default is a
    placeholder that never resolves: set the merchant's claim service."""
    claim_days: PositiveInt = 30
    """How long a customer has to claim a code, capped by the grant's end (plus 7 days)."""
    rules: Annotated[tuple[DispenseRule, ...], PlainValidator(_rules)] = Field([])
    """[[dispense.rules]] tables: after_card, card, count."""

    def after(self, card_id: int | None) -> tuple[DispenseRule, ...]:
        """The rules an accepted redemption of `card_id` triggers."""
        return tuple(rule for rule in self.rules if rule.after_card == card_id)


SECTIONS: dict[str, type[Section]] = {
    "box": Box,
    "trust": Trust,
    "scan": Scan,
    "api": Api,
    "sync": Sync,
    "hooks": Hooks,
    "dispense": Dispense,
}

OPTIONAL_SECTIONS: dict[str, type[Settings]] = {"printer": PrinterSettings}
"""Sections that are None unless the file has the table: a [printer] needs its kind and
device, and a box without one prints nothing (drivers/settings.py PrinterSettings)."""


class ScannerBlock(Section):
    """The two keys every [[scanner]] block has; the rest depend on `type`."""

    type: Literal[tuple(SCANNER_SETTINGS)]  # type: ignore[valid-type]
    name: Identifier


@dataclass(frozen=True)
class ScannerConfig:
    """One [[scanner]] block: its type and name, and the settings its driver takes
    (drivers/settings.py), validated and with defaults filled in."""

    type: str
    name: str
    settings: ScannerSettings
