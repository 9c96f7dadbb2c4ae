"""Tests for backbeat_sync.signing and signed frames/claims in the integration."""

from __future__ import annotations

from pathlib import Path

import pytest

from backbeat_sync import BackbeatConfig, BeatFrame, ConfigError, Integration
from backbeat_sync.protocol import parse_beat_frame, parse_status_claim
from backbeat_sync.signing import SigningKey, Verifier, generate_private_key

from .support import ClaimLog, HandledBeats, ManualPulse, unique_bus, wait_until

FRAME = BeatFrame(cluster_id="c", beat_index=7, downbeat=False, phase="upbeat", tempo_bpm=2, window_id="w-1")


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.load(generate_private_key())


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.load(generate_private_key())


def test_sign_and_verify_frame_and_claim(key: SigningKey) -> None:
    """A signed frame survives the wire and verifies; the signature covers canonical JSON without sig."""
    verifier = Verifier.from_keys([key.public_text()])
    signed = key.sign_frame(FRAME)
    assert signed.key_id == key.key_id
    again = parse_beat_frame(signed.encode())
    assert verifier.verify(again) == "ok"
    assert verifier.verify(FRAME) == "unsigned"


def test_tampered_and_unknown_key(key: SigningKey, other_key: SigningKey) -> None:
    """Changing any signed field, or signing with an untrusted key, fails verification."""
    verifier = Verifier.from_keys([key.public_text()])
    signed = key.sign_frame(FRAME)
    tampered = parse_beat_frame(signed.encode().replace(b'"beat_index":7', b'"beat_index":8'))
    assert verifier.verify(tampered) == "bad_signature"
    assert verifier.verify(other_key.sign_frame(FRAME)) == "unknown_key"
    impostor = SigningKey.load(generate_private_key(), key_id=key.key_id)  # claims the trusted id
    assert verifier.verify(impostor.sign_frame(FRAME)) == "bad_signature"
    garbage = parse_beat_frame(signed.encode().replace(signed.sig.encode(), b"!!notbase64!!"))  # type: ignore[union-attr]
    assert verifier.verify(garbage) == "bad_signature"


def test_keys_from_pem_files(tmp_path: Path, key: SigningKey) -> None:
    """Public keys load from PEM files, with an optional KEY_ID= prefix."""
    pub = tmp_path / "pulse.pub.pem"
    pub.write_bytes(key.public_pem())
    assert Verifier.from_keys([str(pub)]).key_ids == [key.key_id]
    assert Verifier.from_keys([f"pulse-1={pub}"]).key_ids == ["pulse-1"]


@pytest.mark.parametrize(
    ("field", "spec", "reason"),
    [
        ("signing_key", "/nonexistent/key.pem", "cannot read key file"),
        ("signing_key", "base64:!!!", "not valid base64"),
        ("signing_key", "base64:AAAA", "must be 32 bytes"),
        ("trusted_pulse_keys", "/nonexistent/pub.pem", "cannot read key file"),
    ],
)
def test_bad_keys_are_config_errors(field: str, spec: str, reason: str) -> None:
    """A bad key file or inline key is refused at construction, naming the field."""
    with pytest.raises(ConfigError, match=reason) as info:
        BackbeatConfig(**{field: spec})  # type: ignore[arg-type]
    assert info.value.field == field


def test_key_file_that_is_not_a_key(tmp_path: Path) -> None:
    """A file that is not a PEM Ed25519 key is a ConfigError, from env too, without leaking content."""
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not an Ed25519 private key") as info:
        BackbeatConfig.from_env({"CHORUS_BACKBEAT_SIGNING_KEY": str(bad)})
    assert info.value.field == "CHORUS_BACKBEAT_SIGNING_KEY"


def test_signing_key_never_in_repr(key: SigningKey) -> None:
    """The private key spec never appears in repr(config)."""
    spec = generate_private_key()
    cfg = BackbeatConfig(signing_key=spec)
    assert spec.split(":")[1] not in repr(cfg)
    assert "signing_key='***'" in repr(cfg)


def test_agent_drops_unsigned_and_forged_frames(key: SigningKey, other_key: SigningKey) -> None:
    """With trusted pulse keys, unsigned and forged frames are dropped and counted; signed ones count."""
    bus = unique_bus()
    cfg = BackbeatConfig(
        cluster_id="c",
        agent_id="a",
        nats_url=f"local://{bus}?pulse=manual",
        trusted_pulse_keys=(key.public_text(),),
    )
    integration = Integration(cfg, node_id="n")
    pulse = ManualPulse(bus, "c", handled=HandledBeats(integration))
    with integration:
        pulse.raw(pulse.frame(1).encode())
        pulse.raw(other_key.sign_frame(pulse.frame(2)).encode())
        pulse.raw(key.sign_frame(pulse.frame(3)).encode())
        pulse.handled.wait(3)  # type: ignore[union-attr]
        health = integration.get_health()
    assert health["current_beat"] == 3
    assert health["beats_received"] == 1
    assert (health["unsigned_frames"], health["forged_frames"]) == (1, 1)
    assert any("dropped beat frame: unsigned" in e for e in health["errors"])
    assert any("dropped beat frame: unknown key" in e for e in health["errors"])


def test_agent_signs_its_claims(key: SigningKey) -> None:
    """An agent with a signing key signs every claim; a monitor with its public key verifies them."""
    bus = unique_bus()
    cfg = BackbeatConfig(
        cluster_id="c",
        agent_id="a",
        nats_url=f"local://{bus}?pulse=manual",
        signing_key=generate_private_key(),
        signing_key_id="agent-a",
    )
    integration = Integration(cfg, node_id="n")
    raw: list[bytes] = []
    log = ClaimLog()
    with integration:
        integration.transport.bus.subscribe("backbeat.status.>", lambda s, d: raw.append(d))  # type: ignore[union-attr]
        integration.on_claim(log)
        integration.start_p2p_operation("op", "election", 3)
        integration.complete_p2p_operation("op", 1)
        wait_until(lambda: len(raw) == 2)
    signer = SigningKey.load(cfg.signing_key, "agent-a")  # type: ignore[arg-type]
    verifier = Verifier.from_keys([f"agent-a={signer.public_text()}"])
    claims = [parse_status_claim(d) for d in raw]
    assert [verifier.verify(c) for c in claims] == ["ok", "ok"]
    assert [c.state for c in claims] == ["executing", "done"]


def test_foreign_signer_with_unknown_fields_verifies(key: SigningKey) -> None:
    """A peer that signs the canonical JSON of its own object (extra fields, int tempo) verifies here."""
    import base64
    import json

    from backbeat_sync.protocol import canonical_json

    obj = {**FRAME.to_dict(), "tempo_bpm": 2, "future": {"z": 1, "a": [1.5]}, "key_id": key.key_id}
    obj["sig"] = key.sign_bytes(canonical_json(obj))
    received = parse_beat_frame(json.dumps(obj, indent=2).encode())  # any whitespace on the wire
    assert Verifier.from_keys([key.public_text()]).verify(received) == "ok"
    assert base64.b64decode(received.sig or "")  # a real signature was checked
