// Live updates (issue 12): one EventSource on /api/console/events pushes the overview, the
// alarm desk, the 叫应 board and the command list of the gateway on screen (live.gw) whenever
// they change, and a ping every 5 s. When central cannot be reached the page says so in red
// across the top and greys every number (body.stale).
"use strict";

const live = {
  source: null,
  lastHeard: 0,  // Date.now() of the last event of any kind
  handlers: {},  // event name -> function(data)
  area: "",
  gw: "",  // the gateway whose commands are pushed as well
  bodies: {},  // event name -> the body last handled
};
const LIVE_DEAD_MS = 15000;  // three missed pings

function setOutage(down, why) {
  document.body.classList.toggle("stale", down);
  const banner = $("outage");
  banner.hidden = !down;
  if (down) {
    // "no active alarms" is not something the page knows while it cannot reach central
    const empty = document.querySelector("#alarm-rows td.muted");
    if (empty) empty.textContent = "告警状态未知：无法连接中心服务器";
    banner.textContent = `无法连接中心服务器（${why}）· 页面数据已过时，最后更新 ` +
      (live.lastHeard ? fmtTime(live.lastHeard) : "—");
  }
}

// (Re)connect with the page's area and gateway. The stream it replaces is closed only once the
// new one is open: the view's feed keeps running meanwhile, so the new stream starts from the
// very bodies already on screen, and those are not drawn again (moving to another gateway
// redraws the command list, not the desk and the map under the operator's hand).
function connectLive() {
  const old = live.source;
  const params = new URLSearchParams();
  if (live.area) params.set("area", live.area);
  if (live.gw) params.set("gw", live.gw);
  const source = new EventSource(`/api/console/events?${params}`);
  live.source = source;
  const retire = () => { if (old) old.close(); };
  source.addEventListener("open", retire, { once: true });
  source.addEventListener("error", retire, { once: true });
  // what changed while the link was down comes with the first events: the feed sends every
  // body (the gateway's command list too) as soon as the stream opens
  for (const name of ["overview", "desk", "board", "commands", "ping"]) {
    source.addEventListener(name, (ev) => {
      if (source !== live.source) return;  // being replaced: the new stream brings it too
      live.lastHeard = Date.now();
      setOutage(false);
      $("updated").textContent = fmtTime(live.lastHeard);
      if (live.bodies[name] === ev.data) return;
      live.bodies[name] = ev.data;
      const fn = live.handlers[name];
      if (fn) fn(JSON.parse(ev.data));
    });
  }
  source.onerror = () => {
    if (source !== live.source) return;
    live.bodies = {};  // the outage changed what the page shows: draw everything again
    // EventSource retries by itself; a failed retry may mean the session ended.
    setOutage(true, "实时连接中断");
    fetch("/api/me", { cache: "no-store" }).then((r) => { if (r.status === 401) toLogin(); })
      .catch(() => null);
  };
}

async function checkHealth() {
  try {
    const r = await fetch("/api/health", { cache: "no-store" });
    const h = await r.json();
    const chip = $("health");
    chip.textContent = `数据库 ${h.db ? "正常" : "异常"} · 数据接入 ${h.mqtt_connected ? "正常" : "中断"}`;
    chip.className = "chip " + (r.ok ? "ok" : "bad");
  } catch (e) {
    $("health").textContent = "服务状态 未知";
    $("health").className = "chip bad";
    setOutage(true, "中心服务无响应");
  }
  if (live.lastHeard && Date.now() - live.lastHeard > LIVE_DEAD_MS) setOutage(true, "超过 15 秒未收到数据");
}

function startLive() {
  connectLive();
  checkHealth();
  setInterval(checkHealth, 5000);
}
