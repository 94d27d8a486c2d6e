"""Gateway identities at central (DESIGN.md §8): the CA, one-time enrolment tokens, the
enrol/renew endpoints, revocation and the CRL, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import settings as settings_
from hypothesis import strategies as st
from typer.testing import CliRunner

from central.app import create_app
from central.cli import app as central_cli
from central.config.settings import Settings
from central.identity.ca import (
    CaKeyPermissionError,
    CsrError,
    check_csr,
    common_name,
    load_ca,
    load_or_create_ca,
)
from central.identity.enrolment import sign_renewal
from tests.identity import auth, token_for
from tests.pg import pg_schema


def _csr(cn: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None
         ) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, run_ingest=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


async def _token(settings: Settings, gw: str, *extra: str) -> str:
    """`central gateway enroll-token GW --json` (in a thread: the CLI runs its own loop)."""
    return await asyncio.to_thread(_token_sync, settings, gw, *extra)


def _token_sync(settings: Settings, gw: str, *extra: str) -> str:
    res = CliRunner().invoke(central_cli, ["gateway", "enroll-token", gw, "--db", settings.db_url,
                                           "--pki-dir", str(settings.pki_dir), "--json", *extra])
    assert res.exit_code == 0, res.output
    return str(json.loads(res.stdout.strip().splitlines()[-1])["token"])


def _made(settings: Settings) -> Settings:
    """The database and the CA, made as the production set-up makes them: `central init`,
    `central ca init` (the other commands refuse to make either)."""
    for args in (["init", "--db", settings.db_url],
                 ["ca", "init", "--db", settings.db_url, "--pki-dir", str(settings.pki_dir)]):
        res = CliRunner().invoke(central_cli, args)
        assert res.exit_code == 0, res.output
    return settings


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    if request.param == "sqlite":
        yield _made(Settings(db_url=f"sqlite:///{tmp_path}/c.db", pki_dir=tmp_path / "pki"))
        return
    with pg_schema() as url:
        yield _made(Settings(db_url=url, pki_dir=tmp_path / "pki",
                             command_key_path=tmp_path / "k.pem"))


def test_ca_key_is_private_and_a_loose_key_is_refused(tmp_path: Path) -> None:
    """The CA key is made 0600; one readable by others is refused, naming file and mode."""
    ca = load_or_create_ca(tmp_path / "pki")
    key = tmp_path / "pki" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ca.crl_path.exists()
    os.chmod(key, 0o640)
    with pytest.raises(CaKeyPermissionError) as info:
        load_ca(tmp_path / "pki")
    assert info.value.path == key and info.value.mode == 0o640
    assert str(key) in str(info.value) and "0640" in str(info.value)


async def test_central_refuses_to_start_on_a_loose_ca_key(tmp_path: Path) -> None:
    """`central serve` exits 1 naming the key; the app's start-up raises the typed error."""
    settings = Settings(db_url=f"sqlite:///{tmp_path}/c.db", pki_dir=tmp_path / "pki")
    load_or_create_ca(tmp_path / "pki")
    os.chmod(tmp_path / "pki" / "ca.key", 0o644)
    res = CliRunner().invoke(central_cli, ["serve", "--db", settings.db_url, "--http-port", "0"],
                             env={"FIELDLINK_CENTRAL_PKI_DIR": str(tmp_path / "pki")})
    assert res.exit_code == 1
    assert "ca.key" in res.output and "0644" in res.output
    app = create_app(settings, run_ingest=False)
    with pytest.raises(CaKeyPermissionError):
        async with app.router.lifespan_context(app):
            pass


async def test_enrol_issues_a_certificate_for_the_gateway(settings: Settings) -> None:
    """A token and a CSR give a cert (CN = gw) from the CA, the CA cert and the command key;
    the database holds only the token's hash."""
    token = await _token(settings, "gw-a")
    _, csr = _csr("gw-a")
    async with serve(settings) as c:
        r = await c.post("/api/gateways/enroll", json={"gateway": "gw-a", "token": token,
                                                       "csr_pem": csr})
        assert r.status_code == 200, r.text
        body = r.json()
        cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
        ca = x509.load_pem_x509_certificate(body["ca_pem"].encode())
        cert.verify_directly_issued_by(ca)
        assert common_name(cert) == "gw-a"
        assert body["central_public_key"] == c.app.state.commands.service.public_key_b64  # type: ignore[attr-defined]
        rows = await c.app.state.identity.store.tokens("gw-a")  # type: ignore[attr-defined]
        assert len(rows) == 1 and rows[0].used_ms is not None
    if settings.db_url.startswith("sqlite"):
        db = settings.db_url.removeprefix("sqlite:///")
        with sqlite3.connect(db) as conn:
            stored = [r[0] for r in conn.execute("SELECT token_hash FROM gateway_enrol_tokens")]
        assert token not in stored and len(stored[0]) == 64
        for f in Path(db).parent.glob("c.db*"):
            assert token.encode() not in f.read_bytes()


async def test_tokens_are_one_use_expiring_and_for_one_gateway(settings: Settings) -> None:
    """A used, expired or other gateway's token is refused with 403 and the reason."""
    used, other = await _token(settings, "gw-a"), await _token(settings, "gw-b")
    expired = await _token(settings, "gw-a", "--ttl", "0.001")
    await asyncio.sleep(0.01)
    _, csr = _csr("gw-a")
    async with serve(settings) as c:
        async def enrol(token: str) -> httpx.Response:
            return await c.post("/api/gateways/enroll", json={"gateway": "gw-a", "token": token,
                                                              "csr_pem": csr})

        assert (await enrol(used)).status_code == 200
        for token, reason in ((used, "used"), (expired, "expired"), (other, "wrong gateway"),
                              ("not-a-token", "unknown")):
            r = await enrol(token)
            assert r.status_code == 403, r.text
            assert reason in r.json()["detail"]
        counters = c.app.state.identity.counters  # type: ignore[attr-defined]
        assert counters.enrolled == 1 and sum(counters.refused.values()) == 4
        token = await token_for(c.app, c)  # type: ignore[attr-defined]
        text = (await c.get("/metrics", headers=auth(token))).text
        assert "fieldlink_central_gateways_enrolled_total 1" in text
        audited = [(e.actor, e.action, e.target)  # wired to the audit log (§8)
                   for e in await c.app.state.audit.entries()  # type: ignore[attr-defined]
                   if e.action.startswith("gateway.")]
        assert audited.count(("gateway:gw-a", "gateway.enrolled", "gw-a")) == 1
        assert audited.count(("gateway:gw-a", "gateway.enrol_refused", "gw-a")) == 4
        assert any(a == "gateway.enrol_token_issued" and actor.startswith("cli") for actor, a, _ in audited)
        assert 'fieldlink_central_enrolment_refused_total{reason="token_used"} 1' in text


@pytest.mark.parametrize("cn, key, why", [
    ("gw-b", None, "CN must be exactly"),
    ("gw-a", rsa.generate_private_key(65537, 1024), "too short"),
    ("gw-a", ec.generate_private_key(ec.SECP256K1()), "not accepted"),
])
async def test_bad_csr_is_422_and_keeps_the_token(tmp_path: Path, cn: str,
                                                  key: ec.EllipticCurvePrivateKey | None,
                                                  why: str) -> None:
    """A CSR for another name or with a weak key is refused before the token is spent."""
    settings = await asyncio.to_thread(_made, Settings(db_url=f"sqlite:///{tmp_path}/c.db",
                                                       pki_dir=tmp_path / "pki"))
    token = await _token(settings, "gw-a")
    async with serve(settings) as c:
        r = await c.post("/api/gateways/enroll", json={"gateway": "gw-a", "token": token,
                                                       "csr_pem": _csr(cn, key)[1]})
        assert r.status_code == 422 and why in r.json()["detail"]
        r = await c.post("/api/gateways/enroll", json={"gateway": "gw-a", "token": token,
                                                       "csr_pem": "garbage"})
        assert r.status_code == 422
        r = await c.post("/api/gateways/enroll", json={"gateway": "gw-a", "token": token,
                                                       "csr_pem": _csr("gw-a")[1]})
        assert r.status_code == 200


async def test_renew_without_token_and_refused_after_revocation(settings: Settings) -> None:
    """The current cert and a signature by its key renew it; a wrong signature, a foreign or
    a revoked certificate is refused; revocation lists every serial in the CRL."""
    token = await _token(settings, "gw-a")
    key, csr = _csr("gw-a")
    async with serve(settings) as c:
        first = (await c.post("/api/gateways/enroll", json={
            "gateway": "gw-a", "token": token, "csr_pem": csr})).json()
        new_key, new_csr = _csr("gw-a")

        async def renew(cert: str, csr_pem: str, sig: str, gw: str = "gw-a") -> httpx.Response:
            return await c.post("/api/gateways/renew", json={
                "gateway": gw, "certificate_pem": cert, "csr_pem": csr_pem, "signature": sig})

        bad = sign_renewal(new_key, "gw-a", new_csr)  # signed by the new key, not the current
        assert (await renew(first["certificate_pem"], new_csr, bad)).status_code == 403
        other_csr = _csr("gw-b")[1]
        r = await renew(first["certificate_pem"], other_csr, sign_renewal(key, "gw-b", other_csr),
                        gw="gw-b")
        assert r.status_code == 403 and "not 'gw-b'" in r.json()["detail"]
        r = await renew(first["certificate_pem"], new_csr, sign_renewal(key, "gw-a", new_csr))
        assert r.status_code == 200, r.text
        second = r.json()
        assert second["serial"] != first["serial"]
        revocation = await c.app.state.identity.service.revoke("gw-a")  # type: ignore[attr-defined]
        assert set(revocation.serials) == {first["serial"], second["serial"]}
        crl = x509.load_pem_x509_crl(revocation.crl_path.read_bytes())
        assert {format(r.serial_number, "x") for r in crl} == set(revocation.serials)
        newer_key, newer_csr = _csr("gw-a")
        r = await renew(second["certificate_pem"], newer_csr,
                        sign_renewal(new_key, "gw-a", newer_csr))
        assert r.status_code == 403 and "revoked" in r.json()["detail"]
    res = await asyncio.to_thread(CliRunner().invoke, central_cli, [
        "gateway", "certs", "gw-a", "--db", settings.db_url, "--pki-dir", str(settings.pki_dir),
        "--json"])
    listed = json.loads(res.stdout.strip().splitlines()[-1])
    assert [(c["how"], c["revoked_ms"] is not None) for c in listed] == [("enrol", True),
                                                                          ("renew", True)]


def test_cli_help_has_examples_and_revoke_writes_the_crl(tmp_path: Path) -> None:
    """Every identity command's help carries an example; revoke --json names the CRL."""
    runner = CliRunner()
    for cmd in (["gateway", "enroll-token"], ["gateway", "revoke"], ["gateway", "certs"],
                ["ca", "init"], ["ca", "central-cert"], ["broker-config"]):
        res = runner.invoke(central_cli, [*cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, cmd
    db = f"sqlite:///{tmp_path}/c.db"
    _made(Settings(db_url=db, pki_dir=tmp_path / "pki"))
    res = runner.invoke(central_cli, ["gateway", "revoke", "gw-a", "--db", db, "--pki-dir",
                                      str(tmp_path / "pki"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["serials"] == [] and Path(out["crl"]).exists()
    res = runner.invoke(central_cli, ["gateway", "enroll-token", "_central", "--db", db])
    assert res.exit_code == 1 and "gateway id" in res.output


async def test_every_identity_action_reaches_the_audit_hook(tmp_path: Path) -> None:
    """Token issue, enrolment (ok and refused), renewal and revocation each call `audit`
    once with the gateway and what happened (the audit log's single call point)."""
    from central.identity.enrolment import Enrolment, IdentityEvent
    from central.identity.enrolment_store import EnrolmentStore, TokenRefusedError

    events: list[IdentityEvent] = []

    async def audit(event: IdentityEvent) -> None:
        events.append(event)

    async with EnrolmentStore(f"sqlite:///{tmp_path}/c.db") as store:
        svc = Enrolment(ca=load_or_create_ca(tmp_path / "pki"), store=store,
                        central_public_key="k", audit=audit)
        token = (await svc.issue_token("gw-a")).token
        key, csr = _csr("gw-a")
        issued = await svc.enrol("gw-a", token, csr)
        with pytest.raises(TokenRefusedError):
            await svc.enrol("gw-a", token, csr)
        new_key, new_csr = _csr("gw-a")
        await svc.renew("gw-a", issued.certificate_pem, new_csr, sign_renewal(key, "gw-a", new_csr))
        await svc.revoke("gw-a")
    assert [(e.action, e.gw) for e in events] == [
        ("enrol_token_issued", "gw-a"), ("enrolled", "gw-a"), ("enrol_refused", "gw-a"),
        ("renewed", "gw-a"), ("revoked", "gw-a")]
    assert events[1].detail["serial"] == issued.serial and events[2].detail["reason"] == "used"
    assert all(token not in repr(e) for e in events)  # no secret in the audit trail


async def test_garbage_requests_get_4xx_never_5xx(tmp_path: Path) -> None:
    """Junk in every field of both endpoints is a problem response (403/422), never a 500."""
    import base64

    settings = Settings(db_url=f"sqlite:///{tmp_path}/c.db", pki_dir=tmp_path / "pki")
    junk_pem = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.b64encode(b"\x30\x03\x02\x01\x00"
                * 9).decode() + "\n-----END CERTIFICATE REQUEST-----\n")
    junk_cert = junk_pem.replace("CERTIFICATE REQUEST", "CERTIFICATE")
    async with serve(settings) as c:
        for body in ({"gateway": "gw-a", "token": "t", "csr_pem": junk_pem},
                     {"gateway": "../x", "token": "t", "csr_pem": _csr("../x")[1]},
                     {"gateway": "gw-a", "token": "t", "csr_pem": "x" * 20_000},
                     {"gateway": "gw-a", "token": "t"},
                     {"gateway": "gw-a", "token": "t", "csr_pem": "x", "extra": 1}):
            r = await c.post("/api/gateways/enroll", json=body)
            assert r.status_code in (403, 422), (body, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        for body in ({"gateway": "gw-a", "certificate_pem": junk_cert, "csr_pem": junk_pem,
                      "signature": "!!"},
                     {"gateway": "gw-a", "certificate_pem": "x", "csr_pem": "y",
                      "signature": "AAAA"}):
            r = await c.post("/api/gateways/renew", json=body)
            assert r.status_code in (403, 422), (body, r.text)


@given(st.one_of(st.binary(max_size=600), st.builds(
    lambda b: b"-----BEGIN CERTIFICATE REQUEST-----\n" + __import__("base64").encodebytes(b)
    + b"-----END CERTIFICATE REQUEST-----\n", st.binary(max_size=400))))
@settings_(max_examples=200, deadline=None)
def test_check_csr_raises_only_its_own_error(data: bytes) -> None:
    """Any bytes as a CSR: accepted or `CsrError`, nothing else."""
    try:
        check_csr(data, "gw-a")
    except CsrError:
        pass
