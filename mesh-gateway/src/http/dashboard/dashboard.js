// The Starling dashboard: polls /v1/overview on the gateway that served it (no other request),
// and draws nodes, who calls whom, services, the policy rollout, audit events and traces.
"use strict";

const POLL_MS = 2000;
let token = sessionStorage.getItem("starling-token") || "";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const pct = (x) => (x * 100).toFixed(1) + "%";
const ms = (x) => (x == null ? "-" : x < 1 ? x.toFixed(2) + " ms" : x.toFixed(0) + " ms");
const rate = (x) => (x < 10 ? x.toFixed(2) : x.toFixed(0));
const mib = (b) => (b == null ? "-" : (b / 1048576).toFixed(1) + " MiB");
const hours = (s) => (s == null ? "-" : s <= 0 ? "EXPIRED" : s < 86400 ? Math.floor(s / 3600) + " h" : Math.floor(s / 86400) + " d");

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function drawNodes(o) {
  const rows = o.nodes.map((n) => {
    const policy = o.policy.version === 0 ? "none" :
      "v" + n.policy_version + (n.policy_error ? " (refused)" : n.policy_current ? "" : " (behind)");
    const tr = el("tr", { class: n.up ? "up" : "down", "data-node": n.name },
      el("td", {}, n.name),
      el("td", { class: n.up ? "state-up" : "state-down" }, n.up ? "up" : "down"),
      el("td", {}, n.version),
      el("td", { class: n.policy_error ? "bad" : "" }, policy),
      el("td", { class: n.certificate_expires_in_s != null && n.certificate_expires_in_s < 43200 ? "bad" : "" }, hours(n.certificate_expires_in_s)),
      el("td", {}, mib(n.rss_bytes)),
      el("td", {}, n.cpu_seconds == null ? "-" : n.cpu_seconds.toFixed(1) + " s"),
      el("td", {}, n.last_seen_s + " s ago"));
    return tr;
  });
  fill(document.querySelector("#nodes tbody"), rows);
}

function drawTopology(o) {
  const g = document.getElementById("topology");
  const names = o.nodes.map((n) => n.name);
  for (const e of o.edges) for (const x of [e.caller, e.callee]) if (x && !names.includes(x)) names.push(x);
  const cx = 300, cy = 180, r = 130;
  const pos = {};
  names.forEach((name, i) => {
    const a = (2 * Math.PI * i) / Math.max(names.length, 1) - Math.PI / 2;
    pos[name] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const parts = [];
  for (const e of o.edges) {
    if (!pos[e.caller] || !pos[e.callee]) continue;
    const [x1, y1] = pos[e.caller], [x2, y2] = pos[e.callee];
    parts.push(svg("g", { class: "edge" + (e.error_share > 0 ? " failing" : ""), "data-edge": e.caller + ">" + e.callee },
      svg("line", { x1, y1, x2, y2 }),
      svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" },
        rate(e.rate) + "/s " + pct(e.error_share))));
  }
  const down = new Set(o.nodes.filter((n) => !n.up).map((n) => n.name));
  for (const name of names) {
    const [x, y] = pos[name];
    parts.push(svg("g", { class: "node" + (down.has(name) ? " down" : ""), "data-node": name },
      svg("circle", { cx: x, cy: y, r: 22 }),
      svg("text", { x, y: y + 38, "text-anchor": "middle" }, name)));
  }
  g.replaceChildren(...parts);
  fill(document.querySelector("#edges tbody"), o.edges.map((e) =>
    el("tr", { "data-edge": e.caller + ">" + e.callee },
      el("td", {}, e.caller), el("td", {}, e.callee || "(no endpoint)"),
      el("td", {}, rate(e.rate)), el("td", { class: e.error_share > 0 ? "bad" : "", title: e.recent ? "over the window" : "over every call so far" }, pct(e.error_share)),
      el("td", {}, ms(e.p50_ms)), el("td", {}, ms(e.p99_ms)), el("td", { class: "count" }, e.calls))));
}

function drawServices(o) {
  fill(document.querySelector("#services tbody"), o.services.map((s) =>
    el("tr", { "data-service": s.name },
      el("td", {}, s.name), el("td", {}, rate(s.rate)),
      el("td", { class: s.error_share > 0 ? "bad errors" : "errors", title: s.recent ? "over the window" : "over every call so far" }, pct(s.error_share)),
      el("td", {}, ms(s.p50_ms)), el("td", {}, ms(s.p99_ms)), el("td", { class: "count" }, s.calls))));
}

function drawPolicy(o) {
  document.getElementById("policy").textContent = o.policy.version === 0 ? "no policy: every call allowed" :
    "version " + o.policy.version + (o.policy.hash ? " (" + o.policy.hash.slice(0, 12) + ")" : "") +
    ": held by " + o.summary.policy_current + " of " + o.summary.nodes + " nodes";
  fill(document.getElementById("nacks"), o.nodes.filter((n) => n.policy_error).map((n) =>
    el("li", { class: "bad" }, n.name + " refused it: " + n.policy_error)));
}

function drawAudit(o) {
  fill(document.getElementById("audit"), o.audit.map((a) => {
    // A node's clock (or a node) may say anything: a time out of range is shown as it came.
    const t = Number(a.unix_ms);
    const when = Number.isFinite(t) && Math.abs(t) < 8.64e15
      ? new Date(t).toISOString().replace("T", " ").slice(0, 19) : String(a.unix_ms);
    const rest = Object.entries(a).filter(([k]) => !["unix_ms", "node", "kind"].includes(k))
      .map(([k, v]) => k + "=" + v).join(" ");
    return el("li", {}, when + " " + a.node + " " + a.kind + " " + rest);
  }));
  fill(document.getElementById("traces"), o.traces.map((t) => {
    const spans = t.spans.map((s) => s.node + " " + s.service + "." + s.method + " " + (s.duration_us / 1000).toFixed(1) + " ms").join(" / ");
    return el("li", {}, t.trace_id.slice(0, 12) + ": " + spans);
  }));
}

async function poll() {
  try {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const r = await fetch("/v1/overview", { headers, cache: "no-store" });
    if (r.status === 401) {
      document.getElementById("login").hidden = false;
      document.getElementById("summary").textContent = "needs the admin token";
      return;
    }
    const o = await r.json();
    const failing = o.services.filter((s) => s.error_share > 0).length;
    document.getElementById("summary").textContent =
      o.summary.up + " of " + o.summary.nodes + " nodes up" + (failing ? ", " + failing + " service(s) failing" : "") +
      (o.nodes.length < o.summary.nodes ? "; " + o.nodes.length + " listed, what is wrong first (mesh-gateway nodes lists all)" : "");
    document.getElementById("updated").textContent =
      "updated " + new Date().toLocaleTimeString() + (o.window_s > 0 ? ", rates over " + Math.round(o.window_s) + " s" : "");
    drawNodes(o);
    drawTopology(o);
    drawServices(o);
    drawPolicy(o);
    drawAudit(o);
    document.body.dataset.ready = "1";
  } catch (e) {
    document.getElementById("summary").textContent = "the gateway does not answer (" + e.message + ")";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("starling-token", token);
  document.getElementById("login").hidden = true;
});

poll();
