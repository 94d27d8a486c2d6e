// Commands on the gateway page (issue 12, DESIGN.md §6): an operator fills in a command, a
// dialog asks to confirm it (what, to which gateway, by whom), then it is issued through
// POST /api/commands and its state is followed until the gateway reports the end. A viewer
// sees the commands but the button is disabled; the API refuses them anyway (403).
"use strict";

const COMMAND_KINDS = { request_diagnostics: "请求诊断", sync_time: "校时",
                        set_poll_interval: "设置采集周期", write_point: "写测点",
                        play_warning: "叫应播放" };
const COMMAND_STATES = { pending: "待发送", sent: "已发送", received: "网关已接收",
                         executing: "执行中", succeeded: "执行成功", failed: "执行失败",
                         rejected: "网关拒绝", expired: "已过期" };
const COMMAND_FIELDS = { request_diagnostics: [], sync_time: [],
                         set_poll_interval: ["device", "seconds"],
                         write_point: ["device", "point", "value"] };
const FINAL_STATES = new Set(["succeeded", "failed", "rejected", "expired"]);
const cmdPage = { gw: null, pending: null, follow: null };

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
  const args = Object.entries(c.args || {}).filter(([k]) => k !== "central_ms")
    .map(([k, x]) => `${k}=${x}`).join(" ");
  return `${COMMAND_KINDS[c.kind] || c.kind}${args ? `（${args}）` : ""}`;
}

function showKindFields() {
  const wanted = COMMAND_FIELDS[$("cmd-kind").value] || [];
  for (const label of document.querySelectorAll("#cmd-form label[data-for]")) {
    label.hidden = !wanted.includes(label.dataset.for);
  }
}

function renderCommands(rows) {
  $("cmd-rows").replaceChildren(...(rows.length ? rows.map((c) => labelCells(el("tr", {
      class: `command ${c.state}`, "data-cmd": c.cmd_id },
    el("td", {}, fmtTime(c.created_ms)), el("td", {}, describeCommand(c)),
    el("td", {}, el("span", { class: `badge cstate ${c.state}` }, COMMAND_STATES[c.state] || c.state),
      c.approval === "required" ? el("span", { class: "muted" }, " 待第二人审批") : "",
      c.reason ? el("span", { class: "muted" }, ` ${c.reason}`) : ""),
    el("td", {}, c.issued_by || "—"), el("td", { class: "muted" }, c.cmd_id.slice(0, 8))),
    CMD_HEADS)) : [el("tr", {}, el("td", { colspan: "5", class: "muted" }, "暂无命令"))]));
}
const CMD_HEADS = ["时间", "命令", "状态", "下发人", "编号"];

async function refreshCommands() {
  if (!cmdPage.gw) return;
  try {
    renderCommands(await getJSON(`/api/commands?gw=${encodeURIComponent(cmdPage.gw)}&limit=10`));
  } catch (e) {
    $("cmd-rows").replaceChildren(el("tr", {}, el("td", { colspan: "5", class: "error" },
      `命令读取失败：${errorText(e)}`)));
  }
}

// Called by the gateway page whenever it shows a gateway.
function showCommandsFor(g) {
  $("cmd").hidden = false;
  $("cmd-gw").textContent = g.gw;
  $("cmd-devices").replaceChildren(...g.devices.map((d) => el("option", { value: d.device })));
  $("cmd-points").replaceChildren(...g.devices.flatMap((d) => d.points.map((p) => el("option", { value: p.point }))));
  if (cmdPage.gw !== g.gw) {
    cmdPage.gw = g.gw;
    $("cmd-result").hidden = true;
    refreshCommands();
  }
}

function commandResult(text, cls) {
  const p = $("cmd-result");
  p.textContent = text;
  p.className = `cmd-result ${cls}`;
  p.hidden = false;
}

async function followCommand(cmdId) {
  clearTimeout(cmdPage.follow);
  try {
    const c = await getJSON(`/api/commands/${encodeURIComponent(cmdId)}`);
    const final = FINAL_STATES.has(c.state);
    commandResult(`命令 ${describeCommand(c)} · ${COMMAND_STATES[c.state] || c.state}` +
      (c.reason ? ` · ${c.reason}` : "") + (c.detail ? ` · ${c.detail}` : ""),
      c.state === "succeeded" ? "ok" : final ? "bad" : "wait");
    $("cmd-result").dataset.state = c.state;
    await refreshCommands();
    if (!final) cmdPage.follow = setTimeout(() => followCommand(cmdId), 2000);
  } catch (e) {
    commandResult(`命令状态读取失败：${errorText(e)}`, "bad");
  }
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
      followCommand(out.cmd_id);
    } else {
      commandResult(`下发失败：${out.detail || `HTTP ${r.status}`}`, "bad");
    }
  } catch (e) {
    commandResult(`下发失败：${errorText(e)}`, "bad");
  }
}

function startCommands() {
  const allowed = can("operate");
  $("cmd-issue").disabled = !allowed;
  $("cmd-note").textContent = allowed ? "" : "只读账号不能下发命令（需值班员权限）";
  $("cmd-kind").addEventListener("change", showKindFields);
  $("cmd-form").addEventListener("submit", askToConfirm);
  $("cmd-yes").addEventListener("click", issueCommand);
  $("cmd-no").addEventListener("click", () => { cmdPage.pending = null; $("cmd-confirm").close(); });
  showKindFields();
  setInterval(refreshCommands, 10000);
}
