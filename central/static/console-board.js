// 叫应 board (issue 11, DESIGN.md §7): every open warning with its targets — who has answered,
// who has not, re-sends, escalations, and the countdown to each target's current deadline.
// Live: the `board` server-sent event (console-live.js); the countdowns tick locally, on the
// server's clock (the offset is taken from each event's now_ms). An operator issues a warning
// from here (发布预警: a form, then a confirmation naming what will sound; see below).
"use strict";

const LEVELS = { red: "红色", orange: "橙色", yellow: "黄色", blue: "蓝色" };
const TARGET_STATES = { sent: "已发送", delivered: "已送达", answered: "已应答",
                        escalated: "已升级", unanswered: "无人应答", cancelled: "已取消" };
const CLOSED_REASONS = { gateway_retired: "网关已退役" };  // central.callresp.workflow
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
    el("td", {}, el("span", { class: `badge tstate ${t.state}` }, TARGET_STATES[t.state] || t.state),
      t.closed_reason ? el("span", { class: "muted" },
        `（${CLOSED_REASONS[t.closed_reason] || t.closed_reason}）`) : ""),
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

async function refreshBoard() {
  const params = new URLSearchParams();
  if (live.area) params.set("area", live.area);
  renderBoard(await getJSON(`/api/console/board?${params}`));
}

// --- issuing a warning (operators): a form, then a confirmation that says what goes out ------
// POST /api/callresp/warnings {level, text, repeat?, areas, groups, persons, terminals}. The
// targets offered are those the user sees (GET /api/areas, /api/callresp/{groups, persons,
// terminals}, all in the user's area); the confirmation counts the terminals that will sound.

const WARN_MAX_TEXT = 500;  // protocols.callresp.MAX_TEXT_CHARS, which the API enforces
const WARN_MAX_REPEAT = 10;  // protocols.callresp.MAX_REPEAT
const WHAT = { area: "区域", terminal: "终端", person: "责任人", group: "终端分组" };
const warn = { dir: null, pending: null, busy: false };

function warnError(text) {
  $("warn-error").textContent = text || "";
  $("warn-error").hidden = !text;
}

// Every area id under (and including) each node: an area target reaches its whole subtree.
function subtreeIds(nodes, out = new Map()) {
  for (const n of nodes) {
    subtreeIds(n.children, out);
    out.set(n.id, new Set([n.id, ...n.children.flatMap((c) => [...out.get(c.id)])]));
  }
  return out;
}

async function loadDirectory() {
  const [tree, groups, persons, terminals] = await Promise.all([
    getJSON("/api/areas"), getJSON("/api/callresp/groups"), getJSON("/api/callresp/persons"),
    getJSON("/api/callresp/terminals")]);
  const areas = areaRows(tree);
  const seen = new Set(terminals.map((t) => t.id));
  return {
    areas, subtree: subtreeIds(tree), persons, terminals,
    areaName: new Map(areas.map((a) => [a.id, a.name])),
    // a group is offered only if every one of its terminals lies in the user's area
    groups: groups.filter((g) => g.terminals.length && g.terminals.every((t) => seen.has(t))),
    byTerminal: new Map(terminals.map((t) => [t.id, t])),
  };
}

function option(kind, value, label, note, depth = 0) {
  return el("label", { class: "warn-opt", "data-kind": kind, "data-search": `${label} ${value}`,
                       style: `padding-left: ${depth * 1.2 + 0.2}em` },
    el("input", { type: "checkbox", name: `warn-${kind}`, value: String(value) }), label,
    note ? el("span", { class: "muted" }, ` ${note}`) : "");
}

function renderDirectory(d) {
  const none = (what) => [el("p", { class: "muted" }, `您的区域内没有${what}`)];
  const list = (id, rows, what) => $(id).replaceChildren(...(rows.length ? rows : none(what)));
  list("warn-areas", d.areas.map((a) => option("area", a.id, a.name,
    `${d.terminals.filter((t) => d.subtree.get(a.id).has(t.area_id)).length} 台`, a.depth)), "区域");
  list("warn-groups", d.groups.map((g) => option("group", g.id, g.name, `${g.terminals.length} 台`)),
    "终端分组");
  list("warn-persons", d.persons.map((p) => option("person", p.id, p.name,
    (p.role === "in_charge" ? "责任人" : "成员") +
    (d.areaName.get(p.area_id) ? ` · ${d.areaName.get(p.area_id)}` : ""))), "责任人");
  list("warn-terminals", d.terminals.map((t) => option("terminal", t.id, t.name || t.id,
    `${t.name ? t.id : ""} ${d.areaName.get(t.area_id) || ""}`.trim())), "终端");
}

function checked(kind) {
  return [...document.querySelectorAll(`#warn-form input[name="warn-${kind}"]:checked`)]
    .map((i) => i.value);
}

// What the chosen targets reach, as central resolves them (central.callresp.workflow): one
// target per terminal (from areas, groups and terminals) and one per person.
function reach(d, choice) {
  const terminals = new Set(choice.terminals);
  for (const a of choice.areas) {
    const under = d.subtree.get(a) || new Set([a]);
    for (const t of d.terminals) if (under.has(t.area_id)) terminals.add(t.id);
  }
  for (const g of d.groups) if (choice.groups.includes(g.id)) g.terminals.forEach((t) => terminals.add(t));
  const sounding = new Set(terminals);
  const persons = d.persons.filter((p) => choice.persons.includes(p.id));
  for (const p of persons) p.terminals.forEach((t) => sounding.add(t));
  return { terminals: terminals.size, persons: persons.length, sounding: sounding.size };
}

function formChoice() {
  const level = document.querySelector('#warn-form input[name="warn-level"]:checked');
  const repeat = $("warn-repeat").value.trim();
  return { level: level ? level.value : "", text: $("warn-text").value, repeat,
           areas: checked("area").map(Number), groups: checked("group"),
           persons: checked("person"), terminals: checked("terminal") };
}

function updateReach() {
  const n = $("warn-text").value.length;
  $("warn-text-n").textContent = n;
  $("warn-text-n").parentElement.classList.toggle("bad", n > WARN_MAX_TEXT);
  if (!warn.dir) return;
  const r = reach(warn.dir, formChoice());
  $("warn-n-targets").textContent = r.terminals + r.persons;
  $("warn-n-terminals").textContent = r.sounding;
}

function filterTargets() {
  const q = $("warn-filter").value.trim().toLowerCase();
  for (const opt of document.querySelectorAll("#warn-form .warn-opt")) {
    opt.hidden = !!q && !opt.dataset.search.toLowerCase().includes(q);
  }
}

// The form's own checks, before anything is sent: the same rules the API enforces.
function formProblem(c, r) {
  if (!LEVELS[c.level]) return "请选择预警级别";
  if (!c.text.trim()) return "预警内容不能为空，请填写要播放的文字";
  if (c.text.length > WARN_MAX_TEXT) return `预警内容不能超过 ${WARN_MAX_TEXT} 字（现为 ${c.text.length} 字）`;
  if (c.repeat && !(/^\d+$/.test(c.repeat) && +c.repeat >= 1 && +c.repeat <= WARN_MAX_REPEAT)) {
    return `重复播放次数须为 1–${WARN_MAX_REPEAT} 的整数，或不填`;
  }
  if (!c.areas.length && !c.groups.length && !c.persons.length && !c.terminals.length) {
    return "请至少选择一个发布对象（区域、终端分组、责任人或终端）";
  }
  if (!r.terminals && !r.persons) return "所选区域和分组下没有任何终端，预警无法送达，请另选对象";
  return "";
}

function names(d, c) {
  const pick = (rows, ids, label) => rows.filter((x) => ids.includes(x.id)).map(label);
  return [
    ...pick(d.areas, c.areas, (a) => `区域 ${a.name}`),
    ...pick(d.groups, c.groups, (g) => `分组 ${g.name}`),
    ...pick(d.persons, c.persons, (p) => `责任人 ${p.name}`),
    ...pick(d.terminals, c.terminals, (t) => `终端 ${t.name || t.id}`)];
}

function confirmFacts(c, r) {
  const who = names(warn.dir, c);
  const shown = who.length > 8 ? `${who.slice(0, 8).join("、")} 等 ${who.length} 项` : who.join("、");
  const level = el("span", { class: `badge level ${c.level}` }, `${LEVELS[c.level]}预警`);
  return [
    ["级别", level], ["内容", c.text], ["发布对象", shown],
    ["对象数", `${r.terminals + r.persons} 个（终端 ${r.terminals} 台，责任人 ${r.persons} 名）`],
    ["将鸣响的终端", `${r.sounding} 台`],
    ["重复播放", c.repeat ? `${c.repeat} 次` : "中心默认次数"],
    ["发布人", session.me.user.name]];
}

function showStep(confirming) {
  if (!confirming) delete $("warn-dialog").dataset.level;
  $("warn-form").hidden = confirming;
  $("warn-confirm").hidden = !confirming;
  if (confirming) $("warn-back").focus();  // Enter alone must not issue a warning
}

function askToConfirmWarning(ev) {
  ev.preventDefault();
  if (!warn.dir) {
    warnError("发布对象未能读取，现在无法发布；请关闭本窗口后重新打开");
    return;
  }
  const c = formChoice();
  const r = reach(warn.dir, c);
  const problem = formProblem(c, r);
  warnError(problem);
  if (problem) return;
  warn.pending = { level: c.level, text: c.text, areas: c.areas, groups: c.groups,
                   persons: c.persons, terminals: c.terminals,
                   ...(c.repeat ? { repeat: Number(c.repeat) } : {}) };
  $("warn-facts").replaceChildren(...factList(confirmFacts(c, r)));
  $("warn-confirm").className = `warn-confirm ${c.level}`;
  $("warn-dialog").dataset.level = c.level;
  showStep(true);
}

// Central's problem responses name the refused objects in fields beside `detail`, and their
// `type` says which refusal it is (central.web.problems): read those, never the English text.
const PROBLEM_TYPE = "urn:fieldlink:problem:";

function isProblem(problem, name) {
  return problem.type === PROBLEM_TYPE + name;
}

// A directory entry's name as the form showed it, else its id.
function entryName(kind, ref) {
  const d = warn.dir;
  const found = !d ? null : kind === "area" ? { name: d.areaName.get(Number(ref)) }
    : kind === "terminal" ? d.byTerminal.get(ref)
      : kind === "person" ? d.persons.find((p) => p.id === ref)
        : kind === "group" ? d.groups.find((g) => g.id === ref) : null;
  return (found && found.name) || String(ref);
}

// At most `max` names, then how many more.
function someNames(names, max = 5) {
  return names.slice(0, max).join("、") + (names.length > max ? ` 等 ${names.length} 个` : "");
}

// Why central refused, in the duty officer's words (never the raw problem JSON).
function warningRefusal(status, problem) {
  if (status === 401) return "登录已失效，请重新登录";
  const what = problem.ref != null && WHAT[problem.kind];  // one named object
  if (isProblem(problem, "out-of-scope") && what) {
    return `${what}「${entryName(problem.kind, problem.ref)}」不在您负责的区域内，预警未发布。`;
  }
  if (status === 403) return "无权发布预警：需要值班员权限";
  if (isProblem(problem, "unknown-entry") && what) {
    return `所选${what}「${entryName(problem.kind, problem.ref)}」在中心已不存在，预警未发布。`;
  }
  if (status === 404) return "所选对象在中心已不存在，预警未发布。";
  if (status === 422) {
    const locs = (problem.errors || []).map((e) => (e.loc || []).join("."));
    if (locs.some((l) => l.endsWith("text"))) return `预警内容不能为空，且不能超过 ${WARN_MAX_TEXT} 字`;
    if (locs.some((l) => l.endsWith("level"))) return "请选择预警级别";
    if (locs.some((l) => l.includes("repeat"))) return `重复播放次数须为 1–${WARN_MAX_REPEAT}`;
    if (isProblem(problem, "no-target")) return "所选对象下没有任何终端或责任人，预警无法送达";
    return "发布内容不符合要求，中心拒绝了这条预警（未发布）";
  }
  if (isProblem(problem, "targets-retired") && problem.terminals && problem.gateways) {
    const terminals = problem.terminals.map((t) => entryName("terminal", t));
    return `所选终端（${someNames(terminals)}）所在网关 ${someNames(problem.gateways)} ` +
      "已退役，预警未发布。";
  }
  if (status === 409) return "对象的状态不允许发布，预警未发布。";
  if (status === 503) return "中心服务器的叫应服务暂不可用，预警未发布，请稍后重试";
  return `中心服务器返回错误 HTTP ${status}，预警未发布`;
}

async function issueWarning() {
  const body = warn.pending;
  if (!body || warn.busy) return;
  warn.busy = true;
  $("warn-issue").disabled = true;
  try {
    const r = await postJSON("/api/callresp/warnings", body);
    const out = await r.json().catch(() => ({}));
    if (r.status !== 201) {
      const why = warningRefusal(r.status, out);
      showStep(false);
      const reread = [403, 404, 409].includes(r.status);  // the directory changed meanwhile
      if (reread) await reloadDirectory();
      warnError(`发布失败：${why}` + (reread ? "对象列表已重新读取，请核对后再发布。" : ""));
      return;
    }
    warn.pending = null;
    $("warn-dialog").close();
    issued(out);
  } catch (e) {
    warnError(`发布结果未知：${errorText(e)}。请先查看叫应列表是否已有这条预警，再决定是否重发。`);
    showStep(false);
  } finally {
    warn.busy = false;
    $("warn-issue").disabled = false;
  }
}

// The new warning on the board at once (the live feed then moves its targets' states).
async function issued(w) {
  const msg = $("warn-msg");
  msg.textContent = `已发布：${LEVELS[w.level]}预警「${w.text}」· 对象 ${w.targets.length} 个，` +
    "等待送达与应答" + (w.skipped && w.skipped.length ? `；${w.skipped.length} 台终端所在网关已退役，` +
      `未叫应（${w.skipped.map((s) => s.terminal).join("、")}）` : "");
  msg.className = "alarm-msg";
  msg.hidden = false;
  await refreshBoard().catch(() => null);
  const card = document.querySelector(`#board article[data-warning="${w.id}"]`);
  if (card) card.scrollIntoView({ block: "nearest" });
  else if (live.area) msg.textContent += "（页面正按区域筛选，这条预警不在所选区域内，未在下方列出）";
}

// Read the targets again, keeping what is still chosen and still offered.
async function reloadDirectory() {
  const before = new Set([...document.querySelectorAll("#warn-form .warn-opt input:checked")]
    .map((i) => `${i.name}:${i.value}`));
  try {
    warn.dir = await loadDirectory();
    renderDirectory(warn.dir);
    for (const i of document.querySelectorAll("#warn-form .warn-opt input")) {
      i.checked = before.has(`${i.name}:${i.value}`);
    }
    $("warn-dir-msg").hidden = true;
  } catch (e) {
    warn.dir = null;
    $("warn-dir-msg").textContent = `发布对象读取失败：${errorText(e)}`;
    $("warn-dir-msg").hidden = false;
  }
  filterTargets();
  updateReach();
}

async function openWarningForm() {
  warn.pending = null;
  $("warn-form").reset();
  warnError("");
  showStep(false);
  $("warn-dialog").showModal();
  $("warn-dir-msg").hidden = false;
  $("warn-dir-msg").textContent = "正在读取区域、分组、责任人和终端…";
  for (const id of ["warn-areas", "warn-groups", "warn-persons", "warn-terminals"]) $(id).replaceChildren();
  await reloadDirectory();
}

function startWarnForm() {
  if (!can("operate")) return;  // a viewer sees no button (and the API refuses them: 403)
  $("warn-new").hidden = false;
  $("warn-text").maxLength = WARN_MAX_TEXT;
  $("warn-text-max").textContent = WARN_MAX_TEXT;
  $("warn-repeat").max = WARN_MAX_REPEAT;
  $("warn-new").addEventListener("click", openWarningForm);
  $("warn-form").addEventListener("submit", askToConfirmWarning);
  $("warn-form").addEventListener("input", () => { warnError(""); updateReach(); });
  $("warn-form").addEventListener("change", updateReach);
  $("warn-filter").addEventListener("input", filterTargets);
  $("warn-filter").addEventListener("keydown", (ev) => { if (ev.key === "Enter") ev.preventDefault(); });
  $("warn-cancel").addEventListener("click", () => $("warn-dialog").close());
  $("warn-back").addEventListener("click", () => showStep(false));
  $("warn-issue").addEventListener("click", issueWarning);
  $("warn-dialog").addEventListener("close", () => { warn.pending = null; });
}

function startBoard() {
  live.handlers.board = renderBoard;
  if (!board.timer) board.timer = setInterval(tickCountdowns, 1000);
  startWarnForm();
}
