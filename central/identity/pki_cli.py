"""`central ca …`, `central gateway …` and `central broker-config` (DESIGN.md §8).

Registered on `central.cli.app`. Every command reads the same settings as `central serve`
(`--config`, `FIELDLINK_CENTRAL_*`, `--db`, `--pki-dir`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from central import CentralError
from central.cli.options import ConfigOpt, DbOpt
from central.cli.output import error, say, table, when
from protocols.errors import DetailedError

if TYPE_CHECKING:
    from central.identity.ca import CertificateAuthority

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # a path in an error stays one piece to copy
# Mosquitto re-reads the CRL on SIGHUP (tests/test_pki_broker.py checks it): a reload keeps
# every other gateway's session, a restart drops them all.
RELOAD_BROKER = ("reload the broker so that it reads the CRL: systemctl reload mosquitto "
                 "(SIGHUP). The gateway's open session lasts until it disconnects; "
                 "systemctl restart mosquitto ends it at once")

ca_app = typer.Typer(help="The gateway certificate authority.", no_args_is_help=True,
                     context_settings={"help_option_names": ["-h", "--help"]})
gateway_app = typer.Typer(help="Gateway identities: enrolment tokens, certificates, revocation.",
                          no_args_is_help=True,
                          context_settings={"help_option_names": ["-h", "--help"]})

PkiOpt = Annotated[Path | None, typer.Option("--pki-dir", help="CA folder (default: pki/ next "
                                                               "to the SQLite file; with "
                                                               "PostgreSQL required, absolute).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _settings(config: Path | None, db: str | None, pki_dir: Path | None) -> Any:
    from central.config.settings import load_settings

    return load_settings(config, env=os.environ, db_url=db, pki_dir=pki_dir)


class CaMissingError(CentralError, DetailedError):
    """A command that uses the CA found none: only `central ca init` (and `central serve` on
    first start) make one, so a wrong --pki-dir or --db never makes a second CA."""

    template = ("no CA in {directory}: make it with `central ca init` and the same --pki-dir / "
                "--db / --config, or give the right one")
    directory: Path


def _existing_ca(settings: Any) -> CertificateAuthority:
    from central.identity.ca import CA_KEY, load_ca
    from central.identity.enrolment_api import pki_dir_for

    directory = pki_dir_for(settings).resolve()
    if not (directory / CA_KEY).exists():
        raise CaMissingError(directory)
    return load_ca(directory)


def _fail(exc: BaseException) -> typer.Exit:
    error(err, exc)
    return typer.Exit(1)


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(fn())  # type: ignore[arg-type]
    except (CentralError, OSError) as exc:
        raise _fail(exc) from exc


def parse_duration(text: str) -> float:
    """`3600`, `90s`, `30m`, `24h`, `7d` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise typer.BadParameter(f"{text!r}: expected e.g. 3600, 30m, 24h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}[m.group(2)]


async def _with_service(settings: Any, fn: Callable[[Any], Awaitable[T]]) -> T:
    from central.cli.database import require_existing_database
    from central.identity.audit import AuditLog
    from central.identity.cli import cli_actor
    from central.identity.enrolment import Enrolment
    from central.identity.enrolment_api import identity_audit
    from central.identity.enrolment_store import EnrolmentStore
    from central.storage import open_storage

    require_existing_database(settings.db_url)  # never make a new one (central init does)
    ca = _existing_ca(settings)
    async with EnrolmentStore(settings.db_url) as store, \
            open_storage(settings.db_url) as storage:
        service = Enrolment(ca=ca, store=store, central_public_key="",
                            cert_days=settings.gateway_cert_days,
                            token_ttl_s=settings.enrol_token_ttl_s,
                            audit=identity_audit(AuditLog(storage), cli_actor()))
        return await fn(service)


# --- central ca ------------------------------------------------------------------------------


@ca_app.command("init", short_help="Make the CA (once).  e.g. central ca init -c central.toml")
def ca_init(config: ConfigOpt = None, db: DbOpt = None, pki_dir: PkiOpt = None,
            as_json: JsonOpt = False) -> None:
    """Make the gateway CA if it does not exist yet (key 0600) and show where it is.

    Example: central ca init --config /etc/fieldlink/central.toml
    """
    from central.identity.ca import fingerprint, load_or_create_ca
    from central.identity.enrolment_api import pki_dir_for

    try:
        ca = load_or_create_ca(pki_dir_for(_settings(config, db, pki_dir)))
    except (CentralError, OSError) as exc:
        raise _fail(exc) from exc
    info = {"dir": str(ca.dir), "ca_cert": str(ca.cert_path), "crl": str(ca.crl_path),
            "subject": ca.cert.subject.rfc4514_string(), "sha256": fingerprint(ca.cert)}
    if as_json:
        typer.echo(json.dumps(info))
    else:
        for k, v in info.items():
            say(out, f"{k:8} {v}")


@ca_app.command("central-cert", short_help="Central's own MQTT client certificate.  "
                "e.g. central ca central-cert --out /etc/fieldlink/mqtt")
def central_cert(out_dir: Annotated[Path, typer.Option("--out", help="Folder for central.crt, "
                                                                      "central.key, ca.crt.")],
                 cn: Annotated[str, typer.Option(
                     help="The CN the broker's ACL names.")] = "_central",
                 days: Annotated[float, typer.Option(help="Lifetime in days.")] = 825,
                 config: ConfigOpt = None, db: DbOpt = None, pki_dir: PkiOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Issue central's MQTT client certificate (CN _central) from the CA, with a fresh key
    (mode 0600), and print the settings that use it.

    Example: central ca central-cert --out /etc/fieldlink/mqtt -c /etc/fieldlink/central.toml
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from central.identity.ca import new_key_and_csr, write_private, write_public

    try:
        ca = _existing_ca(_settings(config, db, pki_dir))
        key_pem, csr_pem = new_key_and_csr(cn)
        cert = ca.issue(cn, x509.load_pem_x509_csr(csr_pem).public_key(), days=days)  # type: ignore[arg-type]
        out_dir = out_dir.resolve()
        write_private(out_dir / "central.key", key_pem)
        write_public(out_dir / "central.crt", cert.public_bytes(serialization.Encoding.PEM))
        write_public(out_dir / "ca.crt", ca.cert_path.read_bytes())
    except (CentralError, OSError) as exc:
        raise _fail(exc) from exc
    info = {"mqtt_tls_ca": str(out_dir / "ca.crt"), "mqtt_tls_cert": str(out_dir / "central.crt"),
            "mqtt_tls_key": str(out_dir / "central.key")}
    if as_json:
        typer.echo(json.dumps(info))
        return
    say(out, "# add to central's settings ([central] table):")
    for k, v in info.items():
        say(out, f'{k} = "{v}"')


# --- central gateway -------------------------------------------------------------------------


@gateway_app.command("enroll-token", short_help="A one-time enrolment token.  "
                     "e.g. central gateway enroll-token gw-001 --ttl 24h")
def enroll_token(gw: Annotated[str, typer.Argument(help="The gateway id (its certificate CN).")],
                 ttl: Annotated[str | None, typer.Option(
                     help="Lifetime: seconds or 30m, 24h, 7d "
                          "(default: enrol_token_ttl_s).")] = None,
                 config: ConfigOpt = None, db: DbOpt = None, pki_dir: PkiOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Make a one-time, expiring enrolment token for GW. It is shown once: central keeps only
    its hash. On the gateway: edge-agent enroll -c site.toml --central URL --token TOKEN

    Example: central gateway enroll-token gw-001 --ttl 24h --config /etc/fieldlink/central.toml
    """
    ttl_s = parse_duration(ttl) if ttl is not None else None
    try:
        settings = _settings(config, db, pki_dir)
    except CentralError as exc:
        raise _fail(exc) from exc
    issued = _run(lambda: _with_service(settings, lambda s: s.issue_token(gw, ttl_s)))
    if as_json:
        typer.echo(json.dumps({"gateway": issued.gw, "token": issued.token,
                               "expires_ms": issued.expires_ms}))
        return
    say(out, f"token for {issued.gw} (valid until {when(issued.expires_ms)}, one use):")
    typer.echo(issued.token)


@gateway_app.command("revoke", short_help="Revoke a gateway's certificates.  "
                     "e.g. central gateway revoke gw-001")
def revoke(gw: Annotated[str, typer.Argument(help="The gateway id.")],
           config: ConfigOpt = None, db: DbOpt = None, pki_dir: PkiOpt = None,
           as_json: JsonOpt = False) -> None:
    """Revoke every certificate of GW and void its unused tokens; rewrites the CRL. Then
    reload the broker (systemctl reload mosquitto: SIGHUP) so that it reads the new CRL; the
    other gateways stay connected.

    Example: central gateway revoke gw-001 --config /etc/fieldlink/central.toml
    """
    try:
        settings = _settings(config, db, pki_dir)
    except CentralError as exc:
        raise _fail(exc) from exc
    r = _run(lambda: _with_service(settings, lambda s: s.revoke(gw)))
    if as_json:
        typer.echo(json.dumps({"gateway": r.gw, "serials": list(r.serials),
                               "tokens_voided": r.tokens_voided, "crl": str(r.crl_path)}))
        return
    say(out, f"revoked {len(r.serials)} certificate(s) of {r.gw}, voided {r.tokens_voided} "
             f"token(s); CRL written to {r.crl_path}")
    say(out, RELOAD_BROKER)


@gateway_app.command("certs", short_help="Issued certificates.  e.g. central gateway certs gw-001")
def certs(gw: Annotated[str | None, typer.Argument(help="Only this gateway.")] = None,
          config: ConfigOpt = None, db: DbOpt = None, pki_dir: PkiOpt = None,
          as_json: JsonOpt = False) -> None:
    """List the certificates central issued, with validity and revocation.

    Example: central gateway certs --json
    """
    try:
        settings = _settings(config, db, pki_dir)
    except CentralError as exc:
        raise _fail(exc) from exc
    rows = _run(lambda: _with_service(settings, lambda s: s.store.certs(gw)))
    if as_json:
        typer.echo(json.dumps([{"gateway": r.gw, "serial": r.serial, "how": r.how,
                                "not_after_ms": r.not_after_ms, "revoked_ms": r.revoked_ms,
                                "sha256": r.fingerprint} for r in rows]))
        return
    out.print(table(["gateway", "serial", "how", "valid until", "revoked"],
                    [[r.gw, r.serial[:16], r.how, when(r.not_after_ms), when(r.revoked_ms)]
                     for r in rows]))


# --- central broker-config -------------------------------------------------------------------


def broker_config(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write the broker's files to.")],
    host: Annotated[list[str], typer.Option(
        "--host", help="Name or address gateways use to reach the broker (repeatable).")],
    port: Annotated[int, typer.Option(help="Gateways' TLS listener.")] = 8883,
    bind: Annotated[str, typer.Option(help="Address of the gateways' listener.")] = "0.0.0.0",
    central_port: Annotated[int, typer.Option(help="Central's TLS listener.")] = 8884,
    central_bind: Annotated[str, typer.Option(help="Address of central's listener.")] = "127.0.0.1",
    crl: Annotated[Path | None, typer.Option(help="CRL path the broker reads (default: "
                                                  "central's pki/crl.pem).")] = None,
    persistence: Annotated[Path | None, typer.Option(help="Broker persistence folder.")] = None,
    user: Annotated[str | None, typer.Option(help="User Mosquitto runs as after start "
                                                  "(default: its own, mosquitto).")] = None,
    config: ConfigOpt = None, db: DbOpt = None, pki_dir: PkiOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a production Mosquitto config: mutual-TLS listeners (require_certificate,
    use_identity_as_username), the CRL, per-gateway ACLs, nothing anonymous, persistence on;
    with the broker's certificate issued by central's CA.

    Example: central broker-config --out /etc/mosquitto/fieldlink --host mqtt.example.gov.cn
    """
    from central.identity.broker_config import write_broker_config

    try:
        ca = _existing_ca(_settings(config, db, pki_dir))
        files = write_broker_config(ca, out_dir, hosts=host, port=port, bind=bind,
                                    central_port=central_port, central_bind=central_bind,
                                    crl=crl, persistence=persistence, user=user)
    except (CentralError, OSError) as exc:
        raise _fail(exc) from exc
    info = {k: str(getattr(files, k)) for k in ("conf", "acl", "ca", "cert", "key", "crl")}
    if as_json:
        typer.echo(json.dumps(info))
        return
    for k, v in info.items():
        say(out, f"{k:5} {v}")
    say(out, f"run: mosquitto -c {files.conf}")
