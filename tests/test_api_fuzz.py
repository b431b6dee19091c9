"""Fuzzing the local API of the real `redeemd run` process: no request line, however
malformed, may stop the API or be answered `internal_error` (a bug).

Bounded so that it runs in CI in a few seconds; hypothesis keeps any failing example
in .hypothesis/ and replays it first on the next run.
"""

from __future__ import annotations

import json

from api_helpers import Client
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_api_service import Daemon, api_box

from daemon.api import MAX_LINE, Error

COMMANDS = ["subscribe", "status", "check", "redeem", "reverse", "manual"]
FIELDS = ["id", "code", "key", "check_id", "amount", "uses", "operator", "record_id"]

# Any text JSON can carry, lone surrogates ("\ud800") and control characters included.
text = st.text(st.characters(exclude_categories=()), max_size=40)
codes = st.one_of(
    text, st.sampled_from(["DEMO-0004", "GIFT-0001", "LUNCH-0001", "MEMBER-0001", "\ud800"])
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), text, codes,
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
requests = st.dictionaries(
    st.sampled_from(FIELDS) | text, st.one_of(codes, codes, values), max_size=6
).flatmap(
    lambda fields: st.one_of(st.sampled_from(COMMANDS), values).map(
        lambda cmd: {"cmd": cmd, **fields}
    )
)
lines = st.one_of(
    requests.map(lambda r: json.dumps(r).encode()),
    requests.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


def test_no_request_line_stops_the_api_or_is_an_internal_error(loaded_box, tmp_path):
    socket = tmp_path / "run" / "api.sock"
    daemon = Daemon(api_box(loaded_box, socket))
    pos = daemon.connect(socket)
    codes_known = {e.value for e in Error} - {Error.INTERNAL_ERROR.value}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(lines)
    @example(b"[" * 30_000 + b"]" * 30_000)  # issue 16.5: RecursionError stopped the API
    @example(rb'{"cmd": "manual", "code": "\ud800"}')  # issue 16.6
    @example(rb'{"cmd": "subscribe", "id": "\udfff"}')  # an id that is not UTF-8
    def one_line(line: bytes) -> None:
        line = line.replace(b"\n", b" ")
        if not line.strip() or len(line) > MAX_LINE:
            return  # a blank line gets no answer; a long one is another test's
        pos.send(line + b"\n")
        answer = pos.answer()
        assert isinstance(answer.get("ok"), bool), answer
        if not answer["ok"]:
            assert answer["error"] in codes_known, (line, answer)
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            return
        if isinstance(request, dict) and "id" in request and answer.get("error") != "bad_json":
            assert answer["id"] == request["id"]

    one_line()
    # Still serving: this connection, a new one, and the scanner.
    assert pos.request({"cmd": "status"})["ok"] is True
    other = Client(socket)
    assert other.request({"cmd": "subscribe"})["ok"] is True
    daemon.scan("DEMO-0001")
    assert other.event()["digest_prefix"]
    pos.close()
    other.close()
    code, _, stderr = daemon.finish()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
