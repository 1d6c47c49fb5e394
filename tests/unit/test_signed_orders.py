"""Signed orders (protocol/orders.py): the agent acts only on an operation or a cancel
that the server signed for this computer, this generation and this operation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskfleet.protocol.exchange import REFUSAL_REASONS, canonical
from taskfleet.protocol.orders import (
    CANCEL,
    OPERATION,
    Refusal,
    cancel_body,
    open_order,
    operation_body,
)
from taskfleet.protocol.signing import Signer, Verifier, new_signing_seed

SERVER = Signer(new_signing_seed())
VERIFIER = Verifier(SERVER.public_key_hex)
HERE = {"computer": 17, "generation": 3}


def _operation(**kw: Any) -> str:
    fields: dict[str, Any] = {
        **HERE,
        "op": 121,
        "type": "execute-script",
        "params": {"script": "echo hi"},
        "policy": {},
        "timeout": 60.0,
        "issued_at": 1795300000.0,
    }
    fields.update(kw)
    return operation_body(**fields)


def _open(body: str, sig: str | None = None, *, kind: str = CANCEL, op: int = 121) -> Any:
    return open_order(
        VERIFIER, body, SERVER.sign(body) if sig is None else sig, kind=kind, op=op, **HERE
    )


def test_a_cancel_body_is_small_canonical_and_names_whom_and_what() -> None:
    body = cancel_body(computer=17, generation=3, op=121)
    assert body == '{"computer":17,"generation":3,"op":121,"order":"cancel"}'
    assert len(body) + 128 < 200  # with its hex signature: a cancel stays small


def test_genuine_orders_open_to_their_payload() -> None:
    assert _open(cancel_body(op=121, **HERE))["order"] == "cancel"
    payload = _open(_operation(), kind=OPERATION)
    assert payload["params"] == {"script": "echo hi"} and "order" not in payload


def _refused(reason: str, **kw: Any) -> str:
    with pytest.raises(Refusal) as caught:
        _open(**kw)
    assert caught.value.reason == reason and reason in REFUSAL_REASONS
    return caught.value.text


def test_an_unsigned_order_is_refused() -> None:
    assert "not signed" in _refused("bad-signature", body=cancel_body(op=121, **HERE), sig="")
    assert "not signed" in _refused("bad-signature", body="", sig="ab" * 64)


def test_an_order_signed_with_another_key_is_refused() -> None:
    body = cancel_body(op=121, **HERE)
    forged = Signer(new_signing_seed()).sign(body)
    assert "does not verify" in _refused("bad-signature", body=body, sig=forged)
    assert "does not verify" in _refused("bad-signature", body=body, sig="zz")


def test_an_altered_operation_is_refused() -> None:
    body = _operation()
    sig = SERVER.sign(body)
    altered = body.replace("echo hi", "rm -rf /")
    _refused("bad-signature", body=altered, sig=sig, kind=OPERATION)


def test_an_order_for_another_computer_or_generation_is_refused() -> None:
    text = _refused("wrong-computer", body=cancel_body(computer=18, generation=3, op=121))
    assert "computer 18" in text
    _refused("wrong-computer", body=_operation(computer=18), kind=OPERATION)
    text = _refused("wrong-generation", body=cancel_body(computer=17, generation=2, op=121))
    assert "generation 2" in text and "at 3" in text
    _refused("wrong-generation", body=_operation(generation=4), kind=OPERATION)


def test_a_signed_order_cannot_pass_for_another_operation_or_the_other_kind() -> None:
    assert "operation 122" in _refused("bad-signature", body=cancel_body(op=121, **HERE), op=122)
    # A genuine operation presented as a cancel of it, and the other way round.
    assert "operation sent as a cancel" in _refused("bad-signature", body=_operation())
    _refused("bad-signature", body=cancel_body(op=121, **HERE), kind=OPERATION)


@pytest.mark.parametrize("text", ["[1, 2]", "not json", '"cancel"'])
def test_signed_text_that_is_no_order_is_refused_as_malformed(text: str) -> None:
    _refused("malformed", body=text)


def test_the_payload_is_exactly_what_was_signed() -> None:
    body = cancel_body(op=121, **HERE)
    assert _open(body) == json.loads(body) and canonical(json.loads(body)) == body
