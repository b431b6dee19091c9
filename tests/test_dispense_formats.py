"""Grant sets and claim codes (cards/grant.py, cards/claim_code.py): the committed
vectors are reproduced bit for bit, and every refusal a box or the claim service relies
on happens."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cards import claim_code, grant, keys
from cards.claim_code import choose
from cards.digest import code_digest
from cards.grant import Grant, GrantError
from cards.verdict import Reason

VECTORS = Path(__file__).parent / "vectors"
KEYS = json.loads((VECTORS / "keys.json").read_text())
ROOT = bytes.fromhex(KEYS["root"]["seed_hex"])
ISSUER = bytes.fromhex(KEYS["issuer"]["seed_hex"])
CODE_KEY = bytes.fromhex(KEYS["code_key_hex"])
ROOTS = {KEYS["root"]["key_id"]: keys.public_of(ROOT)}
GRANTS = json.loads((VECTORS / "grants.json").read_text())
CLAIM = json.loads((VECTORS / "claim_code.json").read_text())
BOX = bytes.fromhex(GRANTS["box_seed_hex"])
NOW = 1_780_000_000


def delegation(merchants=("demo",), not_before=1_767_225_600, not_after=1_893_456_000):
    return keys.delegate(ROOT, keys.public_of(ISSUER), merchants, not_before, not_after)


def make(grants, *, seq=1, created_at=NOW, box="box-1", merchant="demo", box_seed=BOX, **kw):
    return grant.build(
        ISSUER, kw.pop("deleg", delegation()), merchant=merchant, box=box,
        box_public=keys.public_of(box_seed), seq=seq, created_at=created_at, grants=grants,
    )  # fmt: skip


LIVE = Grant("00000000000000aa", (1, 2), 3, NOW - 10, NOW + 1000)


def test_the_committed_grant_set_is_reproduced_and_opens():
    data = bytes.fromhex(GRANTS["file_hex"])
    assert (VECTORS / "grants.rdg").read_bytes() == data
    opened = grant.open_grants(data, ROOTS)
    assert opened.box == "box-1" and opened.box_key_id == GRANTS["box_key_id"]
    rebuilt = make(opened.grants, seq=opened.seq, created_at=opened.created_at)
    assert rebuilt == data
    assert [g.revoked for g in opened.grants] == [False, True]
    for bad in GRANTS["refused"]:
        with pytest.raises(GrantError):
            grant.open_grants(bytes.fromhex(bad["hex"]), ROOTS)


def test_the_committed_claim_code_is_reproduced_and_verifies():
    text = claim_code.mint(
        BOX, CLAIM["grant_id"], CLAIM["counter"], CLAIM["card_id"], CLAIM["claim_by"]
    )
    assert text == CLAIM["text"] and len(text) == claim_code.TEXT_LENGTH == 151
    assert code_digest(CODE_KEY, text).hex() == CLAIM["digest_hex"]
    code = claim_code.parse(text)
    assert (code.grant_id, code.counter, code.card_id) == ("0102030405060708", 1, 1)
    assert claim_code.verify(code, keys.public_of(BOX))
    assert not claim_code.verify(code, keys.public_of(ISSUER)), "another key must not verify"
    for bad in CLAIM["refused_by_parse"]:
        with pytest.raises(claim_code.ClaimCodeError):
            claim_code.parse(bad["text"])
    forged = claim_code.parse(CLAIM["bad_signature"]["text"])
    assert not claim_code.verify(forged, keys.public_of(BOX))


def test_a_grant_set_from_an_unknown_root_or_merchant_is_refused():
    other_root = keys.new_private_key()
    with pytest.raises(GrantError, match="not in this box's"):
        grant.open_grants(make((LIVE,)), {keys.key_id(keys.public_of(other_root)): b"x" * 32})
    with pytest.raises(GrantError, match="may not sign for merchant 'other'"):
        grant.open_grants(make((LIVE,), merchant="other"), ROOTS)


@pytest.mark.parametrize(
    "bad, message",
    [
        (replace(LIVE, id="XYZ"), "16 lower-case hex"),
        (replace(LIVE, quota=0), "quota must be"),
        (replace(LIVE, cards=()), "non-empty list"),
        (replace(LIVE, not_before=NOW + 5000), "window must be"),
    ],
)
def test_a_grant_with_a_bad_field_is_refused_when_built(bad, message):
    with pytest.raises(GrantError, match=message):
        make((bad,))


def test_a_grant_id_may_appear_once():
    with pytest.raises(GrantError, match="appears twice"):
        make((LIVE, replace(LIVE, quota=9)))


def test_a_box_refuses_a_set_for_another_box_or_key():
    opened = grant.open_grants(make((LIVE,)), ROOTS)
    mine = keys.key_id(keys.public_of(BOX))
    assert grant.refusal_for(opened, merchant="demo", box="box-1", box_key_id=mine) is None
    assert "box 'box-1'" in grant.refusal_for(opened, merchant="demo", box="b2", box_key_id=mine)
    assert "redeemd box-key" in grant.refusal_for(
        opened, merchant="demo", box="box-1", box_key_id="00" * 8
    )


def grants_of(*items: Grant):
    return grant.open_grants(make(items), ROOTS)


def test_choose_counts_up_to_the_quota_then_refuses():
    held = grants_of(LIVE)
    used: dict[str, int] = {}
    for expected in (1, 2, 3):
        choice = choose(held, used, 1, NOW)
        assert choice.reason is None and choice.counter == expected
        used[choice.grant.id] = choice.counter
    assert choose(held, used, 1, NOW).reason is Reason.QUOTA_EXHAUSTED


def test_choose_prefers_the_grant_that_ends_first_and_says_why_it_cannot():
    soon = replace(LIVE, id="00000000000000bb", not_after=NOW + 10)
    held = grants_of(LIVE, soon)
    assert choose(held, {}, 2, NOW).grant.id == soon.id
    assert choose(held, {}, 9, NOW).reason is Reason.NO_GRANT
    assert choose(None, {}, 1, NOW).reason is Reason.NO_GRANT
    assert choose(held, {}, 1, NOW + 5000).reason is Reason.GRANT_EXPIRED
    assert choose(held, {}, 1, NOW - 100).reason is Reason.GRANT_NOT_YET_VALID
    revoked = grants_of(replace(LIVE, revoked=True))
    assert choose(revoked, {}, 1, NOW).reason is Reason.GRANT_REVOKED


def test_the_claim_service_refuses_codes_outside_their_grant():
    held = grants_of(LIVE)

    def code(counter=1, card=1, claim_by=NOW + 100, grant_id=LIVE.id):
        return claim_code.parse(claim_code.mint(BOX, grant_id, counter, card, claim_by))

    assert claim_code.refusal(code(), held, NOW) is None
    assert claim_code.refusal(code(counter=4), held, NOW)[0] is Reason.QUOTA_EXHAUSTED
    assert claim_code.refusal(code(counter=0), held, NOW)[0] is Reason.QUOTA_EXHAUSTED
    assert claim_code.refusal(code(card=7), held, NOW)[0] is Reason.NO_GRANT
    assert claim_code.refusal(code(grant_id="00" * 8), held, NOW)[0] is Reason.NO_GRANT
    assert claim_code.refusal(code(), held, NOW + 101)[0] is Reason.EXPIRED
    late = code(claim_by=LIVE.not_after + claim_code.CLAIM_GRACE + 1)
    assert claim_code.refusal(late, held, NOW)[0] is Reason.GRANT_EXPIRED
    revoked = grants_of(replace(LIVE, revoked=True))
    assert claim_code.refusal(code(), revoked, NOW)[0] is Reason.GRANT_REVOKED


def test_claim_code_fields_out_of_range_are_refused():
    with pytest.raises(claim_code.ClaimCodeError, match="counter"):
        claim_code.mint(BOX, LIVE.id, 1 << 32, 1, NOW)
    with pytest.raises(claim_code.ClaimCodeError, match="16 hex"):
        claim_code.mint(BOX, "nothex", 1, 1, NOW)


def test_every_reason_is_documented_for_the_cashier_and_the_backend():
    documented = (Path(__file__).parent.parent / "docs" / "reasons.md").read_text()
    missing = [r.value for r in Reason if f"| `{r.value}` |" not in documented]
    assert not missing, f"docs/reasons.md has no row for {missing}"
