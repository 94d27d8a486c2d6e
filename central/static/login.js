// Fieldlink login: POST /api/login with kind "cookie"; the session lives in an HttpOnly,
// SameSite=Strict cookie, the CSRF token is fetched again by the console from /api/me.
"use strict";

const form = document.getElementById("login");
const msg = document.getElementById("msg");

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  msg.hidden = true;
  const button = document.getElementById("submit");
  button.disabled = true;
  try {
    const r = await fetch("/api/login", {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: document.getElementById("name").value.trim(),
                             password: document.getElementById("password").value,
                             kind: "cookie" }),
    });
    if (r.ok) {
      location.replace("/");
      return;
    }
    const problem = await r.json().catch(() => ({}));
    msg.textContent = r.status === 429 ? "登录失败次数过多，请稍后再试。"
      : r.status === 401 ? "用户名或密码错误。" : `登录失败：${problem.detail || `HTTP ${r.status}`}`;
  } catch (e) {
    msg.textContent = "登录失败：无法连接中心服务器，请检查网络后重试。";  // not the browser's "Failed to fetch"
  }
  msg.hidden = false;
  button.disabled = false;
  document.getElementById("password").value = "";
});
