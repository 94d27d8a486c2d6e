#!/usr/bin/env python3
"""Build the Debian packages fieldlink-edge and fieldlink-central (`make deb`).

Each package carries a self-contained virtual environment made with the machine's Python
(`--python`, default /usr/bin/python3, so the package depends on that Debian python3.X):
fieldlink-edge under /opt/fieldlink/edge with `.[edge]`, fieldlink-central under
/opt/fieldlink/central with `.[central]`, and /opt/fieldlink/bin/{edge-agent,central} (also
in /usr/bin) pointing into them, so both fit on one host. The environment is built in a
staging folder and the staging path is then rewritten to the installed one in its scripts;
no byte-code is shipped (postinst compiles it, prerm removes it). Only the standard library,
pip and dpkg-deb are used: no debhelper. See packaging/README.md.

Example: python3 packaging/build_deb.py --out dist --package edge
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "packaging"
OPT = Path("/opt/fieldlink")


class BuildError(Exception):
    """A step of the package build failed; the message says which."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One Debian package: its name, the extra it installs, its command, unit and config."""

    name: str
    venv: str
    extra: str
    command: str
    conf: str
    conf_source: Path
    other: str
    state: str
    summary: str
    description: str
    # The edge agent rewrites its own site.toml (remote configuration), so it is no conffile:
    # postinst puts the example in place when there is none and never touches it again, so an
    # upgrade can neither prompt on a gateway nobody watches nor bring the example back.
    conffile: bool = True
    etc_mode: str = "u=rwx,g+rx,o="  # keeps g+w, which the edge package may have given
    etc_purge: str = ""  # what purge removes from /etc/fieldlink besides conffiles
    etc_tmpfiles: str = ""  # the /etc/fieldlink line, from the edge package only

    @property
    def seed(self) -> Path:
        """Where a package whose config is no conffile keeps the config an install starts from."""
        return Path("/usr/share") / self.name / self.conf


SPECS = {
    "edge": Spec(
        name="fieldlink-edge", venv="edge", extra="edge", command="edge-agent",
        conf="site.toml", conf_source=ROOT / "examples" / "site.toml", other="fieldlink-central",
        state="/var/lib/fieldlink/outbox.db* /var/lib/fieldlink/agent.sock",
        summary="Fieldlink edge agent (field device poller and uplink)",
        description="Polls Modbus field devices, evaluates alarm rules, keeps every reading\n"
                    " in a SQLite outbox and delivers it to central over MQTT, with BeiDou/PDT\n"
                    " fallback. Runs as the systemd service fieldlink-edge.",
        conffile=False, etc_mode="0770",
        etc_purge="/etc/fieldlink/site.toml /etc/fieldlink/site.toml.history "
                  "/etc/fieldlink/.site.toml-*",
        etc_tmpfiles="# Group-writable: the agent replaces site.toml itself (remote "
                     "configuration).\nd /etc/fieldlink 0770 root fieldlink -\n"),
    "central": Spec(
        name="fieldlink-central", venv="central", extra="central", command="central",
        conf="central.toml", conf_source=HERE / "central.toml", other="fieldlink-edge",
        state="/var/lib/fieldlink/central.db*",
        summary="Fieldlink central (MQTT ingest, API, duty officers' console)",
        description="Receives the gateways' data over MQTT, stores it in SQLite or\n"
                    " PostgreSQL, raises alarms and serves the API and the Chinese web\n"
                    " console. Runs as the systemd service fieldlink-central."),
}


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(str(a) for a in args)} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    return proc.stdout


def _version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
               ["project"]["version"])


def build_wheel(python: Path, work: Path) -> Path:
    """The project's own wheel (no dependencies), built once for both packages."""
    out = work / "wheel"
    # A copy of the sources, so the build's build/ and *.egg-info do not land in the checkout.
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench",
        "model", "demo-data", ".hypothesis", ".pytest_cache", "*.db*"))
    tools = work / "buildenv"  # the target Python may have no pip of its own (Debian)
    _run(python, "-m", "venv", tools)
    _run(tools / "bin" / "python", "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--wheel-dir", out, src)
    wheels = sorted(out.glob("fieldlink-*.whl"))
    if not wheels:
        raise BuildError(f"no wheel in {out}")
    return wheels[0]


def _rewrite_prefix(tree: Path, staged: Path, installed: Path) -> None:
    """Replace the staging path by the installed one in every text file that names it."""
    old, new = str(staged).encode(), str(installed).encode()
    for path in tree.rglob("*"):
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data:
            path.write_bytes(data.replace(old, new))


def _python_minor(python: Path) -> str:
    code = "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"
    return _run(python, "-c", code).strip()


def stage(spec: Spec, wheel: Path, python: Path, root: Path) -> None:
    """Lay out the package's files under `root` (the future `/`)."""
    venv = root / OPT.relative_to("/") / spec.venv
    installed = OPT / spec.venv
    _run(python, "-m", "venv", venv)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile",
         f"{wheel}[{spec.extra}]")
    for cache in sorted(venv.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache, ignore_errors=True)
    _rewrite_prefix(venv, venv, installed)
    # Pin the exact interpreter the site-packages were built for, not whatever python3 becomes.
    interpreter = venv / "bin" / "python3"
    interpreter.unlink()
    interpreter.symlink_to(f"/usr/bin/python{_python_minor(python)}")
    # One command per package (the wheel declares both), and no trace of the build folder.
    for other in {s.command for s in SPECS.values()} - {spec.command}:
        (venv / "bin" / other).unlink(missing_ok=True)
    for direct_url in venv.glob("lib/python*/site-packages/fieldlink-*.dist-info/direct_url.json"):
        direct_url.unlink()

    bin_dir = root / "opt/fieldlink/bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / spec.command).symlink_to(f"../{spec.venv}/bin/{spec.command}")
    usr_bin = root / "usr/bin"
    usr_bin.mkdir(parents=True, exist_ok=True)
    (usr_bin / spec.command).symlink_to(OPT / "bin" / spec.command)

    def put(src: Path, dest: str, mode: int = 0o644) -> None:
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        target.chmod(mode)

    put(HERE / f"{spec.name}.service", f"/usr/lib/systemd/system/{spec.name}.service")
    put(HERE / "fieldlink.sysusers", f"/usr/lib/sysusers.d/{spec.name}.conf")
    put(HERE / "fieldlink.tmpfiles", f"/usr/lib/tmpfiles.d/{spec.name}.conf")
    if spec.etc_tmpfiles:
        with (root / f"usr/lib/tmpfiles.d/{spec.name}.conf").open("a") as tmpfiles:
            tmpfiles.write(spec.etc_tmpfiles)
    if spec.conffile:
        put(spec.conf_source, f"/etc/fieldlink/{spec.conf}", 0o640)
        (root / "etc/fieldlink").chmod(0o750)
    else:
        put(spec.conf_source, str(spec.seed))
    doc = f"/usr/share/doc/{spec.name}"
    put(HERE / "README.md", f"{doc}/README.md")
    put(spec.conf_source, f"{doc}/examples/{spec.conf}")
    for rules in sorted(HERE.glob("alerts-*.yml")):
        put(rules, f"{doc}/examples/{rules.name}")
    if spec.venv == "central":
        _broker_example(venv / "bin" / "python", root / doc.lstrip("/") / "examples" / "mosquitto")


def _broker_example(python: Path, out: Path) -> None:
    """The Mosquitto files `central broker-config` writes, with the packaged paths, as an
    example."""
    out.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys; from pathlib import Path\n"
        "from central.identity.broker_config import acl_text, conf_text\n"
        "d = Path('/etc/mosquitto/fieldlink')\n"
        "conf = conf_text(d, Path('/var/lib/fieldlink/pki/crl.pem'), port=8883, bind='0.0.0.0',\n"
        "                 central_port=8884, central_bind='127.0.0.1',\n"
        "                 persistence=Path('/var/lib/mosquitto/fieldlink'), user='mosquitto')\n"
        "Path(sys.argv[1], 'mosquitto.conf').write_text(conf + open(sys.argv[2]).read())\n"
        "Path(sys.argv[1], 'acl').write_text(acl_text())\n")
    _run(python, "-c", code, out, HERE / "mosquitto-limits.conf")


def _control(spec: Spec, root: Path, python_minor: str) -> str:
    files = (p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    size_kb = sum(p.stat().st_size for p in files) // 1024
    arch = _run("dpkg", "--print-architecture").strip()
    return (f"Package: {spec.name}\n"
            f"Version: {_version()}\n"
            f"Architecture: {arch}\n"
            "Maintainer: Fieldlink maintainers <fieldlink@localhost>\n"
            "Section: net\n"
            "Priority: optional\n"
            f"Installed-Size: {size_kb}\n"
            f"Depends: python{python_minor}, passwd\n"
            "Recommends: systemd\n"
            + ("Suggests: mosquitto, postgresql\n" if spec.venv == "central" else "")
            + f"Description: {spec.summary}\n {spec.description}\n")


def _maintainer_script(name: str, spec: Spec) -> str:
    text = (HERE / "deb" / name).read_text(encoding="utf-8")
    seed = "" if spec.conffile else str(spec.seed)
    for key, value in {"@PKG@": spec.name, "@VENV@": spec.venv, "@CONF@": spec.conf,
                       "@OTHER@": spec.other, "@STATE@": spec.state, "@SEED@": seed,
                       "@ETC_MODE@": spec.etc_mode, "@ETC_PURGE@": spec.etc_purge}.items():
        text = text.replace(key, value)
    return text


def build(spec: Spec, wheel: Path, python: Path, work: Path, out: Path) -> Path:
    """Stage one package and turn it into `out/<name>_<version>_<arch>.deb`."""
    root = work / spec.name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    stage(spec, wheel, python, root)
    debian = root / "DEBIAN"
    debian.mkdir()
    (debian / "control").write_text(_control(spec, root, _python_minor(python)))
    if spec.conffile:
        (debian / "conffiles").write_text(f"/etc/fieldlink/{spec.conf}\n")
    for name in ("postinst", "prerm", "postrm"):
        script = debian / name
        script.write_text(_maintainer_script(name, spec))
        script.chmod(0o755)
    out.mkdir(parents=True, exist_ok=True)
    arch = _run("dpkg", "--print-architecture").strip()
    deb = out / f"{spec.name}_{_version()}_{arch}.deb"
    _run("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, deb)
    return deb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Example: python3 packaging/build_deb.py --out dist")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the .deb files go")
    parser.add_argument("--package", choices=[*SPECS, "all"], default="all")
    parser.add_argument("--python", type=Path, default=Path("/usr/bin/python3"),
                        help="the Python the packages run on (the target's Debian python3)")
    args = parser.parse_args(argv)
    if shutil.which("dpkg-deb") is None:
        print("error: dpkg-deb not found (apt-get install dpkg)", file=sys.stderr)
        return 1
    specs = list(SPECS.values()) if args.package == "all" else [SPECS[args.package]]
    with tempfile.TemporaryDirectory(prefix="fieldlink-deb-") as tmp:
        work = Path(tmp)
        os.umask(0o022)
        try:
            wheel = build_wheel(args.python, work)
            for spec in specs:
                print(build(spec, wheel, args.python, work, args.out.resolve()))
        except BuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
