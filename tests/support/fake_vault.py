"""A stand-in Vault server for tests: Vault's HTTP API for exactly the paths
Conveyor's ``VaultSecretStore`` uses, with real cryptography behind it.

No Vault binary can be installed on these machines (``../shared/TRAPS.md``); a real
``vault server -dev`` is the production path. This server follows Vault's
documented API (developer.hashicorp.com/vault/api-docs) for:

- ``POST /v1/auth/approle/login``, ``POST /v1/auth/token/renew-self``,
  ``GET /v1/auth/token/lookup-self``
- ``GET|POST /v1/{kv}/data/{path}`` (KV version 2)
- ``POST /v1/{transit}/encrypt|decrypt/{key}``, ``/datakey/{plaintext|wrapped}/{key}``,
  ``/sign/{key}``, ``/verify/{key}``, ``/keys/{key}/rotate``; ``GET|POST /keys/{key}``

Status codes and JSON shapes are Vault's: ``200`` with a response envelope
(``data``, ``auth``, ``lease_duration``, ``renewable``, ``warnings``), ``204`` with no
body, ``400`` with ``{"errors": [...]}``, ``403 {"errors": ["permission denied"]}``
for a missing, unknown or expired ``X-Vault-Token``, ``404 {"errors": []}``.
Token lifetimes follow ``clock`` (a callable), so tests can move time forward.
Transit ciphertexts are ``vault:v{n}:base64(nonce || AES-GCM)`` with keys derived
per context (HKDF here; Vault uses SP 800-108, and only this server reads them).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

Json = dict[str, Any]
_VALUE = re.compile(r"^vault:v([0-9]+):(.*)$")


class VaultHTTPError(Exception):
    """Ends a request with ``status`` and ``{"errors": errors}``."""

    def __init__(self, status: int, *errors: str) -> None:
        super().__init__(status, errors)
        self.status = status
        self.errors = list(errors)


@dataclass
class FakeToken:
    policies: list[str]
    ttl: float  # 0: never expires
    max_ttl: float
    renewable: bool
    issued: float
    expires: float | None


@dataclass
class FakeKey:
    name: str
    key_type: str
    derived: bool
    versions: dict[int, Any] = field(default_factory=dict)  # AES bytes or private key
    created: dict[int, str] = field(default_factory=dict)
    min_decryption_version: int = 1

    @property
    def latest(self) -> int:
        return max(self.versions)

    def rotate(self) -> int:
        number = self.latest + 1 if self.versions else 1
        if self.key_type == "aes256-gcm96":
            self.versions[number] = AESGCM.generate_key(bit_length=256)
        elif self.key_type == "ed25519":
            self.versions[number] = Ed25519PrivateKey.generate()
        else:
            self.versions[number] = ec.generate_private_key(ec.SECP256R1())
        # Vault writes times as RFC 3339 (Go's time.Time): "…Z" in UTC.
        self.created[number] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return number

    def describe(self) -> Json:
        """The key as ``GET /v1/{transit}/keys/{name}`` shows it: for an asymmetric
        key, ``keys`` maps each version to ``name``, ``public_key`` (base64 of the
        raw key for Ed25519, PEM for ECDSA; empty for a derived Ed25519 key read
        without a context), ``certificate_chain`` and ``creation_time``; for a
        symmetric key, to its creation time in Unix seconds."""
        signing = self.key_type != "aes256-gcm96"
        keys: dict[str, Any] = {}
        for number, material in self.versions.items():
            if signing:
                keys[str(number)] = {
                    "name": self.key_type if self.key_type == "ed25519" else "P-256",
                    "public_key": self._public_key(material),
                    "certificate_chain": "",
                    "creation_time": self.created[number],
                }
            else:
                keys[str(number)] = int(datetime.fromisoformat(self.created[number]).timestamp())
        return {
            "name": self.name,
            "type": self.key_type,
            "derived": self.derived,
            "keys": keys,
            "latest_version": self.latest,
            "min_decryption_version": self.min_decryption_version,
            "min_encryption_version": 0,
            "deletion_allowed": False,
            "exportable": False,
            "supports_encryption": not signing,
            "supports_decryption": not signing,
            "supports_derivation": not signing,
            "supports_signing": signing,
        }

    def _public_key(self, private: Any) -> str:
        public = private.public_key()
        if self.key_type != "ed25519":
            pem: bytes = public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            return pem.decode()
        if self.derived:
            return ""
        return base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


class FakeVault:
    """The server and its state; ``with FakeVault() as vault: vault.url``."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.root_token = "hvs.root-" + secrets.token_urlsafe(12)
        self.tokens: dict[str, FakeToken] = {
            self.root_token: FakeToken(["root"], 0, 0, False, clock(), None)
        }
        self.approles: dict[str, tuple[str, float, float]] = {}
        self.kv: dict[str, dict[str, list[Json]]] = {"secret": {}}
        self.transit: dict[str, dict[str, FakeKey]] = {"transit": {}}
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request, for assertions."""
        self.namespaces: list[str | None] = []
        self.stopped = False
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeVault:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop answering, like a Vault that went down (open connections drop)."""
        self.stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    # Setup helpers (what an operator would do with the vault CLI) -------------

    def add_approle(self, role_id: str, secret_id: str, *, ttl: float, max_ttl: float) -> None:
        self.approles[role_id] = (secret_id, ttl, max_ttl)

    def issue_token(self, *, ttl: float = 0, max_ttl: float = 0, renewable: bool = True) -> str:
        token = "hvs." + secrets.token_urlsafe(18)
        now = self.clock()
        self.tokens[token] = FakeToken(
            ["default"], ttl, max_ttl, renewable, now, now + ttl if ttl else None
        )
        return token

    def create_key(self, name: str, key_type: str, *, derived: bool = False) -> FakeKey:
        key = FakeKey(name, key_type, derived)
        key.rotate()
        self.transit["transit"][name] = key
        return key

    # Dispatch -----------------------------------------------------------------

    def handle(self, method: str, path: str, token: str | None, body: Json) -> tuple[int, Json]:
        with self._lock:
            self.requests.append((method, path))
            if path == "auth/approle/login" and method in ("POST", "PUT"):
                return 200, self._login(body)
            caller = self._check_token(token)
            if path == "auth/token/renew-self" and method in ("POST", "PUT"):
                return 200, self._renew(token or "", caller, body)
            if path == "auth/token/lookup-self" and method == "GET":
                return 200, _envelope(data=self._lookup(token or "", caller))
            mount, _, rest = path.partition("/")
            if mount in self.kv and rest.startswith("data/"):
                return self._kv(method, mount, rest.removeprefix("data/"), body)
            if mount in self.transit:
                return self._transit(method, self.transit[mount], rest, body)
            raise VaultHTTPError(404, f'no handler for route "{path}". route entry not found.')

    def _check_token(self, token: str | None) -> FakeToken:
        found = self.tokens.get(token or "")
        if found is None or (found.expires is not None and self.clock() >= found.expires):
            raise VaultHTTPError(403, "permission denied")
        return found

    # Auth ---------------------------------------------------------------------

    def _login(self, body: Json) -> Json:
        role = self.approles.get(str(body.get("role_id", "")))
        if role is None or role[0] != body.get("secret_id"):
            raise VaultHTTPError(400, "invalid role or secret ID")
        _, ttl, max_ttl = role
        token = "hvs." + secrets.token_urlsafe(18)
        now = self.clock()
        self.tokens[token] = FakeToken(["default", "conveyor"], ttl, max_ttl, True, now, now + ttl)
        return _envelope(auth=_auth(token, self.tokens[token], ttl))

    def _renew(self, token: str, caller: FakeToken, body: Json) -> Json:
        if not caller.renewable or caller.expires is None:
            raise VaultHTTPError(400, "lease is not renewable")
        now = self.clock()
        wanted = float(body.get("increment") or caller.ttl)
        limit = caller.issued + caller.max_ttl if caller.max_ttl else now + wanted
        caller.expires = min(now + wanted, limit)
        lease = int(caller.expires - now)
        warnings = None
        if now + wanted > limit:
            warnings = [f'TTL of "{int(wanted)}s" exceeded the effective max_ttl; capped']
        return _envelope(auth=_auth(token, caller, lease), warnings=warnings)

    def _lookup(self, token: str, caller: FakeToken) -> Json:
        ttl = int(caller.expires - self.clock()) if caller.expires is not None else 0
        return {
            "id": token,
            "accessor": uuid.uuid4().hex,
            "policies": caller.policies,
            "ttl": ttl,
            "creation_ttl": int(caller.ttl),
            "explicit_max_ttl": int(caller.max_ttl),
            "renewable": caller.renewable,
            "type": "service",
            "expire_time": None,
        }

    # KV version 2 -------------------------------------------------------------

    def _kv(self, method: str, mount: str, path: str, body: Json) -> tuple[int, Json]:
        versions = self.kv[mount].setdefault(path, [])
        if method == "GET":
            if not versions:
                raise VaultHTTPError(404)
            latest = versions[-1]
            return 200, _envelope(data={"data": latest["data"], "metadata": latest["metadata"]})
        if method in ("POST", "PUT"):
            if not isinstance(body.get("data"), dict):
                raise VaultHTTPError(400, "no data provided")
            metadata = {
                "created_time": datetime.now(UTC).isoformat(),
                "custom_metadata": None,
                "deletion_time": "",
                "destroyed": False,
                "version": len(versions) + 1,
            }
            versions.append({"data": body["data"], "metadata": metadata})
            return 200, _envelope(data=metadata)
        raise VaultHTTPError(405, "unsupported operation")

    # Transit ------------------------------------------------------------------

    def _transit(
        self, method: str, keys: dict[str, FakeKey], rest: str, body: Json
    ) -> tuple[int, Json]:
        parts = rest.split("/")
        if parts[0] == "keys" and len(parts) == 2:
            if method == "GET":
                return 200, _envelope(data=_key(keys, parts[1], "key not found", 404).describe())
            if parts[1] not in keys:
                key = FakeKey(parts[1], body.get("type", "aes256-gcm96"), bool(body.get("derived")))
                key.rotate()
                keys[parts[1]] = key
            return 200, _envelope(data=keys[parts[1]].describe())
        if parts[0] == "keys" and len(parts) == 3 and parts[2] == "rotate":
            key = _key(keys, parts[1], "key not found", 404)
            key.rotate()
            return 200, _envelope(data=key.describe())
        if method not in ("POST", "PUT"):
            raise VaultHTTPError(405, "unsupported operation")
        if parts[0] == "encrypt" and len(parts) == 2:
            if parts[1] not in keys:  # Vault upserts an encryption key on first use
                key = FakeKey(parts[1], "aes256-gcm96", derived=bool(body.get("context")))
                key.rotate()
                keys[parts[1]] = key
            key = keys[parts[1]]
            plaintext = _unb64(body.get("plaintext"), "plaintext")
            ciphertext = _seal(key, key.latest, plaintext, body)
            return 200, _envelope(data={"ciphertext": ciphertext, "key_version": key.latest})
        if parts[0] == "decrypt" and len(parts) == 2:
            key = _key(keys, parts[1], "encryption key not found", 400)
            return 200, _envelope(data={"plaintext": _open(key, body)})
        if parts[0] == "datakey" and len(parts) == 3 and parts[1] in ("plaintext", "wrapped"):
            key = _key(keys, parts[2], "encryption key not found", 400)
            data_key = secrets.token_bytes(int(body.get("bits") or 256) // 8)
            data: Json = {
                "ciphertext": _seal(key, key.latest, data_key, body),
                "key_version": key.latest,
            }
            if parts[1] == "plaintext":
                data["plaintext"] = base64.b64encode(data_key).decode()
            return 200, _envelope(data=data)
        if parts[0] in ("sign", "verify") and len(parts) in (2, 3):
            key = _key(keys, parts[1], "signing key not found", 400)
            if len(parts) == 3:
                body.setdefault("hash_algorithm", parts[2])
            handler = _sign if parts[0] == "sign" else _verify
            return 200, _envelope(data=handler(key, body))
        raise VaultHTTPError(404, f'no handler for route "{rest}". route entry not found.')


def _key(keys: dict[str, FakeKey], name: str, message: str, status: int) -> FakeKey:
    if name not in keys:
        raise VaultHTTPError(status, *([message] if status == 400 else []))
    return keys[name]


def _aes_key(key: FakeKey, version: int, body: Json) -> bytes:
    if key.key_type != "aes256-gcm96":
        raise VaultHTTPError(400, f"key type {key.key_type} does not support encryption")
    material: bytes = key.versions[version]
    if not key.derived:
        return material
    context = body.get("context")
    if not context:
        raise VaultHTTPError(400, "missing 'context' for key derivation; the key was created "
                             "using a derived key, which means additional, per-request "
                             "information must be included in order to perform operations "
                             "with the key")  # fmt: skip
    info = _unb64(context, "context")
    return HKDF(hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def _seal(key: FakeKey, version: int, plaintext: bytes, body: Json) -> str:
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_aes_key(key, version, body)).encrypt(nonce, plaintext, None)
    return f"vault:v{version}:{base64.b64encode(nonce + sealed).decode()}"


def _open(key: FakeKey, body: Json) -> str:
    version, blob = _parse_value(str(body.get("ciphertext", "")), "ciphertext")
    if version not in key.versions or version < key.min_decryption_version:
        raise VaultHTTPError(400, "invalid ciphertext: key version not found or not permitted")
    try:
        plaintext = AESGCM(_aes_key(key, version, body)).decrypt(blob[:12], blob[12:], None)
    except InvalidTag:
        raise VaultHTTPError(400, "cipher: message authentication failed") from None
    return base64.b64encode(plaintext).decode()


def _sign(key: FakeKey, body: Json) -> Json:
    message = _unb64(body.get("input"), "input")
    version = int(body.get("key_version") or key.latest)
    private = key.versions[version]
    if key.key_type == "ed25519":
        if body.get("prehashed"):
            raise VaultHTTPError(400, "unsupported prehashed input for an ed25519 key")
        raw = private.sign(message)
    elif key.key_type == "ecdsa-p256":
        raw = private.sign(_ecdsa_digest(message, body), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    else:
        raise VaultHTTPError(400, f"key type {key.key_type} does not support signing")
    signature = f"vault:v{version}:{base64.b64encode(raw).decode()}"
    return {"signature": signature, "key_version": version}


def _verify(key: FakeKey, body: Json) -> Json:
    message = _unb64(body.get("input"), "input")
    version, raw = _parse_value(str(body.get("signature", "")), "signature")
    if version not in key.versions or version < key.min_decryption_version:
        raise VaultHTTPError(400, "invalid signature: key version not found or not permitted")
    public = key.versions[version].public_key()
    try:
        if key.key_type == "ed25519":
            public.verify(raw, message)
        else:
            digest = _ecdsa_digest(message, body)
            public.verify(raw, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    except InvalidSignature:
        return {"valid": False}
    return {"valid": True}


def _ecdsa_digest(message: bytes, body: Json) -> bytes:
    if body.get("hash_algorithm", "sha2-256") != "sha2-256":
        raise VaultHTTPError(400, "this test server supports only sha2-256")
    if body.get("prehashed"):
        if len(message) != 32:
            raise VaultHTTPError(400, "prehashed input is not the size of a sha2-256 digest")
        return message
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    return digest.finalize()


def _parse_value(value: str, what: str) -> tuple[int, bytes]:
    match = _VALUE.match(value)
    if match is None:
        raise VaultHTTPError(400, f"invalid {what}: no prefix")
    return int(match[1]), _unb64(match[2], what)


def _unb64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value if value is not None else ""), validate=True)
    except ValueError:
        raise VaultHTTPError(400, f"failed to base64-decode {what}") from None


def _auth(token: str, held: FakeToken, lease: float) -> Json:
    return {
        "client_token": token,
        "accessor": uuid.uuid4().hex,
        "policies": held.policies,
        "token_policies": held.policies,
        "metadata": {},
        "lease_duration": int(lease),
        "renewable": held.renewable,
        "entity_id": "",
        "token_type": "service",
        "orphan": True,
    }


def _envelope(*, data: Json | None = None, auth: Json | None = None, warnings: Any = None) -> Json:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": warnings,
        "auth": auth,
    }


def _handler_for(vault: FakeVault) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            if vault.stopped:  # a kept-alive connection outlived the server: drop it
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            path, _, _query = self.path.partition("?")
            vault.namespaces.append(self.headers.get("X-Vault-Namespace"))
            try:
                if not path.startswith("/v1/"):
                    raise VaultHTTPError(404)
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    raise VaultHTTPError(400, "failed to parse JSON input") from None
                status, payload = vault.handle(
                    self.command, path.removeprefix("/v1/"), self.headers.get("X-Vault-Token"),
                    body if isinstance(body, dict) else {},
                )  # fmt: skip
            except VaultHTTPError as error:
                status, payload = error.status, {"errors": error.errors}
            self._reply(status, payload)

        def _reply(self, status: int, payload: Json | None) -> None:
            data = b"" if status == 204 else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    return Handler
