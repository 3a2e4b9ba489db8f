// uproxy status page. Every string from the server goes into the DOM through
// textContent (never innerHTML); the page only talks to its own origin.
"use strict";

const REFRESH_MS = 5000;
const rows = new Map();  // connection id -> <tr>
let stream = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function age(seconds) {  // kubectl's human durations
  if (seconds === null || seconds === undefined) return "<unknown>";
  const s = Math.floor(seconds);
  if (s < 0) return "0s";
  if (s < 120) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 10) return s % 60 ? m + "m" + (s % 60) + "s" : m + "m";
  if (m < 180) return m + "m";
  const h = Math.floor(s / 3600);
  if (h < 8) return m % 60 ? h + "h" + (m % 60) + "m" : h + "h";
  if (h < 48) return h + "h";
  if (h < 192) return h % 24 ? Math.floor(h / 24) + "d" + (h % 24) + "h" : Math.floor(h / 24) + "d";
  return Math.floor(h / 24) + "d";
}

function bytes(n) {
  let v = Number(n);
  if (v < 1024) return String(v);
  for (const unit of ["Ki", "Mi", "Gi", "Ti"]) {
    v /= 1024;
    if (v < 1024 || unit === "Ti") return v.toFixed(1) + unit;
  }
  return String(n);
}

function fillTable(id, records) {  // records: arrays of cell values (or [value, class])
  const body = document.querySelector("#" + id + " tbody");
  const fresh = records.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) {
      tr.appendChild(Array.isArray(cell) ? el("td", cell[0], cell[1]) : el("td", cell));
    }
    return tr;
  });
  body.replaceChildren(...fresh);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function orNone(list) { return list && list.length ? list.join(",") : "<none>"; }

function renderInfo(info) {
  const dl = document.getElementById("info");
  const pairs = [
    ["version", info.version], ["node", info.node], ["source", info.source],
    ["relay", info.relay], ["loop", info.loop],
    ["ready", info.ready ? "yes" : "no"], ["healthy", info.healthy ? "yes" : "no"],
    ["last sync", info.lastSync || "never"], ["connections", info.connections],
  ];
  dl.replaceChildren(...pairs.map(([k, v]) => {
    const div = el("div");
    div.appendChild(el("dt", k));
    const cls = (k === "ready" || k === "healthy") ? (v === "yes" ? "ok" : "bad") : undefined;
    const dd = el("dd", v, cls);
    dd.dataset.key = k;
    div.appendChild(dd);
    return div;
  }));
}

function renderServices(data) {
  fillTable("services", data.items.map((s) => {
    const ports = s.ports.map((p) => p.port + (p.nodePort ? ":" + p.nodePort : "") + "/" + p.protocol);
    const proxied = s.ports.filter((p) => p.proxyPort).map((p) => p.port + "->" + p.proxyPort + "/" + p.protocol);
    let external = orNone([...(s.loadBalancerIPs || []), ...(s.externalIPs || [])]);
    if (s.type === "LoadBalancer" && !(s.loadBalancerIPs || []).length) external = "<pending>";
    if (s.type === "ExternalName") external = s.externalName || "<none>";
    const clusterIPs = (s.clusterIPs && s.clusterIPs.length) ? s.clusterIPs.join(",") : s.clusterIP;
    return [s.namespace, s.name, s.type, clusterIPs || "<none>", external, orNone(ports),
            age(s.age), orNone(proxied)];
  }));
  updateFilterOptions(data.items);
}

function renderEndpoints(data) {
  fillTable("endpoints", data.items.map((e) => {
    const shown = e.addresses.length > 3
      ? e.addresses.slice(0, 3).join(",") + " + " + (e.addresses.length - 3) + " more..."
      : orNone(e.addresses);
    return [e.namespace, e.name, shown, age(e.age)];
  }));
}

function renderRules(data) {
  const lines = data.lines.length ? data.lines : ["# no uproxy rules"];
  const header = data.applied ? "" : "# not applied: this uproxy does not manage iptables\n";
  const lines6 = data.lines6 || [];
  const v6 = lines6.length > 1  // more than the rule that keeps NAT alive
    ? "\n# ip6tables-save -t nat\n*nat\n:" + data.chain + " - [0:0]\n" + lines6.join("\n") + "\nCOMMIT"
    : "";
  document.getElementById("rules").textContent = header + "*nat\n:" + data.chain + " - [0:0]\n" +
    lines.join("\n") + "\nCOMMIT" + v6;
  fillTable("listeners", data.listeners.map((l) => [l.service, l.scope, l.address, [l.port, "num"]]));
}

let knownServices = "";
function updateFilterOptions(services) {
  const names = [];
  for (const s of services) {
    names.push(s.namespace + "/" + s.name);
    for (const p of s.ports) if (p.proxied && p.name) names.push(s.namespace + "/" + s.name + ":" + p.name);
  }
  const key = names.join("\n");
  if (key === knownServices) return;
  knownServices = key;
  const select = document.getElementById("service-filter");
  const current = select.value;
  const options = [el("option", "all services")];
  options[0].value = "";
  for (const name of names) {
    const option = el("option", name);
    option.value = name;
    options.push(option);
  }
  select.replaceChildren(...options);
  select.value = names.includes(current) ? current : "";
}

async function refresh() {
  const results = await Promise.allSettled([
    getJSON("/api/v1/info").then(renderInfo),
    getJSON("/api/v1/services").then(renderServices),
    getJSON("/api/v1/endpoints").then(renderEndpoints),
    getJSON("/api/v1/rules").then(renderRules),
  ]);
  for (const r of results) if (r.status === "rejected") console.warn(r.reason);
}

// --- live connections ----------------------------------------------------------------------
function connCells(c) {
  return [
    [c.client], [c.service], [c.backend || "<none>"], [c.protocol], [age(c.age)],
    [bytes(c.bytes_up), "num"], [bytes(c.bytes_down), "num"], [c.state],
    [c.native ? "native" : "python"],
  ];
}

function upsertRow(c, fresh) {
  let tr = rows.get(c.id);
  const cells = connCells(c);
  if (!tr) {
    tr = el("tr");
    tr.dataset.id = String(c.id);
    for (const [text, cls] of cells) tr.appendChild(el("td", text, cls));
    rows.set(c.id, tr);
    if (fresh) tr.classList.add("fresh");
  } else {
    cells.forEach(([text], i) => {
      const td = tr.children[i];
      if (td.textContent !== text) td.textContent = text;
    });
  }
  return tr;
}

function removeRow(id) {
  const tr = rows.get(id);
  if (tr) { tr.remove(); rows.delete(id); }
}

function updateEmpty() {
  document.getElementById("conn-empty").hidden = rows.size > 0;
}

function onSnapshot(data) {
  const body = document.querySelector("#connections tbody");
  const keep = new Set(data.items.map((c) => c.id));
  for (const id of [...rows.keys()]) if (!keep.has(id)) removeRow(id);
  for (const c of data.items) {
    const tr = upsertRow(c, false);
    tr.classList.remove("fresh");
    body.appendChild(tr);  // keeps the server's order (oldest first)
  }
  const shown = data.items.length;
  document.getElementById("conn-summary").textContent =
    "(" + data.total + " open" + (data.matched !== data.total ? ", " + data.matched + " matching" : "") +
    (shown < data.matched ? ", showing the oldest " + shown : "") + ")";
  const live = document.querySelector('#info dd[data-key="connections"]');
  if (live) live.textContent = String(data.total);
  fillTable("conn-counts", Object.entries(data.counts).map(([name, n]) => [name, [n, "num"]]));
  updateEmpty();
}

function onBatch(data) {
  const body = document.querySelector("#connections tbody");
  for (const id of data.closed) removeRow(id);
  for (const c of data.updated) upsertRow(c, false);
  for (const c of data.opened) body.appendChild(upsertRow(c, true));
  const live = document.querySelector('#info dd[data-key="connections"]');
  if (live) live.textContent = String(data.total);
  updateEmpty();
}

function openStream() {
  if (stream) stream.close();
  for (const id of [...rows.keys()]) removeRow(id);
  const params = new URLSearchParams();
  const service = document.getElementById("service-filter").value;
  if (service) params.set("service", service);
  params.set("limit", document.getElementById("row-limit").value);
  const badge = document.getElementById("stream-state");
  stream = new EventSource("/api/v1/connections/watch?" + params.toString());
  stream.addEventListener("open", () => { badge.textContent = "live"; badge.className = "badge live"; });
  stream.addEventListener("error", () => { badge.textContent = "reconnecting"; badge.className = "badge down"; });
  stream.addEventListener("snapshot", (e) => onSnapshot(JSON.parse(e.data)));
  stream.addEventListener("batch", (e) => onBatch(JSON.parse(e.data)));
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("service-filter").addEventListener("change", openStream);
  document.getElementById("row-limit").addEventListener("change", openStream);
  refresh();
  setInterval(refresh, REFRESH_MS);
  openStream();
});
