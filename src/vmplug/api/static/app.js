// vmplug web page: the host's USB tree, the VMs as columns, live through /v1/events.
// Plain script, no build step, nothing fetched from elsewhere.
"use strict";

(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const state = { devices: new Map(), vms: [], selected: null, version: 0 };
  const rows = new Map(); // port -> tree row <li>
  // timings of the first render and the last refresh, for benchmarks and the curious
  window.vmplugStats = { firstRenderMs: 0, fetchMs: 0, renderMs: 0, refreshes: 0, log: [] };
  let treeKey = "";
  let vmKey = "";

  const esc = (s) =>
    String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  const label = (d) =>
    d.name || (d.is_hub ? "USB hub" : "(no name)");

  const vidpid = (d) => `${d.vendor_id ?? "????"}:${d.product_id ?? "????"}`;

  // where a device is now: the VM holding it, else the host
  const where = (d) => d.attached || "";

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
    const name = `${label(d)} (${port})`;
    try {
      if (vm) {
        const r = await api("POST", "/v1/attach", { device: port, vm });
        toast(r.state === "attached" ? `${name} → ${vm}` : `${name}: ${r.state} ${r.error ?? ""}`, r.state !== "attached");
      } else {
        await api("POST", "/v1/detach", { device: port });
        toast(`${name} stays on the host`);
      }
    } catch (e) {
      toast(`${name}: ${e.message}`, true);
    }
    refresh();
  }

  // -- rendering -----------------------------------------------------------------

  function parentPort(port) {
    const i = port.lastIndexOf(".");
    return i < 0 ? null : port.slice(0, i);
  }

  // The per-device menu holds only where the device is until someone reaches for it:
  // 200 rows x 21 VMs of <option> would be most of the page's nodes.
  function moveSelect(d) {
    const here = where(d);
    return (
      `<select class="to" aria-label="Move ${esc(d.port)} to" data-port="${esc(d.port)}">` +
      `<option value="${esc(here)}" selected>${here ? esc(here) : "host"}</option></select>`
    );
  }

  function fillSelect(sel) {
    if (sel.dataset.full) return;
    sel.dataset.full = "1";
    const here = sel.value;
    let html = `<option value=""${here ? "" : " selected"}>host</option>`;
    for (const vm of state.vms) {
      html += `<option value="${esc(vm.name)}"${vm.name === here ? " selected" : ""}>${esc(vm.name)}</option>`;
    }
    sel.innerHTML = html;
  }

  function rowInner(d) {
    const here = where(d);
    const st = d.state;
    const badge = d.is_hub ? "" : `<span class="badge s-${esc(st)}" title="${esc(d.error ?? st)}">${here ? "in " + esc(here) : st === "pending" || st === "retrying" ? esc(st) + " → " + esc(d.vm) : "host"}</span>`;
    return (
      `<div class="row${here ? " away" : ""}${d.port === state.selected ? " sel" : ""}">` +
      `<button type="button" class="name" data-port="${esc(d.port)}"><span class="port">${esc(d.port)}</span> ${esc(label(d))} <span class="vp">${esc(vidpid(d))}</span></button>` +
      badge +
      (d.is_hub ? "" : moveSelect(d)) +
      "</div>"
    );
  }

  function rowSig(d) {
    return [d.state, d.attached, d.vm, d.error, d.port === state.selected, vmKey].join("|");
  }

  function buildTree() {
    const byParent = new Map();
    const buses = new Map();
    for (const d of state.devices.values()) {
      const parent = parentPort(d.port);
      if (parent && state.devices.has(parent)) {
        if (!byParent.has(parent)) byParent.set(parent, []);
        byParent.get(parent).push(d);
      } else {
        const bus = d.port.split("-")[0];
        if (!buses.has(bus)) buses.set(bus, []);
        buses.get(bus).push(d);
      }
    }
    const tree = $("tree");
    tree.textContent = "";
    rows.clear();
    const add = (ul, d) => {
      const li = document.createElement("li");
      li.className = d.is_hub ? "dev hub" : "dev";
      li.dataset.port = d.port;
      li.dataset.sig = rowSig(d);
      if (!d.is_hub) li.draggable = true;
      li.innerHTML = rowInner(d);
      rows.set(d.port, li);
      ul.appendChild(li);
      const kids = byParent.get(d.port);
      if (kids) {
        const sub = document.createElement("ul");
        for (const k of kids) add(sub, k);
        li.appendChild(sub);
      }
    };
    for (const [bus, list] of [...buses].sort((a, b) => Number(a[0]) - Number(b[0]))) {
      const li = document.createElement("li");
      li.className = "bus";
      li.innerHTML = `<span class="busname">Bus ${esc(bus)}</span>`;
      const ul = document.createElement("ul");
      for (const d of list) add(ul, d);
      li.appendChild(ul);
      tree.appendChild(li);
    }
  }

  function updateRows() {
    for (const d of state.devices.values()) {
      const li = rows.get(d.port);
      const sig = rowSig(d);
      if (!li || li.dataset.sig === sig) continue;
      if (li.contains(document.activeElement) && document.activeElement.tagName === "SELECT") continue;
      li.dataset.sig = sig;
      const sub = li.querySelector(":scope > ul");
      li.innerHTML = rowInner(d);
      if (sub) li.appendChild(sub);
    }
  }

  function renderVms() {
    const box = $("vms");
    const key = state.vms.map((v) => v.name).join("\n");
    if (box.dataset.key !== key) {
      box.dataset.key = key;
      box.innerHTML = state.vms
        .map(
          (v) =>
            `<section class="vm drop" data-vm="${esc(v.name)}" data-target="${esc(v.name)}" aria-label="VM ${esc(v.name)}">` +
            `<h3><span class="dot"></span>${esc(v.name)}</h3><ul class="cards"></ul></section>`,
        )
        .join("");
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
      const html = list
        .map(
          (d) =>
            `<li class="card s-${esc(d.state)}${d.port === state.selected ? " sel" : ""}" draggable="true" data-port="${esc(d.port)}">` +
            `<button type="button" class="name" data-port="${esc(d.port)}"><span class="port">${esc(d.port)}</span> ${esc(label(d))}</button>` +
            (d.attached === v.name ? "" : `<span class="badge s-${esc(d.state)}">${esc(d.state)}</span>`) +
            `<button type="button" class="detach" data-port="${esc(d.port)}" aria-label="Detach ${esc(d.port)}">⏏</button></li>`,
        )
        .join("");
      const ul = sec.querySelector(".cards");
      if (ul.dataset.html !== html) {
        ul.dataset.html = html;
        ul.innerHTML = html || '<li class="empty">no devices</li>';
      }
    }
  }

  function render() {
    const key = [...state.devices.keys()].join("\n");
    const vk = state.vms.map((v) => v.name).join("\n");
    const vmsChanged = vk !== vmKey;
    vmKey = vk;
    if (key !== treeKey || vmsChanged) {
      treeKey = key;
      buildTree();
    } else {
      updateRows();
    }
    renderVms();
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


  async function load() {
    const t0 = performance.now();
    const [devices, vms] = await Promise.all([api("GET", "/v1/devices"), api("GET", "/v1/vms")]);
    const t1 = performance.now();
    state.devices = new Map(devices.map((d) => [d.port, d]));
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
    }
  }

  function refresh() {
    if (inflight) {
      again = true;
      return inflight;
    }
    inflight = load()
      .catch((e) => toast(`cannot load: ${e.message}`, true))
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

  const fmtS = (s) => {
    if (s === null || s === undefined) return "–";
    if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
    if (s < 120) return `${s.toFixed(1)} s`;
    if (s < 7200) return `${(s / 60).toFixed(1)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  };

  async function loadDetails() {
    const port = state.selected;
    const d = state.devices.get(port);
    if (!d) return;
    $("details").hidden = false;
    $("d-title").textContent = `${label(d)}`;
    $("d-info").textContent =
      `${port} · ${vidpid(d)}${d.serial ? " · serial " + d.serial : ""} · ` +
      (d.attached ? `in ${d.attached}` : "on the host") +
      (d.vm && d.vm !== d.attached ? ` · wanted in ${d.vm}` : "") +
      (d.error ? ` · ${d.error}` : "");
    const acts = $("d-actions");
    acts.innerHTML = d.is_hub
      ? "<p>Hubs stay on the host: QEMU cannot pass a hub through.</p>"
      : state.vms
          .map(
            (v) =>
              `<button type="button" class="go" data-port="${esc(port)}" data-vm="${esc(v.name)}"${v.name === d.attached ? " disabled" : ""}>${d.attached ? "Move" : "Attach"} to ${esc(v.name)}</button>`,
          )
          .join("") +
        `<button type="button" class="go" data-port="${esc(port)}" data-vm=""${d.attached ? "" : " disabled"}>Detach</button>`;
    const q = encodeURIComponent(port);
    try {
      const [health, history] = await Promise.all([
        api("GET", `/v1/health?device=${q}`),
        api("GET", `/v1/history?device=${q}&limit=40`),
      ]);
      if (state.selected !== port) return;
      const h = health[0] || {};
      $("d-window").textContent = "last 7 days";
      const items = [
        ["Uptime", h.uptime === null || h.uptime === undefined ? "–" : `${(h.uptime * 100).toFixed(2)} %`],
        ["Failures", h.failures ?? 0],
        ["MTBF", fmtS(h.mtbf_s)],
        ["Median recovery", fmtS(h.median_recovery_s)],
        ["Worst recovery", fmtS(h.worst_recovery_s)],
        ["Errors / hour", h.errors_per_hour === null || h.errors_per_hour === undefined ? "–" : h.errors_per_hour.toFixed(3)],
      ];
      $("d-health").innerHTML = items.map(([k, v]) => `<div><dt>${esc(k)}</dt><dd>${esc(v)}</dd></div>`).join("");
      $("d-history").innerHTML = history
        .filter((e) => e.identity)
        .reverse()
        .map((e) => {
          const t = new Date(e.ts * 1000).toLocaleString();
          const what = e.entry === "action" ? `${e.kind} ${e.vm ?? ""} ${e.result}` : `${e.kind}${e.vm ? " (" + e.vm + ")" : ""}`;
          const err = e.error_message ? ` — ${e.error_message}` : "";
          return `<li class="${e.result === "error" ? "bad" : ""}"><time>${esc(t)}</time> ${esc(what)}${esc(err)}</li>`;
        })
        .join("");
    } catch (e) {
      $("d-health").textContent = e.message;
    }
  }

  function select(port) {
    state.selected = port;
    document.body.classList.add("with-details");
    render();
    loadDetails();
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

  refresh();
  connect();
})();
