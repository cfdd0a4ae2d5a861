"use strict";
// The status page: polls api/runs once a second (not while the tab is hidden) and redraws
// each run's card in place. Everything from the server is set as text, never as markup.
(function () {
  const POLL_MS = 1000;
  const SVG = "http://www.w3.org/2000/svg";
  const main = document.getElementById("runs");
  const conn = document.getElementById("conn");
  const connText = document.getElementById("conn-text");
  const held = new Map();    // run id -> detail version this page holds
  const details = new Map(); // run id -> detail
  const toggled = new Map(); // run id -> open, where the reader chose
  const allFigures = new Set(); // runs whose whole result the reader unfolded
  const RESULT_ROWS = 8;
  let timer = null;
  let lastRuns = [];

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }
  function num(v) { return typeof v === "number" && isFinite(v); }
  function si(v) {
    if (!num(v)) return "–";
    const a = Math.abs(v);
    for (const [unit, scale] of [["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
      if (a >= scale) return (v / scale).toFixed(a >= 100 * scale ? 0 : 1) + unit;
    }
    return a >= 10 || a === 0 ? v.toFixed(0) : v.toFixed(1);
  }
  function duration(s) {
    if (!num(s)) return "–";
    s = Math.max(0, Math.round(s));
    const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
    const m = Math.floor(s % 3600 / 60), sec = s % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    if (m) return m + "m " + String(sec).padStart(2, "0") + "s";
    return sec + "s";
  }
  function clock(wall, withSeconds) {
    const t = new Date(wall * 1000);
    const two = (n) => String(n).padStart(2, "0");
    return two(t.getHours()) + ":" + two(t.getMinutes()) +
      (withSeconds ? ":" + two(t.getSeconds()) : "");
  }
  function tone(state) {
    if (["running", "completed"].includes(state)) return "good";
    if (["gave_up", "unreadable", "kill_failed"].includes(state)) return "bad";
    if (["stopped", "new"].includes(state)) return "idle";
    return "warn";
  }
  function isOpen(run, index) {
    if (toggled.has(run.run_id)) return toggled.get(run.run_id);
    return run.live || index === 0;
  }

  // Cards ---------------------------------------------------------------------------------
  function card(run, index) {
    let node = main.querySelector(`article[data-run="${CSS.escape(run.run_id)}"]`);
    if (!node) {
      node = el("article", "run");
      node.dataset.run = run.run_id;
      const head = el("div", "head");
      head.tabIndex = 0;
      head.setAttribute("role", "button");
      const ident = el("div", "ident");
      ident.append(el("div", "rid", run.run_id), el("div", "sub"));
      head.append(ident, el("span", "badge"));
      const flip = () => {
        toggled.set(run.run_id, !isOpen(run, [...main.children].indexOf(node)));
        render(lastRuns);
        poll();
      };
      head.addEventListener("click", flip);
      head.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); flip(); }
      });
      node.append(head, el("div", "body"));
    }
    const open = isOpen(run, index);
    node.dataset.state = run.state || "";
    node.dataset.units = num(run.units_done) ? run.units_done : "";
    node.querySelector(".head").setAttribute("aria-expanded", String(open));
    const created = (run.created || "").replace("T", " ").slice(0, 16);
    node.querySelector(".sub").textContent = [run.job, created].filter(Boolean).join(" · ");
    const badge = node.querySelector(".badge");
    badge.textContent = (run.state || "?").replace("_", " ");
    badge.className = "badge " + tone(run.state);
    node.querySelector(".body").replaceChildren(...body(run, open ? details.get(run.run_id) : null,
                                                        open));
    return node;
  }

  function body(run, detail, open) {
    const parts = [];
    const bar = el("div", "bar");
    const fill = el("div", "fill");
    fill.style.width = (num(run.progress) ? Math.min(100, run.progress * 100) : 0) + "%";
    bar.append(fill);
    const pct = el("div", "pct");
    pct.append(el("b", null, num(run.progress) ? (run.progress * 100).toFixed(1) + "%" : "–"));
    if (num(run.units_done) && num(run.units_total)) {
      pct.append(" · " + run.units_done.toLocaleString() + " / " +
                 run.units_total.toLocaleString() + " units");
    }
    parts.push(bar, pct);
    const reasons = detail ? Object.entries(detail.restart_reasons || {}) : [];
    const stats = el("dl", "stats");
    const stat = (label, value, small) => {
      const box = el("div");
      box.append(el("dt", null, label), el("dd", null, value));
      if (small) box.append(el("small", null, small));
      stats.append(box);
    };
    stat("ETA", run.live && num(run.eta_s) ? duration(run.eta_s) : "–");
    stat("Speed", num(run.rate) ? si(run.rate) + " " + run.rate_unit : "–");
    stat("Restarts", num(run.restarts) ? run.restarts : "–",
         reasons.map(([why, n]) => why + " " + n).join(" · "));
    stat("Checkpoint", num(run.checkpoint_age_s) ? duration(run.checkpoint_age_s) + " ago" : "–",
         num(run.durable_ckpt_seq) ? "durable seq " + run.durable_ckpt_seq : "");
    parts.push(stats);
    if (run.error) parts.push(el("div", "empty", run.error));
    if (!open) return parts;
    const more = el("div", "detail");
    more.append(gpuTable(run));
    more.append(el("h3", null, "Throughput and temperature"));
    more.append(detail ? chart(detail, run) : el("div", "empty", "Loading…"));
    if (detail && detail.result && detail.result.length) {
      more.append(el("h3", null, "Result"), result(run.run_id, detail.result));
    }
    if (detail) {
      more.append(el("h3", null, "Newest warnings"));
      if (!detail.warnings.length) more.append(el("div", "empty", "None."));
      const list = el("ol", "warnings");
      for (const w of detail.warnings) {
        const item = el("li", w.level);
        item.append(el("span", "when", w.ts ? clock(Date.parse(w.ts) / 1000, true) : ""),
                    el("span", "lvl", w.level), el("span", "ev", w.event));
        if (w.text) item.append(el("span", "txt", w.text));
        list.append(item);
      }
      more.append(list);
    }
    parts.push(more);
    return parts;
  }

  // The job's figures first, how the run went (performance, provenance) after; the first
  // few shown, the rest behind a fold that stays as the reader left it.
  function result(runId, rows) {
    const late = (key) => /^(performance|provenance)\./.test(key);
    const sorted = rows.filter(([k]) => !late(k)).concat(rows.filter(([k]) => late(k)));
    const list = (part) => {
      const dl = el("dl", "kv");
      for (const [key, value] of part) {
        dl.append(el("dt", null, key),
                  el("dd", null, num(value) ? fmt(value) : value === null ? "–" : value));
      }
      return dl;
    };
    const box = el("div");
    box.append(list(sorted.slice(0, RESULT_ROWS)));
    if (sorted.length > RESULT_ROWS) {
      const fold = el("details");
      fold.open = allFigures.has(runId);
      fold.append(el("summary", null, "all " + sorted.length + " figures"),
                  list(sorted.slice(RESULT_ROWS)));
      fold.addEventListener("toggle", () => {
        if (fold.open) allFigures.add(runId); else allFigures.delete(runId);
      });
      box.append(fold);
    }
    return box;
  }

  function fmt(v) {
    if (Number.isInteger(v)) return v.toLocaleString();
    return Math.abs(v) >= 1e6 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(6)
      : String(+v.toPrecision(8));
  }

  function gpuTable(run) {
    const box = el("div");
    box.append(el("h3", null, "GPUs"));
    if (!run.gpus || !run.gpus.length) {
      box.append(el("div", "empty", "No GPU readings (no GPU, or none reported yet)."));
      return box;
    }
    const table = el("table", "gpus");
    const head = el("tr");
    const label = (g) => [g.name, g.shard != null ? "shard " + g.shard : null]
      .filter((x) => x != null && x !== "").join(" · ");
    const named = run.gpus.some((g) => label(g));
    const several = run.gpus.length > 1;
    for (const h of ["#", named ? "GPU" : null, several ? "done" : null, several ? "speed" : null,
                     "°C", "duty", "thermal", "state"]) {
      if (h) head.append(el("th", null, h));
    }
    table.append(head);
    for (const g of run.gpus) {
      const row = el("tr");
      row.append(el("td", null, g.index ?? "–"));
      if (named) row.append(el("td", "wrap", label(g) || "–"));
      if (several) {
        row.append(el("td", null, num(g.progress) ? (g.progress * 100).toFixed(1) + "%" : "–"),
                   el("td", null, num(g.dims_per_s) ? si(g.dims_per_s) + "/s" : "–"));
      }
      row.append(el("td", null, num(g.temperature) ? g.temperature.toFixed(0) : "–"),
                 el("td", null, num(g.duty) ? Math.round(g.duty * 100) + "%" : "–"),
                 el("td", null, g.thermal_state || "–"),
                 el("td", null, g.state || "–"));
      table.append(row);
    }
    const scroll = el("div", "scroll");
    scroll.append(table);
    box.append(scroll);
    return box;
  }

  // The chart: rates as steps (left axis), temperature as a line (right axis), restarts,
  // thermal stops and checkpoints as marks along the time axis.
  function chart(detail, run) {
    const c = detail.chart;
    const fig = el("figure", "chart");
    const times = [].concat(c.rates.map((r) => r[0]), c.rates.map((r) => r[1]),
                            c.temperatures.map((p) => p[0]), c.restarts, c.thermal_stops,
                            c.checkpoints);
    if (!c.rates.length && !c.temperatures.length) {
      fig.append(el("div", "empty", run.live
        ? "No chart yet: it starts with the first checkpoints and GPU readings."
        : "The log has no throughput between checkpoints and no GPU readings."));
      return fig;
    }
    const W = Math.max(280, Math.min(900, main.clientWidth - 30)), H = 190;
    const L = 44, R = 34, T = 8, B = 22;
    let t0 = Math.min(...times), t1 = Math.max(...times);
    if (run.live) t1 = Math.max(t1, Date.now() / 1000);
    if (t1 - t0 < 2) { t0 -= 1; t1 += 1; }
    const rmax = Math.max(1e-9, ...c.rates.map((r) => r[2])) * 1.1;
    const temps = c.temperatures.map((p) => p[1]);
    const cmin = temps.length ? Math.floor(Math.min(...temps) - 3) : 0;
    const cmax = temps.length ? Math.ceil(Math.max(...temps) + 3) : 100;
    const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
    const yr = (v) => T + (1 - v / rmax) * (H - T - B);
    const yc = (v) => T + (1 - (v - cmin) / (cmax - cmin)) * (H - T - B);
    const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img",
                             "aria-label": "throughput and GPU temperature over time"});
    for (const f of [0, 0.5, 1]) {
      const y = T + f * (H - T - B);
      root.append(svg("line", {x1: L, x2: W - R, y1: y, y2: y, class: "grid"}));
      const left = svg("text", {x: L - 4, y: y + 3, "text-anchor": "end"});
      left.textContent = si(rmax * (1 - f));
      root.append(left);
      if (temps.length) {
        const right = svg("text", {x: W - R + 4, y: y + 3});
        right.textContent = (cmax - f * (cmax - cmin)).toFixed(0) + "°";
        root.append(right);
      }
    }
    const withSeconds = t1 - t0 < 3 * 3600;
    for (const f of [0, 1 / 3, 2 / 3, 1]) {
      const t = t0 + f * (t1 - t0);
      const label = svg("text", {x: x(t), y: H - 6,
                                  "text-anchor": f === 0 ? "start" : f === 1 ? "end" : "middle"});
      label.textContent = clock(t, withSeconds);
      root.append(label);
    }
    for (const t of c.checkpoints) {
      root.append(svg("line", {x1: x(t), x2: x(t), y1: H - B - 6, y2: H - B, class: "ckpt"}));
    }
    for (const t of c.thermal_stops) {
      root.append(svg("line", {x1: x(t), x2: x(t), y1: T, y2: H - B, class: "thermal"}));
    }
    for (const t of c.restarts) {
      root.append(svg("line", {x1: x(t), x2: x(t), y1: T, y2: H - B, class: "restart"}));
    }
    if (c.rates.length) {
      // Steps, joined where one interval starts as the last ended (a gap is a restart).
      let d = "", end = null;
      for (const [a, b, r] of c.rates) {
        d += (end !== null && Math.abs(a - end) < 1e-3 ? "L" : "M") +
          `${x(a).toFixed(1)} ${yr(r).toFixed(1)}H${x(b).toFixed(1)}`;
        end = b;
      }
      root.append(svg("path", {d, class: "rate"}));
    }
    if (c.temperatures.length) {
      const d = c.temperatures.map(([t, v], i) =>
        `${i ? "L" : "M"}${x(t).toFixed(1)} ${yc(v).toFixed(1)}`).join("");
      root.append(svg("path", {d, class: "temp"}));
    }
    fig.append(root);
    const legend = el("figcaption", "legend");
    const key = (cls, text) => { const s = el("span"); s.append(el("i", cls), text); return s; };
    legend.append(key("rate", detail.rate_unit), key("temp", "GPU °C"),
                  key("restart", "restart"), key("thermal", "thermal stop"),
                  key("ckpt", "checkpoint"));
    fig.append(legend);
    return fig;
  }

  // Polling ---------------------------------------------------------------------------------
  function render(runs) {
    lastRuns = runs;
    if (!runs.length) {
      main.replaceChildren(el("p", "note", "No runs in this state directory yet."));
      return;
    }
    const cards = runs.map((run, i) => card(run, i));
    const current = [...main.children];
    if (cards.length !== current.length || cards.some((c, i) => c !== current[i])) {
      main.replaceChildren(...cards);
    }
    // For tools/bench_cli.py: when the runs were first on screen (a User Timing mark).
    if (!performance.getEntriesByName("nkat-runs-shown").length) {
      performance.mark("nkat-runs-shown");
    }
  }

  function status(text, cls) {
    conn.className = "conn " + cls;
    connText.textContent = text;
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    const open = lastRuns.filter((r, i) => isOpen(r, i)).map((r) => r.run_id);
    const ask = lastRuns.length ? open : [];
    const query = ask.map((id) => id + ":" + (held.get(id) || 0)).join(",");
    let again = false;
    const ctl = new AbortController();
    const abort = setTimeout(() => ctl.abort(), 8000);
    try {
      const reply = await fetch("api/runs" + (lastRuns.length ? "?open=" +
                                encodeURIComponent(query) : "?first=1"),
                                {cache: "no-store", credentials: "same-origin",
                                 signal: ctl.signal});
      if (reply.status === 401) {
        status("token needed: open the address with ?token=…", "lost");
        return;
      }
      if (!reply.ok) throw new Error("HTTP " + reply.status);
      const data = await reply.json();
      for (const [id, d] of Object.entries(data.details || {})) {
        details.set(id, d);
        held.set(id, d.version);
      }
      // The first answer names the runs; the details of the open ones follow at once.
      again = !lastRuns.length && (data.runs || []).length > 0;
      render(data.runs || []);
      status("updated " + clock(data.now, true), "ok");
      document.title = titleOf(data.runs || []);
    } catch (err) {
      status("connection lost, retrying…", "lost");
    } finally {
      clearTimeout(abort);
      if (!document.hidden && timer === null) timer = setTimeout(poll, again ? 0 : POLL_MS);
    }
  }

  function titleOf(runs) {
    const live = runs.find((r) => r.live);
    if (!live) return "nkat-supervise";
    return (num(live.progress) ? (live.progress * 100).toFixed(1) + "% " : "") +
      live.state + " · nkat-supervise";
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) { clearTimeout(timer); timer = null; } else poll();
  });
  window.addEventListener("resize", () => render(lastRuns));
  poll();
})();
