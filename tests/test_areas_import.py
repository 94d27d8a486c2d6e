"""`central areas import FILE` / `central areas export` against a running central process, as
a logged-in admin: the example 武汉市 tree goes in with its positions (audited), a second
import changes nothing, the export re-imports unchanged; a file with bad rows lists every one
by line and writes nothing (exit 2); rows may come children first, with a BOM and CRLF;
--dry-run and a declined confirmation write nothing; conflicts are left alone (exit 1) except
a position with --update; a non-admin is refused by central."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import Central, sqlite_rows
from tests.helpers import free_port
from tests.identity import PASSWORD, cli_user
from tests.test_operator_cli import Operator

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "areas-wuhan.csv"
HEADER = "code,name_zh,level,parent_code,kind,lat,lon\n"


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Central]:
    """One central for the module (no broker: the API serves without ingest); each test
    builds its own city so they do not see each other's rows as theirs."""
    workdir = tmp_path_factory.mktemp("areas-import")
    c = Central(workdir, free_port())
    try:
        c.start()
        cli_user(c.db_url, "areas-admin", role="admin")
        cli_user(c.db_url, "areas-op", role="operator")
        yield c
    finally:
        c.stop()


def _login(central: Central, session: Path, user: str = "areas-admin") -> Operator:
    op = Operator(session)
    op.ok("login", "--url", central.base_url, "--user", user, "--password-stdin",
          stdin=PASSWORD + "\n")
    return op


def _areas(op: Operator) -> dict[str, dict[str, Any]]:
    """Every area central shows, by code, with its parent's code."""
    found: dict[str, dict[str, Any]] = {}

    def walk(nodes: list[dict[str, Any]], parent: str | None) -> None:
        for n in nodes:
            found[n["code"]] = {**n, "parent": parent}
            walk(n["children"], n["code"])

    walk(op.json("areas", "list"), None)
    return found


def _import(op: Operator, file: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = op.run("areas", "import", str(file), "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def test_example_tree_imports_once_and_round_trips(central: Central, tmp_path: Path) -> None:
    """The example file adds every area with its position, audited; importing it again and
    importing its export are all unchanged."""
    admin = _login(central, tmp_path / "s.json")
    rows = EXAMPLE.read_text(encoding="utf-8").splitlines()[1:]
    code, summary = _import(admin, EXAMPLE, "--yes")
    assert code == 0, summary
    assert summary | {"problems": []} == {"added": len(rows), "unchanged": 0, "conflicts": 0,
                                          "positioned": len(rows), "errors": 0,
                                          "dry_run": False, "problems": []}
    tree = _areas(admin)
    assert tree["420116-site-02"]["parent"] == "420116-mulan-shuangmiao"
    assert (tree["420116-mulan"]["kind"], tree["420116-mulan-shuangmiao"]["kind"]) == (
        "township", "village")
    assert (tree["420107-site-05"]["lat"], tree["420107-site-05"]["lon"]) == (30.6342, 114.3748)
    audit = sqlite_rows(central.db_path, "SELECT actor, action FROM audit_log WHERE action IN"
                                         " ('area.created', 'area.positioned')")
    assert audit.count(("areas-admin", "area.created")) == len(rows)
    assert audit.count(("areas-admin", "area.positioned")) == len(rows)

    code, again = _import(admin, EXAMPLE, "--yes")
    assert (code, again["added"], again["unchanged"], again["positioned"]) == (0, 0, len(rows), 0)

    exported = tmp_path / "export.csv"
    admin.run("areas", "export", str(exported))
    assert exported.read_bytes().startswith(b"\xef\xbb\xbf")  # Excel reads the Chinese
    assert set(exported.read_text(encoding="utf-8-sig").splitlines()[1:]) >= {
        "420116-mulan,木兰乡,street,420116,township,31.09,114.4"}
    code, back = _import(admin, exported)
    assert (code, back["added"], back["unchanged"], back["conflicts"]) == (0, 0, len(rows), 0)
    assert _areas(admin) == tree


def test_bad_rows_are_all_listed_by_line_and_nothing_is_written(central: Central,
                                                                 tmp_path: Path) -> None:
    """Every bad row is reported with its line and reason, the exit is 2, central unchanged."""
    admin = _login(central, tmp_path / "s.json")
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER +
                   "110100,北京市,city,,,,\n"                          # 2 fine
                   "110101,东城区,district,110100,,,\n"                  # 3 fine
                   "110101-a,东华门街道,street,110199,,,\n"              # 4 unknown parent
                   "110101-b,景山街道,shire,110101,,,\n"                 # 5 bad level
                   "110101-c,交道口街道,city,110101,,,\n"                # 6 level not below
                   "110101,东城区,district,110100,,,\n"                  # 7 duplicate code
                   "110101-site-1,某企业,site,110101,enterprise,91.5,116.4\n"  # 8 bad lat
                   "110101-site-2,某站,site,110101,village,,\n"          # 9 bad kind
                   "110101-site-3,某厂,site,110101,enterprise,39.9,\n",  # 10 lat without lon
                   encoding="utf-8")
    result = admin.run("areas", "import", str(bad), "--yes")
    assert result.exit_code == 2, result.stderr
    said = result.stderr
    for line, words in [(4, "unknown parent '110199'"), (5, "level 'shire'"),
                        (6, "a city cannot stand under a district"),
                        (7, "duplicate code (first on line 3)"), (8, "lat 91.5"),
                        (9, "not 'village'"), (10, "lat and lon go together")]:
        assert f"line {line}: " in said and words in said, (line, said)
    assert "line 2:" not in said and "line 3:" not in said
    assert "7 bad row(s); nothing imported" in said
    code, summary = _import(admin, bad, "--yes")
    assert (code, summary["errors"], summary["added"]) == (2, 7, 0)
    assert sorted(p["line"] for p in summary["problems"]) == [4, 5, 6, 7, 8, 9, 10]
    assert "110100" not in _areas(admin)

    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes((HEADER + "110100,北京市,city,,,,\n").encode("gbk"))
    result = admin.run("areas", "import", str(gbk), "--yes")
    assert result.exit_code == 2 and "CSV UTF-8" in result.stderr
    header = tmp_path / "header.csv"
    header.write_text("code,name,level,parent_code,kind\n", encoding="utf-8")
    result = admin.run("areas", "import", str(header), "--yes")
    assert result.exit_code == 2 and "missing: name_zh" in result.stderr, result.stderr


def test_children_first_with_bom_and_crlf(central: Central, tmp_path: Path) -> None:
    """A file saved by Excel (BOM, CRLF) with children above their parents imports whole."""
    admin = _login(central, tmp_path / "s.json")
    file = tmp_path / "excel.csv"
    file.write_bytes("\ufeff".encode() + (
        HEADER + "120101-site-1,和平某企业,site,120101-s1,enterprise,39.11,117.19\n"
        "120101-s1,劝业场街道,street,120101,,,\n"
        "120101,和平区,district,120100,,,\n"
        "120100,天津市,city,,,,\n"
        ",,,,,,\n").replace("\n", "\r\n").encode())
    code, summary = _import(admin, file, "--yes")
    assert (code, summary["added"], summary["positioned"], summary["errors"]) == (0, 4, 1, 0)
    tree = _areas(admin)
    assert [tree[c]["parent"] for c in ("120100", "120101", "120101-s1", "120101-site-1")] == [
        None, "120100", "120101", "120101-s1"]
    assert tree["120101-s1"]["kind"] == "street"  # an empty kind is the level's first


def test_dry_run_and_declining_write_nothing(central: Central, tmp_path: Path) -> None:
    """--dry-run says what it would add and writes nothing; so does answering no."""
    admin = _login(central, tmp_path / "s.json")
    file = tmp_path / "sh.csv"
    file.write_text(HEADER + "310100,上海市,city,,,31.23,121.47\n"
                    "310101,黄浦区,district,310100,,,\n", encoding="utf-8")
    dry = admin.run("areas", "import", str(file), "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert "黄浦区" in dry.stdout and "2 added" in dry.stdout and "nothing written" in dry.stdout
    code, summary = _import(admin, file, "--dry-run")
    assert (code, summary["added"], summary["positioned"], summary["dry_run"]) == (0, 2, 1, True)
    declined = admin.run("areas", "import", str(file), stdin="n\n")
    assert declined.exit_code == 1 and "nothing imported" in declined.stderr
    assert "310100" not in _areas(admin)


def test_conflicts_are_left_alone_and_update_moves_positions(central: Central,
                                                              tmp_path: Path) -> None:
    """An area central has with another name is a conflict (exit 1, unchanged) while the
    other rows go in; a different position moves only with --update; a missing one is set."""
    admin = _login(central, tmp_path / "s.json")
    admin.ok("areas", "add", "500100", "重庆市", "--level", "city")
    admin.ok("areas", "add", "500103", "渝中区", "--level", "district", "--parent", "500100")
    first = tmp_path / "first.csv"
    first.write_text(HEADER + "500100,重庆市,city,,,29.56,106.55\n", encoding="utf-8")
    assert _import(admin, first, "--yes")[1]["positioned"] == 1  # none yet: filled in
    file = tmp_path / "cq.csv"
    file.write_text(HEADER + "500100,重庆市,city,,,29.60,106.50\n"
                    "500103,渝中区（旧名）,district,500100,,,\n"
                    "500103-s1,解放碑街道,street,500103,,,\n", encoding="utf-8")
    result = admin.run("areas", "import", str(file), "--yes")
    assert result.exit_code == 1
    assert "line 2: 500100: central has it at 29.56, 106.55" in result.stderr
    assert "line 3: 500103: name_zh is '渝中区' in central, '渝中区（旧名）' here" in result.stderr
    tree = _areas(admin)
    assert tree["500103"]["name_zh"] == "渝中区" and tree["500100"]["lat"] == 29.56
    assert tree["500103-s1"]["parent"] == "500103"
    code, summary = _import(admin, file, "--yes", "--update")
    assert (code, summary["conflicts"], summary["positioned"], summary["added"]) == (1, 1, 1, 0)
    assert _areas(admin)["500100"]["lat"] == 29.60


def test_operator_is_refused_by_central(central: Central, tmp_path: Path) -> None:
    """The command goes through the API: an operator's first add is central's 403, exit 1."""
    op = _login(central, tmp_path / "s.json", "areas-op")
    file = tmp_path / "gz.csv"
    file.write_text(HEADER + "440100,广州市,city,,,,\n", encoding="utf-8")
    result = op.run("areas", "import", str(file), "--yes")
    assert result.exit_code == 1 and "line 2: 440100: central refused" in result.stderr
    assert "403" in result.stderr
    assert "440100" not in _areas(op)
