"""Secrets kept in PostgreSQL, sealed: AES-256-GCM under a key from the settings.

The events' ticket-signing keys are the secrets here: whoever reads a database backup must not
be able to forge tickets with them. The key comes from ``BILTEN_DATA_KEY`` (any 32+ characters,
stretched with HKDF), else from ``BILTEN_SECRET_KEY``; every data and secret key configured,
old ones included, may open. To rotate: set the new key, keep the old one in
``BILTEN_OLD_DATA_KEYS`` (or ``BILTEN_OLD_SECRET_KEYS``) until every sealed value was read once,
since a value sealed under an old key is sealed again under the current one when it is read.
A sealed value names its key (the first 8 bytes of a hash of it); a value without the marker
is an old plaintext one, read as it is and sealed at its next read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bilten.settings import Settings

MARKER = b"bsv1"  # "bilten sealed, version 1"
NONCE_BYTES = 12
ID_BYTES = 8


class Unsealable(Exception):
    """Sealed under a key this instance does not have (an old key dropped too soon)."""


def _key_id(secret: str) -> bytes:
    return hashlib.sha256(b"bilten-data-key-id:" + secret.encode()).digest()[:ID_BYTES]


def _cipher(secret: str) -> AESGCM:
    stretched = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"bilten sealed data v1"
    ).derive(secret.encode())
    return AESGCM(stretched)


@dataclass(frozen=True)
class Keyring:
    current: bytes  # the id of the key that seals
    ciphers: dict[bytes, AESGCM]  # every key that may open, the current one included

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        header = MARKER + self.current
        return header + nonce + self.ciphers[self.current].encrypt(nonce, data, header)

    def open(self, blob: bytes) -> tuple[bytes, bool]:
        """The data, and whether it should be sealed again (plaintext, or an old key)."""
        if not blob.startswith(MARKER):
            return blob, True
        header = blob[: len(MARKER) + ID_BYTES]
        key_id = header[len(MARKER) :]
        cipher = self.ciphers.get(key_id)
        if cipher is None:
            raise Unsealable("sealed under a key that is not configured")
        nonce = blob[len(header) : len(header) + NONCE_BYTES]
        data = cipher.decrypt(nonce, blob[len(header) + NONCE_BYTES :], header)
        return data, key_id != self.current


def keyring(settings: Settings) -> Keyring:
    """Seals with the data key (else the secret key); opens with every data and secret key
    configured, so that setting a data key for the first time loses nothing sealed before."""
    secrets = [
        s
        for s in (
            settings.data_key,
            *settings.old_data_keys,
            settings.secret_key,
            *settings.old_secret_keys,
        )
        if s
    ]
    if not secrets:
        raise ValueError("no data key or secret key configured")
    return Keyring(_key_id(secrets[0]), {_key_id(s): _cipher(s) for s in secrets})
