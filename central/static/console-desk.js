// The alarm desk (DESIGN.md §7, issue 12): every alarm still active or not yet acknowledged
// stays until someone acknowledges it; the value at raise time beside the current one; the
// history with who did what; a banner and a locally generated beep while any 二级 alarm is
// unacknowledged.
"use strict";

const ALARM_TYPES = {
  high: "超上限", low: "超下限", rate: "变化过快", stale: "数据中断",
  device_offline: "设备离线", gateway_offline: "网关离线",
};
const ACTIONS = { raised: "发生", changed: "变化", cleared: "恢复", ack: "确认",
                  manual_clear: "人工清除", flap_settled: "抖动平息", comment: "备注" };
const NOTES = { opened: "新告警", updated: "更新", severity_rose: "级别升高", closed: "已关闭",
                flapping: "进入抖动", flap_counted: "抖动计数", flap_ended: "抖动结束",
                stale: "过期事件（仅记录）", no_alarm: "无对应告警" };
const SOURCES = { edge: "网关", central: "中心", beidou: "北斗", pdt: "370MHz" };
const desk = { alarms: [], areasKey: "", open: null, beepTimer: null, audio: null,
               incidents: new Set() };  // the incidents the officer expanded

function showAlarmMsg(text, bad = false) {
  const p = $("alarm-msg");
  p.textContent = text;
  p.className = "alarm-msg" + (bad ? " bad" : "");
  p.hidden = false;
}

async function refreshAreas() {
  const tree = await getJSON("/api/areas");
  const key = JSON.stringify(tree);
  if (key === desk.areasKey) return;
  desk.areasKey = key;
  const select = $("alarm-area");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "全部区域"),
    ...areaRows(tree).map((a) => el("option", { value: String(a.id) },
                                    "\u3000".repeat(a.depth) + a.name)));
  select.value = chosen;
}

function withUnit(v, unit) { return v === "—" ? v : `${v} ${unit || ""}`.trim(); }

function renderAlarm(a) {
  const acked = a.ack_state === "acknowledged";
  const level = el("td", {}, el("span", { class: `badge sev${a.severity}` },
    SEVERITY[a.severity] || `${a.severity}级`));
  if (a.flapping) level.append(el("span", { class: "badge flap", title: "频繁报警/恢复" }, "抖动"));
  if (NARROWBAND.has(a.source)) {  // it came by radio while the gateway's IP link was down
    level.append(el("span", { class: "badge via", title: "IP 中断时经窄带送达，完整记录待恢复后补传" },
      a.source === "beidou" ? "经北斗" : "经370MHz"));
  }
  const state = el("td", {}, el("span", { class: "badge " + (a.state === "active" ? "act" : "clr") },
    a.state === "active" ? "告警中" : "已恢复"));
  if (a.cleared_ms) state.append(" ", el("span", { class: "muted" }, fmtTime(a.cleared_ms)));
  const ackCell = el("td", {}, el("span", { class: "badge " + (acked ? "acked" : "unacked") },
    acked ? "已确认" : "未确认"));
  if (acked) {
    ackCell.append(" ", el("span", { class: "muted", title: a.ack_comment || "" },
      `${a.acked_by} ${fmtTime(a.acked_ms)}`));
  }
  const actions = el("td", { class: "actions" });
  if (can("operate") && !acked) actions.append(el("button", { type: "button", "data-action": "ack", "data-id": a.id }, "确认"));
  if (can("operate") && a.state === "active") actions.append(el("button", { type: "button", "data-action": "clear", "data-id": a.id }, "清除"));
  actions.append(el("button", { type: "button", "data-action": "history", "data-id": a.id }, "记录"));
  const point = a.point ? (a.name_zh ? `${a.device} · ${a.name_zh}` : a.point) : "—";
  const now = a.current ? withUnit(fmtValue(a.current), a.unit) : "—";
  const nowCell = el("td", { class: "num" + (a.state === "active" ? " in-alarm" : "") }, now);
  if (a.current) nowCell.title = `更新于 ${fmtTime(a.current.ts_ms)}`;
  const row = el("tr", { class: `alarm ${a.ack_state} ${a.state} sev${a.severity}`, "data-alarm-id": String(a.id) },
    level, el("td", {}, a.area_name || "未分配"),
    el("td", {}, el("a", { href: `#gw=${encodeURIComponent(a.gw)}`, class: "gw-link" }, a.gw)),
    el("td", {}, point), el("td", {}, ALARM_TYPES[a.type] || a.type),
    el("td", { class: "num" }, withUnit(fmtValue({ value: a.raised_value, text: a.text }), a.unit)),
    nowCell, el("td", {}, fmtTime(a.raised_ms)), state, ackCell, actions);
  // A narrow window shows each alarm as a wrapped card, every value named by its column.
  const heads = document.querySelectorAll("#alarms thead th");
  row.querySelectorAll(":scope > td").forEach((td, i) => {
    if (heads[i]) td.dataset.label = heads[i].textContent;
  });
  return row;
}

function renderHistory(detail) {
  return el("tr", { class: "history", "data-history-of": String(detail.id) },
    el("td", { colspan: "11" }, el("ol", {}, ...detail.history.map((h) => el("li", {},
      el("b", {}, fmtTime(h.ts_ms)), " ", ACTIONS[h.action] || h.action,
      h.user ? ` · ${h.user}` : ` · ${SOURCES[h.source] || h.source}`,
      h.value !== null ? ` · 数值 ${fmtValue({ value: h.value })}` : "",
      h.comment ? ` · “${h.comment}”` : "", h.note ? ` · ${NOTES[h.note] || h.note}` : "")))));
}

// Alarms of one site within the incident window share an incident (central.alarms.engine):
// two or more of them show as one row with a count, expandable to its alarms.
function groupIncidents(list) {
  const groups = new Map();
  for (const a of list) {
    const key = a.incident_id === null || a.incident_id === undefined ? `a${a.id}` : `i${a.incident_id}`;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(a);
  }
  return [...groups.values()];
}

function renderIncident(members) {
  const id = members[0].incident_id;
  const open = desk.incidents.has(id);
  const worst = Math.max(...members.map((a) => a.severity));
  const active = members.filter((a) => a.state === "active").length;
  const unacked = members.filter((a) => a.ack_state !== "acknowledged").length;
  const gws = [...new Set(members.map((a) => a.gw))];
  const first = Math.min(...members.map((a) => a.raised_ms));
  const row = el("tr", { class: `incident sev${worst}${unacked ? " unacknowledged" : ""}`,
                         "data-incident": String(id), "data-alarms": members.map((a) => a.id).join(" ") },
    el("td", {}, el("span", { class: `badge sev${worst}` }, SEVERITY[worst] || `${worst}级`)),
    el("td", {}, members[0].area_name || "未分配"),
    el("td", { colspan: "3" }, el("b", {}, `事件 #${id} · ${members.length} 条告警`),
      el("span", { class: "muted" }, ` · ${gws.join("、")}`)),
    el("td", { colspan: "2" }, `告警中 ${active} · 未确认 ${unacked}`),
    el("td", {}, fmtTime(first)),
    el("td", {}, el("span", { class: "badge " + (active ? "act" : "clr") }, active ? "告警中" : "已恢复")),
    el("td", {}, el("span", { class: "badge " + (unacked ? "unacked" : "acked") }, unacked ? "未确认" : "已确认")),
    el("td", { class: "actions" }, el("button", { type: "button", "data-action": "incident",
      "data-id": String(id), "aria-expanded": String(open) }, open ? "收起" : `展开 ${members.length}`)));
  row.querySelectorAll(":scope > td").forEach((td) => { td.dataset.label = ""; });
  return row;
}

async function renderDesk(data) {
  desk.alarms = data.alarms;
  const list = data.alarms;
  const active = list.filter((a) => a.state === "active");
  $("n-sev2").textContent = active.filter((a) => a.severity >= 2).length;
  $("n-sev1").textContent = active.filter((a) => a.severity === 1).length;
  $("n-unack").textContent = list.filter((a) => a.ack_state !== "acknowledged").length;
  const rows = [];
  for (const members of groupIncidents(list)) {
    const grouped = members.length > 1;
    if (grouped) rows.push(renderIncident(members));
    if (grouped && !desk.incidents.has(members[0].incident_id)) continue;
    for (const a of members) {
      const row = renderAlarm(a);
      if (grouped) row.classList.add("member");
      rows.push(row);
      if (desk.open === a.id) {
        try { rows.push(renderHistory(await getJSON(`/api/alarms/${a.id}`))); } catch (e) { /* gone */ }
      }
    }
  }
  $("alarm-rows").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: "11", class: "muted" }, "当前无活动告警"))]));
  updateUrgent(list);
  refreshGateway();  // its highlighted values follow the desk at once
}

// --- the 二级 banner and beep, until every level-2 alarm is acknowledged -----------------

function beep() {
  try {
    desk.audio = desk.audio || new AudioContext();
    const ctx = desk.audio;
    if (ctx.state === "suspended") ctx.resume();
    for (const at of [0, 0.35]) {
      const osc = ctx.createOscillator();
      const gain = ctx.createGain();
      osc.type = "square";
      osc.frequency.value = 880;
      gain.gain.setValueAtTime(0.0001, ctx.currentTime + at);
      gain.gain.exponentialRampToValueAtTime(0.2, ctx.currentTime + at + 0.02);
      gain.gain.exponentialRampToValueAtTime(0.0001, ctx.currentTime + at + 0.25);
      osc.connect(gain).connect(ctx.destination);
      osc.start(ctx.currentTime + at);
      osc.stop(ctx.currentTime + at + 0.3);
    }
    document.body.dataset.beeps = String(Number(document.body.dataset.beeps || 0) + 1);
  } catch (e) { /* no audio device: the banner still shows */ }
}

function updateUrgent(list) {
  const urgent = list.filter((a) => a.severity >= 2 && a.ack_state !== "acknowledged");
  const banner = $("alarm-banner");
  banner.hidden = urgent.length === 0;
  if (urgent.length) {
    const a = urgent[0];
    banner.textContent = `二级告警 ${urgent.length} 条未确认 · ${a.area_name || a.gw} · ` +
      `${a.name_zh || a.point || ""} ${withUnit(fmtValue({ value: a.raised_value, text: a.text }), a.unit)}` +
      ` · ${fmtTime(a.raised_ms)}`;
    if (!desk.beepTimer) { beep(); desk.beepTimer = setInterval(beep, 4000); }
  } else if (desk.beepTimer) {
    clearInterval(desk.beepTimer);
    desk.beepTimer = null;
  }
}

async function refreshDesk() {
  try {
    const params = new URLSearchParams();
    if ($("alarm-area").value) params.set("area", $("alarm-area").value);
    await renderDesk(await getJSON(`/api/console/desk?${params}`));
  } catch (e) {
    showAlarmMsg(`告警刷新失败：${errorText(e)}`, true);
  }
}

async function alarmAction(action, id) {
  if (action === "incident") {
    const n = Number(id);
    if (desk.incidents.has(n)) desk.incidents.delete(n); else desk.incidents.add(n);
    return renderDesk({ alarms: desk.alarms });
  }
  if (action === "history") {
    desk.open = desk.open === Number(id) ? null : Number(id);
    return renderDesk({ alarms: desk.alarms });
  }
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
    showAlarmMsg(`${verb}失败：${errorText(e)}`, true);
  }
  await refreshDesk();
}

function setArea(area, reconnect = true) {
  live.area = area;
  const select = $("alarm-area");
  if (select.value !== area) {
    if (![...select.options].some((o) => o.value === area)) select.append(el("option", { value: area }, `区域 #${area}`));
    select.value = area;
  }
  const url = new URL(location.href);
  if (area) url.searchParams.set("area", area); else url.searchParams.delete("area");
  history.replaceState(null, "", url);
  document.body.dataset.area = area;
  refreshDesk();
  if (reconnect) connectLive();
}

function startDesk() {
  $("alarm-rows").addEventListener("click", (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (button) alarmAction(button.dataset.action, button.dataset.id);
  });
  // The area filters everything on the page: the live feed then sends this area's map, counts,
  // desk and 叫应 board; the address keeps it (a reload, the big screen, a shared link).
  $("alarm-area").addEventListener("change", () => setArea($("alarm-area").value));
  const fromUrl = new URLSearchParams(location.search).get("area") || "";
  if (fromUrl) setArea(fromUrl, false);
  live.handlers.desk = renderDesk;
  refreshAreas().catch(() => null);
  setInterval(() => refreshAreas().catch(() => null), 30000);
}
