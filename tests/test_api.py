"""The local API on a real Unix socket, served by a real Engine on a real SQLite file."""

from __future__ import annotations

import os
import socket
import stat
import threading
import uuid
from pathlib import Path

import pytest
from api_helpers import Client, EngineLoop, wait_for
from conftest import CREATED, write_box

from daemon import api
from daemon.api import ApiServer, ApiUnavailable
from daemon.engine import Engine
from storage import ledger
from storage.database import open_database


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(loaded_box) -> Engine:
    write_box(loaded_box.dir, loaded_box.keyset, debounce="0s")
    conn = open_database(loaded_box.database)
    yield Engine(conn, loaded_box.config, clock=Clock(CREATED + 60))
    conn.close()


@pytest.fixture
def served(engine, tmp_path):
    with EngineLoop(engine, tmp_path / "api.sock") as loop:
        yield loop


@pytest.fixture
def client(served):
    c = Client(served.server.path)
    yield c
    c.close()


def rows(engine: Engine) -> list[ledger.Redemption]:
    return list(ledger.records(engine.conn))


def key() -> str:
    return str(uuid.uuid4())


# ---------------------------------------------------------------- commands


def test_status_names_the_box_and_its_cache(client):
    answer = client.request({"cmd": "status", "id": 7})
    assert answer["ok"] is True and answer["id"] == 7
    assert answer["status"]["box"] == "box-1"
    assert answer["status"]["cache_seq"] == 2


def test_check_gives_a_verdict_and_records_nothing(served, client):
    answer = client.request({"cmd": "check", "code": "DEMO-0001"})
    assert answer["verdict"]["verdict"] == "accepted"
    assert answer["verdict"]["action"] == "check"
    assert rows(served.engine) == []
    redeemed = client.request({"cmd": "redeem", "code": "DEMO-0001", "key": key()})
    assert redeemed["verdict"]["verdict"] == "accepted"


def test_redeem_retried_with_the_same_key_returns_the_original_verdict_and_redeems_once(
    served, client
):
    request = {"cmd": "redeem", "code": "DEMO-0002", "key": key(), "operator": "anna"}
    first = client.request(request)
    assert first["verdict"]["verdict"] == "accepted" and first["replayed"] is False
    again = client.request(request)
    assert again["replayed"] is True
    assert again["verdict"] == first["verdict"]
    # A new request (a new key) for the same code is a second redemption: refused.
    other = client.request({**request, "key": key()})
    assert other["verdict"]["reason"] == "already_redeemed"
    redeems = [r for r in rows(served.engine) if r.action == "redeem"]
    assert len(redeems) == 1 and redeems[0].operator == "anna"


def test_retry_after_a_reconnect_is_answered_from_the_database(served, engine, tmp_path):
    request = {"cmd": "redeem", "code": "GIFT-0001", "amount": 700, "key": key()}
    first = Client(served.server.path)
    answer = first.request(request)
    first.close()
    second = Client(served.server.path)
    again = second.request(request)
    second.close()
    assert again["replayed"] is True and again["verdict"] == answer["verdict"]
    assert again["verdict"]["balance"] == 4300


def test_a_key_reused_for_a_different_request_is_refused(client):
    k = key()
    assert client.request({"cmd": "redeem", "code": "DEMO-0003", "key": k})["ok"] is True
    answer = client.request({"cmd": "redeem", "code": "DEMO-0004", "key": k})
    assert answer["ok"] is False and answer["error"] == "key_reused"
    assert "DEMO-0004" not in answer["message"]


def test_redeem_without_a_key_is_a_bad_request(client):
    answer = client.request({"cmd": "redeem", "code": "DEMO-0001"})
    assert answer == {"ok": False, "error": "bad_request", "message": answer["message"]}
    assert '"key"' in answer["message"]


def test_idempotency_key_and_ledger_row_commit_together_or_not_at_all(served, engine, client):
    # Writing the key fails inside the redemption's transaction: nothing is kept, not
    # the ledger row, not the code's new state.
    engine.conn.execute(
        "CREATE TEMP TRIGGER refuse_key BEFORE INSERT ON api_requests "
        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
    )
    request = {"cmd": "redeem", "code": "DEMO-0005", "key": key()}
    failed = client.request(request)
    assert failed["verdict"]["reason"] == "storage_error"
    assert rows(engine) == []
    engine.conn.execute("DROP TRIGGER refuse_key")
    # The retry redeems (the code was not consumed) and stores its key with its row.
    retried = client.request(request)
    assert retried["verdict"]["verdict"] == "accepted" and retried["replayed"] is False
    seq = retried["verdict"]["box_seq"]
    assert engine.conn.execute("SELECT seq FROM api_requests").fetchall() == [(seq,)]
    assert [r.seq for r in rows(engine)] == [seq]


def test_reverse_within_the_window_restores_the_code(served, client):
    redeemed = client.request({"cmd": "redeem", "code": "DEMO-0006", "key": key()})
    record_id = redeemed["verdict"]["record_id"]
    request = {"cmd": "reverse", "record_id": record_id, "key": key(), "operator": "bo"}
    reversed_ = client.request(request)
    assert reversed_["verdict"]["verdict"] == "accepted"
    assert reversed_["verdict"]["action"] == "reverse"
    assert client.request(request)["replayed"] is True
    # Without a key, a second reversal is simply refused.
    twice = client.request({"cmd": "reverse", "record_id": record_id})
    assert twice["verdict"]["reason"] == "already_reversed"
    again = client.request({"cmd": "redeem", "code": "DEMO-0006", "key": key()})
    assert again["verdict"]["verdict"] == "accepted"


def test_manual_code_is_a_scan_from_source_manual_seen_by_subscribers(served, client):
    watcher = Client(served.server.path)
    assert watcher.request({"cmd": "subscribe"}) == {"ok": True, "subscribed": True}
    answer = client.request({"cmd": "manual", "code": "DEMO-0007"})
    assert answer["verdict"]["verdict"] == "accepted"
    assert answer["verdict"]["source"] == "manual"
    event = watcher.event()
    assert event["event"] == "verdict" and event["record_id"] == answer["verdict"]["record_id"]
    assert rows(served.engine)[-1].source == "manual"
    watcher.close()


def test_payment_code_goes_to_subscribers_only_and_is_never_stored(served, client):
    assert client.request({"cmd": "subscribe"})["ok"]
    served.scan("134567890123456789")
    event = client.event()
    # The POS app charges it at the payment provider, so the event carries the number.
    assert event == {
        "event": "payment", "scheme": "wechat", "source": "front", "code": "134567890123456789",
    }  # fmt: skip
    assert rows(served.engine) == []
    database = served.engine.conn.execute("PRAGMA database_list").fetchone()[2]
    for path in Path(database).parent.glob(Path(database).name + "*"):
        assert b"134567890123456789" not in path.read_bytes(), path


def test_no_plaintext_code_in_any_event_or_answer(served, client):
    client.request({"cmd": "subscribe"})
    served.scan("DEMO-0008")
    served.scan("GIFT-0001")
    served.scan("NOT-A-CODE")
    client.request({"cmd": "check", "code": "LUNCH-0001"})
    client.request({"cmd": "manual", "code": "MEMBER-0001"})
    client.request({"cmd": "redeem", "code": "DEMO-0009", "key": key()})
    client.request({"cmd": "status"})  # every event published before it is in the buffer
    text = b"\n".join(client.lines).decode()
    assert len(client.lines) >= 9
    for code in ("DEMO-0008", "GIFT-0001", "NOT-A-CODE", "LUNCH-0001", "MEMBER-0001", "DEMO-0009"):
        assert code not in text


# ---------------------------------------------------------------- two-phase


def test_two_phase_scan_is_checked_and_redeems_nothing_until_confirmed(served, engine, client):
    client.request({"cmd": "subscribe"})
    served.scan("GIFT-0001")
    checked = client.event()
    assert checked["event"] == "checked"
    assert checked["action"] == "check" and checked["balance"] == 5000
    check_id = checked["check_id"]
    # Checked, recorded as a check, nothing taken from the card.
    assert [r.action for r in rows(engine)] == ["check"]
    assert client.request({"cmd": "check", "code": "GIFT-0001"})["verdict"]["balance"] == 5000

    confirm = {"cmd": "redeem", "check_id": check_id, "amount": 1250, "key": key()}
    answer = client.request(confirm)
    assert answer["verdict"]["verdict"] == "accepted"
    assert answer["verdict"]["balance"] == 3750 and answer["verdict"]["amount"] == 1250
    assert answer["verdict"]["source"] == "front"  # the scanner that read it
    assert client.event()["record_id"] == answer["verdict"]["record_id"]
    # The same check cannot be confirmed twice under another key.
    twice = client.request({**confirm, "key": key()})
    assert twice["ok"] is False and twice["error"] == "unknown_check"
    assert [r.action for r in rows(engine)] == ["check", "redeem"]


def test_two_phase_check_without_confirmation_expires(served, engine, client):
    clock = Clock(0.0)
    served.commands.clock = clock
    client.request({"cmd": "subscribe"})
    served.scan("GIFT-0001")
    check_id = client.event()["check_id"]
    clock.now = served.commands.confirm_within + 1
    answer = client.request({"cmd": "redeem", "check_id": check_id, "amount": 100, "key": key()})
    assert answer["error"] == "unknown_check"
    assert [r.action for r in rows(engine)] == ["check"]


def test_two_phase_redeem_without_amount_is_amount_required(served, client):
    client.request({"cmd": "subscribe"})
    served.scan("GIFT-0001")
    check_id = client.event()["check_id"]
    answer = client.request({"cmd": "redeem", "check_id": check_id, "key": key()})
    assert answer["verdict"]["reason"] == "amount_required"
    # Refused, so the check is still waiting for a proper confirmation.
    ok = client.request({"cmd": "redeem", "check_id": check_id, "amount": 10, "key": key()})
    assert ok["verdict"]["verdict"] == "accepted"


# ---------------------------------------------------------------- robustness


def test_malformed_json_is_answered_and_the_connection_keeps_working(client):
    client.send(b"{not json\n")
    assert client.answer()["error"] == "bad_json"
    client.send(b"[1, 2]\n")
    assert client.answer()["error"] == "bad_request"
    client.send(b'{"no": "cmd"}\n')
    assert client.answer()["error"] == "bad_request"
    client.send(b"\xff\xfe\n")
    assert client.answer()["error"] == "bad_json"
    assert client.request({"cmd": "status"})["ok"] is True


def test_a_code_with_a_lone_surrogate_is_malformed_not_an_internal_error(served, client):
    # JSON may escape half of a UTF-16 pair ("\ud800"); such a code has no UTF-8 bytes.
    requests = [
        {"cmd": "manual", "code": "\ud800"},
        {"cmd": "check", "code": "DEMO-\udfff"},
        {"cmd": "redeem", "code": "\ud800", "key": key()},
    ]
    for request in requests:
        answer = client.request(request)
        assert answer["ok"] is True, (request, answer)
        verdict = answer["verdict"]
        assert (verdict["verdict"], verdict["reason"]) == ("rejected", "malformed"), request
    # The manual entry and the redemption are recorded like any refused read.
    assert [(r.action, r.reason, r.source) for r in rows(served.engine)] == [
        ("reject", "malformed", "manual"),
        ("reject", "malformed", "api"),
    ]


def test_a_request_id_that_is_not_utf8_is_echoed_as_its_json_escape(client):
    client.send(b'{"cmd": "status", "id": "\\udfff-1"}\n')
    answer = client.answer()
    assert answer["ok"] is True and answer["id"] == "\udfff-1"
    assert b'"id":"\\udfff-1"' in client.lines[-1]


def test_nesting_deeper_than_the_limit_is_bad_json(client):
    deep = {"cmd": "status", "id": [[[]]]}
    for _ in range(api.MAX_DEPTH):
        deep["id"] = [deep["id"]]
    client.send(deep)
    answer = client.answer()
    assert answer["error"] == "bad_json" and "nested too deeply" in answer["message"]
    client.send(b"[" * 30_000 + b"]" * 30_000 + b"\n")
    assert client.answer()["error"] == "bad_json"
    client.send(b'{"cmd": "status", "id": NaN}\n')
    assert client.answer()["error"] == "bad_json"
    assert client.request({"cmd": "status", "id": [[1]]})["id"] == [[1]]


def test_unknown_command_is_named_with_the_known_ones(client):
    answer = client.request({"cmd": "launch", "id": "x"})
    assert answer["ok"] is False and answer["error"] == "unknown_command" and answer["id"] == "x"
    assert "redeem" in answer["message"]


def test_bad_field_types_are_bad_requests(client):
    for request in (
        {"cmd": "check"},
        {"cmd": "check", "code": 12},
        {"cmd": "redeem", "code": "DEMO-0001", "key": key(), "amount": -5},
        {"cmd": "redeem", "code": "DEMO-0001", "key": key(), "amount": True},
        {"cmd": "redeem", "code": "DEMO-0001", "check_id": "x", "key": key()},
        {"cmd": "redeem", "code": "DEMO-0001", "key": "k" * 500},
        {"cmd": "reverse"},
    ):
        answer = client.request(request)
        assert answer["ok"] is False and answer["error"] == "bad_request", (request, answer)


def test_huge_line_is_refused_and_that_client_alone_is_dropped(served, client):
    other = Client(served.server.path)
    client.send(b'{"cmd": "check", "code": "' + b"A" * (api.MAX_LINE + 10))
    answer = client.answer()
    assert answer["error"] == "line_too_long"
    assert client.closed_by_server()
    assert other.request({"cmd": "status"})["ok"] is True
    other.close()


def test_client_that_never_reads_is_dropped_alone_while_others_get_every_event(served):
    sleeper = Client(served.server.path)
    sleeper.request({"cmd": "subscribe"})
    reader = Client(served.server.path)
    reader.request({"cmd": "subscribe"})
    padding = "x" * 600
    # Events at the pace a reader keeps up with; the sleeper's share piles up past the
    # socket buffers and MAX_OUTPUT (about 2000 of these events).
    for i in range(20_000):
        served.server.publish({"event": "verdict", "n": i, "detail": padding})
        assert reader.event()["n"] == i
        if served.server.clients == 1:
            break
    assert served.server.clients == 1, "the sleeping client was never dropped"
    assert i * len(padding) > api.MAX_OUTPUT
    assert sleeper.closed_by_server()
    served.server.publish({"event": "verdict", "n": "after"})
    assert reader.event()["n"] == "after"
    assert reader.request({"cmd": "status"})["ok"] is True
    reader.close()


def test_fifty_clients_at_once_each_get_their_answer_and_every_event(served):
    clients = [Client(served.server.path) for _ in range(50)]
    for i, c in enumerate(clients):
        c.send({"cmd": "subscribe", "id": i})
    for i, c in enumerate(clients):
        assert c.answer() == {"id": i, "ok": True, "subscribed": True}
    for i, c in enumerate(clients):  # all in flight together
        c.send({"cmd": "check", "code": f"DEMO-{i % 10 + 1:04d}", "id": i})
    for i, c in enumerate(clients):
        answer = c.answer()
        assert answer["id"] == i and answer["verdict"]["verdict"] == "accepted"
    served.scan("DEMO-0010")
    for c in clients:
        assert c.event()["digest_prefix"]
        c.close()
    wait_for(lambda: served.server.clients == 0, "closed clients to be forgotten")


def test_client_that_half_closes_still_gets_its_answers(served):
    c = Client(served.server.path)
    c.send(b'{"cmd": "status", "id": 1}\n{"cmd": "check", "code": "DEMO-0001", "id": 2}\n')
    c.sock.shutdown(socket.SHUT_WR)
    assert c.answer()["id"] == 1
    assert c.answer()["id"] == 2
    assert c.closed_by_server()


class BuggyServer(ApiServer):
    """A server with a bug on one line, as a stand-in for whatever bug is left: the
    transport must contain it (issue 16.5)."""

    def _line(self, client, line: bytes) -> None:
        if line == b"boom":
            raise RuntimeError("a bug while handling one line")
        super()._line(client, line)


def test_a_bug_on_one_line_answers_that_client_and_everyone_keeps_being_served(tmp_path):
    def submit(request: dict) -> dict:
        if request["cmd"] == "unencodable":  # a response that cannot be written as JSON
            return {"ok": True, "value": object()}
        return {"ok": True, "echo": request["cmd"]}

    server = BuggyServer(tmp_path / "api.sock", submit)
    server.start()
    try:
        victim, bystander = Client(server.path), Client(server.path)
        assert bystander.request({"cmd": "subscribe"})["ok"] is True
        victim.send(b"boom\n")
        assert victim.answer()["error"] == "internal_error"
        assert victim.request({"cmd": "unencodable", "id": 3}) == {
            "ok": False, "error": "internal_error", "message": "the request failed; see the log",
        }  # fmt: skip
        assert victim.request({"cmd": "after"})["echo"] == "after"
        assert bystander.request({"cmd": "still"})["echo"] == "still"
        server.publish({"event": "verdict", "n": 1})
        assert bystander.event()["n"] == 1
        assert Client(server.path).request({"cmd": "new"})["echo"] == "new"
        assert [t.name for t in server._threads if t.is_alive()] == ["api-io", "api-requests"]
    finally:
        assert server.stop()


# ---------------------------------------------------------------- lifecycle


def test_stop_closes_clients_removes_the_socket_and_joins_its_threads(engine, tmp_path):
    path = tmp_path / "api.sock"
    loop = EngineLoop(engine, path)
    with loop:
        c = Client(path)
        c.request({"cmd": "subscribe"})
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert c.closed_by_server()
    assert not path.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("api-")]


def test_a_second_server_on_the_same_path_is_refused_and_the_first_keeps_serving(served, client):
    second = ApiServer(served.server.path, lambda r: r)
    with pytest.raises(ApiUnavailable, match="another redeemd"):
        second.start()
    assert second.stop()
    assert client.request({"cmd": "status"})["ok"] is True


def test_a_socket_left_by_a_crash_is_replaced(engine, tmp_path):
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what kill -9 leaves
    with EngineLoop(engine, path):
        assert Client(path).request({"cmd": "status"})["ok"] is True


@pytest.mark.parametrize("where", ["parent_is_a_file", "path_is_a_file"])
def test_unusable_socket_path_says_what_to_do(tmp_path, where):
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "api.sock" if where == "parent_is_a_file" else tmp_path / "file"
    server = ApiServer(path, lambda r: r)
    with pytest.raises(ApiUnavailable, match=r"local API disabled: .*\[api\]"):
        server.start()
    assert server.stop()
    assert (tmp_path / "file").read_text() == ""


def test_publish_never_blocks_even_without_a_server(tmp_path):
    server = ApiServer(tmp_path / "api.sock", lambda r: r)
    server.publish({"event": "verdict"})  # not started: dropped, no error
    assert os.listdir(tmp_path) == []


def test_every_command_and_error_code_is_documented(engine):
    from conftest import ROOT

    from daemon.api_commands import Commands

    text = (ROOT / "docs" / "local-api.md").read_text()
    for code in api.Error:
        assert f"| `{code.value}` |" in text, f"docs/local-api.md does not explain {code.value}"
    for cmd in ["subscribe", *Commands(engine, lambda e: None)._handlers]:
        assert f"### `{cmd}`" in text, f"docs/local-api.md does not describe {cmd}"
    assert "examples/pos_client.py" in text


def test_idempotency_keys_older_than_30_days_are_forgotten_and_newer_kept(loaded_box):
    from storage import api_requests
    from storage.database import open_database

    conn = open_database(loaded_box.database)
    try:
        now_ms = 1_800_000_000_000
        with conn:
            for seq, age_days in ((1, 31), (2, 29)):
                conn.execute(
                    "INSERT INTO ledger(seq, id, at_ms, box, merchant, store, action, verdict, "
                    "source, cache_seq) VALUES (?, randomblob(16), ?, 'b', 'demo', 's', "
                    "'redeem', 'accepted', 'api', 2)",
                    (seq, now_ms - age_days * 86_400_000),
                )
                api_requests.record(
                    conn, api_requests.RequestKey(f"key-{seq}", "f"), seq, {"verdict": "ok"}
                )
        assert api_requests.prune(conn, now_ms) == 1
        assert api_requests.lookup(conn, "key-1") is None
        assert api_requests.lookup(conn, "key-2") is not None
    finally:
        conn.close()
