import { api, ApiError, setToken, token, subscribe } from "./api.js";
import { buildTree, deleteEstimate, subtreeBytes, fmtBytes } from "./tree.js";

const $ = sel => document.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) if (k !== null && k !== undefined) e.append(k);
  return e;
};

const state = { templates: [], sandboxes: [], snapshots: [], selected: null, busy: new Set() };

function toast(msg, bad) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = ""), bad ? 8000 : 3000);
}

function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.floor(s) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h";
  return Math.floor(s / 86400) + "d";
}

// Runs a mutating call, shows its outcome and refreshes the lists.
async function act(label, fn) {
  if (state.busy.has(label)) return;
  state.busy.add(label);
  toast(label + "…");
  render();
  try {
    await fn();
    toast(label + ": done");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return showLogin("the token was refused");
    toast(label + " failed: " + (e.code ? e.code + ": " : "") + e.message, true);
  } finally {
    state.busy.delete(label);
    await refresh();
  }
}

function confirmDelete(text) {
  const d = $("#confirm");
  $("#confirm-text").textContent = text;
  d.returnValue = "";
  d.showModal();
  return new Promise(ok => d.addEventListener("close", () => ok(d.returnValue === "ok"), { once: true }));
}

const enc = encodeURIComponent;
const actions = {
  snapshot: s => act("snapshot " + s.name, () => api("POST", `/v1/sandboxes/${enc(s.id)}/snapshots`, {})),
  fork: s => act("fork " + s.name, () => api("POST", `/v1/sandboxes/${enc(s.id)}/fork`, {})),
  stop: s => act("stop " + s.name, () => api("POST", `/v1/sandboxes/${enc(s.id)}/stop`)),
  start: s => act("start " + s.name, () => api("POST", `/v1/sandboxes/${enc(s.id)}/start`)),
  resume: s => act("continue " + s.name, () => api("POST", `/v1/sandboxes/${enc(s.id)}/resume`)),
  async deleteSandbox(s) {
    const snaps = state.snapshots.filter(n => n.sandbox_id === s.id).length;
    const ok = await confirmDelete(`Delete sandbox ${s.name}? Its VM and disk go; its ${snaps} snapshot(s) stay.`);
    if (ok) act("delete " + s.name, () => api("DELETE", `/v1/sandboxes/${enc(s.id)}`));
  },
  resumeSnapshot: n => act("resume " + n.id, () => api("POST", `/v1/snapshots/${enc(n.id)}/resume`, {})),
  restore: n => act("restore " + n.id, () => api("POST", `/v1/snapshots/${enc(n.id)}/restore`, { resume: true })),
  async deleteSnapshot(n) {
    const est = deleteEstimate(n, state.sandboxes, state.snapshots);
    let text = `Delete snapshot ${n.id}? Frees up to ${fmtBytes(est.bytes)}.`;
    if (est.shared) text += ` Files shared with ${[...est.users, ...est.diffs].join(", ")} stay until they go.`;
    if (await confirmDelete(text)) act("delete " + n.id, () => api("DELETE", `/v1/snapshots/${enc(n.id)}`));
  },
};

function button(label, fn, cls) {
  return el("button", { type: "button", class: cls, onclick: e => { e.stopPropagation(); fn(); } }, label);
}

function sandboxButtons(s) {
  const b = [];
  if (s.state === "running" || s.state === "paused") b.push(button("snapshot", () => actions.snapshot(s)));
  if (s.state === "running") b.push(button("fork", () => actions.fork(s)), button("stop", () => actions.stop(s)));
  if (s.state === "paused") b.push(button("continue", () => actions.resume(s)));
  if (s.state === "stopped") b.push(button("start", () => actions.start(s)));
  b.push(button("delete", () => actions.deleteSandbox(s), "danger"));
  return b;
}

function renderSandboxes() {
  const body = $("#sandboxes tbody");
  body.replaceChildren(...state.sandboxes.map(s => el("tr",
    { "data-sandbox": s.name, class: state.selected === s.id ? "selected" : null, onclick: () => select(s.id) },
    el("td", {}, s.name),
    el("td", {}, el("span", { class: "state " + s.state }, s.state)),
    el("td", {}, String(s.cpus)),
    el("td", {}, s.memory_mib + " MiB"),
    el("td", { title: s.created_at }, age(s.created_at)),
    el("td", {}, s.forked_from ? "fork of " + nameOf(s.forked_from) : s.origin),
    el("td", { class: "actions" }, sandboxButtons(s)))));
  if (!state.sandboxes.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "hint" }, "no sandboxes yet")));
}

function nameOf(id) {
  return state.sandboxes.find(s => s.id === id)?.name || id;
}

function renderNode(n) {
  const d = n.data;
  let info = [], btns = [];
  if (n.kind === "sandbox") {
    info.push(el("span", { class: "state " + d.state }, d.state), `${d.cpus} vCPU · ${d.memory_mib} MiB`);
    if (d.restored_from) info.push("rolled back to " + d.restored_from);
    const below = subtreeBytes(n);
    if (below) info.push("snapshots below: " + fmtBytes(below));
    btns = sandboxButtons(d).filter(b => b.textContent !== "delete" && b.textContent !== "stop");
  } else if (n.kind === "snapshot") {
    info.push(d.type, fmtBytes(d.size_bytes));
    if (d.parent && d.parent.startsWith("snapshot:")) info.push(el("span", { class: "diff" }, "diff on " + d.parent.slice(9)));
    if (d.restored) info.push("restored");
    const est = deleteEstimate(d, state.sandboxes, state.snapshots);
    info.push(el("span", { class: "frees", title: est.shared ? "shared with " + [...est.users, ...est.diffs].join(", ") : "" },
      "delete frees " + (est.shared ? "≤ " : "") + fmtBytes(est.bytes)));
    btns = [button("resume", () => actions.resumeSnapshot(d)), button("restore", () => actions.restore(d)),
      button("delete", () => actions.deleteSnapshot(d), "danger")];
  } else if (n.kind === "template") {
    info.push("template");
  }
  const label = el("span", { class: "label" }, n.label);
  const row = el("div", { class: "node " + n.kind, "data-kind": n.kind, "data-name": n.label,
    onclick: n.kind === "sandbox" ? () => select(d.id) : null }, label, el("span", { class: "info" }, info.flatMap(i => [" ", i])), el("span", { class: "actions" }, btns));
  return el("li", {}, row, n.children.length ? el("ul", {}, n.children.map(renderNode)) : null);
}

function renderTree() {
  const { roots } = buildTree(state.templates, state.sandboxes, state.snapshots);
  $("#tree").replaceChildren(el("ul", { class: "tree" }, roots.map(renderNode)));
}

function render() {
  renderSandboxes();
  renderTree();
  const s = state.sandboxes.find(x => x.id === state.selected);
  $("#detail").hidden = !s;
  if (s) $("#detail-title").textContent = `${s.name} (${s.state})`;
}

async function select(id) {
  state.selected = id;
  $("#exec-out").textContent = "";
  render();
  await loadLogs();
}

async function loadLogs() {
  if (!state.selected) return;
  try {
    $("#logs").textContent = await api("GET", `/v1/sandboxes/${enc(state.selected)}/logs?lines=200`);
    $("#logs").scrollTop = $("#logs").scrollHeight;
  } catch (e) {
    $("#logs").textContent = "(" + e.message + ")";
  }
}

async function refresh() {
  try {
    const [sandboxes, snapshots] = await Promise.all([api("GET", "/v1/sandboxes"), api("GET", "/v1/snapshots")]);
    state.sandboxes = sandboxes.filter(s => !s.origin.startsWith("spare:") && !s.origin.startsWith("building:"));
    state.snapshots = snapshots;
    render();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return showLogin("the token was refused");
    $("#live").textContent = "offline";
  }
}

let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150);
}

// Live updates: the event stream when the daemon has one; polling every 2 s otherwise, and while the
// stream is down.
async function live() {
  let poll = null;
  const polling = on => {
    if (on && !poll) poll = setInterval(refresh, 2000);
    if (!on && poll) { clearInterval(poll); poll = null; }
  };
  for (;;) {
    try {
      const had = await subscribe(() => {
        polling(false);
        $("#live").textContent = "live";
        $("#live").className = "badge";
        // What changed while the stream was down.
        refreshSoon();
      }, ev => {
        if (ev.kind !== "heartbeat") refreshSoon();
        if (ev.sandbox && ev.sandbox === state.selected) loadLogs();
      });
      if (!had) {
        $("#live").textContent = "polling every 2 s";
        $("#live").className = "badge polling";
        polling(true);
        return;
      }
    } catch (_) { /* fall through to a retry */ }
    $("#live").textContent = "reconnecting";
    polling(true);
    await new Promise(r => setTimeout(r, 2000));
  }
}

function showLogin(why) {
  $("#app").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = why || "";
  $("#token").focus();
}

async function start() {
  try {
    const info = await api("GET", "/v1/info");
    $("#daemon").textContent = `daemon ${info.version} · ${info.accel}`;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return showLogin(token() ? "the token was refused" : "");
    $("#daemon").textContent = "cannot reach the daemon: " + e.message;
    return;
  }
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = !token();
  const images = await api("GET", "/v1/images").catch(() => []);
  state.templates = images.map(i => i.name);
  $("#create-template").replaceChildren(...images.map(i => el("option", { value: i.name }, i.name)));
  await refresh();
  live();
}

$("#login").addEventListener("submit", e => {
  e.preventDefault();
  setToken($("#token").value.trim());
  $("#token").value = "";
  start();
});
$("#logout").addEventListener("click", () => { setToken(null); location.reload(); });
$("#create").addEventListener("submit", e => {
  e.preventDefault();
  const body = { template: $("#create-template").value };
  if ($("#create-name").value.trim()) body.name = $("#create-name").value.trim();
  if ($("#create-memory").value) body.memory_mib = Number($("#create-memory").value);
  $("#create-name").value = "";
  act("create " + (body.name || body.template), () => api("POST", "/v1/sandboxes", body));
});
$("#exec").addEventListener("submit", async e => {
  e.preventDefault();
  const cmd = $("#exec-cmd").value;
  if (!cmd.trim() || !state.selected) return;
  $("#exec-out").textContent = "$ " + cmd + "\n…";
  try {
    const r = await api("POST", `/v1/sandboxes/${enc(state.selected)}/exec`, { cmd, timeout_ms: 60000 });
    $("#exec-out").textContent = `$ ${cmd}\n${r.stdout}${r.stderr}[exit ${r.exit_code ?? "signal " + r.signal}${r.timed_out ? ", timed out" : ""}]`;
  } catch (err) {
    $("#exec-out").textContent = `$ ${cmd}\n${err.code || ""}: ${err.message}`;
  }
});
$("#logs-refresh").addEventListener("click", loadLogs);
setInterval(() => state.sandboxes.length && renderSandboxes(), 10000);
start();
