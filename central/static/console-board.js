// 叫应 board (issue 11, DESIGN.md §7): every open warning with its targets — who has answered,
// who has not, re-sends, escalations, and the countdown to each target's current deadline.
// Live: the `board` server-sent event (console-live.js); the countdowns tick locally, on the
// server's clock (the offset is taken from each event's now_ms).
"use strict";

const LEVELS = { red: "红色", orange: "橙色", yellow: "黄色", blue: "蓝色" };
const TARGET_STATES = { sent: "已发送", delivered: "已送达", answered: "已应答",
                        escalated: "已升级", unanswered: "无人应答" };
const board = { data: null, skew: 0, timer: null };
const TARGET_HEADS = ["对象", "区域", "状态", "发送次数", "送达", "应答", "剩余时间"];

function fmtLeft(ms) {
  if (ms <= 0) return "已超时";
  const s = Math.ceil(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function renderTarget(t, w, byId) {
  const done = t.state === "answered";
  const who = el("td", {}, t.kind === "person" ? `${t.name}（责任人）` : t.name);
  if (t.escalated_from) {
    const from = byId[t.escalated_from];
    who.append(el("span", { class: "muted" }, ` ← 升级自 ${from ? from.name : t.escalated_from}`));
  }
  const answer = done ? `${fmtTime(t.answered_ms)} · ${t.answered_by || ""}` +
    (t.answered_terminal ? ` @${t.answered_terminal}` : "") : "—";
  let left = "—";
  if (t.due_ms) left = el("span", { class: "countdown", "data-due": String(t.due_ms) }, "");
  else if (t.escalated_to && byId[t.escalated_to]) left = `→ ${byId[t.escalated_to].name}`;
  const row = el("tr", { class: `target ${t.state}`, "data-target": t.ref },
    who, el("td", {}, t.area_name || "—"),
    el("td", {}, el("span", { class: `badge tstate ${t.state}` }, TARGET_STATES[t.state] || t.state)),
    el("td", { class: "num" }, `${t.attempts} / ${w.max_resends + 1}`),
    el("td", {}, t.delivered_ms ? fmtTime(t.delivered_ms) : "—"),
    el("td", {}, answer), el("td", { class: "num" }, left));
  return labelCells(row, TARGET_HEADS);
}

function renderWarning(w) {
  const byId = Object.fromEntries(w.targets.map((t) => [t.id, t]));
  const n = w.targets.length;
  const head = el("div", { class: "cr-head" },
    el("span", { class: `badge level ${w.level}` }, `${LEVELS[w.level] || w.level}预警`),
    el("b", { class: "cr-text" }, w.text),
    el("span", { class: "muted" }, `${w.created_by} · ${fmtTime(w.created_ms)}`),
    el("span", { class: "cr-tally" },
      el("span", { class: "ok" }, `已应答 ${w.answered}/${n}`), " · ",
      el("span", { class: w.waiting ? "bad" : "" }, `待应答 ${w.waiting}`), " · ",
      `重发 ${w.resends} · 升级 ${w.escalations}`,
      w.unanswered ? el("span", { class: "bad" }, ` · 无人应答 ${w.unanswered}`) : ""),
    el("span", { class: `badge ${w.open ? "act" : "clr"}` }, w.open ? "进行中" : "已结束"));
  const table = el("table", { class: "cards" },
    el("thead", {}, el("tr", {}, ...TARGET_HEADS.map((h) => el("th", {}, h)))),
    el("tbody", {}, ...w.targets.map((t) => renderTarget(t, w, byId))));
  return el("article", { class: `cr-warning ${w.level}${w.open ? " open" : ""}`, "data-warning": w.id },
    head, el("div", { class: "scroll" }, table));
}

function tickCountdowns() {
  const now = Date.now() + board.skew;
  for (const node of document.querySelectorAll("#board .countdown")) {
    const left = Number(node.dataset.due) - now;
    node.textContent = fmtLeft(left);
    node.classList.toggle("late", left <= 0);
    node.classList.toggle("soon", left > 0 && left < 60000);
  }
}

function renderBoard(data) {
  board.data = data;
  board.skew = data.now_ms - Date.now();
  const open = data.warnings.filter((w) => w.open);
  const waiting = open.reduce((s, w) => s + w.waiting, 0);
  $("n-cr-open").textContent = $("n-cr-open-top").textContent = open.length;
  $("n-cr-waiting").textContent = $("n-cr-waiting-top").textContent = waiting;
  $("cr-chip").classList.toggle("waiting", waiting > 0);
  $("board-list").replaceChildren(...(data.warnings.length ? data.warnings.map(renderWarning)
    : [el("p", { class: "muted" }, "当前无进行中的叫应")]));
  $("board").dataset.rendered = String(data.now_ms);
  tickCountdowns();
}

function startBoard() {
  live.handlers.board = renderBoard;
  if (!board.timer) board.timer = setInterval(tickCountdowns, 1000);
}
