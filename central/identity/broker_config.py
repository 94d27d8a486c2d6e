"""`central broker-config --out DIR`: a production Mosquitto set-up for Fieldlink (DESIGN.md §8).

Written into DIR:

| file | what |
|---|---|
| `mosquitto.conf` | two mutual-TLS listeners, no anonymous, persistence on, CRL, ACL file |
| `acl` | a gateway writes only `fieldlink/v1/<CN>/up/#`, reads only `.../<CN>/down/#` |
| | and `fieldlink/v1/_central/state` (central's online state: it resends on central's return) |
| | `_central` reads every `up/`, writes every `down/` and its own state |
| `ca.crt` | the gateway CA (clients' certificates must chain to it) |
| `server.crt`, `server.key` (0600) | the broker's own certificate, for the names in `--host` |

Two listeners, because Mosquitto's `use_username_as_clientid` is per listener: on the gateways'
listener the client id is forced to the certificate's CN, so one gateway cannot take over
another's session by connecting with its client id; central's connections (ingest, command
dispatcher, shared workers) need ids of their own, so they use a second listener that only
central's hosts should reach (bind it to their network, or firewall it).

Mosquitto started as root drops to the `mosquitto` user (or `--user`), which must be able to
read `server.key` (chown it) and the CRL.

`crlfile` names central's own `crl.pem` (rewritten by `central gateway revoke`); Mosquitto
re-reads it on SIGHUP (`systemctl reload mosquitto`), so a revocation takes effect for new
connections at the next reload; a restart also ends the revoked gateway's open session.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from central.identity.ca import CertificateAuthority, new_key_and_csr, write_private, write_public

CENTRAL_CN = "_central"
SERVER_CN = "_broker"


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    conf: Path
    acl: Path
    ca: Path
    cert: Path
    key: Path
    crl: Path


def acl_text(central_cn: str = CENTRAL_CN) -> str:
    return f"""\
# Fieldlink broker ACL (written by `central broker-config`). The username is the client
# certificate's CN (use_identity_as_username): a gateway's id, or {central_cn} for central.

# Every gateway: its own uplink and downlink only, and central's online state.
pattern write fieldlink/v1/%u/up/#
pattern read fieldlink/v1/%u/down/#
pattern read fieldlink/v1/_central/state

# Central: every gateway's uplink (also as a shared-subscription group), every downlink,
# and its own state (with its Will).
user {central_cn}
topic read fieldlink/v1/+/up/#
topic read $share/central/fieldlink/v1/+/up/#
topic write fieldlink/v1/+/down/#
topic readwrite fieldlink/v1/_central/state
"""


def conf_text(d: Path, crl: Path, *, port: int, bind: str, central_port: int,
              central_bind: str, persistence: Path, user: str | None = None) -> str:
    tls = (f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
           f"crlfile {crl}\nrequire_certificate true\nuse_identity_as_username true\n")
    return f"""\
# Fieldlink production broker (written by `central broker-config`; DESIGN.md §8).
# Nothing anonymous, mutual TLS only, per-gateway ACLs, revocation by CRL.
per_listener_settings false
{f"user {user}" + chr(10) if user else ""}allow_anonymous false
acl_file {d / 'acl'}
persistence true
persistence_location {persistence}/
autosave_interval 60
# Queue generously for a gateway or central that is away; the edge resends what is lost.
max_queued_messages 100000
max_inflight_messages 100

# Gateways: the client id is forced to the certificate's CN.
listener {port} {bind}
{tls}use_username_as_clientid true

# Central only (ingest, command dispatcher, shared workers): reachable from central's hosts.
listener {central_port} {central_bind}
{tls}"""


def write_broker_config(ca: CertificateAuthority, out: Path, *, hosts: list[str],
                        port: int = 8883, bind: str = "0.0.0.0", central_port: int = 8884,
                        central_bind: str = "127.0.0.1", crl: Path | None = None,
                        persistence: Path | None = None, cert_days: float = 825,
                        user: str | None = None) -> BrokerFiles:
    """Write the broker's files into `out` (see the module doc); returns their paths."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    crl = Path(crl).resolve() if crl else ca.crl_path.resolve()
    if not crl.exists():
        raise FileNotFoundError(f"no CRL at {crl}: start central once or run `central ca init`")
    key_pem, csr_pem = new_key_and_csr(SERVER_CN)
    csr = x509.load_pem_x509_csr(csr_pem)
    pub = csr.public_key()
    cert = ca.issue(SERVER_CN, pub, days=cert_days, server_names=hosts, client=False)  # type: ignore[arg-type]
    files = BrokerFiles(conf=out / "mosquitto.conf", acl=out / "acl", ca=out / "ca.crt",
                        cert=out / "server.crt", key=out / "server.key", crl=crl)
    write_private(files.key, key_pem)
    write_public(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    shutil.copyfile(ca.cert_path, files.ca)
    write_public(files.acl, acl_text().encode())
    persistence = Path(persistence).resolve() if persistence else out / "data"
    persistence.mkdir(parents=True, exist_ok=True)
    write_public(files.conf, conf_text(out, crl, port=port, bind=bind,
                                       central_port=central_port, central_bind=central_bind,
                                       persistence=persistence, user=user).encode())
    return files
