// Fieldlink duty console: start-up, the header, big-screen mode and the audit log. The views
// live in console-map.js (一张图), console-desk.js (告警台), console-gateway.js (网关) and
// console-live.js (server-sent events, outage banner).
"use strict";

async function refreshAudit() {
  try {
    const [rows, verdict] = await Promise.all([getJSON("/api/audit?limit=50"),
                                               getJSON("/api/audit/verify")]);
    $("audit-verify").textContent = verdict.ok ? `校验通过（${verdict.rows} 条）`
      : `校验失败：第 ${verdict.bad_seq} 条 ${verdict.reason}`;
    $("audit-verify").className = "chip " + (verdict.ok ? "online" : "offline");
    $("audit-rows").replaceChildren(...rows.map((e) => el("tr", {},
      el("td", { class: "num" }, e.seq), el("td", {}, fmtTime(e.ts_ms)), el("td", {}, e.actor),
      el("td", {}, e.action), el("td", {}, e.target),
      el("td", { class: "muted" }, JSON.stringify(e.detail)))));
  } catch (e) {
    $("audit-verify").textContent = `审计日志读取失败：${errorText(e)}`;
  }
}

function setBigScreen(on) {
  document.body.classList.toggle("bigscreen", on);
  $("bigscreen").textContent = on ? "退出大屏" : "大屏模式";
  const url = new URL(location.href);
  if (on) url.searchParams.set("screen", "big"); else url.searchParams.delete("screen");
  history.replaceState(null, "", url);
  setTimeout(() => { if (overview.chart) overview.chart.resize(); }, 50);
}

async function start() {
  session.me = await getJSON("/api/me");
  const u = session.me.user;
  $("whoami").textContent = `${u.name} · ${ROLES[u.role] || u.role}` + (u.area ? ` · ${u.area}` : "");
  if (new URLSearchParams(location.search).get("screen") === "big") setBigScreen(true);
  $("bigscreen").addEventListener("click", () => setBigScreen(!document.body.classList.contains("bigscreen")));
  $("logout").addEventListener("click", async () => {
    await postJSON("/api/logout").catch(() => null);
    toLogin();
  });
  startDesk();
  startBoard();
  live.handlers.overview = (data) => { overview.data = data; renderOverview(data); };
  startLive();
  startCommands();
  startGatewayPage();
  startMap().catch((e) => { $("map").textContent = `地图加载失败：${errorText(e)}`; });
  setInterval(() => { $("clock").textContent = fmtTime(Date.now()); }, 1000);
  if (can("audit")) {
    $("audit").hidden = false;
    refreshAudit();
    setInterval(refreshAudit, 10000);
  }
}

start().catch((e) => {
  $("error").textContent = `启动失败：${errorText(e)}`;
  $("error").hidden = false;
});
