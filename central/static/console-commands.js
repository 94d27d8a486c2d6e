// Commands on the gateway page (issue 12, DESIGN.md §6): an operator fills in a command, a
// dialog asks to confirm it (what, to which gateway, by whom), then it is issued through
// POST /api/commands and its state is followed until the gateway reports the end. A viewer
// sees the commands but the button is disabled; the API refuses them anyway (403).
// The list comes only from the live feed (console-live.js: a `commands` event for the gateway
// on screen as soon as the stream opens and whenever it changed), so a second operator's
// approval or a gateway's result shows at once on every screen. Ages are reckoned on
// central's clock (the event's now_ms), not the browser's. While central cannot read the list
// the event carries an `error` instead: the table says so (not 「读取中…」 for ever) until the
// list comes again, by itself, on the feed's next good read.
// A write to a safety-critical point waits for a second operator (DESIGN.md §8): another
// operator's row has 审批…, which opens a dialog naming what will be written and asks for a
// tick before POST /api/commands/{id}/approve; the issuer's own row says it waits for someone
// else (the API refuses self-approval with 409), and a viewer sees no button.
"use strict";

const COMMAND_KINDS = { request_diagnostics: "请求诊断", sync_time: "校时",
                        set_poll_interval: "设置采集周期", write_point: "写测点",
                        play_warning: "叫应播放", apply_config: "下发配置" };
const COMMAND_STATES = { pending: "待发送", sent: "已发送", received: "网关已接收",
                         executing: "执行中", succeeded: "执行成功", failed: "执行失败",
                         rejected: "网关拒绝", expired: "已过期" };
const COMMAND_FIELDS = { request_diagnostics: [], sync_time: [],
                         set_poll_interval: ["device", "seconds"],
                         write_point: ["device", "point", "value"] };
const FINAL_STATES = new Set(["succeeded", "failed", "rejected", "expired"]);
const cmdPage = { gw: null, pending: null, follow: null, rows: new Map(), names: new Map(),
                  approving: null, shown: null, skew: 0 };

function commandArgs(kind) {
  const v = (id) => $(id).value.trim();
  if (kind === "set_poll_interval") return { device: v("cmd-device"), seconds: Number(v("cmd-seconds")) };
  if (kind !== "write_point") return {};
  const raw = v("cmd-value");
  let value = raw;
  if (raw === "true" || raw === "false") value = raw === "true";
  else if (raw !== "" && !Number.isNaN(Number(raw))) value = Number(raw);
  return { device: v("cmd-device"), point: v("cmd-point"), value };
}

function describeCommand(c) {
  // apply_config carries a whole site file: name its size, not its text (the diff is in the
  // result, GET /api/commands/{id}).
  const args = c.kind === "apply_config"
    ? `site.toml ${(c.args.site_toml || "").length} 字符` +
      (c.args.profiles ? ` + ${Object.keys(c.args.profiles).length} 个设备模板` : "")
    : Object.entries(c.args || {}).filter(([k]) => k !== "central_ms")
      .map(([k, x]) => `${k}=${x}`).join(" ");
  return `${COMMAND_KINDS[c.kind] || c.kind}${args ? `（${args}）` : ""}`;
}

function showKindFields() {
  const wanted = COMMAND_FIELDS[$("cmd-kind").value] || [];
  for (const label of document.querySelectorAll("#cmd-form label[data-for]")) {
    label.hidden = !wanted.includes(label.dataset.for);
  }
}

// The 审批 cell: who approved, or what the approval waits for, and the button for whoever may
// give it (an operator who did not issue the command).
function approvalCell(c) {
  if (c.approval === "approved") return el("span", { class: "approval done" }, `已审批 · ${c.approved_by}`);
  if (c.approval !== "required") return el("span", { class: "muted" }, "—");
  if (FINAL_STATES.has(c.state)) return el("span", { class: "approval muted" }, "未经审批");
  const waiting = el("span", { class: "approval wait" }, "待第二人审批");
  if (!can("operate")) return waiting;
  if (c.issued_by === session.me.user.name) {
    return el("span", {}, waiting, el("span", { class: "muted approval-own" },
      " 本人下发，须由另一名值班员审批"));
  }
  return el("span", {}, waiting, " ", el("button", { type: "button", class: "approve",
    "data-approve": c.cmd_id, title: "核对后批准这条安全关键写操作" }, "审批…"));
}

function renderCommands(rows) {
  cmdPage.rows = new Map(rows.map((c) => [c.cmd_id, c]));
  $("cmd-rows").replaceChildren(...(rows.length ? rows.map((c) => labelCells(el("tr", {
      class: `command ${c.state}`, "data-cmd": c.cmd_id, "data-approval": c.approval || "" },
    el("td", {}, fmtTime(c.created_ms)), el("td", {}, describeCommand(c)),
    el("td", {}, el("span", { class: `badge cstate ${c.state}` }, COMMAND_STATES[c.state] || c.state),
      c.reason ? el("span", { class: "muted" }, ` ${c.reason}`) : "",
      el("span", { class: "muted cmd-age", "data-since": String(c.updated_ms),
                   title: `状态更新于 ${fmtTime(c.updated_ms)}` })),
    el("td", { class: "approval-cell" }, approvalCell(c)),
    el("td", {}, c.issued_by || "—"), el("td", { class: "muted" }, c.cmd_id.slice(0, 8))),
    CMD_HEADS)) : [el("tr", {}, el("td", { colspan: "6", class: "muted" }, "暂无命令"))]));
}
const CMD_HEADS = ["时间", "命令", "状态", "审批", "下发人", "编号"];

// How long each state has held, on central's clock; written in place, so a button about to
// be clicked stays put.
function tickCommandAges() {
  for (const node of document.querySelectorAll("#cmd-rows .cmd-age")) {
    node.textContent = ` · ${fmtAgo(Number(node.dataset.since) - cmdPage.skew)}`;
  }
}

// The list and, for the command this page issued or approved (cmdPage.follow), the line
// under the form. The same list comes again with a newer now_ms (the feed's periodic resend,
// a reconnection): it is not redrawn then, or a button about to be clicked would move.
function pushedCommands(data) {
  if (data.gw !== cmdPage.gw) return;  // sent before the page moved to another gateway
  cmdPage.skew = data.now_ms - Date.now();
  if (data.error) {
    unreadableCommands(data.error);
    return;
  }
  const body = JSON.stringify(data.commands);
  if (body !== cmdPage.shown) {
    cmdPage.shown = body;
    renderCommands(data.commands);
  }
  tickCommandAges();
  const c = cmdPage.follow && cmdPage.rows.get(cmdPage.follow);
  if (c) followed(c);
}

// The list cannot be read on central: no rows are shown as if current (nor buttons for them).
// The reason stays out of the table, which a duty officer reads; its problem type rides on
// data-error for whoever inspects the page.
function unreadableCommands(error) {
  cmdPage.shown = null;  // the list that comes back is drawn, even if unchanged
  cmdPage.rows = new Map();
  $("cmd-rows").replaceChildren(el("tr", { class: "cmd-unreadable", "data-error": error.type },
    el("td", { colspan: "6", class: "error" }, "命令读取失败，正在重试…")));
}

// Called by the gateway page whenever it shows a gateway: the live feed moves to it.
function showCommandsFor(g) {
  $("cmd").hidden = false;
  $("cmd-gw").textContent = g.gw;
  $("cmd-devices").replaceChildren(...g.devices.map((d) => el("option", { value: d.device })));
  $("cmd-points").replaceChildren(...g.devices.flatMap((d) => d.points.map((p) => el("option", { value: p.point }))));
  cmdPage.names = new Map(g.devices.flatMap((d) => d.points.map((p) => [`${d.device}/${p.point}`,
                                                                          enumOf(p.name_zh).name])));
  if (cmdPage.gw !== g.gw) {
    cmdPage.gw = g.gw;
    cmdPage.follow = null;
    cmdPage.shown = null;
    cmdPage.rows = new Map();
    $("cmd-result").hidden = true;
    $("cmd-rows").replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "读取中…")));
    live.gw = g.gw;
    delete live.bodies.commands;  // this gateway's list may be the one last handled: show it
    connectLive();  // the new stream brings this gateway's list as soon as it opens
  }
}

function commandResult(text, cls) {
  const p = $("cmd-result");
  p.textContent = text;
  p.className = `cmd-result ${cls}`;
  p.hidden = false;
}

// The line under the form for the followed command, as the list shows it now.
function followed(c) {
  const final = FINAL_STATES.has(c.state);
  commandResult(`命令 ${describeCommand(c)} · ${COMMAND_STATES[c.state] || c.state}` +
    (c.approval === "required" && !final ? " · 待第二人审批" : "") +
    (c.approval === "approved" ? ` · 已由 ${c.approved_by} 审批` : "") +
    (c.reason ? ` · ${c.reason}` : "") + (c.detail ? ` · ${c.detail}` : ""),
    c.state === "succeeded" ? "ok" : final ? "bad" : "wait");
  $("cmd-result").dataset.state = c.state;
  if (final) cmdPage.follow = null;
}

// Follow `c` (just issued or approved) on the line from the next events on.
function follow(c) {
  cmdPage.follow = c.cmd_id;
  const now = cmdPage.rows.get(c.cmd_id);
  if (now && now.updated_ms >= c.updated_ms) followed(now);
}

function askToConfirm(ev) {
  ev.preventDefault();
  if (!can("operate") || !cmdPage.gw) return;
  const kind = $("cmd-kind").value;
  cmdPage.pending = { gw: cmdPage.gw, kind, args: commandArgs(kind), ttl_s: 600 };
  $("cmd-confirm-text").textContent = `向网关 ${cmdPage.gw} 下发「${describeCommand(cmdPage.pending)}」？` +
    `操作人 ${session.me.user.name}，将记入审计日志；网关离线时命令在 10 分钟内有效。`;
  $("cmd-confirm").showModal();
}

async function issueCommand() {
  const body = cmdPage.pending;
  cmdPage.pending = null;
  $("cmd-confirm").close();
  if (!body) return;
  try {
    const r = await postJSON("/api/commands", body);
    const out = await r.json().catch(() => ({}));
    if (r.status === 201) {
      commandResult(`已下发：${describeCommand(out)} · ${COMMAND_STATES[out.state] || out.state}`, "wait");
      follow(out);
    } else {
      commandResult(`下发失败：${out.detail || `HTTP ${r.status}`}`, "bad");
    }
  } catch (e) {
    commandResult(`下发失败：${errorText(e)}`, "bad");
  }
}

// --- approving a safety-critical write (a second operator) ---------------------------------

function approvalFacts(c) {
  const a = c.args || {};
  const what = c.kind === "write_point"
    ? [["设备 / 测点", `${a.device} / ${a.point}` +
         (cmdPage.names.get(`${a.device}/${a.point}`) ? `（${cmdPage.names.get(`${a.device}/${a.point}`)}）` : "")],
       ["写入值", String(a.value)]]
    : [["命令", describeCommand(c)]];
  return [["网关", c.gw], ...what, ["下发人", c.issued_by || "—"], ["下发时间", fmtTime(c.created_ms)],
          ["有效期至", fmtTime(c.expires_at_ms)], ["审批人", session.me.user.name]];
}

function askToApprove(ev) {
  const button = ev.target.closest("button[data-approve]");
  const c = button && cmdPage.rows.get(button.dataset.approve);
  if (!c || !can("operate")) return;
  cmdPage.approving = c;
  $("cmd-approve-facts").replaceChildren(...factList(approvalFacts(c)));
  $("cmd-approve-check").checked = false;
  $("cmd-approve-yes").disabled = true;
  $("cmd-approve").showModal();
  $("cmd-approve-no").focus();  // Enter alone must not approve
}

// Why the API refused (409, 403, 404, 503), in the duty officer's words. A 409 is explained
// from the command as it is now: someone else approved it first, it ended, or it is one's own.
async function approvalRefusal(status, c) {
  if (status === 401) return "登录已失效，请重新登录";
  if (status === 403) return "无权审批：需要值班员权限，且该网关须在您负责的区域内";
  if (status === 404) return "中心服务器上没有这条命令";
  if (status === 503) return "中心服务器的命令服务暂不可用，命令未审批，请稍后重试";
  if (status !== 409) return `中心服务器返回错误 HTTP ${status}，命令未审批`;
  const now = await getJSON(`/api/commands/${encodeURIComponent(c.cmd_id)}`).catch(() => c);
  if (now.approval === "approved") return `该命令已由 ${now.approved_by} 审批，无需再次审批`;
  if (now.issued_by === session.me.user.name) return "不能审批本人下发的命令，须由另一名值班员审批";
  if (FINAL_STATES.has(now.state)) return `该命令已结束（${COMMAND_STATES[now.state] || now.state}），不能再审批`;
  return "该命令当前无需审批";
}

async function approveCommand() {
  const c = cmdPage.approving;
  cmdPage.approving = null;
  $("cmd-approve").close();
  if (!c || !$("cmd-approve-check").checked) return;
  cmdPage.follow = null;  // the outcome of this approval is what the line shows now
  try {
    const r = await postJSON(`/api/commands/${encodeURIComponent(c.cmd_id)}/approve`);
    if (r.status === 200) {
      const out = await r.json();
      commandResult(`已审批：${describeCommand(out)} · ${COMMAND_STATES[out.state] || out.state}`, "wait");
      follow(out);
      return;
    }
    commandResult(`审批失败：${await approvalRefusal(r.status, c)}`, "bad");
  } catch (e) {
    commandResult(`审批失败：${errorText(e)}`, "bad");
  }
}

function startApprovals() {
  $("cmd-rows").addEventListener("click", askToApprove);
  $("cmd-approve-check").addEventListener("change", (ev) => {
    $("cmd-approve-yes").disabled = !ev.target.checked;
  });
  $("cmd-approve-yes").addEventListener("click", approveCommand);
  $("cmd-approve-no").addEventListener("click", () => $("cmd-approve").close());
  $("cmd-approve").addEventListener("close", () => { cmdPage.approving = null; });
}

function startCommands() {
  const allowed = can("operate");
  $("cmd-issue").disabled = !allowed;
  $("cmd-note").textContent = allowed ? "" : "只读账号不能下发命令（需值班员权限）";
  $("cmd-kind").addEventListener("change", showKindFields);
  $("cmd-form").addEventListener("submit", askToConfirm);
  $("cmd-yes").addEventListener("click", issueCommand);
  $("cmd-no").addEventListener("click", () => { cmdPage.pending = null; $("cmd-confirm").close(); });
  startApprovals();
  showKindFields();
  live.handlers.commands = pushedCommands;
  setInterval(tickCommandAges, 5000);
}
