"""`edge-agent enroll` / `renew`: the gateway's identity (DESIGN.md §8), made on the gateway.

`enrol(config_path, central, token)`:
1. makes an EC P-256 key here (it never leaves the gateway; mode 0600);
2. sends a CSR whose CN is the gateway id, with the one-time token, to central's
   `POST /api/gateways/enroll`;
3. writes into `<data_dir>/pki/`: `gateway.key`, `gateway.crt`, `ca.crt`, `central-command.pub`
   (central's Ed25519 command key, pinned) and `enrolment.json` (central's URL, for renewal);
4. writes (or updates) the config's `[mqtt.tls]` table and `[commands] central_public_key`,
   keeping the rest of the file as it is; the edited text must load before it replaces the
   file (the agent must be restarted to use the new identity).

`renew(config_path)` does the same through `POST /api/gateways/renew`, proving the current
certificate with a signature by the current key instead of a token. The new key and
certificate replace the old ones only once central has answered.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent import EdgeError
from edge_agent.config.site import AgentConfig, ConfigError, load_config, parse_config
from runtime.files import write_atomic

KEY, CERT, CA, PUB, META = ("gateway.key", "gateway.crt", "ca.crt", "central-command.pub",
                            "enrolment.json")


class EnrolmentError(EdgeError):
    """Enrolment or renewal failed: central refused, was unreachable, or a file is unusable."""


@dataclass(frozen=True, slots=True)
class EnrolResult:
    gateway: str
    central: str
    serial: str
    not_after_ms: int
    key: Path
    cert: Path
    ca: Path
    central_public_key: Path
    config: Path
    mqtt_tls_written: bool = True

    def to_jsonable(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v
                for k, v in ((f, getattr(self, f)) for f in self.__slots__)}


def pki_dir(config: AgentConfig) -> Path:
    return config.gateway.data_dir / "pki"


def _new_key_and_csr(gw: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, gw)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def _post(url: str, body: dict[str, Any], *, cacert: Path | None, timeout: float) -> dict[str, Any]:
    try:
        with httpx.Client(verify=str(cacert) if cacert else True, timeout=timeout) as client:
            resp = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise EnrolmentError(f"cannot reach central at {url}: {exc}") from exc
    try:
        data = resp.json()
    except ValueError:
        data = {}
    if resp.status_code != 200:
        detail = data.get("detail") if isinstance(data, dict) else None
        raise EnrolmentError(f"central refused ({resp.status_code}): {detail or resp.text[:200]}")
    if not isinstance(data, dict):
        raise EnrolmentError("central answered something that is not an object")
    return data


def _parse_issued(data: dict[str, Any], gw: str) -> tuple[bytes, bytes, str, str, int]:
    try:
        cert_pem = str(data["certificate_pem"]).encode()
        ca_pem = str(data["ca_pem"]).encode()
        pub = str(data["central_public_key"])
        cert = x509.load_pem_x509_certificate(cert_pem)
        x509.load_pem_x509_certificate(ca_pem)
        serial, not_after = str(data["serial"]), int(data["not_after_ms"])
    except (KeyError, ValueError, TypeError) as exc:
        raise EnrolmentError(f"central's answer is incomplete or malformed: {exc}") from exc
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if [a.value for a in cns] != [gw]:
        raise EnrolmentError(f"central issued a certificate for {cns}, not {gw!r}")
    return cert_pem, ca_pem, pub, serial, not_after


def _install(config_path: Path, cfg: AgentConfig, central: str, key: ec.EllipticCurvePrivateKey,
             issued: dict[str, Any], *, write_tls: bool = True) -> EnrolResult:
    gw = cfg.gateway.id
    cert_pem, ca_pem, pub, serial, not_after = _parse_issued(issued, gw)
    d = pki_dir(cfg)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    paths = {n: d / n for n in (KEY, CERT, CA, PUB, META)}
    text = config_path.read_text(encoding="utf-8")
    if write_tls:
        text = set_table(text, "mqtt.tls", {"ca": str(paths[CA]), "cert": str(paths[CERT]),
                                            "key": str(paths[KEY])})
    text = set_table(text, "commands", {"central_public_key": str(paths[PUB])})
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_atomic(paths[KEY], key_pem, 0o600)
    write_atomic(paths[CERT], cert_pem, 0o644)
    write_atomic(paths[CA], ca_pem, 0o644)
    write_atomic(paths[PUB], (pub + "\n").encode(), 0o644)
    write_atomic(paths[META], json.dumps({"central": central, "serial": serial,
                                    "not_after_ms": not_after}).encode(), 0o644)
    try:
        parse_config(text, config_path, check_profiles=False)
    except ConfigError as exc:
        raise EnrolmentError(f"the updated config would not load, left unchanged: {exc}") from exc
    mode = config_path.stat().st_mode & 0o777
    write_atomic(config_path, text.encode("utf-8"), mode)
    return EnrolResult(gw, central, serial, not_after, paths[KEY], paths[CERT], paths[CA],
                       paths[PUB], config_path, write_tls)


def enrol(config_path: Path, central: str, token: str, *, cacert: Path | None = None,
          timeout: float = 30.0, write_tls: bool = True) -> EnrolResult:
    """Enrol this gateway with a one-time token (see the module doc). `write_tls=False`
    leaves `[mqtt.tls]` out of the config (a broker without TLS, e.g. the demo's)."""
    config_path = Path(config_path)
    cfg = load_config(config_path, check_profiles=False)
    central = central.rstrip("/")
    key, csr_pem = _new_key_and_csr(cfg.gateway.id)
    issued = _post(f"{central}/api/gateways/enroll",
                   {"gateway": cfg.gateway.id, "token": token, "csr_pem": csr_pem},
                   cacert=cacert, timeout=timeout)
    return _install(config_path, cfg, central, key, issued, write_tls=write_tls)


def renew(config_path: Path, central: str | None = None, *, cacert: Path | None = None,
          timeout: float = 30.0) -> EnrolResult:
    """A new key and certificate before the current one expires, without a token."""
    config_path = Path(config_path)
    cfg = load_config(config_path, check_profiles=False)
    gw = cfg.gateway.id
    d = pki_dir(cfg)
    tls = cfg.mqtt.tls
    cert_path = tls.cert if tls and tls.cert else d / CERT
    key_path = tls.key if tls and tls.key else d / KEY
    if central is None:
        try:
            central = str(json.loads((d / META).read_text())["central"])
        except (OSError, ValueError, KeyError) as exc:
            raise EnrolmentError(f"no central URL recorded in {d / META}: give --central") from exc
    central = central.rstrip("/")
    try:
        cert_pem = cert_path.read_text(encoding="ascii")
        old_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise EnrolmentError(f"cannot read the current certificate or key: {exc}") from exc
    if not isinstance(old_key, ec.EllipticCurvePrivateKey):
        raise EnrolmentError(f"{key_path}: not an EC key")
    key, csr_pem = _new_key_and_csr(gw)
    message = b"fieldlink-renew\n" + gw.encode() + b"\n" + csr_pem.strip().encode()
    signature = base64.b64encode(old_key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()
    issued = _post(f"{central}/api/gateways/renew",
                   {"gateway": gw, "certificate_pem": cert_pem, "csr_pem": csr_pem,
                    "signature": signature}, cacert=cacert, timeout=timeout)
    return _install(config_path, cfg, central, key, issued, write_tls=tls is not None)


# --- editing the TOML text ---------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def set_table(text: str, table: str, values: dict[str, str]) -> str:
    """`text` with `[table]` holding `values` (string keys replaced or added in place; the
    table appended when absent). Comments and every other line stay as they are."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if (m := _HEADER.match(line)) and m.group(1).replace(" ", "") == table), None)
    if start is None:
        block = ["", f"[{table}]"] + [f"{k} = {_toml_str(v)}" for k, v in values.items()]
        return "\n".join(lines + block) + "\n"
    end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
    todo = dict(values)
    for i in range(start + 1, end):
        m = re.match(r"^\s*([A-Za-z0-9_-]+)\s*=", lines[i])
        if m and m.group(1) in todo:
            lines[i] = f"{m.group(1)} = {_toml_str(todo.pop(m.group(1)))}"
    insert_at = end
    while insert_at > start + 1 and not lines[insert_at - 1].strip():
        insert_at -= 1  # before the blank lines that separate the next table
    lines[insert_at:insert_at] = [f"{k} = {_toml_str(v)}" for k, v in todo.items()]
    return "\n".join(lines) + "\n"
