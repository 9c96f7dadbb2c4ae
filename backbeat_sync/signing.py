"""Ed25519 signatures on beat frames and claims (the optional ``signing`` extra).

A signed message carries ``sig`` (base64 Ed25519 signature) and ``key_id``;
the signature covers the message's canonical JSON without ``sig``. Keys are
given as a path to a PEM file, or inline as ``base64:<32 raw bytes>`` (handy
in environment variables). Key ids default to the first 16 hex digits of the
SHA-256 of the raw public key.

Example:
    >>> from backbeat_sync.signing import generate_private_key, SigningKey, Verifier
    >>> key = SigningKey.load(generate_private_key())
    >>> verifier = Verifier.from_keys([key.public_text()])
    >>> from backbeat_sync import BeatFrame
    >>> frame = key.sign_frame(BeatFrame(cluster_id="c", beat_index=1, downbeat=False,
    ...                                  phase="upbeat", tempo_bpm=2, window_id="w-0"))
    >>> verifier.verify(frame)
    'ok'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from .errors import ConfigError
from .protocol import BeatFrame, StatusClaim

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["SigningKey", "Verdict", "Verifier", "generate_private_key", "key_id_for"]

INLINE_PREFIX = "base64:"
Verdict = Literal["ok", "unsigned", "unknown_key", "bad_signature"]


def _crypto(field: str) -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - depends on the extra
        raise ConfigError(
            field, "...", "signing needs the 'cryptography' package: pip install 'backbeat_sync[signing]'"
        ) from None
    return ed25519, serialization


def _raw_public(public: Ed25519PublicKey) -> bytes:
    _, ser = _crypto("signing")
    raw: bytes = public.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return raw


def key_id_for(public: Ed25519PublicKey) -> str:
    """The default key id: first 16 hex digits of SHA-256 of the raw public key."""
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def _read_source(spec: str, field: str) -> tuple[bytes | None, bytes | None]:
    """Return (inline raw bytes, PEM bytes) for a key spec."""
    if spec.startswith(INLINE_PREFIX):
        try:
            raw = base64.b64decode(spec[len(INLINE_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(field, "base64:***", "inline key is not valid base64") from None
        if len(raw) != 32:
            raise ConfigError(field, "base64:***", f"inline Ed25519 key must be 32 bytes, got {len(raw)}")
        return raw, None
    path = Path(spec)
    try:
        return None, path.read_bytes()
    except OSError as exc:
        raise ConfigError(field, spec, f"cannot read key file: {exc.strerror or exc}") from None


def generate_private_key() -> str:
    """A new Ed25519 private key as an inline ``base64:`` spec (for tests and tooling)."""
    ed25519, ser = _crypto("signing_key")
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    return INLINE_PREFIX + base64.b64encode(raw).decode()


@attrs.frozen
class SigningKey:
    """A private key that signs frames and claims.

    Attributes:
        key_id: the id put in each signed message.
    """

    key_id: str
    _private: Ed25519PrivateKey = attrs.field(repr=False)

    @classmethod
    def load(cls, spec: str, key_id: str | None = None, *, field: str = "signing_key") -> SigningKey:
        """Load a private key from a PEM file path or a ``base64:`` inline seed.

        Raises:
            ConfigError: the file cannot be read or is not an Ed25519 private key (names ``field``).
        """
        ed25519, ser = _crypto(field)
        raw, pem = _read_source(spec, field)
        shown = "base64:***" if raw is not None else spec
        try:
            if raw is not None:
                private = ed25519.Ed25519PrivateKey.from_private_bytes(raw)
            else:
                private = ser.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(field, shown, f"not an Ed25519 private key ({exc})") from None
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise ConfigError(field, shown, f"not an Ed25519 private key but {type(private).__name__}")
        return cls(key_id or key_id_for(private.public_key()), private)

    def public_text(self) -> str:
        """The public half as an inline ``base64:`` spec (give it to verifiers)."""
        return INLINE_PREFIX + base64.b64encode(_raw_public(self._private.public_key())).decode()

    def public_pem(self) -> bytes:
        """The public half as a PEM SubjectPublicKeyInfo."""
        _, ser = _crypto("signing_key")
        pem: bytes = self._private.public_key().public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign_bytes(self, data: bytes) -> str:
        """Base64 signature of ``data``."""
        return base64.b64encode(self._private.sign(data)).decode()

    def sign_frame(self, frame: BeatFrame) -> BeatFrame:
        """``frame`` with ``key_id`` and ``sig`` set."""
        unsigned = attrs.evolve(frame, key_id=self.key_id, sig=None, raw=None)
        return attrs.evolve(unsigned, sig=self.sign_bytes(unsigned.signing_bytes()))

    def sign_claim(self, claim: StatusClaim) -> StatusClaim:
        """``claim`` with ``key_id`` and ``sig`` set."""
        unsigned = attrs.evolve(claim, key_id=self.key_id, sig=None, raw=None)
        return attrs.evolve(unsigned, sig=self.sign_bytes(unsigned.signing_bytes()))

    def encode_claim(self, claim: StatusClaim) -> bytes:
        """Sign and encode ``claim`` (an integration's claim encoder when signing)."""
        return self.sign_claim(claim).encode()


class Verifier:
    """Checks signatures against a set of trusted public keys, by key id."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        self._keys = dict(keys)

    @property
    def key_ids(self) -> list[str]:
        """The trusted key ids."""
        return sorted(self._keys)

    @classmethod
    def from_keys(cls, specs: Iterable[str], *, field: str = "trusted_keys") -> Verifier:
        """Trust each key in ``specs`` (PEM public key files, or ``base64:`` raw public keys).

        A spec may be ``KEY_ID=SPEC`` to give the id the signer uses; otherwise
        the default id (SHA-256 prefix) is assumed.

        Raises:
            ConfigError: a key cannot be read or is not an Ed25519 public key.
        """
        ed25519, ser = _crypto(field)
        keys: dict[str, Ed25519PublicKey] = {}
        for spec in specs:
            key_id = None
            if "=" in spec and not spec.startswith(INLINE_PREFIX):
                key_id, spec = spec.split("=", 1)
            raw, pem = _read_source(spec, field)
            shown = "base64:***" if raw is not None else spec
            try:
                public = (
                    ed25519.Ed25519PublicKey.from_public_bytes(raw)
                    if raw is not None
                    else ser.load_pem_public_key(pem)
                )
            except (ValueError, TypeError) as exc:
                raise ConfigError(field, shown, f"not an Ed25519 public key ({exc})") from None
            if not isinstance(public, ed25519.Ed25519PublicKey):
                raise ConfigError(field, shown, f"not an Ed25519 public key but {type(public).__name__}")
            keys[key_id or key_id_for(public)] = public
        return cls(keys)

    def verify(self, message: BeatFrame | StatusClaim) -> Verdict:
        """``"ok"``, or why the message is not trusted: ``unsigned``, ``unknown_key``, ``bad_signature``."""
        if message.sig is None or message.key_id is None:
            return "unsigned"
        public = self._keys.get(message.key_id)
        if public is None:
            return "unknown_key"
        try:
            signature = base64.b64decode(message.sig, validate=True)
        except (binascii.Error, ValueError):
            return "bad_signature"
        from cryptography.exceptions import InvalidSignature

        try:
            public.verify(signature, message.signing_bytes())
        except InvalidSignature:
            return "bad_signature"
        return "ok"
