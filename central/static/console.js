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

// The logged-in user (GET /api/me): name, role, permissions, and the CSRF token every
// state-changing request sends back (the session itself is an HttpOnly cookie).
let me = null;

function toLogin() { location.replace("/login"); }

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (r.status === 401) { toLogin(); throw new Error("请重新登录"); }
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function postJSON(url, body) {
  const r = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", "X-CSRF-Token": me ? me.csrf : "" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) toLogin();
  return r;
}

const ROLES = { viewer: "只读", operator: "值班员", admin: "管理员", auditor: "审计员" };
const can = (perm) => !!me && me.user.permissions.includes(perm);

// How the gateway was last heard: over IP, or by radio while IP is down (DESIGN.md §5).
const BEARERS = { ip: "IP 网络", "4g": "4G", "5g": "5G", beidou: "北斗短报文", pdt: "370MHz 窄带" };
const NARROWBAND = new Set(["beidou", "pdt"]);

function renderGateway(g) {
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

async function start() {
  me = await getJSON("/api/me");
  $("whoami").textContent = `${me.user.name} · ${ROLES[me.user.role] || me.user.role}` +
    (me.user.area ? ` · ${me.user.area}` : "");
  refresh();
  setInterval(refresh, REFRESH_MS);
  refreshAlarms();
  setInterval(refreshAlarms, REFRESH_MS);
  if (can("audit")) {
    $("audit").hidden = false;
    refreshAudit();
    setInterval(refreshAudit, 5 * REFRESH_MS);
  }
}

$("logout").addEventListener("click", async () => {
  await postJSON("/api/logout").catch(() => null);
  toLogin();
});

// --- alarms panel (DESIGN.md §7): active alarms of the chosen area, acknowledge and clear. ---

const ALARM_TYPES = {
  high: "超上限", low: "超下限", rate: "变化过快", stale: "数据中断",
  device_offline: "设备离线", gateway_offline: "网关离线",
};
const SEVERITY = { 1: "一级", 2: "二级" };
let areasKey = "";
let alarmTicks = 0;

function showAlarmMsg(text, bad = false) {
  const p = $("alarm-msg");
  p.textContent = text;
  p.className = "alarm-msg" + (bad ? " bad" : "");
  p.hidden = false;
}

function flattenAreas(nodes, depth, out) {
  for (const n of nodes) {
    out.push([n.id, "\u3000".repeat(depth) + n.name_zh]);
    flattenAreas(n.children, depth + 1, out);
  }
  return out;
}

async function refreshAreas() {
  const tree = await getJSON("/api/areas");
  const key = JSON.stringify(tree);
  if (key === areasKey) return;
  areasKey = key;
  const select = $("alarm-area");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "全部区域"),
    ...flattenAreas(tree, 0, []).map(([id, label]) => el("option", { value: String(id) }, label)));
  select.value = chosen;
}

function renderAlarm(a) {
  const acked = a.ack_state === "acknowledged";
  const level = el("td", {}, el("span", { class: `badge sev${a.severity}` },
    SEVERITY[a.severity] || `${a.severity}级`));
  if (a.flapping) level.append(el("span", { class: "badge flap", title: "频繁报警/恢复" }, "抖动"));
  if (NARROWBAND.has(a.source)) {  // it came by radio while the gateway's IP link was down
    level.append(el("span", { class: "badge via", title: "IP 中断时经窄带送达，完整记录待恢复后补传" },
      a.source === "beidou" ? "经北斗" : "经370MHz"));
  }
  const ackCell = el("td", {}, el("span", { class: "badge " + (acked ? "acked" : "unacked") },
    acked ? "已确认" : "未确认"));
  if (acked) {
    ackCell.append(" ", el("span", { class: "muted", title: a.ack_comment || "" },
      `${a.acked_by} ${fmtTime(a.acked_ms)}`));
  }
  const actions = el("td", { class: "actions" });
  if (!can("operate")) return el("tr", { class: `alarm ${a.ack_state}`, "data-alarm-id": String(a.id) },
    level, el("td", {}, a.area_name || "未分配"), el("td", {}, a.gw),
    el("td", {}, a.point ? (a.name_zh ? `${a.device} · ${a.name_zh}` : a.point) : "—"),
    el("td", {}, ALARM_TYPES[a.type] || a.type),
    el("td", { class: "num" }, fmtValue({ value: a.value, text: a.text })),
    el("td", {}, fmtTime(a.raised_ms)), ackCell, actions);
  if (!acked) actions.append(el("button", { type: "button", "data-action": "ack", "data-id": a.id }, "确认"));
  if (a.state === "active") actions.append(el("button", { type: "button", "data-action": "clear", "data-id": a.id }, "清除"));
  const point = a.point ? (a.name_zh ? `${a.device} · ${a.name_zh}` : a.point) : "—";
  const value = fmtValue({ value: a.value, text: a.text });
  return el("tr", { class: `alarm ${a.ack_state}`, "data-alarm-id": String(a.id) },
    level, el("td", {}, a.area_name || "未分配"), el("td", {}, a.gw),
    el("td", {}, point), el("td", {}, ALARM_TYPES[a.type] || a.type),
    el("td", { class: "num" }, value === "—" ? value : `${value} ${a.unit || ""}`.trim()),
    el("td", {}, fmtTime(a.raised_ms)), ackCell, actions);
}

async function refreshAlarms() {
  try {
    if (alarmTicks++ % 15 === 0) await refreshAreas();  // the tree changes rarely
    const params = new URLSearchParams({ state: "active" });
    if ($("alarm-area").value) params.set("area", $("alarm-area").value);
    const list = await getJSON(`/api/alarms?${params}`);
    $("n-sev2").textContent = list.filter((a) => a.severity >= 2).length;
    $("n-sev1").textContent = list.filter((a) => a.severity === 1).length;
    $("n-unack").textContent = list.filter((a) => a.ack_state !== "acknowledged").length;
    $("alarm-rows").replaceChildren(...(list.length ? list.map(renderAlarm)
      : [el("tr", {}, el("td", { colspan: "9", class: "muted" }, "当前无活动告警"))]));
  } catch (e) {
    showAlarmMsg(`告警刷新失败：${e.message}`, true);
  }
}

async function alarmAction(action, id) {
  // Who acts is the logged-in user (the server takes it from the session, not from here).
  const verb = action === "ack" ? "确认" : "清除";
  try {
    const r = await postJSON(`/api/alarms/${encodeURIComponent(id)}/${action}`,
      { comment: $("alarm-comment").value.trim() });
    if (r.ok) {
      showAlarmMsg(`已${verb}告警 #${id}`);
      $("alarm-comment").value = "";
    } else {
      const problem = await r.json().catch(() => ({}));
      showAlarmMsg(`${verb}失败：${problem.detail || `HTTP ${r.status}`}`, true);
    }
  } catch (e) {
    showAlarmMsg(`${verb}失败：${e.message}`, true);
  }
  await refreshAlarms();
}

$("alarm-rows").addEventListener("click", (ev) => {
  const button = ev.target.closest("button[data-action]");
  if (button) alarmAction(button.dataset.action, button.dataset.id);
});
$("alarm-area").addEventListener("change", refreshAlarms);

// --- audit log (DESIGN.md §8): the newest rows and the chain's verdict, for auditors. ---

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
    $("audit-verify").textContent = `审计日志读取失败：${e.message}`;
  }
}

start().catch((e) => {
  $("error").textContent = `启动失败：${e.message}`;
  $("error").hidden = false;
});
