// uproxy status page. Every string from the server goes into the DOM through
// textContent (never innerHTML); the page only talks to its own origin.
"use strict";

const REFRESH_MS = 5000;
const LIVE_MS = 2000;  // charts, bars and events
const PAGE = 50;  // rows per page of the Services and Endpoints tables
const BAR_PAGE = 10;  // service ports per page of bars
const EVENTS_KEPT = 200;
const COUNTS_SHOWN = 50;
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

// A pager: "1-50 of 10000" and two buttons; the table asks the API for one page only.
function makePager(id, size, onChange) {
  const box = document.getElementById(id);
  const state = { offset: 0, size: size, total: 0 };
  const label = el("span", "", "muted");
  const prev = el("button", "\u2039 prev");
  const next = el("button", "next \u203a");
  prev.type = next.type = "button";
  prev.addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.size); onChange(); });
  next.addEventListener("click", () => { state.offset += state.size; onChange(); });
  box.replaceChildren(prev, label, next);
  state.query = () => "offset=" + state.offset + "&limit=" + state.size;
  state.update = (total) => {
    state.total = total;
    if (state.offset >= total && total > 0) {
      state.offset = Math.floor((total - 1) / state.size) * state.size;
      onChange();
    }
    const last = Math.min(total, state.offset + state.size);
    label.textContent = total ? (state.offset + 1) + "\u2013" + last + " of " + total : "none";
    prev.disabled = state.offset === 0;
    next.disabled = last >= total;
    box.hidden = total <= state.size && state.offset === 0;
  };
  return state;
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

// The filter offers the Services of the table's current page and the service ports with the
// most open connections (the table is paged: 10,000 options would not help anyone).
let knownServices = "";
let pageNames = [];
let busyNames = [];
function updateFilterOptions(services) {
  if (services) {
    pageNames = [];
    for (const s of services) {
      pageNames.push(s.namespace + "/" + s.name);
      for (const p of s.ports) if (p.proxied && p.name) pageNames.push(s.namespace + "/" + s.name + ":" + p.name);
    }
  }
  const select = document.getElementById("service-filter");
  const current = select.value;  // kept even when it left both lists: the stream still filters
  const names = [...new Set([...pageNames, ...busyNames, ...(current ? [current] : [])])];
  const key = names.join("\n");
  if (key === knownServices) return;
  knownServices = key;
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

const pagers = {};

async function refresh() {
  const results = await Promise.allSettled([
    getJSON("/api/v1/info").then(renderInfo),
    refreshServices(),
    refreshEndpoints(),
    getJSON("/api/v1/rules").then(renderRules),
  ]);
  for (const r of results) if (r.status === "rejected") console.warn(r.reason);
}

async function refreshServices() {
  const data = await getJSON("/api/v1/services?" + pagers.services.query());
  pagers.services.update(data.total);
  renderServices(data);
}

async function refreshEndpoints() {
  const data = await getJSON("/api/v1/endpoints?" + pagers.endpoints.query());
  pagers.endpoints.update(data.total);
  renderEndpoints(data);
}

async function refreshLive() {
  const results = await Promise.allSettled([refreshCharts(), refreshBars(), refreshEvents()]);
  for (const r of results) if (r.status === "rejected") console.warn(r.reason);
}

// --- traffic charts (uPlot) -----------------------------------------------------------------
const charts = {};
let chartKeys = "";

function rate(n) { return n >= 1024 ? bytes(Math.round(n)) + "/s" : (Math.round(n * 10) / 10) + "/s"; }

function chartOptions(title, series, width) {
  return {
    title: title, width: width, height: 180,
    scales: { x: { time: true } },
    series: [{}, ...series.map(([label, color, fmt]) => ({
      label: label, stroke: color, width: 1.5, fill: color + "22",
      value: (u, v) => (v === null || v === undefined ? "--" : fmt(v)),
    }))],
    axes: [{}, { size: 70, values: (u, vals) => vals.map((v) => series[0][2](v)) }],
  };
}

const CHARTS = [
  ["chart-conns", "New connections/s", [["connections/s", "#2463eb", (v) => rate(v)]],
   (d) => [d.connections]],
  ["chart-bytes", "Bytes/s", [["up (client to backend)", "#16803c", rate],
                              ["down (backend to client)", "#b45309", rate]],
   (d) => [d.bytesUp, d.bytesDown]],
  ["chart-open", "Open", [["TCP connections", "#7c3aed", (v) => String(Math.round(v))],
                          ["UDP flows", "#0891b2", (v) => String(Math.round(v))]],
   (d) => [d.open, d.udpFlows]],
];

function updateChartOptions(keys) {
  const key = keys.join("\n");
  if (key === chartKeys) return;
  chartKeys = key;
  const select = document.getElementById("chart-service");
  const current = select.value;
  const options = [el("option", "all service ports")];
  options[0].value = "";
  for (const name of keys) {
    const option = el("option", name);
    option.value = name;
    options.push(option);
  }
  select.replaceChildren(...options);
  select.value = keys.includes(current) ? current : "";
}

async function refreshCharts() {
  const wanted = document.getElementById("chart-service").value;
  const query = wanted ? "service=" + encodeURIComponent(wanted) : "only=total";
  const data = await getJSON("/api/v1/series?" + query);
  updateChartOptions(data.keys);
  const picked = wanted ? data.items.find((i) => i.service === wanted) : data.total;
  if (!picked) return;
  if (typeof uPlot === "undefined") {
    document.getElementById("charts-missing").hidden = false;
    return;
  }
  for (const [id, title, series, pick] of CHARTS) {
    const box = document.getElementById(id);
    const values = pick(picked);
    const plotted = [data.times, ...values];
    if (!charts[id]) {
      charts[id] = new uPlot(chartOptions(title, series, Math.max(300, box.clientWidth)), plotted, box);
    } else {
      charts[id].setData(plotted);
    }
    // What the browser test (and anyone curious) can read without the canvas.
    box.dataset.points = String(data.times.length);
    box.dataset.max = String(Math.max(0, ...values.flat()));
    box.dataset.last = values.map((v) => v.length ? v[v.length - 1] : 0).join(",");
  }
}

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries(charts)) {
    chart.setSize({ width: Math.max(300, document.getElementById(id).clientWidth), height: 180 });
  }
});

// --- balance bars ---------------------------------------------------------------------------
async function refreshBars() {
  const data = await getJSON("/api/v1/endpoints?sort=traffic&" + pagers.bars.query());
  pagers.bars.update(data.total);
  const blocks = [];
  for (const item of data.items) {
    const byPort = new Map();
    for (const e of item.endpoints) {
      if (!byPort.has(e.service)) byPort.set(e.service, []);
      byPort.get(e.service).push(e);
    }
    for (const [service, eps] of byPort) blocks.push(barBlock(service, eps));
  }
  document.getElementById("bars").replaceChildren(...blocks);
  document.getElementById("bars-empty").hidden = blocks.length > 0;
}

function barBlock(service, eps) {
  const count = (t) => t.opened + t.udpFlowsOpened;
  const live = (t) => t.open + t.udpFlows;
  const total = eps.reduce((n, e) => n + count(e.traffic), 0);
  const open = eps.reduce((n, e) => n + live(e.traffic), 0);
  const scale = Math.max(1, ...eps.map((e) => count(e.traffic)));
  const block = el("div", null, "svc-bars");
  block.dataset.service = service;
  block.appendChild(el("h3", service + "  \u2014 " + total + " connections, " + open + " open"));
  for (const e of eps) {
    const t = e.traffic;
    const host = e.ip.includes(":") ? "[" + e.ip + "]" : e.ip;
    const row = el("div", null, "bar-row" + (e.ready ? "" : " notready"));
    row.dataset.endpoint = host + ":" + e.port;
    row.dataset.opened = String(count(t));
    row.dataset.open = String(live(t));
    const notes = [e.ready ? "" : (e.terminating ? "terminating" : "not ready"), e.zone || ""]
      .filter(Boolean);
    row.appendChild(el("span", host + ":" + e.port + (notes.length ? " (" + notes.join(", ") + ")" : "")));
    const bar = el("div", null, "bar");
    const fill = el("div", null, "fill");
    fill.style.width = (100 * count(t) / scale).toFixed(1) + "%";
    const now = el("div", null, "open");
    now.style.width = (100 * live(t) / scale).toFixed(1) + "%";
    bar.append(fill, now);
    row.appendChild(bar);
    const share = total ? Math.round(100 * count(t) / total) + "%" : "-";
    const text = el("span", share + "  " + count(t) + " conns, " + live(t) + " open, " +
      bytes(t.bytesUp) + " up, " + bytes(t.bytesDown) + " down");
    row.appendChild(text);
    if (t.failed) row.appendChild(el("span", t.failed + " failed", "failed"));
    block.appendChild(row);
  }
  return block;
}

// --- events ---------------------------------------------------------------------------------
let lastEventSeq = 0;

async function refreshEvents() {
  const data = await getJSON("/api/v1/events?limit=" + EVENTS_KEPT + "&since=" + lastEventSeq);
  if (data.lastSeq < lastEventSeq) lastEventSeq = 0;  // the daemon restarted
  const body = document.querySelector("#events tbody");
  for (const e of data.items) {
    const old = body.querySelector('tr[data-key="' + CSS.escape(e.kind + "|" + e.object + "|" + e.message) + '"]');
    if (old) old.remove();  // counted again: moves to the top
    const tr = el("tr", null, e.level === "info" ? "" : e.level);
    tr.dataset.key = e.kind + "|" + e.object + "|" + e.message;
    tr.dataset.kind = e.kind;
    const when = new Date(e.time * 1000).toISOString().replace("T", " ").slice(0, 19);
    for (const [text, cls] of [[when], [e.kind], [e.object], [e.message], [e.count, "num"]]) {
      tr.appendChild(el("td", text, cls));
    }
    body.insertBefore(tr, body.firstChild);
    lastEventSeq = Math.max(lastEventSeq, e.seq);
  }
  while (body.children.length > EVENTS_KEPT) body.lastChild.remove();
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
  const busiest = Object.entries(data.counts).sort((a, b) => b[1] - a[1]).slice(0, COUNTS_SHOWN);
  fillTable("conn-counts", busiest.map(([name, n]) => [name, [n, "num"]]));
  busyNames = busiest.map(([name]) => name).sort();
  updateFilterOptions(null);
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
  pagers.services = makePager("services-pager", PAGE, () => refreshServices().catch(console.warn));
  pagers.endpoints = makePager("endpoints-pager", PAGE, () => refreshEndpoints().catch(console.warn));
  pagers.bars = makePager("balance-pager", BAR_PAGE, () => refreshBars().catch(console.warn));
  document.getElementById("chart-service").addEventListener("change", () => {
    for (const id of Object.keys(charts)) { charts[id].destroy(); delete charts[id]; }
    refreshCharts().catch(console.warn);
  });
  refresh();
  refreshLive();
  setInterval(refresh, REFRESH_MS);
  setInterval(refreshLive, LIVE_MS);
  openStream();
});
