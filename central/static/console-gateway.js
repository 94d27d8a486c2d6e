// A gateway's page (issue 12): its link and delivery, every point's live value with its
// unit, values in alarm highlighted, stale ones greyed with their age (older than 3 poll
// intervals, or the gateway not on IP), and a trend of the chosen point from central's
// series API (1-minute / 1-hour aggregates beyond 6 h) with a time range picker.
"use strict";

const STALE_MS = 30000;  // 3 × the default 10 s a gateway reports a steady value at
const RANGES = { "1h": 3600e3, "6h": 6 * 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };
const gwPage = { gw: null, point: null, range: "24h", chart: null };

function selectGateway(gw) {
  if (location.hash !== `#gw=${encodeURIComponent(gw)}`) location.hash = `gw=${encodeURIComponent(gw)}`;
  gwPage.gw = gw;
  refreshGateway().then(() => $("gateways").scrollIntoView({ behavior: "smooth", block: "start" }));
}

function pointInAlarm(gw, p) {
  return desk.alarms.find((a) => a.gw === gw && a.state === "active" && a.point_ref === p.ref);
}

function renderGateway(g) {
  const onIp = g.online && !NARROWBAND.has(g.bearer);
  const head = el("div", { class: "gw-head" },
    el("h2", {}, g.gw),
    el("span", { class: "badge " + (g.online ? "on" : "off") }, g.online ? "在线" : "离线"),
    el("span", { class: "kv" + (g.backlog > 1000 ? " backlog-high" : "") },
       "积压 ", el("b", {}, g.backlog ?? "—")),
    el("span", { class: "kv", "data-k": "held" }, "已接收 ", el("b", {}, g.held)),
    el("span", { class: "kv" + (g.missing > g.reported_lost ? " missing" : ""), "data-k": "missing",
                 title: `未解释/待到 ${g.missing - g.reported_lost} 条` },
       "缺失 ", el("b", {}, g.missing)),
    el("span", { class: "kv" + (g.reported_lost ? " lost" : ""), "data-k": "reported_lost",
                 title: "网关磁盘预算已稀疏或丢弃，不会再送达" },
       "已报告丢弃 ", el("b", {}, g.reported_lost)),
    el("span", { class: "kv" }, "最后通信 ", el("b", { title: fmtTime(g.last_seen_ms) },
       fmtAgo(g.last_seen_ms))),
    el("span", { class: "kv" + (NARROWBAND.has(g.bearer) ? " narrowband" : ""), "data-k": "bearer",
                 title: NARROWBAND.has(g.bearer) ? "IP 中断：告警与心跳经窄带上报，数据待恢复后补传" : "" },
       "链路 ", el("b", {}, BEARERS[g.bearer] || g.bearer || "—")),
    el("span", { class: "kv" }, "版本 ", el("b", {}, g.version || "—")));
  const table = el("table", { class: "cards points" },
    el("thead", {}, el("tr", {},
      el("th", {}, "设备"), el("th", {}, "测点"), el("th", {}, "名称"),
      el("th", { class: "num" }, "最新数值"), el("th", {}, "单位"), el("th", {}, "更新时间"),
      el("th", {}, "趋势"))));
  const body = el("tbody");
  const now = Date.now();
  for (const d of g.devices) {
    d.points.forEach((p, i) => {
      const age = p.latest ? now - p.latest.ts_ms : Infinity;
      const stale = !onIp || age > STALE_MS;
      const alarm = pointInAlarm(g.gw, p);
      const cls = [stale ? "stale" : "", alarm ? `in-alarm sev${alarm.severity}` : "",
                   gwPage.point === p.ref ? "chosen" : ""].join(" ").trim();
      body.append(el("tr", { class: cls, "data-ref": p.ref },
        el("td", { class: "dev" }, i === 0 ? d.device || "—" : ""),
        el("td", {}, p.point), el("td", { title: p.name_zh || "" }, enumOf(p.name_zh).name),
        el("td", { class: "num" }, fmtPointValue(p.latest, p.name_zh)), el("td", {}, p.unit || ""),
        el("td", {}, p.latest ? (stale ? `${fmtTime(p.latest.ts_ms)}（${fmtAgo(p.latest.ts_ms)}，已过时）`
                                        : fmtTime(p.latest.ts_ms)) : "—"),
        el("td", { class: "actions" }, el("button", { type: "button", "data-trend": p.ref }, "趋势"))));
      labelCells(body.lastChild, POINT_HEADS);
    });
  }
  if (!body.children.length) body.append(el("tr", {}, el("td", { colspan: "7", class: "muted" }, "暂无测点数据")));
  table.append(body);
  return el("section", { class: "gw", "data-gw": g.gw }, head, table);
}

const POINT_HEADS = ["设备", "测点", "名称", "最新数值", "单位", "更新时间", "趋势"];

async function refreshGateway() {
  if (!gwPage.gw) {
    // the most urgent one first: in alarm, then on radio, then offline
    const rank = { alarm: 0, narrowband: 1, offline: 2, ip: 3 };
    const first = overview.data && overview.data.gateways.slice()
      .sort((a, b) => rank[a.state] - rank[b.state] || b.severity - a.severity)[0];
    if (!first) return;
    gwPage.gw = first.gw;
  }
  try {
    const g = await getJSON(`/api/gateways/${encodeURIComponent(gwPage.gw)}`);
    $("gateways").replaceChildren(renderGateway(g));
    $("gw-title").textContent = `网关 ${g.gw}`;
    showCommandsFor(g);
  } catch (e) {
    $("gateways").replaceChildren(el("p", { class: "error" }, `网关 ${gwPage.gw} 读取失败：${errorText(e)}`));
  }
}

async function refreshTrend() {
  if (!gwPage.point) return;
  $("trend").hidden = false;
  const to = Date.now();
  const from = to - RANGES[gwPage.range];
  const s = await getJSON(`/api/points/${encodeURIComponent(gwPage.point)}/series?from=${Math.round(from)}&to=${to}`);
  const raw = s.resolution === "raw";
  const avg = s.samples.map((x) => [x.ts_ms, x.value]);
  const series = [{ name: "数值", type: "line", showSymbol: false, data: avg, lineStyle: { width: 2 } }];
  // the thresholds of the point's alarms on the desk, as dashed lines
  const marks = desk.alarms.filter((a) => a.point_ref === gwPage.point && a.threshold !== null)
    .map((a) => ({ yAxis: a.threshold, name: `${SEVERITY[a.severity] || ""}阈值`,
                   lineStyle: { color: a.severity >= 2 ? "#e53935" : "#d97706" } }));
  if (marks.length) series[0].markLine = { symbol: "none", data: marks, label: { formatter: "{b} {c}", position: "insideEndTop" } };
  if (!raw) {  // the band between the bucket min and max
    series.push({ name: "最小", type: "line", data: s.samples.map((x) => [x.ts_ms, x.min]),
                  showSymbol: false, lineStyle: { opacity: 0 }, stack: "band" });
    series.push({ name: "范围", type: "line", showSymbol: false, lineStyle: { opacity: 0 }, stack: "band",
                  areaStyle: { opacity: 0.2 }, data: s.samples.map((x) => [x.ts_ms, x.max - x.min]) });
  }
  gwPage.chart = gwPage.chart || echarts.init($("trend-chart"));
  gwPage.chart.setOption({
    animation: false,
    title: { text: `${s.point} · ${{ raw: "原始数据", "1m": "1 分钟均值", "1h": "1 小时均值" }[s.resolution]}`,
             textStyle: { fontSize: 13 } },
    tooltip: { trigger: "axis" }, grid: { left: 50, right: 20, top: 40, bottom: 30 },
    xAxis: { type: "time", min: from, max: to }, yAxis: { type: "value", scale: true }, series,
  }, true);
  $("trend-chart").dataset.points = String(s.samples.length);
  $("trend-chart").dataset.resolution = s.resolution;
}

function startGatewayPage() {
  const fromHash = () => {
    const m = location.hash.match(/^#gw=(.+)$/);
    if (m && decodeURIComponent(m[1]) !== gwPage.gw) selectGateway(decodeURIComponent(m[1]));
  };
  window.addEventListener("hashchange", fromHash);
  // the trend follows the window's width (a chart drawn wide would push a narrow page sideways)
  window.addEventListener("resize", () => { if (gwPage.chart) gwPage.chart.resize(); });
  fromHash();
  $("gateways").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-trend]");
    if (!b) return;
    gwPage.point = b.dataset.trend;
    refreshTrend().catch((e) => showAlarmMsg(`趋势读取失败：${errorText(e)}`, true));
  });
  $("trend-range").addEventListener("change", () => {
    gwPage.range = $("trend-range").value;
    refreshTrend().catch(() => null);
  });
  refreshGateway();
  setInterval(refreshGateway, 2000);  // the one gateway on screen, not every gateway
  setInterval(() => refreshTrend().catch(() => null), 30000);
}
