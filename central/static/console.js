// Fieldlink duty console: polls the JSON API every 2 s and renders one table per gateway.
// Plain JS, no build step, no CDN (the control room may have no internet).
"use strict";

const REFRESH_MS = 2000;
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function fmtTime(ms) {
  if (ms === null || ms === undefined) return "—";
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function fmtAgo(ms) {
  if (ms === null || ms === undefined) return "从未";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} 秒前`;
  if (s < 3600) return `${Math.floor(s / 60)} 分钟前`;
  if (s < 86400) return `${Math.floor(s / 3600)} 小时前`;
  return `${Math.floor(s / 86400)} 天前`;
}

function fmtValue(latest) {
  if (!latest) return "—";
  if (latest.text !== null && latest.text !== undefined) return latest.text;
  if (latest.value === null || latest.value === undefined) return "—";
  const v = latest.value;
  return Number.isInteger(v) ? String(v) : v.toFixed(Math.abs(v) >= 100 ? 1 : 2);
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function renderGateway(g) {
  const head = el("div", { class: "gw-head" },
    el("h2", {}, g.gw),
    el("span", { class: "badge " + (g.online ? "on" : "off") }, g.online ? "在线" : "离线"),
    el("span", { class: "kv" + (g.backlog > 1000 ? " backlog-high" : "") },
       "积压 ", el("b", {}, g.backlog ?? "—")),
    el("span", { class: "kv" }, "最后通信 ", el("b", { title: fmtTime(g.last_seen_ms) },
       fmtAgo(g.last_seen_ms))),
    el("span", { class: "kv" }, "链路 ", el("b", {}, g.bearer || "—")),
    el("span", { class: "kv" }, "版本 ", el("b", {}, g.version || "—")));
  const table = el("table", {},
    el("thead", {}, el("tr", {},
      el("th", {}, "设备"), el("th", {}, "测点"), el("th", {}, "名称"),
      el("th", { class: "num" }, "最新数值"), el("th", {}, "单位"), el("th", {}, "更新时间"))));
  const body = el("tbody");
  let rows = 0;
  for (const d of g.devices) {
    d.points.forEach((p, i) => {
      const tr = el("tr", g.online ? {} : { class: "stale" },
        el("td", { class: "dev" }, i === 0 ? d.device || "—" : ""),
        el("td", {}, p.point), el("td", {}, p.name_zh || ""),
        el("td", { class: "num" }, fmtValue(p.latest)), el("td", {}, p.unit || ""),
        el("td", {}, p.latest ? fmtTime(p.latest.ts_ms) : "—"));
      body.append(tr);
      rows++;
    });
  }
  if (!rows) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "暂无测点数据")));
  table.append(body);
  return el("section", { class: "gw", "data-gw": g.gw }, head, table);
}

async function refresh() {
  try {
    const [health, list] = await Promise.all([getJSON("/api/health"), getJSON("/api/gateways")]);
    const details = await Promise.all(
      list.map((g) => getJSON(`/api/gateways/${encodeURIComponent(g.gw)}`)));
    const online = list.filter((g) => g.online).length;
    $("n-total").textContent = list.length;
    $("n-online").textContent = online;
    $("n-offline").textContent = list.length - online;
    $("health").textContent = `数据库 ${health.db ? "正常" : "异常"} · MQTT ${health.mqtt_connected ? "已连接" : "未连接"}`;
    $("updated").textContent = fmtTime(Date.now());
    $("empty").hidden = list.length > 0;
    $("gateways").replaceChildren(...details.map(renderGateway));
    $("error").hidden = true;
  } catch (e) {
    $("error").textContent = `刷新失败：${e.message}`;
    $("error").hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
