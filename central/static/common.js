// Fieldlink duty console: helpers every view shares (no build step, no CDN: the duty room
// may have no internet, DESIGN.md §8). Loaded first; the views are console-*.js.
"use strict";

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
const session = { me: null };

function toLogin() { location.replace("/login"); }

// What the page says when it cannot reach central: never the browser's own words ("Failed to
// fetch", "NetworkError when attempting to fetch resource"), which are English and say nothing
// to the duty officer.
const OFFLINE_TEXT = "无法连接中心服务器";

// An error whose message is written for the duty officer (Chinese, no browser text).
class ConsoleError extends Error {}

// The text to show for any error: ours as written, a failed fetch as OFFLINE_TEXT, anything
// else (a bug, a browser message) as a plain Chinese line, with the details in the JS console.
function errorText(e) {
  if (e instanceof ConsoleError) return e.message;
  if (e instanceof TypeError && /fetch|network|load/i.test(e.message || "")) return OFFLINE_TEXT;
  console.warn(e);
  return "页面内部错误（详情见浏览器控制台）";
}

async function centralFetch(url, options) {
  try {
    return await fetch(url, options);
  } catch (e) {
    throw new ConsoleError(OFFLINE_TEXT);  // the network, not the server: fetch rejects
  }
}

async function getJSON(url) {
  const r = await centralFetch(url, { cache: "no-store" });
  if (r.status === 401) { toLogin(); throw new ConsoleError("请重新登录"); }
  if (!r.ok) throw new ConsoleError(`中心服务器返回错误 HTTP ${r.status}（${url}）`);
  try {
    return await r.json();
  } catch (e) {
    throw new ConsoleError(`中心服务器返回的数据无法读取（${url}）`);
  }
}

async function postJSON(url, body) {
  const r = await centralFetch(url, {
    method: "POST",
    headers: { "content-type": "application/json",
               "X-CSRF-Token": session.me ? session.me.csrf : "" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) toLogin();
  return r;
}

const ROLES = { viewer: "只读", operator: "值班员", admin: "管理员", auditor: "审计员" };
const can = (perm) => !!session.me && session.me.user.permissions.includes(perm);

// How the gateway was last heard: over IP, or by radio while IP is down (DESIGN.md §5).
const BEARERS = { ip: "IP 网络", "4g": "4G", "5g": "5G", beidou: "北斗短报文", pdt: "370MHz 窄带",
                  tiantong: "天通" };
const NARROWBAND = new Set(["beidou", "pdt", "tiantong"]);
// The map's states (central.geo), in the order the duty room reads them.
const STATES = {
  alarm: { label: "告警", color: "#e53935" },
  narrowband: { label: "北斗/370MHz", color: "#f59e0b" },
  offline: { label: "离线", color: "#8a96a3" },
  ip: { label: "在线 IP", color: "#22c55e" },
};
const SEVERITY = { 1: "一级", 2: "二级" };

// Enum points name their states in the profile's name_zh, e.g. "传感器状态（0 正常 1 预热 2 标定
// 3 传感器故障）": split into the plain name and the labels, and show 预热 (1) instead of 1.
function enumOf(nameZh) {
  const m = /^(.*?)[（(]((?:\s*\d+\s+[^\s\d（）()]+)+)\s*[）)]\s*$/.exec(nameZh || "");
  if (!m) return { name: nameZh || "", labels: null };
  const labels = {};
  for (const [, k, v] of m[2].matchAll(/(\d+)\s+([^\s\d（）()]+)/g)) labels[k] = v;
  return { name: m[1], labels };
}

function fmtPointValue(latest, nameZh) {
  const { labels } = enumOf(nameZh);
  if (labels && latest && latest.value !== null && latest.value !== undefined
      && labels[String(latest.value)] !== undefined) {
    return `${labels[String(latest.value)]} (${latest.value})`;
  }
  return fmtValue(latest);
}

// A dialog's facts ([label, value] pairs) as the <dt>/<dd> rows of its <dl>; each value is
// named by its label (data-fact), so what the officer is asked to confirm can be read back.
function factList(facts) {
  return facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-fact": k }, v)]);
}

// The area tree (GET /api/areas) as one list, each parent before its children, with its depth
// for indenting: the areas a select or a checklist offers.
function areaRows(nodes, depth = 0, out = []) {
  for (const n of nodes) {
    out.push({ id: n.id, name: n.name_zh, depth });
    areaRows(n.children, depth + 1, out);
  }
  return out;
}

// A phone-wide window shows the rows of a `table.cards` as wrapped cards, each cell named by
// its column (console.css): the names ride on the cells.
function labelCells(row, heads) {
  row.querySelectorAll(":scope > td").forEach((td, i) => { if (heads[i]) td.dataset.label = heads[i]; });
  return row;
}
