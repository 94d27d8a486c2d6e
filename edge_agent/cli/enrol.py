"""`edge-agent enroll` and `edge-agent renew`: the gateway's certificate (DESIGN.md §8)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from edge_agent.cli.common import ConfigOpt, JsonOpt, errors, out, print_json


def _central_url(value: str | None) -> str | None:
    """`--central` must be an http(s) URL with a host: anything else is a usage error (2)."""
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise typer.BadParameter(f"{value!r} is not an http(s) URL, e.g. "
                                 "https://central.example:8080")
    return value


CacertOpt = Annotated[Path | None, typer.Option(
    "--cacert", help="CA bundle to check central's HTTPS certificate with (default: the "
                     "system's)")]


def _show(result_json: dict[str, object], as_json: bool, verb: str) -> None:
    if as_json:
        print_json(result_json)
        return
    until = time.strftime("%Y-%m-%d", time.gmtime(int(str(result_json["not_after_ms"])) / 1000))
    out.print(f"[green]{verb}[/green] {result_json['gateway']} with {result_json['central']}: "
              f"certificate {str(result_json['serial'])[:16]} valid until {until}")
    out.print(f"key {result_json['key']} (0600), certificate {result_json['cert']}, "
              f"CA {result_json['ca']}, central's command key {result_json['central_public_key']}")
    written = ("\\[mqtt.tls] and " if result_json.get("mqtt_tls_written") else "") + \
        "\\[commands] central_public_key"
    if verb == "renewed":  # same files, new contents: the uplink reads them at each connect
        out.print(f"{result_json['config']}: {written} written; the running agent uses the new "
                  "certificate from its next connection (no restart needed)")
        return
    out.print(f"{result_json['config']}: {written} written; restart the agent "
              "(systemctl restart fieldlink-edge) to use them")


def enroll(
    config: ConfigOpt,
    central: Annotated[str, typer.Option("--central", help="central's URL, "
                                         "e.g. https://central.example:8080",
                                         callback=_central_url)],
    token: Annotated[str, typer.Option("--token", help="the one-time token from "
                                       "`central gateway enroll-token GW`",
                                       envvar="FIELDLINK_ENROL_TOKEN")],
    cacert: CacertOpt = None,
    mqtt_tls: Annotated[bool, typer.Option(
        "--mqtt-tls/--no-mqtt-tls",
        help="write \\[mqtt.tls] (off for a broker without TLS)")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Enrol this gateway: make its key here (mode 0600), send a certificate request with the
    one-time token, write the certificate, the CA and central's command key into
    <data_dir>/pki/, and the \\[mqtt.tls] section into the config.

    Example: edge-agent enroll -c /etc/fieldlink/site.toml
    --central https://central.example:8080 --token 3q2-…
    """
    from edge_agent.uplink.enrolment import enrol

    with errors():
        result = enrol(Path(config), central, token, cacert=cacert, write_tls=mqtt_tls)
    _show(result.to_jsonable(), as_json, "enrolled")


def renew(
    config: ConfigOpt,
    central: Annotated[str | None, typer.Option("--central", help="central's URL (default: "
                                                "the one enrolled with)",
                                                callback=_central_url)] = None,
    cacert: CacertOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Renew the gateway's certificate before it expires: a new key, proven by the current
    certificate (no token needed). Refused once the certificate is revoked or expired.

    Example: edge-agent renew -c /etc/fieldlink/site.toml
    """
    from edge_agent.uplink.enrolment import renew as do_renew

    with errors():
        result = do_renew(Path(config), central, cacert=cacert)
    _show(result.to_jsonable(), as_json, "renewed")


def register(app: typer.Typer) -> None:
    app.command(short_help="Get this gateway's certificate with a one-time token.  "
                "e.g. [cyan]edge-agent enroll -c site.toml --central https://central:8080 "
                "--token T[/cyan]")(enroll)
    app.command(short_help="Renew the gateway's certificate before it expires.  "
                "e.g. [cyan]edge-agent renew -c site.toml[/cyan]")(renew)
