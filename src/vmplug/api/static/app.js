// vmplug web page: the host's USB tree, the VMs as columns, each device's life as a
// timeline drawn from the journal, live through /v1/events.
// Plain script, no build step, nothing fetched from elsewhere.  Device data only ever
// reaches the page through textContent, attribute values and SVG attributes: a
// device chooses its own strings, so none of them is parsed as HTML.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const state = { devices: new Map(), vms: [], selected: null, version: 0, history: [], health: [], rules: null };
  const rows = new Map(); // port -> tree row <li>
  // timings of the first render and the last refresh, for benchmarks and the curious
  window.vmplugStats = { firstRenderMs: 0, fetchMs: 0, renderMs: 0, picturesMs: 0, refreshes: 0, log: [] };
  let treeKey = "";
  let vmKey = "";

  // -- device strings: visible, cut ---------------------------------------------

  // the same rule as the CLI's (vmplug.textsafe.printable): controls, format
  // characters (bidi overrides, zero-width marks), lone surrogates and line/paragraph
  // separators are shown as escapes, never interpreted; "\n" is the two characters
  // backslash and n; a backslash is doubled, so an escape always means a character
  const UNSAFE = /[\p{Cc}\p{Cf}\p{Cs}\p{Zl}\p{Zp}\\]/gu;
  const NAMED = { "\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\" };
  const hex = (n, w) => n.toString(16).padStart(w, "0");
  const visible = (s) =>
    String(s ?? "").replace(UNSAFE, (c) => {
      if (NAMED[c]) return NAMED[c];
      const n = c.codePointAt(0);
      return n <= 0xff ? `\\x${hex(n, 2)}` : n <= 0xffff ? `\\u${hex(n, 4)}` : `\\U${hex(n, 8)}`;
    });
  // the JS cap (CSS ellipsis does the rest): a 5,000-character name costs 5,000
  // characters in the detail panel only
  const CAP = 64;
  const cut = (s, n = CAP) => {
    const chars = Array.from(s);
    return chars.length > n ? chars.slice(0, n - 1).join("") + "…" : s;
  };

  const rawLabel = (d) => d.name || (d.is_hub ? "USB hub" : "(no name)");
  const label = (d) => visible(rawLabel(d));
  const vidpid = (d) => `${d.vendor_id ?? "????"}:${d.product_id ?? "????"}`;
  const where = (d) => d.attached || "";

  // -- DOM builders (text only through textContent) ------------------------------

  function h(tag, props, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k === "data") for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = dv;
      else if (k in el && typeof el[k] === "boolean") el[k] = !!v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(typeof kid === "string" || typeof kid === "number" ? String(kid) : kid);
    }
    return el;
  }

  function s(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null) continue;
      if (k === "data") for (const [dk, dv] of Object.entries(v)) el.dataset[dk] = dv;
      else el.setAttribute(k, String(v));
    }
    for (const kid of kids.flat()) if (kid) el.append(kid);
    return el;
  }

  const tip = (text) => {
    const t = document.createElementNS(SVG, "title");
    t.textContent = text;
    return t;
  };

  // a cut string with the whole (visible) text on hover
  const clipped = (cls, text, n = CAP) => h("span", { class: cls, title: text.length > n ? text : null, text: cut(text, n) });

  async function api(method, path, body) {
    const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.headers["X-CSRF-Token"] = csrf;
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    if (resp.status === 401) {
      location.assign("/"); // the session is gone (daemon restarted): sign in again
      throw new Error("signed out");
    }
    const data = await resp.json().catch(() => ({ error: resp.statusText }));
    if (!resp.ok) throw new Error(data.error || `${resp.status}`);
    return data;
  }

  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.classList.toggle("bad", !!bad);
    t.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => (t.hidden = true), 4000);
  }

  // -- actions ------------------------------------------------------------------

  async function moveTo(port, vm) {
    const d = state.devices.get(port);
    if (!d) return;
    const name = `${cut(label(d), 40)} (${port})`;
    try {
      if (vm) {
        const r = await api("POST", "/v1/attach", { device: selector(d), vm });
        toast(r.state === "attached" ? `${name} → ${vm}` : `${name}: ${r.state} ${visible(r.error ?? "")}`, r.state !== "attached");
      } else {
        await api("POST", "/v1/detach", { device: selector(d) });
        toast(`${name} stays on the host`);
      }
    } catch (e) {
      toast(`${name}: ${visible(e.message)}`, true);
    }
    refresh();
  }

  // -- the journal replayed: spans per device and per VM ---------------------------
  //
  // The same vocabulary as vmplug.history.health: a device is *attached* while it
  // is present, its rules name a running VM and that VM holds it; *waiting* while it
  // is wanted there and not held yet; *failed* when an attach of it failed and it
  // is still not held; *unplugged* while absent; *host* while no rule wants it.

  const WINDOW_S = 7 * 86400; // the health window
  const STATES = ["attached", "waiting", "failed", "unplugged", "host"];
  const DEV_KINDS = new Set(["device-add", "device-bind", "device-remove", "device-route", "attachment-lost"]);
  const QUIET = new Set([...DEV_KINDS, "vm-up", "vm-down", "daemon-start", "daemon-stop", "attach", "adopt", "detach", "rescan", "config-reload"]);

  function replay(entries, end, vmNames = []) {
    const devs = new Map(); // identity -> {present, target, attached, failed, spans, marks, cur, since}
    const vms = new Map(); // vm -> {spans, marks, cur, since}
    const running = new Set();
    let observed = true;
    const dev = (id) => {
      let d = devs.get(id);
      if (!d) devs.set(id, (d = { seen: false, present: false, target: null, attached: null, failed: null, spans: [], marks: [], cur: null, since: 0, port: null }));
      return d;
    };
    const vmOf = (name) => {
      let v = vms.get(name);
      if (!v) vms.set(name, (v = { seen: false, spans: [], marks: [], cur: null, since: 0 }));
      return v;
    };
    for (const name of vmNames) vmOf(name); // configured VMs: "down" until seen up
    // before a device's first add (a journal cut by the fetch limit) its state is
    // unknown: nothing is drawn rather than a guess
    const devState = (d) => {
      if (!observed || !d.seen) return null;
      if (!d.present) return "unplugged";
      if (!d.target) return "host";
      if (d.attached === d.target && running.has(d.target)) return "attached";
      return d.failed ? "failed" : "waiting";
    };
    const move = (x, st, t, extra) => {
      if (st === x.cur) return;
      if (x.cur !== null && t > x.since) x.spans.push({ state: x.cur, start: x.since, end: t, ...extra });
      x.cur = st;
      x.since = t;
    };
    const settle = (t) => {
      for (const d of devs.values()) move(d, devState(d), t);
      for (const [name, v] of vms) move(v, observed && v.seen ? (running.has(name) ? "up" : "down") : null, t);
    };
    let now = -Infinity;
    for (const e of entries) {
      const t = Math.max(e.ts, now);
      now = t;
      const k = e.kind;
      if (e.entry === "action") {
        if (!e.identity) continue;
        const d = dev(e.identity);
        if (e.result !== "ok") {
          d.failed = e.error_message || e.error_class || e.result;
          d.marks.push({ t, kind: `${k} ${e.result}`, text: `${k} → ${e.vm ?? "?"}: ${e.result}${e.error_message ? " — " + e.error_message : ""}`, cls: "m-error" });
          if (e.vm) vmOf(e.vm).marks.push({ t, kind: `${k} ${e.result}`, text: `${k} ${d.port ?? e.identity}: ${e.result}${e.error_message ? " — " + e.error_message : ""}`, cls: "m-error" });
        } else if (k === "attach" || k === "adopt") {
          d.attached = e.vm;
          d.failed = null;
        } else if (k === "detach" && d.attached === e.vm) {
          d.attached = null;
        } else if (!QUIET.has(k)) {
          d.marks.push({ t, kind: k, text: `${k}${e.vm ? " (" + e.vm + ")" : ""}`, cls: "m-other" });
        }
      } else if (DEV_KINDS.has(k) && e.identity) {
        const d = dev(e.identity);
        if (e.port) d.port = e.port;
        if (k === "device-add" || k === "device-bind") {
          d.seen = true;
          d.present = true;
          d.target = e.vm;
        } else if (k === "device-route") {
          d.target = e.vm;
          d.failed = null;
        } else if (k === "device-remove") {
          d.present = false;
          d.attached = null;
          d.failed = null;
        } else if (!e.vm || d.attached === e.vm) {
          d.attached = null; // attachment-lost
          d.marks.push({ t, kind: k, text: `${k}${e.vm ? " (" + e.vm + ")" : ""}`, cls: "m-error" });
        }
      } else if (k === "vm-up" && e.vm) {
        vmOf(e.vm).seen = true;
        running.add(e.vm);
      } else if (k === "vm-down" && e.vm) {
        vmOf(e.vm).seen = true;
        running.delete(e.vm);
        for (const d of devs.values()) if (d.attached === e.vm) d.attached = null;
      } else if (k === "daemon-start") {
        observed = true;
        for (const v of vms.values()) v.seen = true; // the snapshot names the running ones
        running.clear();
        for (const d of devs.values()) Object.assign(d, { present: false, target: null, attached: null, failed: null });
      } else if (k === "daemon-stop") {
        observed = false;
      } else if (!QUIET.has(k)) {
        // remediation, alerts, anything newer than this page: a neutral mark
        const m = { t, kind: k, text: `${k}${e.vm ? " (" + e.vm + ")" : ""}${e.detail ? " " + JSON.stringify(e.detail) : ""}`, cls: "m-other" };
        if (e.identity) dev(e.identity).marks.push(m);
        else if (e.vm) vmOf(e.vm).marks.push(m);
      }
      settle(t);
    }
    const last = Math.max(end, now);
    for (const x of [...devs.values(), ...vms.values()]) {
      if (x.cur !== null && last > x.since) x.spans.push({ state: x.cur, start: x.since, end: last });
      x.cur = null;
    }
    return { devs, vms };
  }

  // the shown window: the health window, or since the journal's first entry when
  // the journal is younger (a week of an hour-old daemon would be one sliver)
  function timeWindow() {
    const end = Date.now() / 1000;
    const first = state.history.length ? state.history[0].ts : end - 60;
    return [Math.max(end - WINDOW_S, Math.min(first, end - 5)), end];
  }

  // -- SVG pictures ---------------------------------------------------------------

  // tips: a tooltip per span (the detail panel's); the rows' strips go without, a
  // date formatted per span for 200 rows is most of a refresh
  function timeline(spans, marks, [t0, t1], { height = 10, axis = false, cls = "strip", tips = false } = {}) {
    const W = 1000;
    const bar = height;
    const total = axis ? height + 16 : height;
    const x = (t) => ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * W;
    const svg = s("svg", { class: `tl ${cls}`, viewBox: `0 0 ${W} ${total}`, preserveAspectRatio: "none", role: "img" });
    svg.append(s("rect", { class: "tl-bg", x: 0, y: 0, width: W, height: bar }));
    for (const sp of spans) {
      if (sp.end <= t0 || sp.start >= t1) continue;
      const a = x(sp.start);
      const w = Math.max(x(sp.end) - a, 1.5);
      const what = tips ? tip(`${sp.state}: ${new Date(sp.start * 1000).toLocaleString()} – ${new Date(sp.end * 1000).toLocaleString()} (${fmtS(sp.end - sp.start)})`) : null;
      svg.append(s("rect", { class: `span s-${sp.state}`, x: a.toFixed(2), y: 0, width: w.toFixed(2), height: bar, data: { state: sp.state, start: String(sp.start), end: String(sp.end) } }, what));
    }
    for (const m of marks) {
      if (m.t < t0 || m.t > t1) continue;
      const mx = x(m.t);
      svg.append(
        s("g", { class: `mark ${m.cls}`, data: { kind: m.kind, t: String(m.t) } },
          s("rect", { x: (mx - 2).toFixed(2), y: -1, width: 4, height: bar + 2 }),
          tip(visible(m.text))),
      );
    }
    if (axis) {
      const ticks = 4;
      for (let i = 0; i <= ticks; i++) {
        const t = t0 + ((t1 - t0) * i) / ticks;
        const tx = (W * i) / ticks;
        svg.append(s("line", { class: "tick", x1: tx, x2: tx, y1: bar, y2: bar + 4 }));
      }
    }
    return svg;
  }

  // an axis under a detail timeline: HTML, so its text does not stretch with the SVG
  function axisLabels([t0, t1]) {
    const span = t1 - t0;
    const f = (t) => {
      const d = new Date(t * 1000);
      return span < 86400 ? d.toLocaleTimeString() : d.toLocaleDateString() + " " + d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    };
    return h("div", { class: "axis" }, h("span", { text: f(t0) }), h("span", { text: f((t0 + t1) / 2) }), h("span", { text: "now" }));
  }

  const legend = () =>
    h("div", { class: "legend" },
      STATES.map((st) => h("span", { class: "key" }, h("i", { class: `sw s-${st}` }), st)),
      h("span", { class: "key" }, h("i", { class: "sw m-error" }), "error"),
      h("span", { class: "key" }, h("i", { class: "sw m-other" }), "other event"));

  // bars 0..1 (uptime per slice), or counts/durations scaled to their max
  function bars(values, { cls = "", max = null, titles = [] } = {}) {
    const n = Math.max(values.length, 1);
    const W = 100;
    const H = 24;
    const top = max ?? Math.max(...values.filter((v) => v !== null), 0);
    const svg = s("svg", { class: `chart ${cls}`, viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    svg.append(s("rect", { class: "chart-bg", x: 0, y: 0, width: W, height: H }));
    const bw = W / n;
    values.forEach((v, i) => {
      if (v === null) return;
      const bh = top > 0 ? Math.max((v / top) * H, v > 0 ? 1 : 0) : 0;
      svg.append(s("rect", { class: "bar", x: (i * bw + bw * 0.1).toFixed(2), y: (H - bh).toFixed(2), width: (bw * 0.8).toFixed(2), height: bh.toFixed(2) }, titles[i] ? tip(titles[i]) : null));
    });
    return svg;
  }

  // per slice of the window: up / wanted time, failures, and the recoveries
  function slices(spans, [t0, t1], n = 24) {
    const step = (t1 - t0) / n;
    const up = new Array(n).fill(0);
    const wanted = new Array(n).fill(0);
    const fails = new Array(n).fill(0);
    const recoveries = [];
    const ups = [];
    // as vmplug.history.health: leaving "attached" for the device's sake is a failure
    // and opens an outage; a failed attach opens one too; the outage's recovery time
    // is its waiting/failed time, booked when the device is attached again
    let prev = null;
    let outage = null;
    for (const sp of spans) {
      const isWanted = sp.state === "attached" || sp.state === "waiting" || sp.state === "failed";
      for (let i = 0; i < n; i++) {
        const a = Math.max(sp.start, t0 + i * step);
        const b = Math.min(sp.end, t0 + (i + 1) * step);
        if (b <= a || !isWanted) continue;
        wanted[i] += b - a;
        if (sp.state === "attached") up[i] += b - a;
      }
      if (sp.state === "attached" && sp.end > t0) ups.push(sp.end - Math.max(sp.start, t0));
      if (prev && prev.state === "attached" && sp.state !== "attached" && sp.state !== "host") {
        if (sp.start >= t0) fails[Math.min(n - 1, Math.floor((sp.start - t0) / step))] += 1;
        outage = 0;
      }
      if (sp.state === "failed" && outage === null) outage = 0;
      if (sp.state === "host") outage = null;
      if (outage !== null && (sp.state === "waiting" || sp.state === "failed")) outage += sp.end - sp.start;
      if (outage !== null && sp.state === "attached") {
        if (sp.start >= t0) recoveries.push(outage);
        outage = null;
      }
      prev = sp;
    }
    return { uptime: up.map((u, i) => (wanted[i] > 0 ? u / wanted[i] : null)), fails, recoveries, ups, step };
  }

  // -- rendering -----------------------------------------------------------------

  // A device's key on the page: its port, "HOST:PORT" for a remote device (one
  // tree per device host); the API is asked by port, or by identity when remote.
  function keyOf(d) {
    return d.host ? `${d.host}:${d.port}` : d.port;
  }

  function selector(d) {
    return d.host ? d.identity : d.port;
  }

  function parentPort(port) {
    const i = port.lastIndexOf(".");
    return i < 0 ? null : port.slice(0, i);
  }

  // The per-device menu holds only where the device is until someone reaches for it:
  // 200 rows x 21 VMs of <option> would be most of the page's nodes.
  function moveSelect(d) {
    const here = where(d);
    return h("select", { class: "to", "aria-label": `Move ${d.port} to`, data: { port: keyOf(d) } }, h("option", { value: here, selected: true, text: here || "host" }));
  }

  function fillSelect(sel) {
    if (sel.dataset.full) return;
    sel.dataset.full = "1";
    const here = sel.value;
    sel.replaceChildren(
      h("option", { value: "", selected: !here, text: "host" }),
      ...state.vms.map((vm) => h("option", { value: vm.name, selected: vm.name === here, text: vm.name })),
    );
    sel.value = here;
  }

  function badge(d) {
    if (d.is_hub) return null;
    const here = where(d);
    const st = d.state;
    // held: a remote device another VM host holds (its error says which), not "host"
    const text = here ? "in " + here : st === "pending" || st === "retrying" ? `${st} → ${d.vm}` : st === "held" ? d.error || "held" : "host";
    return h("span", { class: `badge s-${st}`, title: visible(d.error ?? st), text: cut(visible(text), 40) });
  }

  function nameButton(d, withVidPid) {
    return h("button", { type: "button", class: "name", data: { port: keyOf(d) }, title: label(d) },
      h("span", { class: "port", text: d.port }), " ",
      h("span", { class: "label", text: cut(label(d)) }),
      withVidPid ? [" ", h("span", { class: "vp", text: vidpid(d) })] : null);
  }

  function rowInner(d) {
    const row = h("div", { class: `row${where(d) ? " away" : ""}${keyOf(d) === state.selected ? " sel" : ""}` },
      nameButton(d, true), badge(d), d.is_hub ? null : moveSelect(d));
    if (!d.is_hub) row.append(h("div", { class: "strip-box", data: { identity: d.identity } }));
    return row;
  }

  function rowSig(d) {
    return [d.state, d.attached, d.vm, d.error, keyOf(d) === state.selected, vmKey].join("|");
  }

  function buildTree() {
    const byParent = new Map();
    const buses = new Map();
    for (const d of state.devices.values()) {
      const parent = parentPort(keyOf(d));
      if (parent && state.devices.has(parent)) {
        if (!byParent.has(parent)) byParent.set(parent, []);
        byParent.get(parent).push(d);
      } else {
        const bus = `${d.host || ""}\t${d.port.split("-")[0]}`;
        if (!buses.has(bus)) buses.set(bus, []);
        buses.get(bus).push(d);
      }
    }
    const tree = $("tree");
    tree.textContent = "";
    rows.clear();
    const add = (ul, d) => {
      const li = h("li", { class: d.is_hub ? "dev hub" : "dev", draggable: d.is_hub ? null : "true", data: { port: keyOf(d), sig: rowSig(d) } }, rowInner(d));
      rows.set(keyOf(d), li);
      ul.appendChild(li);
      const kids = byParent.get(keyOf(d));
      if (kids) {
        const sub = document.createElement("ul");
        for (const k of kids) add(sub, k);
        li.appendChild(sub);
      }
    };
    const hosts = new Map(); // "" (this host) first, then each device host: a tree each
    const order = ([a], [b]) => {
      const [ha, ba] = a.split("\t"), [hb, bb] = b.split("\t");
      return ha === hb ? Number(ba) - Number(bb) : ha < hb ? -1 : 1;
    };
    for (const [key, list] of [...buses].sort(order)) {
      const [host, bus] = key.split("\t");
      const ul = document.createElement("ul");
      for (const d of list) add(ul, d);
      const li = h("li", { class: "bus" }, h("span", { class: "busname", text: `Bus ${bus}` }), ul);
      if (!host) {
        tree.appendChild(li);
        continue;
      }
      if (!hosts.has(host)) {
        const sub = document.createElement("ul");
        tree.appendChild(h("li", { class: "host", data: { host } }, h("span", { class: "hostname", text: `${host} (device host)` }), sub));
        hosts.set(host, sub);
      }
      hosts.get(host).appendChild(li);
    }
  }

  function updateRows() {
    for (const d of state.devices.values()) {
      const li = rows.get(keyOf(d));
      const sig = rowSig(d);
      if (!li || li.dataset.sig === sig) continue;
      if (li.contains(document.activeElement) && document.activeElement.tagName === "SELECT") continue;
      li.dataset.sig = sig;
      li.querySelector(":scope > .row").replaceWith(rowInner(d));
    }
  }

  function renderVms() {
    const box = $("vms");
    const key = state.vms.map((v) => v.name).join("\n");
    if (box.dataset.key !== key) {
      box.dataset.key = key;
      box.replaceChildren(
        ...state.vms.map((v) =>
          h("section", { class: "vm drop", "aria-label": `VM ${v.name}`, data: { vm: v.name, target: v.name } },
            h("h3", {}, h("span", { class: "dot" }), clipped("vmname", visible(v.name), 32)),
            h("div", { class: "strip-box vm-strip", data: { vm: v.name } }),
            h("ul", { class: "cards" })),
        ),
      );
    }
    const cols = new Map();
    for (const v of state.vms) cols.set(v.name, []);
    for (const d of state.devices.values()) {
      if (d.is_hub) continue;
      const col = d.attached || (d.state === "pending" || d.state === "retrying" ? d.vm : null);
      if (col && cols.has(col)) cols.get(col).push(d);
    }
    for (const v of state.vms) {
      const sec = box.querySelector(`section[data-vm="${CSS.escape(v.name)}"]`);
      sec.classList.toggle("down", !v.connected);
      sec.querySelector(".dot").title = v.connected ? v.state || "connected" : "not connected";
      const list = cols.get(v.name);
      const sig = list.map((d) => [keyOf(d), d.state, d.attached, keyOf(d) === state.selected].join(":")).join("|");
      const ul = sec.querySelector(".cards");
      if (ul.dataset.sig === sig && ul.childElementCount) continue;
      ul.dataset.sig = sig;
      ul.replaceChildren(
        ...(list.length
          ? list.map((d) =>
              h("li", { class: `card s-${d.state}${keyOf(d) === state.selected ? " sel" : ""}`, draggable: "true", data: { port: keyOf(d) } },
                nameButton(d, false),
                d.attached === v.name ? null : h("span", { class: `badge s-${d.state}`, text: d.state }),
                h("button", { type: "button", class: "detach", data: { port: keyOf(d) }, "aria-label": `Detach ${d.port}`, title: "Detach: back to the host", text: "⏏" })),
            )
          : [h("li", { class: "empty", text: "no devices" })]),
      );
    }
  }

  // the timelines in the tree rows and VM columns, and the host's figures.
  // full: replay the journal and redraw everything (new journal, the clock moved);
  // else only the rows the last render replaced, from the last replay
  const strips = new Map(); // identity or "vm:" + name -> its drawn strip, until the next replay
  function renderPictures(full) {
    const t0 = performance.now();
    if (full || !state.replayed) {
      const win = timeWindow();
      const { devs, vms } = replay(state.history, win[1], state.vms.map((v) => v.name));
      state.replayed = { devs, vms, win };
      strips.clear();
      renderHost(devs, win);
    }
    const { devs, vms, win } = state.replayed;
    const strip = (key, r, opts) => {
      let svg = strips.get(key);
      if (!svg) strips.set(key, (svg = timeline(r ? r.spans : [], r ? r.marks : [], win, opts)));
      return svg;
    };
    for (const box of document.querySelectorAll("#tree .strip-box")) {
      const id = box.dataset.identity;
      const svg = strip(id, devs.get(id));
      if (box.firstChild !== svg) box.replaceChildren(svg); // a rebuilt row takes the drawn strip
    }
    for (const box of document.querySelectorAll("#vms .vm-strip")) {
      const svg = strip("vm:" + box.dataset.vm, vms.get(box.dataset.vm), { height: 8 });
      if (box.firstChild !== svg) box.replaceChildren(svg);
    }
    if (full) window.vmplugStats.picturesMs = performance.now() - t0;
  }

  function figure(name, value, chart, note) {
    return h("div", { class: "fig" },
      h("div", { class: "fig-text" }, h("span", { class: "fig-name", text: name }), h("span", { class: "fig-value", text: String(value) }), h("span", { class: "fig-note", text: note || "\u00a0" })),
      chart);
  }

  const pct = (u) => (u === null || u === undefined ? "–" : `${(u * 100).toFixed(u >= 0.9995 ? 0 : 2)} %`);

  function renderHost(devs, win) {
    const rowsH = state.health || [];
    let wanted = 0;
    let up = 0;
    let failures = 0;
    let worst = null;
    const meds = [];
    for (const r of rowsH) {
      wanted += r.wanted_s || 0;
      up += r.up_s || 0;
      failures += r.failures || 0;
      if (r.worst_recovery_s !== null && r.worst_recovery_s !== undefined) worst = Math.max(worst ?? 0, r.worst_recovery_s);
      if (r.median_recovery_s !== null && r.median_recovery_s !== undefined) meds.push(r.median_recovery_s);
    }
    // the host's slices: every device's spans summed
    const n = 24;
    const agg = { up: new Array(n).fill(0), wanted: new Array(n).fill(0), fails: new Array(n).fill(0), rec: [], ups: [] };
    for (const d of devs.values()) {
      const sl = slices(d.spans, win, n);
      sl.uptime.forEach((u, i) => {
        // re-weigh: slices() gives ratios; sum the underlying times instead
        if (u === null) return;
        const w = d.spans.reduce((acc, sp) => {
          const a = Math.max(sp.start, win[0] + i * sl.step);
          const b = Math.min(sp.end, win[0] + (i + 1) * sl.step);
          return acc + (b > a && ["attached", "waiting", "failed"].includes(sp.state) ? b - a : 0);
        }, 0);
        agg.wanted[i] += w;
        agg.up[i] += u * w;
      });
      sl.fails.forEach((f, i) => (agg.fails[i] += f));
      agg.rec.push(...sl.recoveries);
      agg.ups.push(...sl.ups);
    }
    const upSl = agg.up.map((u, i) => (agg.wanted[i] > 0 ? u / agg.wanted[i] : null));
    const med = meds.length ? meds.sort((a, b) => a - b)[Math.floor(meds.length / 2)] : null;
    const slot = fmtS((win[1] - win[0]) / n);
    $("host-figs").replaceChildren(
      figure("Uptime", pct(wanted > 0 ? up / wanted : null), bars(upSl, { cls: "c-up", max: 1, titles: upSl.map((u) => `${pct(u)} per ${slot}`) }), `${rowsH.length} devices`),
      figure("Failures", failures, bars(agg.fails, { cls: "c-fail", titles: agg.fails.map((f) => `${f} per ${slot}`) }), null),
      figure("MTBF", failures ? fmtS(wanted / failures) : "–", bars(agg.ups.slice(-24), { cls: "c-mtbf", titles: agg.ups.slice(-24).map((u) => `up for ${fmtS(u)}`) }), failures ? "wanted time / failures" : "no failure"),
      figure("Recovery", fmtS(med), bars(agg.rec.slice(-24), { cls: "c-rec", titles: agg.rec.slice(-24).map(fmtS) }), worst === null ? "median" : `median, worst ${fmtS(worst)}`),
    );
    $("host-window").textContent = `${fmtS(win[1] - win[0])} window`;
  }

  function render() {
    const key = [...state.devices.keys()].join("\n");
    const vk = state.vms.map((v) => v.name).join("\n");
    const vmsChanged = vk !== vmKey;
    vmKey = vk;
    const p0 = performance.now();
    if (key !== treeKey || vmsChanged) {
      treeKey = key;
      buildTree();
    } else {
      updateRows();
    }
    const p1 = performance.now();
    renderVms();
    const p2 = performance.now();
    renderPictures(false);
    // where a render's time goes, for benchmarks: tree rows, VM columns, timelines
    window.vmplugStats.parts = [p1 - p0, p2 - p1, performance.now() - p2];
    const attached = [...state.devices.values()].filter((d) => d.attached).length;
    $("summary").textContent = `${state.devices.size} devices, ${attached} in ${state.vms.length} VMs`;
    state.version += 1;
    document.body.dataset.version = String(state.version);
    if (state.version === 1) window.vmplugStats.firstRenderMs = performance.now();
    if (state.selected && !state.devices.has(state.selected)) {
      $("d-info").textContent = "unplugged";
    }
  }

  // -- data ------------------------------------------------------------------

  let inflight = null;
  let again = false;
  let detailsDirty = false; // an event about the selected device: reload its details
  let journalAt = 0;
  let journalBusy = false;
  let journalAgain = false;

  // the journal and the host's health feed the pictures only: fetched beside the
  // devices, never in the way of showing a change, at most once a second
  function loadJournal() {
    if (journalBusy) {
      journalAgain = true;
      return;
    }
    const wait = 1000 - (performance.now() - journalAt);
    if (wait > 0) {
      clearTimeout(loadJournal.timer);
      loadJournal.timer = setTimeout(loadJournal, wait);
      return;
    }
    journalBusy = true;
    journalAt = performance.now();
    Promise.all([api("GET", "/v1/history?limit=10000"), api("GET", "/v1/health")])
      .then(([history, health]) => {
        const last = (h) => (h.length ? `${h.length}:${h[h.length - 1].id}` : "");
        const news = last(history) !== last(state.history);
        state.history = history;
        state.health = health;
        if (!news) return; // the clock alone: the 10 s redraw moves the window
        renderPictures(true);
        if (state.selected) drawDetailPictures();
      })
      // a daemon without a history database: the page works, without pictures
      .catch((e) => ($("host-window").textContent = visible(e.message)))
      .finally(() => {
        journalBusy = false;
        if (journalAgain) {
          journalAgain = false;
          loadJournal();
        }
      });
  }

  async function load() {
    const t0 = performance.now();
    loadJournal();
    const [devices, vms] = await Promise.all([api("GET", "/v1/devices"), api("GET", "/v1/vms")]);
    const t1 = performance.now();
    state.devices = new Map(devices.map((d) => [keyOf(d), d]));
    state.vms = vms;
    render();
    const st = window.vmplugStats;
    st.fetchMs = t1 - t0;
    st.renderMs = performance.now() - t1;
    st.refreshes += 1;
    st.log = (st.log || []).slice(-9).concat([[performance.timeOrigin + t0, st.fetchMs, st.renderMs, devices.length]]);
    if (state.selected && detailsDirty) {
      detailsDirty = false;
      loadDetails();
    } else if (state.selected) {
      drawDetailPictures();
    }
  }

  function refresh() {
    if (inflight) {
      again = true;
      return inflight;
    }
    inflight = load()
      .catch((e) => toast(`cannot load: ${visible(e.message)}`, true))
      .finally(() => {
        inflight = null;
        if (again) {
          again = false;
          refresh();
        }
      });
    return inflight;
  }

  function connect() {
    const es = new EventSource("/v1/events");
    const live = $("live");
    es.addEventListener("open", () => {
      live.dataset.state = "live";
      live.textContent = "live";
      refresh();
    });
    es.addEventListener("error", () => {
      live.dataset.state = "down";
      live.textContent = "reconnecting…";
    });
    const onItem = (ev) => {
      if (state.selected) {
        let item = {};
        try {
          item = JSON.parse(ev.data);
        } catch {
          item = {};
        }
        const d = state.devices.get(state.selected);
        if (!item.identity || (d && item.identity === d.identity)) detailsDirty = true;
      }
      refresh();
    };
    for (const t of ["event", "action", "resync"]) es.addEventListener(t, onItem);
  }

  // -- details -----------------------------------------------------------------

  const fmtS = (v) => {
    if (v === null || v === undefined) return "–";
    if (v < 1) return `${(v * 1000).toFixed(0)} ms`;
    if (v < 120) return `${v.toFixed(1)} s`;
    if (v < 7200) return `${(v / 60).toFixed(1)} min`;
    if (v < 172800) return `${(v / 3600).toFixed(1)} h`;
    return `${(v / 86400).toFixed(1)} d`;
  };

  const speed = (mbps) => {
    if (mbps === null || mbps === undefined) return "–";
    const names = { 1.5: "low", 12: "full", 480: "high", 5000: "super", 10000: "super+", 20000: "super+ 2x2" };
    return `${mbps >= 1000 ? mbps / 1000 + " Gbit/s" : mbps + " Mbit/s"}${names[mbps] ? " (" + names[mbps] + " speed)" : ""}`;
  };

  // which rule decided, from what the API gives: the device's own "rule" field when
  // the daemon has it; else what /v1/rules and the device's VM allow to conclude
  function decision(d) {
    if (d.is_hub) return ["hub: stays on the host", "QEMU cannot pass a hub through."];
    if (d.override) return [d.vm ? `set by hand: ${d.vm}` : "set by hand: the host", "An attach or detach from this page or `vmplug attach/detach` overrides the rules for this device until the daemon restarts."];
    if (d.rule && typeof d.rule === "object") {
      const r = d.rule;
      return [`rule #${(r.index ?? 0) + 1}${r.line ? " (line " + r.line + ")" : ""}: ${r.action ?? ""} ${r.vm ?? ""}`, visible(r.match ?? "")];
    }
    const rules = state.rules;
    if (!rules) return [d.vm ? `the rules send it to ${d.vm}` : "no rule sends it anywhere", "The rules could not be read."];
    if (d.vm) {
      const cand = rules.filter((r) => r.action === "attach" && r.vm === d.vm);
      if (cand.length === 1) return [`rule #${cand[0].index + 1} (line ${cand[0].line}): attach to ${d.vm}`, visible(cand[0].match)];
      return [`the rules send it to ${d.vm}`, `One of rules ${cand.map((r) => "#" + (r.index + 1)).join(", ")} (the first that matches decides; \`vmplug check-config\` names it).`];
    }
    const blocks = rules.filter((r) => r.action === "block");
    if (!blocks.length) return ["no rule matches: stays on the host", rules.length === 1 ? "The only rule does not match this device." : rules.length ? `None of the ${rules.length} rules matches this device.` : "There are no rules."];
    return ["stays on the host", `No rule attaches it: either none matches or block rule ${blocks.map((r) => "#" + (r.index + 1)).join(", ")} does (\`vmplug check-config\` names it).`];
  }

  function fact(name, value, full) {
    return h("div", { class: full ? "fact full" : "fact" }, h("dt", { text: name }), h("dd", { text: value }));
  }

  function drawDetailPictures() {
    const port = state.selected;
    const d = state.devices.get(port);
    const rp = state.replayed;
    if (!d || !rp) return;
    const r = rp.devs.get(d.identity);
    const spans = r ? r.spans : [];
    $("d-timeline").replaceChildren(timeline(spans, r ? r.marks : [], rp.win, { height: 22, axis: true, cls: "big", tips: true }), axisLabels(rp.win), legend());
    const sl = slices(spans, rp.win);
    const hrow = state.detailHealth || {};
    const slot = fmtS(sl.step);
    $("d-health").replaceChildren(
      figure("Uptime", pct(hrow.uptime), bars(sl.uptime, { cls: "c-up", max: 1, titles: sl.uptime.map((u) => `${pct(u)} per ${slot}`) }), hrow.wanted_s ? `of ${fmtS(hrow.wanted_s)} wanted` : "never wanted in a VM"),
      figure("Failures", hrow.failures ?? 0, bars(sl.fails, { cls: "c-fail", titles: sl.fails.map((f) => `${f} per ${slot}`) }), hrow.errors ? `${hrow.errors} errors` : null),
      figure("MTBF", fmtS(hrow.mtbf_s), bars(sl.ups, { cls: "c-mtbf", titles: sl.ups.map((u) => `up for ${fmtS(u)}`) }), hrow.mtbf_s ? null : "no failure"),
      figure("Recovery", fmtS(hrow.median_recovery_s), bars(sl.recoveries, { cls: "c-rec", titles: sl.recoveries.map(fmtS) }),
        hrow.worst_recovery_s ? `median, worst ${fmtS(hrow.worst_recovery_s)}` : hrow.ongoing_recovery_s ? `ongoing ${fmtS(hrow.ongoing_recovery_s)}` : "median"),
    );
  }

  async function loadDetails() {
    const port = state.selected;
    const d = state.devices.get(port);
    if (!d) return;
    $("details").hidden = false;
    $("d-title").textContent = cut(label(d), 100);
    $("d-title").title = label(d);
    $("d-info").textContent =
      `${port} · ${vidpid(d)} · ` + (d.attached ? `in ${d.attached}` : "on the host") + (d.vm && d.vm !== d.attached ? ` · wanted in ${d.vm}` : "") + (d.error ? ` · ${visible(d.error)}` : "");
    $("d-actions").replaceChildren(
      ...(d.is_hub
        ? [h("p", { text: "Hubs stay on the host: QEMU cannot pass a hub through." })]
        : [
            ...state.vms.map((v) => h("button", { type: "button", class: "go", data: { port, vm: v.name }, disabled: v.name === d.attached, text: `${d.attached ? "Move" : "Attach"} to ${v.name}` })),
            h("button", { type: "button", class: "go", data: { port, vm: "" }, disabled: !d.attached, text: "Detach" }),
          ]),
    );
    const q = encodeURIComponent(selector(d));
    try {
      const [full, health, history, rules] = await Promise.all([
        api("GET", `/v1/devices/${q}`).catch(() => d),
        api("GET", `/v1/health?device=${q}`),
        api("GET", `/v1/history?device=${q}&limit=40`),
        state.rules ? Promise.resolve(state.rules) : api("GET", "/v1/rules").catch(() => null),
      ]);
      if (state.selected !== port) return;
      state.rules = rules;
      state.detailHealth = health[0] || {};
      const drivers = [...new Set((full.interfaces || []).map((i) => i.driver).filter(Boolean))];
      const [why, because] = decision({ ...full, ...d });
      $("d-facts").replaceChildren(
        fact("Manufacturer", visible(d.manufacturer ?? full.manufacturer ?? "–"), true),
        fact("Product", visible(d.product ?? full.product ?? "–"), true),
        fact("Serial", d.serial ? visible(d.serial) : "none", true),
        fact("Speed", speed(d.speed_mbps ?? full.speed_mbps)),
        fact("USB", full.usb_version ? visible(full.usb_version) : "–"),
        fact("Driver", visible(full.driver ?? "–") + (drivers.length ? ` · interfaces: ${visible(drivers.join(", "))}` : "")),
        fact("Decided by", why, true),
        because ? fact("Why", because, true) : null,
        fact("Identity", visible(d.identity), true),
      );
      $("d-window").textContent = "";
      drawDetailPictures();
      // the doctor's findings (vmplug.doctor.findings.Finding.to_json) when the daemon
      // gives them with the device, as "doctor": [...]; else how to get them
      const doctor = full.doctor ?? d.doctor;
      if (Array.isArray(doctor)) {
        $("d-doctor").replaceChildren(
          ...(doctor.length
            ? doctor.map((f) =>
                h("li", { class: `finding sev-${visible(f.severity ?? "info")}` },
                  h("b", { text: `${visible(f.severity ?? "")} ` }),
                  cut(visible(f.title ?? f.check ?? ""), 300),
                  (f.evidence || []).length ? h("div", { class: "evidence", text: cut(visible(f.evidence.join("; ")), 300) }) : null,
                  f.fix ? h("div", { class: "fix" }, "fix: ", h("code", { text: visible(f.fix) })) : null),
              )
            : [h("li", { text: "no findings" })]),
        );
      } else {
        $("d-doctor").replaceChildren(
          h("li", { class: "placeholder" }, "This daemon's API does not give the doctor's findings yet. On the host, run ", h("code", { text: `vmplug doctor ${port}` }), " for this device's checks and their fixes."),
        );
      }
      $("d-history").replaceChildren(
        ...history
          .filter((e) => e.identity)
          .reverse()
          .map((e) => {
            const t = new Date(e.ts * 1000).toLocaleString();
            const what = e.entry === "action" ? `${e.kind} ${e.vm ?? ""} ${e.result}` : `${e.kind}${e.vm ? " (" + e.vm + ")" : ""}`;
            const err = e.error_message ? ` — ${e.error_message}` : "";
            return h("li", { class: e.result && e.result !== "ok" ? "bad" : null }, h("time", { text: t }), " ", visible(what + err));
          }),
      );
    } catch (e) {
      $("d-health").textContent = visible(e.message);
    }
  }

  function select(port) {
    state.selected = port;
    document.body.classList.add("with-details");
    render();
    loadDetails();
    const box = $("details");
    const r = box.getBoundingClientRect();
    if (r.top > innerHeight || r.bottom < 0) box.scrollIntoView({ block: "start", behavior: "smooth" });
  }

  // -- wiring ------------------------------------------------------------------

  document.addEventListener("click", (ev) => {
    const t = ev.target.closest("button");
    if (!t) return;
    if (t.classList.contains("go")) moveTo(t.dataset.port, t.dataset.vm);
    else if (t.classList.contains("detach")) moveTo(t.dataset.port, "");
    else if (t.classList.contains("name")) select(t.dataset.port);
    else if (t.id === "d-close") {
      state.selected = null;
      $("details").hidden = true;
      document.body.classList.remove("with-details");
      render();
    }
  });
  for (const type of ["pointerdown", "focusin", "keydown", "touchstart"]) {
    document.addEventListener(
      type,
      (ev) => {
        const t = ev.target;
        if (t && t.classList && t.classList.contains("to")) fillSelect(t);
      },
      { capture: true, passive: true },
    );
  }
  document.addEventListener("change", (ev) => {
    const t = ev.target;
    if (t.classList && t.classList.contains("to")) moveTo(t.dataset.port, t.value);
  });
  document.addEventListener("dragstart", (ev) => {
    const li = ev.target.closest && ev.target.closest("[draggable=true][data-port]");
    if (!li) return;
    ev.dataTransfer.setData("text/x-vmplug-port", li.dataset.port);
    ev.dataTransfer.effectAllowed = "move";
  });
  document.addEventListener("dragover", (ev) => {
    const zone = ev.target.closest && ev.target.closest(".drop");
    if (!zone) return;
    ev.preventDefault();
    zone.classList.add("over");
  });
  document.addEventListener("dragleave", (ev) => {
    const zone = ev.target.closest && ev.target.closest(".drop");
    if (zone) zone.classList.remove("over");
  });
  document.addEventListener("drop", (ev) => {
    const zone = ev.target.closest && ev.target.closest(".drop");
    if (!zone) return;
    ev.preventDefault();
    zone.classList.remove("over");
    const port = ev.dataTransfer.getData("text/x-vmplug-port");
    if (!port) return;
    const d = state.devices.get(port);
    const to = zone.dataset.target || "";
    if (d && where(d) !== to) moveTo(port, to);
  });

  // the window's end moves with the clock: redraw the pictures now and then
  setInterval(() => {
    if (document.hidden) return;
    renderPictures(true);
    if (state.selected) drawDetailPictures();
  }, 10000);

  refresh();
  connect();
})();
