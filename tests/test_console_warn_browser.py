"""Issuing a 叫应 warning from the console (发布预警) in a real headless Chromium, against a real
`central serve`, a real Mosquitto and a gateway stand-in with terminals (tests/callresp_gw.py):
the form, the confirmation that says what will sound, the warning on the board moving without a
reload, the refusals in Chinese, and no button for a viewer."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from protocols.callresp import MAX_REPEAT, MAX_TEXT_CHARS
from protocols.command_keys import parse_public_key
from tests.browser import callresp_central, chromium, console_login, screenshot, viewport
from tests.callresp_gw import terminal_fleet
from tests.helpers import Mosquitto
from tests.identity import PASSWORD, cli_user

pytestmark = pytest.mark.browser
GW = "gw-warn-1"
TEXT = "暴雨红色预警：请立即组织危险区域人员转移"
# t-1 answers 1 s after it plays; t-2 and t-3 never do; t-9 stands outside the operator's area
ANSWERS: dict[str, float | None] = {"t-1": 1.0, "t-2": None, "t-3": None, "t-9": None}


def _directory(admin: httpx.Client) -> dict[str, int]:
    """武汉市 > 江岸区 > 二七街道 (t-1, t-2, t-3) and 武汉市 > 汉阳区 (t-9); area ids by name."""
    ids: dict[str, int] = {}
    for name, parent, level, code in (("武汉市", None, "city", "c"), ("江岸区", "武汉市", "district", "d"),
                                      ("二七街道", "江岸区", "street", "s"),
                                      ("汉阳区", "武汉市", "district", "h")):
        r = admin.post("/api/areas", json={"parent_id": ids.get(parent or ""), "level": level,
                                           "code": code, "name_zh": name})
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    for t, area, name in (("t-1", "二七街道", "二七街道办"), ("t-2", "二七街道", "社区一号喇叭"),
                          ("t-3", "二七街道", "江边喇叭"), ("t-9", "汉阳区", "汉阳大喇叭")):
        r = admin.put(f"/api/callresp/terminals/{t}",
                      json={"gw": GW, "area_id": ids[area], "name": name})
        assert r.status_code == 200, r.text
    for gid, name, terminals in (("g-river", "沿江喇叭组", ["t-2", "t-3"]),
                                 ("g-hy", "汉阳喇叭组", ["t-9"])):
        r = admin.put(f"/api/callresp/groups/{gid}", json={"name": name, "terminals": terminals})
        assert r.status_code == 200, r.text
    r = admin.put("/api/callresp/persons/p-1", json={
        "name": "区值班领导", "area_id": ids["江岸区"], "role": "in_charge", "terminals": ["t-1"]})
    assert r.status_code == 200, r.text
    return ids


def _shown(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.find_element(By.ID, element_id).is_displayed())


def _text(driver: WebDriver, css: str) -> str:
    """The element's text, read in one go (the board is redrawn on every live update)."""
    return str(driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css))


def _open_form(driver: WebDriver) -> None:
    driver.find_element(By.ID, "warn-new").click()
    WebDriverWait(driver, 10).until(lambda d: _shown(d, "warn-form")
                                    and not _shown(d, "warn-dir-msg"))


def _tick(driver: WebDriver, kind: str, value: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'input[name="warn-{kind}"][value="{value}"]').click()


def _error(driver: WebDriver) -> str:
    WebDriverWait(driver, 10).until(lambda d: _shown(d, "warn-error"))
    with contextlib.suppress(NoAlertPresentException):  # never a browser alert()
        pytest.fail(f"an alert: {driver.switch_to.alert.text}")
    return str(driver.find_element(By.ID, "warn-error").text)


FITS = ("const e = document.querySelector(arguments[0]), r = e.getBoundingClientRect();"
        " return e.scrollWidth <= e.clientWidth + 1 && r.left >= 0 && r.right <= innerWidth")


def _shots(driver: WebDriver, tmp_path: Path, step: str, pane: str) -> None:
    """The dialog at desk width and at phone width (390 px): all of it inside the window."""
    viewport(driver, 1920, 1080)
    screenshot(driver, tmp_path, f"callresp-warn-{step}")
    viewport(driver, 390, 844)
    for selector in ("#warn-dialog", pane, f"{pane} .dialog-buttons"):
        assert driver.execute_script(FITS, selector), (step, selector)
    screenshot(driver, tmp_path, f"callresp-warn-{step}-narrow")
    viewport(driver, 1920, 1080)


def test_operator_issues_a_red_warning_from_the_board(tmp_path: Path,
                                                      mosquitto: Mosquitto) -> None:
    """The operator of 江岸区 fills in the form (only their area's targets offered), is stopped
    on an empty text, confirms a red warning to 二七街道 that names its 3 terminals, and the
    board shows it at once, its targets moving to 已送达 and 已应答 without a reload. A terminal
    moved out of their area before 发布 is refused in Chinese in the form, and so is a terminal
    whose gateway is retired before 发布 (both named from the problem's fields); a viewer has no
    button."""
    with callresp_central(tmp_path, mosquitto.port) as central, httpx.Client(
            base_url=central.base_url, timeout=15, headers=central.auth_headers()) as admin:
        key = parse_public_key(admin.get("/api/keys/commands").json()["public_key"])
        ids = _directory(admin)
        cli_user(central.db_url, "zhangsan", "operator", area="d")
        cli_user(central.db_url, "lisi", "viewer")
        with terminal_fleet(admin, mosquitto.host, mosquitto.port, central_key=key,
                            answers={GW: ANSWERS}, online_timeout=20
                            ) as _, chromium(tmp_path / "chrome") as driver:
            console_login(driver, central.base_url, "zhangsan", PASSWORD)
            driver.execute_script("window.sameDocument = true")  # gone if the page reloads
            wid = _issue_through_form(driver, tmp_path, ids)
            _board_moves(driver, admin, wid)
            _out_of_area_refused(driver, admin, ids)
            _retired_refused(driver, admin, ids, tmp_path)
            assert [w["id"] for w in admin.get("/api/callresp/warnings").json()] == [wid]
            assert driver.execute_script("return window.sameDocument") is True

            driver.find_element(By.ID, "logout").click()
            console_login(driver, central.base_url, "lisi", PASSWORD)
            WebDriverWait(driver, 15).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, f'article[data-warning="{wid}"]'))
            assert not _shown(driver, "warn-new")  # the board, but no 发布预警


def _issue_through_form(driver: WebDriver, tmp_path: Path, ids: dict[str, int]) -> str:
    assert _shown(driver, "warn-new")
    _open_form(driver)
    offered = driver.find_element(By.ID, "warn-form").text
    for name in ("二七街道", "社区一号喇叭", "沿江喇叭组", "区值班领导"):
        assert name in offered, name
    assert "汉阳" not in offered  # outside 江岸区 (the area, its terminal, its group): not offered
    assert f"0 / {MAX_TEXT_CHARS} 字" in offered  # the limits the API enforces
    assert driver.find_element(By.ID, "warn-text").get_attribute("maxlength") == str(MAX_TEXT_CHARS)
    assert driver.find_element(By.ID, "warn-repeat").get_attribute("max") == str(MAX_REPEAT)

    _tick(driver, "level", "red")
    _tick(driver, "area", str(ids["二七街道"]))
    assert driver.find_element(By.ID, "warn-n-terminals").text == "3"
    driver.find_element(By.ID, "warn-next").click()  # no text yet
    assert "预警内容不能为空" in _error(driver)
    assert not _shown(driver, "warn-confirm")
    driver.find_element(By.ID, "warn-text").send_keys("   ")  # blanks are no text either
    driver.find_element(By.ID, "warn-next").click()
    assert "预警内容不能为空" in _error(driver) and not _shown(driver, "warn-confirm")

    driver.find_element(By.ID, "warn-text").clear()
    driver.find_element(By.ID, "warn-text").send_keys(TEXT)
    assert f"{len(TEXT)} / {MAX_TEXT_CHARS} 字" in driver.find_element(By.ID, "warn-form").text
    _shots(driver, tmp_path, "form", "#warn-form")
    driver.find_element(By.ID, "warn-next").click()
    WebDriverWait(driver, 5).until(lambda d: _shown(d, "warn-confirm"))
    assert not _shown(driver, "warn-form")
    facts = {dt.text: dd.text for dt, dd in zip(
        driver.find_elements(By.CSS_SELECTOR, "#warn-facts dt"),
        driver.find_elements(By.CSS_SELECTOR, "#warn-facts dd"), strict=True)}
    assert facts["级别"] == "红色预警" and facts["内容"] == TEXT
    assert facts["发布对象"] == "区域 二七街道"
    assert facts["对象数"] == "3 个（终端 3 台，责任人 0 名）"
    assert facts["将鸣响的终端"] == "3 台" and facts["发布人"] == "zhangsan"
    # Enter alone does not issue: the focus is on 返回修改
    assert driver.switch_to.active_element.get_attribute("id") == "warn-back"
    _shots(driver, tmp_path, "confirm", "#warn-confirm")

    driver.find_element(By.ID, "warn-issue").click()
    WebDriverWait(driver, 10).until(lambda d: not _shown(d, "warn-dialog"))
    msg = driver.find_element(By.ID, "warn-msg").text
    assert msg.startswith("已发布：红色预警") and TEXT in msg
    wids = WebDriverWait(driver, 5).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#board article.cr-warning.red.open')]"
        ".map((a) => a.dataset.warning)"))
    assert len(wids) == 1, wids
    return str(wids[0])


def _board_moves(driver: WebDriver, admin: httpx.Client, wid: str) -> None:
    card = f'article[data-warning="{wid}"]'
    head = _text(driver, card)
    assert "红色预警" in head and TEXT in head and "zhangsan" in head
    WebDriverWait(driver, 20).until(
        lambda d: "已应答" in _text(d, f'{card} tr[data-target="t-1"]')
        and "已送达" in _text(d, f'{card} tr[data-target="t-2"]')
        and "已送达" in _text(d, f'{card} tr[data-target="t-3"]'))
    assert "已应答 1/3" in _text(driver, card)
    states = {t["ref"]: t["state"] for t in admin.get(f"/api/callresp/warnings/{wid}").json()[
        "targets"]}
    assert states == {"t-1": "answered", "t-2": "delivered", "t-3": "delivered"}


def _confirm(driver: WebDriver, level: str, text: str, *ticks: tuple[str, str]) -> str:
    """Fill in the form and go to the confirmation; its 对象数 line."""
    _open_form(driver)
    _tick(driver, "level", level)
    driver.find_element(By.ID, "warn-text").send_keys(text)
    for kind, value in ticks:
        _tick(driver, kind, value)
    driver.find_element(By.ID, "warn-next").click()
    WebDriverWait(driver, 5).until(lambda d: _shown(d, "warn-confirm"))
    return _text(driver, '#warn-facts dd[data-fact="对象数"]')


def _move(admin: httpx.Client, ids: dict[str, int], terminal: str) -> None:
    """The admin moves `terminal` to 汉阳区, out of the operator's area."""
    r = admin.put(f"/api/callresp/terminals/{terminal}", json={"gw": GW, "area_id": ids["汉阳区"],
                                                               "name": f"{terminal} 汉阳"})
    assert r.status_code == 200, r.text


def _refused(driver: WebDriver) -> str:
    """发布, refused: the form again (not the confirmation) with the reason, plain Chinese."""
    driver.find_element(By.ID, "warn-issue").click()
    error = _error(driver)
    assert "预警未发布" in error or "无法送达" in error, error
    assert "{" not in error and "detail" not in error and not error.isascii(), error
    assert _shown(driver, "warn-form") and not _shown(driver, "warn-confirm")
    return error


def _out_of_area_refused(driver: WebDriver, admin: httpx.Client, ids: dict[str, int]) -> None:
    """A terminal chosen and then moved out of the operator's area before 发布: central answers
    403 and the form says which; all of a street's terminals moved away: 422, reaches nobody."""
    n = _confirm(driver, "blue", "演练：江边喇叭测试", ("terminal", "t-3"), ("person", "p-1"))
    assert n == "2 个（终端 1 台，责任人 1 名）", n
    assert _text(driver, '#warn-facts dd[data-fact="将鸣响的终端"]') == "2 台"  # t-3, and t-1 for p-1
    _move(admin, ids, "t-3")
    error = _refused(driver)
    assert "终端「江边喇叭」不在您负责的区域内" in error, error
    # the lists are read again: t-3 (and its group) no longer offered, the person still ticked
    assert not driver.find_elements(By.CSS_SELECTOR, 'input[name="warn-terminal"][value="t-3"]')
    assert "沿江喇叭组" not in driver.find_element(By.ID, "warn-groups").text
    assert driver.find_element(By.CSS_SELECTOR, 'input[name="warn-person"]').is_selected()
    driver.find_element(By.ID, "warn-cancel").click()

    n = _confirm(driver, "yellow", "演练：街道广播测试", ("area", str(ids["二七街道"])))
    assert n == "2 个（终端 2 台，责任人 0 名）", n
    _move(admin, ids, "t-1")
    _move(admin, ids, "t-2")
    assert "所选对象下没有任何终端或责任人" in _refused(driver)
    driver.find_element(By.ID, "warn-cancel").click()


def _retired_refused(driver: WebDriver, admin: httpx.Client, ids: dict[str, int],
                     tmp_path: Path) -> None:
    """A terminal chosen and then its gateway retired before 发布: central answers 409 with the
    terminals and gateways as fields, and the form names both (the terminal by its name in the
    directory, which the English detail does not carry)."""
    r = admin.put("/api/callresp/terminals/t-2", json={"gw": GW, "area_id": ids["二七街道"],
                                                        "name": "社区一号喇叭"})
    assert r.status_code == 200, r.text
    n = _confirm(driver, "orange", "演练：网关退役", ("terminal", "t-2"))
    assert n == "1 个（终端 1 台，责任人 0 名）", n
    r = admin.post(f"/api/gateways/{GW}/retire", json={"reason": "演练后拆除"})
    assert r.status_code == 200, r.text
    error = _refused(driver)
    assert f"所选终端（社区一号喇叭）所在网关 {GW} 已退役，预警未发布。" in error, error
    _shots(driver, tmp_path, "retired", "#warn-form")
    driver.find_element(By.ID, "warn-cancel").click()
