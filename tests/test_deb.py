"""The Debian packages fieldlink-edge and fieldlink-central, built by packaging/build_deb.py, installed as root in a private root of this machine.

The package tests run dpkg, systemd-sysusers and the packaged services for real, but never
on the shared host: test_in_a_private_root runs each of them again in a child pytest inside
its own mount namespace (`unshare --mount`) whose /etc, /opt, /usr, /var and /run are overlays
of the host's, with the writes in the test's tmp_path. So no other test, and nothing else on
the host, ever sees /etc/fieldlink/*.toml (both CLIs' default config), the fieldlink user or
dpkg's lock, and two sessions on one host each install into their own root. Outside that
root the package tests skip; afterwards the outer test checks the host is untouched. If the
private root cannot be made it skips too: it never installs on the host.
Both packages are built once per session, on the host (the build installs nothing; about a
minute and a half).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "fieldlink-edge"
PACKAGES = (PKG, "fieldlink-central")
OURS = (Path("/etc/fieldlink"), Path("/opt/fieldlink"), Path("/var/lib/fieldlink"))
UNIT = Path("/usr/lib/systemd/system/fieldlink-edge.service")
# The private root: every tree a package, its maintainer scripts or its services write to.
PRIVATE = ("/etc", "/opt", "/usr", "/var", "/run")
# Set for the child pytest only: the host's mount namespace (which the child must not be in),
# and the folder holding the packages the outer test built.
HOST_NS = "FIELDLINK_TEST_DEB_HOST_NS"
DEB_DIR = "FIELDLINK_TEST_DEB_DIR"
READY = "fieldlink-test-deb: private root mounted"  # the child's first line once it is

# The outer tests build both packages once; one worker runs them.
pytestmark = [pytest.mark.deb, pytest.mark.timeout(1200), pytest.mark.xdist_group("dpkg")]


def _run(*args: str, check: bool = True, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check:
        assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc  # type: ignore[no-any-return]


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package],
                          capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout[1:2] in {"i", "c", "h", "U", "F", "W", "t"}


def _overlaid() -> set[str]:
    """The mount points of this process's overlay file systems."""
    points = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, fs = line.partition(" - ")
        if fs.split()[0] == "overlay":
            points.add(fields.split()[4])
    return points


@pytest.fixture(scope="session")
def debs() -> dict[str, Path]:
    """In the private root: the packages test_in_a_private_root built."""
    host_ns = os.environ.get(HOST_NS)
    if host_ns is None:
        pytest.skip("installs the packages: runs only in the private root of test_in_a_private_root")
    # Whatever the environment says, dpkg never runs in the host's /etc, /opt, /usr, /var or /run.
    assert os.readlink("/proc/self/ns/mnt") != host_ns, "the host's mount namespace"
    assert set(PRIVATE) <= _overlaid(), f"not overlays: {set(PRIVATE) - _overlaid()}"
    out = Path(os.environ[DEB_DIR])
    return {name: next(out.glob(f"{name}_*.deb")) for name in PACKAGES}


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in {"FIELDLINK_CONFIG", "VIRTUAL_ENV"}}


def _files_under(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


# What `apply_config` does to the config folder, with the packaged code, as the agent's user:
# the checks it runs before trying (the folder must be writable), then a trial that keeps the
# old file in site.toml.history/ and replaces site.toml, then the rollback.
_REMOTE_CONFIG = """
import time
from pathlib import Path
from edge_agent.config.remote import ConfigHistory, check_candidate
from edge_agent.config.site import load_config

path = Path("/etc/fieldlink/site.toml")
history = ConfigHistory(path)
old = history.live_text()
new = old + "\\n# pushed by central\\n"
check_candidate(new, load_config(path))
trial = history.begin("cmd-deb", new, baseline=(), window_s=60.0, now_ms=int(time.time() * 1000))
assert history.live_text() == new
history.roll_back(trial, "deb test")
assert history.live_text() == old
history.clear_trial()
print("generation", trial.generation)
"""


def _unit_read_write_paths(unit: Path) -> list[str]:
    return [p for line in unit.read_text().splitlines() if line.startswith("ReadWritePaths=")
            for p in line.split("=", 1)[1].split()]


def _as_agent_in_unit_sandbox(unit: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` with the packaged Python as `fieldlink`, /etc read-only except the unit's
    ReadWritePaths under it (what ProtectSystem=strict does to /etc; systemd is not PID 1
    here, so a private mount namespace stands in for the unit's)."""
    rw = " ".join(p for p in _unit_read_write_paths(unit) if p.startswith("/etc/"))
    script = ('set -e; mount --bind /etc /etc; '
              f'for p in {rw}; do mount --bind "$p" "$p"; done; '
              'mount -o remount,bind,ro /etc; '
              'exec runuser -u fieldlink -- /opt/fieldlink/edge/bin/python -c "$0"')
    return _run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, code,
                env=_env(), cwd="/var/lib/fieldlink", check=False)


def _repacked(deb: Path, out: Path, version_suffix: str) -> Path:
    """`deb` again as a newer version whose packaged example site.toml changed."""
    tree = out / "tree"
    _run("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN" / "control"
    text = control.read_text()
    version = next(line.split(": ", 1)[1] for line in text.splitlines()
                   if line.startswith("Version: "))
    control.write_text(text.replace(f"Version: {version}", f"Version: {version}{version_suffix}"))
    examples = [p for p in tree.rglob("site.toml") if "DEBIAN" not in p.parts]
    assert examples
    for example in examples:
        example.write_text(example.read_text() + "# a newer packaged example\n")
    new = out / f"{PKG}_{version}{version_suffix}.deb"
    # Uncompressed: the upgrade under test does not depend on it, and gzip-compressing the
    # package's whole environment again (and unpacking it) cost seconds of CPU.
    _run("dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(new))
    return new


def test_edge_package_installs_runs_and_removes_cleanly(debs: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """dpkg -i, edge-agent --help, systemd-analyze verify, status without -c, an edit kept on reinstall, then dpkg -r / -P leave nothing."""
    installed = _run("dpkg", "-i", str(debs[PKG]))
    assert "edit /etc/fieldlink/site.toml" in installed.stdout

    helped = _run("/opt/fieldlink/bin/edge-agent", "--help", env=_env(), cwd=tmp_path)
    assert "Usage" in helped.stdout and "status" in helped.stdout
    assert "edge-agent" in _run("/usr/bin/edge-agent", "--version", env=_env()).stdout
    assert not Path("/opt/fieldlink/edge/bin/central").exists()  # one command per package
    # The package's environment is `pip install '.[edge]'` into a fresh venv: no central stack.
    installed_dists = {p.name.split("-")[0].lower() for p in
                       Path("/opt/fieldlink/edge/lib").glob("python3*/site-packages/*.dist-info")}
    assert "fieldlink" in installed_dists and "aiomqtt" in installed_dists, installed_dists
    assert not installed_dists & {"fastapi", "starlette", "uvicorn", "psycopg", "psycopg_binary",
                                  "amqtt"}, installed_dists

    # The user, the directories and the config's permissions from sysusers/tmpfiles/postinst.
    assert _run("getent", "passwd", "fieldlink").stdout.startswith("fieldlink:")
    state = Path("/var/lib/fieldlink").stat()
    assert state.st_mode & 0o777 == 0o750
    conf = Path("/etc/fieldlink/site.toml").stat()
    assert conf.st_mode & 0o777 == 0o640 and conf.st_gid == state.st_gid and conf.st_uid == 0
    # Remote configuration: the agent replaces site.toml itself, so its folder is the group's.
    etc = Path("/etc/fieldlink").stat()
    assert etc.st_mode & 0o777 == 0o770 and (etc.st_uid, etc.st_gid) == (0, state.st_gid)
    assert "/etc/fieldlink" in _unit_read_write_paths(UNIT)

    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: .ci/run installs the systemd package")
    verify = _run("systemd-analyze", "verify", str(UNIT), check=False)
    assert verify.returncode == 0, verify.stderr
    assert "fieldlink-edge" not in verify.stderr, verify.stderr  # no warning about our unit

    # The packaged agent runs as its user with no -c (it finds /etc/fieldlink/site.toml) ...
    log = tmp_path / "agent.log"
    with log.open("w") as sink:
        agent = subprocess.Popen(["runuser", "-u", "fieldlink", "--", "/opt/fieldlink/bin/edge-agent",
                                  "run", "--log-json"], env=_env(), cwd="/var/lib/fieldlink",
                                 stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not Path("/var/lib/fieldlink/outbox.db").exists():
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the packaged agent made no outbox"
            time.sleep(0.2)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    # ... and so does `edge-agent status`.
    status = _run("/opt/fieldlink/bin/edge-agent", "status", "--json", env=_env(), cwd=tmp_path)
    report = json.loads(status.stdout)
    assert report["gateway"] == "gw-001"

    # Remote configuration works under the installed unit: as `fieldlink`, with /etc read-only
    # but for the unit's ReadWritePaths, the packaged code keeps a generation, replaces
    # site.toml and rolls it back.
    site = Path("/etc/fieldlink/site.toml")
    before = site.read_text()
    remote = _as_agent_in_unit_sandbox(UNIT, _REMOTE_CONFIG)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    assert "generation 1" in remote.stdout
    assert site.read_text() == before
    kept = Path("/etc/fieldlink/site.toml.history/gen-0001.toml")
    assert kept.read_text() == before and kept.stat().st_uid == state.st_uid
    assert site.stat().st_uid == state.st_uid and site.stat().st_mode & 0o777 == 0o640
    assert _run("/opt/fieldlink/bin/edge-agent", "status", "--json", env=_env(),
                cwd=tmp_path).returncode == 0  # root still reads the file the agent wrote

    # site.toml is no conffile: a newer package whose example changed neither asks (no one
    # answers on a hill: stdin is closed here) nor touches the file the agent or a
    # technician wrote.
    site.write_text(site.read_text() + "# edited on site\n")
    edited = site.read_text()
    newer = _repacked(debs[PKG], tmp_path, "+1")
    upgrade = _run("dpkg", "-i", str(newer), stdin=subprocess.DEVNULL, check=False)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert site.read_text() == edited
    assert Path("/etc/fieldlink").stat().st_mode & 0o777 == 0o770

    _run("dpkg", "-r", PKG)
    assert _files_under(Path("/opt/fieldlink")) == []
    assert not Path("/usr/bin/edge-agent").exists() and not UNIT.exists()
    assert site.read_text() == edited  # the config stays until purge
    assert Path("/etc/fieldlink").stat().st_mode & 0o777 == 0o750  # no agent left to write it

    _run("dpkg", "-P", PKG)
    assert not _installed(PKG)
    for path in OURS:
        assert _files_under(path) == [], path


def test_central_package_installs_finds_its_config_and_removes_cleanly(
        debs: dict[str, Path], tmp_path: Path) -> None:
    """fieldlink-central: central --help, its unit verifies, `central init` and `central user list` read /etc/fieldlink/central.toml, purge leaves nothing."""
    unit = Path("/usr/lib/systemd/system/fieldlink-central.service")
    _run("dpkg", "-i", str(debs["fieldlink-central"]))
    assert "Usage" in _run("/opt/fieldlink/bin/central", "--help", env=_env(), cwd=tmp_path).stdout
    assert not Path("/opt/fieldlink/central/bin/edge-agent").exists()
    # Central never rewrites its config: without the edge package its folder is read-only.
    assert Path("/etc/fieldlink").stat().st_mode & 0o777 == 0o750
    if shutil.which("systemd-analyze") is not None:
        verify = _run("systemd-analyze", "verify", str(unit), check=False)
        assert verify.returncode == 0 and "fieldlink-central" not in verify.stderr, verify.stderr
    # No -c: the packaged central.toml puts the database in /var/lib/fieldlink; `central
    # init` makes it (user list would refuse a database that does not exist).
    _run("runuser", "-u", "fieldlink", "--", "/opt/fieldlink/bin/central", "init", env=_env(),
         cwd="/var/lib/fieldlink")
    listed = _run("runuser", "-u", "fieldlink", "--", "/opt/fieldlink/bin/central", "user",
                  "list", "--json", env=_env(), cwd="/var/lib/fieldlink")
    assert json.loads(listed.stdout) == []
    assert Path("/var/lib/fieldlink/central.db").exists()
    mosquitto = Path("/usr/share/doc/fieldlink-central/examples/mosquitto/mosquitto.conf")
    example = mosquitto.read_text()  # what `central broker-config` writes, plus the limits
    for line in ("persistence true", "autosave_interval 60", "max_queued_messages 100000",
                 "max_queued_bytes 268435456", "persistent_client_expiration 30d",
                 "allow_anonymous false", "require_certificate true"):
        assert f"\n{line}\n" in example, line

    _run("dpkg", "-r", "fieldlink-central")
    assert _files_under(Path("/opt/fieldlink")) == [] and not unit.exists()
    _run("dpkg", "-P", "fieldlink-central")
    for path in OURS:
        assert _files_under(path) == [], path


def _packaged_files(deb: Path) -> list[str]:
    """Every path but the folders that `deb` installs."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                         check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return [os.path.normpath(f"/{m.name}") for m in archive.getmembers() if not m.isdir()]


def _host_traces(debs: list[Path]) -> list[str]:
    """What of Fieldlink's packages this machine holds: none of it before or after the tests."""
    traces = [str(p) for p in (*OURS, Path("/run/fieldlink")) if p.exists()]
    traces += [f"dpkg knows {p}" for p in PACKAGES if _installed(p)]
    for db in ("/etc/passwd", "/etc/group"):
        if any(line.startswith("fieldlink:") for line in Path(db).read_text().splitlines()):
            traces.append(f"fieldlink in {db}")
    traces += [p for deb in debs for p in _packaged_files(deb) if os.path.lexists(p)]
    return traces


@pytest.fixture(scope="session")
def deb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fieldlink-edge_*.deb and fieldlink-central_*.deb, built once per session on the host."""
    if shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg is not available: not a Debian system")
    if os.geteuid() != 0:
        pytest.skip("installing a package and mounting its private root need root")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare (util-linux) to make the private root with")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 to build the package's environment with")
    # The host's files show through the private root's overlays: one with Fieldlink on it would
    # make the package tests fail, and the check after them could not tell what they left.
    traces = _host_traces([])
    if traces:
        pytest.skip(f"Fieldlink is on this machine ({', '.join(traces)}): not testing over it")
    out = tmp_path_factory.mktemp("deb")
    # gzip's fastest level (dpkg-deb's own setting): the same files in the same format, for a
    # tenth of the CPU that the default level spends squeezing the environments.
    _run(sys.executable, str(ROOT / "packaging" / "build_deb.py"), "--out", str(out),
         timeout=1200, env=os.environ | {"DPKG_DEB_COMPRESSOR_LEVEL": "1"})
    return out


def _in_private_root(command: list[str], layers: Path, log: Path,
                     env: dict[str, str]) -> int:
    """`command`'s exit status, run in a new mount namespace with each of PRIVATE an overlay
    whose upper layer is under `layers`; `log` starts with READY once they are mounted."""
    mounts = []
    for tree in PRIVATE:
        upper, work = layers / tree.strip("/") / "upper", layers / tree.strip("/") / "work"
        upper.mkdir(parents=True)
        work.mkdir()
        options = f"lowerdir={tree},upperdir={upper},workdir={work}"
        mounts.append(f"mount -t overlay overlay -o {shlex.quote(options)} {tree}")
    script = f'{" && ".join(mounts)} && echo {shlex.quote(READY)} && exec "$@"'
    with log.open("w") as sink:
        child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  script, "sh", *command], cwd=ROOT, env=env, stdout=sink,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return child.wait(timeout=1000)
    finally:
        # The child's session: a packaged agent it left running would keep the root mounted.
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()


@pytest.mark.parametrize("inner", ["test_edge_package_installs_runs_and_removes_cleanly",
                                   "test_central_package_installs_finds_its_config_and_removes_cleanly"])
def test_in_a_private_root(inner: str, deb_dir: Path, tmp_path: Path) -> None:
    """The package test `inner` passes in a child pytest whose /etc, /opt, /usr, /var and /run are private overlays, and leaves no trace on the host."""
    if HOST_NS in os.environ:
        pytest.skip("already in a private root")
    debs = sorted(deb_dir.glob("*.deb"))
    junit, log = tmp_path / "inner.xml", tmp_path / "inner.log"
    env = {k: v for k, v in _env().items() if not k.startswith("PYTEST_")}
    env |= {HOST_NS: os.readlink("/proc/self/ns/mnt"), DEB_DIR: str(deb_dir)}
    status = _in_private_root(
        [sys.executable, "-m", "pytest", f"{__file__}::{inner}", "-n", "0",
         "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"),
         "--junitxml", str(junit), "-q", "-rfEs"], tmp_path / "layers", log, env)
    output = log.read_text()
    if not output.startswith(READY):  # unshare or a mount failed: never install on the host
        pytest.skip(f"cannot make a private root (unshare --mount, overlays): {output[-500:]}")
    output = output[-6000:]
    assert status == 0, output
    cases = ElementTree.parse(junit).getroot().iter("testcase")
    outcomes = {case.get("name"): [child.tag for child in case] for case in cases}
    assert outcomes == {inner: []}, output  # ran, and neither skipped nor failed
    traces = _host_traces(debs)
    assert traces == [], f"left on the host: {traces}"
    shutil.rmtree(tmp_path / "layers")  # a copy of both packages' environments
