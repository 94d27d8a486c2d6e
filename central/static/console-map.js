// 一张图 (issue 12): Wuhan's districts shaded by their worst active alarm, every gateway at
// its position coloured by state (alarm / BeiDou·370MHz / offline / IP), the counts by state,
// and a list of the gateways that need a look. Click a district: the desk shows that district;
// click a gateway: its page below. ECharts and the boundaries are vendored (static/vendor).
"use strict";

const overview = { chart: null, data: null, ready: false };
const DISTRICT_FILL = { 0: "#1f3b57", 1: "#b7791f", 2: "#b71c1c" };

async function startMap() {
  const geojson = await getJSON("/static/vendor/wuhan.geo.json");
  echarts.registerMap("wuhan", geojson);
  const dark = document.body.classList.contains("bigscreen");
  overview.chart = echarts.init($("map"), null, { renderer: "canvas" });
  overview.chart.on("click", (p) => {
    if (p.componentType === "series" && p.data && p.data.terminal) {
      return;  // a terminal: its tooltip says all there is
    } else if (p.componentType === "series" && p.data && p.data.gw) {
      selectGateway(p.data.gw);
    } else if (p.componentType === "geo" && overview.data) {
      const d = overview.data.districts.find((x) => x.name_zh === p.name);
      if (!d) return;
      $("alarm-area").value = String(d.id);  // the desk (and its live feed) follow
      $("alarm-area").dispatchEvent(new Event("change"));
    }
  });
  window.addEventListener("resize", () => overview.chart.resize());
  overview.ready = true;
  live.handlers.overview = renderOverview;
  if (overview.data) renderOverview(overview.data);
  $("map").dataset.theme = dark ? "dark" : "light";
}

function gatewayPoint(g) {
  const s = STATES[g.state];
  return {
    gw: g.gw, name: g.gw, state: g.state,
    value: [g.position.lon, g.position.lat, g.severity],
    symbol: g.state === "narrowband" ? "diamond" : g.state === "offline" ? "rect" : "circle",
    symbolSize: g.state === "alarm" ? 18 : 13,
    itemStyle: { color: s.color, borderColor: "#fff", borderWidth: 1.5 },
    tip: `${g.gw}<br>${g.site_name || "未分配站点"} · ${g.district_name || ""}<br>` +
         `状态 ${s.label} · 链路 ${BEARERS[g.bearer] || g.bearer || "—"}<br>` +
         `活动告警 ${g.active} · 未确认 ${g.unacknowledged}<br>最后通信 ${fmtAgo(g.last_seen_ms)}`,
  };
}

// 叫应 terminals stand at their street's office: several at one place are spread on a small
// ring so that each can be pointed at.
function terminalPoints(terminals) {
  const at = new Map();
  for (const t of terminals) {
    const k = `${t.position.lon},${t.position.lat}`;
    if (!at.has(k)) at.set(k, []);
    at.get(k).push(t);
  }
  const out = [];
  for (const group of at.values()) {
    group.forEach((t, i) => {
      const a = (2 * Math.PI * i) / group.length;
      const r = group.length > 1 ? 0.006 : 0;
      out.push({ name: t.id, terminal: t.id, value: [t.position.lon + r * Math.cos(a), t.position.lat + r * Math.sin(a)],
                 symbol: "triangle", symbolSize: 9,
                 itemStyle: { color: t.kind === "video" ? "#a78bfa" : "#38bdf8", borderColor: "#0f2236", borderWidth: 1 },
                 tip: `叫应终端 ${t.name || t.id}（${t.kind === "video" ? "视频" : "音频"}）<br>网关 ${t.gw}` });
    });
  }
  return out;
}

function renderOverview(data) {
  overview.data = data;
  for (const [k, n] of Object.entries(data.counts)) {
    const node = $(`n-${k}`);
    if (node) node.textContent = n;
  }
  $("n-online").textContent = data.counts.ip + data.counts.narrowband +
    data.gateways.filter((g) => g.state === "alarm" && g.online).length;
  renderWatchList(data);
  const terminals = data.terminals || [];
  $("layer-terminals").hidden = terminals.length === 0;
  $("n-terminals").textContent = terminals.length;
  if (!overview.ready) return;
  const placed = data.gateways.filter((g) => g.position);
  const alarmed = placed.filter((g) => g.state === "alarm").map(gatewayPoint);
  const others = placed.filter((g) => g.state !== "alarm").map(gatewayPoint);
  const dark = document.body.classList.contains("bigscreen");
  overview.chart.setOption({
    backgroundColor: "transparent",
    tooltip: { trigger: "item", formatter: (p) => p.data && p.data.tip ? p.data.tip : p.name },
    geo: {
      map: "wuhan", roam: true, aspectScale: 0.87, layoutCenter: ["50%", "50%"], layoutSize: "96%",
      label: { show: true, color: dark ? "#cfe3f7" : "#e8f1fa", fontSize: dark ? 14 : 12 },
      itemStyle: { areaColor: DISTRICT_FILL[0], borderColor: "#6b93b8", borderWidth: 1 },
      emphasis: { itemStyle: { areaColor: "#2c5a84" }, label: { color: "#fff" } },
      select: { disabled: true }, triggerEvent: true, zoom: 1,
      // shaded by the worst active alarm under each district
      regions: data.districts.map((d) => ({ name: d.name_zh,
        itemStyle: { areaColor: DISTRICT_FILL[Math.min(2, d.severity)] } })),
    },
    series: [
      { name: "叫应终端", type: "scatter", coordinateSystem: "geo", data: terminalPoints(data.terminals || []), zlevel: 1 },
      { type: "scatter", coordinateSystem: "geo", data: others, zlevel: 1 },
      { type: "effectScatter", coordinateSystem: "geo", data: alarmed, zlevel: 2,
        rippleEffect: { scale: 3.5, brushType: "stroke" } },
    ],
  }, { replaceMerge: ["series"] });
  $("map").dataset.rendered = String(data.now_ms);
}

function renderWatchList(data) {
  // The gateways that need a look first; all of them would not fit 400 rows, and IP ones are fine.
  const order = { alarm: 0, narrowband: 1, offline: 2, ip: 3 };
  const rows = data.gateways.slice().sort((a, b) => order[a.state] - order[b.state]
    || b.severity - a.severity || a.gw.localeCompare(b.gw));
  const shown = rows.filter((g) => g.state !== "ip").slice(0, 60);
  $("watch").replaceChildren(...shown.map((g) => el("li", {
      class: `watch ${g.state}`, "data-gw": g.gw, "data-state": g.state },
    el("span", { class: "dot", style: `background:${STATES[g.state].color}` }),
    el("a", { href: `#gw=${encodeURIComponent(g.gw)}` }, g.gw),
    el("span", { class: "muted" }, ` ${g.district_name || ""} · ${STATES[g.state].label}` +
       (g.state !== "offline" && g.bearer ? ` · ${BEARERS[g.bearer] || g.bearer}` : "") +
       (g.position ? "" : " · 未定位")))));
  $("watch-more").textContent = rows.length - shown.length ?
    `其余 ${rows.length - shown.length} 台在线 (IP)` : "";
}
