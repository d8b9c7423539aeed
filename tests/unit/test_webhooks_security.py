"""Webhook signing (Standard Webhooks), its verification, and the SSRF guard on webhook URLs.

The signing is checked against the Standard Webhooks reference vector and against an independent verifier
(the `openai` SDK's `webhooks.verify_signature`, which implements the same scheme)."""

from __future__ import annotations

import base64
import time

import openai
import pytest

from service.auth import secret_key
from service.queue import InvalidField
from service.settings import Settings
from service.webhooks import (
    BlockedDestination,
    WebhookVerificationError,
    check_webhook_url,
    new_webhook_secret,
    resolve_destination,
    sign,
    verify,
)

# The reference vector of the Standard Webhooks specification (and Svix, whose scheme it is).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers_for(
    secret: str, body: bytes, timestamp: int | None = None, message_id: str = "msg_1"
) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }


def test_sign_reproduces_the_standard_webhooks_reference_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE
    verify(
        SPEC_SECRET,
        headers_for(SPEC_SECRET, SPEC_BODY, SPEC_TIMESTAMP, SPEC_ID),
        SPEC_BODY,
        now=SPEC_TIMESTAMP + 10,
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_signatures_verify_with_the_openai_sdk() -> None:
    secret = new_webhook_secret()
    body = b'{"id":"msg_x","type":"video.completed","data":{"id":"3f1c2a9e"}}'
    client = openai.OpenAI(api_key="unused", webhook_secret=secret)
    client.webhooks.verify_signature(body, headers_for(secret, body))
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.verify_signature(body + b" ", headers_for(secret, body))


def test_verify_refuses_tampering_old_timestamps_and_other_secrets_and_accepts_rotation() -> None:
    secret, other = new_webhook_secret(), new_webhook_secret()
    body = b'{"type":"video.failed"}'
    good = headers_for(secret, body)
    verify(secret, good, body)
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify(secret, good, b'{"type":"video.completed"}')
    with pytest.raises(WebhookVerificationError, match="no webhook-signature matches"):
        verify(other, good, body)
    with pytest.raises(WebhookVerificationError, match="300 s"):
        verify(secret, headers_for(secret, body, int(time.time()) - 301), body)
    with pytest.raises(WebhookVerificationError, match="required"):
        verify(secret, {k: v for k, v in good.items() if k != "webhook-id"}, body)
    # Key rotation: the header may list several signatures; one match is enough.
    rotated = {
        **good,
        "webhook-signature": f"{headers_for(other, body)['webhook-signature']} {good['webhook-signature']}",
    }
    verify(secret, rotated, body)


def test_secret_key_rules() -> None:
    assert len(secret_key(new_webhook_secret())) == 32
    for bad, rule in (
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
        ("whsec_not base64!", "base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24 to 64 bytes"),
    ):
        with pytest.raises(ValueError, match=rule):
            secret_key(bad)
    with pytest.raises(ValueError, match="whsec_"):
        Settings(_env_file=None, webhook_secret="plain")  # type: ignore[call-arg, arg-type]


def guarded(**overrides: object) -> Settings:
    return Settings(_env_file=None, webhook_secret=new_webhook_secret(), **overrides)  # type: ignore[call-arg, arg-type]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/hook",
        "http://127.1/hook",  # short IPv4 form the resolver expands to 127.0.0.1
        "http://2130706433/hook",  # 127.0.0.1 as one decimal number
        "http://0x7f.0.0.1/hook",
        "http://localhost/hook",
        "http://api.localhost/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",  # cloud metadata endpoint
        "http://0.0.0.0/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "http://[fd00::1]/hook",
        "http://224.0.0.1/hook",
    ],
)
def test_webhook_urls_naming_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(InvalidField) as refused:
        check_webhook_url(guarded(), url)
    assert refused.value.field == "webhook_url" and "private, loopback or link-local" in refused.value.message
    check_webhook_url(guarded(webhook_allow_private=True), url)  # the setting lifts the guard


def test_webhook_urls_need_a_configured_secret_and_public_hosts_pass() -> None:
    check_webhook_url(guarded(), "https://hooks.example.com/tdserve?token=x")
    check_webhook_url(guarded(), "http://93.184.216.34/hook")
    with pytest.raises(InvalidField, match="TD_WEBHOOK_SECRET"):
        check_webhook_url(Settings(_env_file=None), "https://hooks.example.com/")  # type: ignore[call-arg]


def test_delivery_resolves_names_and_refuses_non_public_addresses() -> None:
    # A name is only known by resolving it: localhost resolves to loopback, which delivery refuses.
    for url in ("http://localhost:9/hook", "http://127.1:9/hook"):
        with pytest.raises(BlockedDestination, match="non-public address 127.0.0.1"):
            resolve_destination(url, allow_private=False)
        assert resolve_destination(url, allow_private=True) == "127.0.0.1"
    with pytest.raises(BlockedDestination, match="does not resolve"):
        resolve_destination("http://no-such-host.invalid/hook", allow_private=True)
