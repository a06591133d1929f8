// The /status page: polls status.json every second and draws it. No inline script, no
// outside calls (the page's Content-Security-Policy allows this origin only). With API_KEY
// set, the key typed into the form lives in this tab's sessionStorage and is sent as a
// Bearer token; it is never put in a URL or a cookie.
"use strict";

(function () {
  const POLL_MS = 1000;
  const KEY_NAME = "embedding-proxy-api-key";
  const SVG = "http://www.w3.org/2000/svg";
  const needsKey = document.body.dataset.auth === "required";
  const form = document.getElementById("key-form");
  const keyInput = document.getElementById("key");
  const keyMessage = document.getElementById("key-message");
  const models = document.getElementById("models");
  const state = document.getElementById("state");

  function text(id, value) {
    document.getElementById(id).textContent = value;
  }

  function fmt(value, digits, unit) {
    if (value === null || value === undefined) return "n/a";
    return Number(value).toFixed(digits) + (unit || "");
  }

  function askForKey(message) {
    form.hidden = false;
    models.hidden = true;
    keyMessage.textContent = message || "";
    state.textContent = "API key needed";
    keyInput.focus();
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    sessionStorage.setItem(KEY_NAME, keyInput.value);
    keyInput.value = "";
    form.hidden = true;
    models.hidden = false;
    poll();
  });

  function tile(card, field, label) {
    let cell = card.querySelector('[data-field="' + field + '"]');
    if (cell === null) {
      const box = document.createElement("div");
      box.className = "tile";
      const name = document.createElement("span");
      name.className = "label";
      name.textContent = label;
      cell = document.createElement("span");
      cell.className = "value";
      cell.dataset.field = field;
      box.append(name, cell);
      card.querySelector(".tiles").append(box);
    }
    return cell;
  }

  function card(model) {
    const id = model.model + "@" + (model.version || "");
    let node = models.querySelector('[data-key="' + CSS.escape(id) + '"]');
    if (node === null) {
      node = document.createElement("section");
      node.className = "model";
      node.dataset.key = id;
      node.dataset.model = model.model;
      const title = document.createElement("h2");
      const tiles = document.createElement("div");
      tiles.className = "tiles";
      const chartTitle = document.createElement("h3");
      chartTitle.textContent = "Batch sizes (upstream calls per bucket, in the window)";
      const chart = document.createElementNS(SVG, "svg");
      chart.setAttribute("class", "chart");
      chart.setAttribute("role", "img");
      node.append(title, tiles, chartTitle, chart);
      models.append(node);
    }
    node.querySelector("h2").textContent =
      model.model + (model.version ? " · " + model.version : "") + " — " + model.model_id;
    return node;
  }

  function drawBatches(chart, buckets) {
    const width = 480;
    const height = 120;
    chart.setAttribute("viewBox", "0 0 " + width + " " + (height + 20));
    chart.replaceChildren();
    chart.setAttribute("aria-label", "batch size distribution");
    if (buckets.length === 0) {
      const empty = document.createElementNS(SVG, "text");
      empty.setAttribute("x", "8");
      empty.setAttribute("y", "20");
      empty.textContent = "no batches in the window";
      chart.append(empty);
      return;
    }
    const most = Math.max(1, ...buckets.map((b) => b.count));
    const step = width / buckets.length;
    buckets.forEach(function (bucket, i) {
      const barHeight = Math.round((bucket.count / most) * height);
      const bar = document.createElementNS(SVG, "rect");
      bar.setAttribute("x", String(i * step + 2));
      bar.setAttribute("y", String(height - barHeight));
      bar.setAttribute("width", String(Math.max(1, step - 4)));
      bar.setAttribute("height", String(barHeight));
      bar.setAttribute("class", "bar");
      const tip = document.createElementNS(SVG, "title");
      tip.textContent = bucket.count + " calls";
      bar.append(tip);
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("x", String(i * step + step / 2));
      label.setAttribute("y", String(height + 15));
      label.setAttribute("text-anchor", "middle");
      label.textContent = bucket.le === null ? "more" : "≤" + bucket.le;
      chart.append(bar, label);
    });
  }

  function split(ab) {
    if (ab === null || ab === undefined) return "n/a";
    return Object.entries(ab)
      .map(([version, share]) => version + " " + Math.round(share * 100) + "%")
      .join(", ");
  }

  function render(doc) {
    text("updated", new Date(doc.generated_at).toLocaleTimeString());
    document.getElementById("updated").dateTime = doc.generated_at;
    text("window", doc.window_s === null ? "-" : doc.window_s.toFixed(1) + " s");
    text("workers", String(doc.workers));
    for (const model of doc.models) {
      const node = card(model);
      const c = model.concurrency;
      tile(node, "requests_per_s", "requests/s").textContent = fmt(model.requests_per_s, 1);
      tile(node, "latency_p50_ms", "p50 latency").textContent = fmt(model.latency_p50_ms, 1, " ms");
      tile(node, "latency_p99_ms", "p99 latency").textContent = fmt(model.latency_p99_ms, 1, " ms");
      tile(node, "errors_per_s", "5xx/s").textContent = fmt(model.errors_per_s, 2);
      tile(node, "queue_depth", "queue depth").textContent = fmt(model.queue_depth, 0);
      tile(node, "in_flight", "calls in flight").textContent = fmt(model.in_flight, 0);
      tile(node, "concurrency_limit", "concurrency limit").textContent =
        c.limit === null ? "n/a" : c.limit + (c.adaptive ? " (adaptive)" : " (fixed)");
      tile(node, "batch_mean", "mean batch").textContent = fmt(model.batch_size.mean, 1);
      const breaker = tile(node, "breaker", "breaker");
      breaker.textContent = model.breaker;
      breaker.dataset.state = model.breaker;
      tile(node, "cache_hit_ratio", "cache hits").textContent =
        model.cache_hit_ratio === null ? "n/a" : fmt(model.cache_hit_ratio * 100, 1, " %");
      tile(node, "ab_split", "A/B split").textContent = split(model.ab_split);
      drawBatches(node.querySelector("svg"), model.batch_size.buckets);
    }
  }

  async function poll() {
    const headers = {};
    if (needsKey) {
      const key = sessionStorage.getItem(KEY_NAME);
      if (!key) {
        askForKey();
        return;
      }
      headers.Authorization = "Bearer " + key;
    }
    let response;
    try {
      response = await fetch("status.json", { headers: headers, cache: "no-store" });
    } catch (error) {
      state.textContent = "unreachable";
      return;
    }
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_NAME);
      askForKey("That key was refused.");
      return;
    }
    if (!response.ok) {
      state.textContent = "HTTP " + response.status;
      return;
    }
    render(await response.json());
    state.textContent = "live";
  }

  setInterval(function () {
    if (form.hidden) poll();
  }, POLL_MS);
  poll();
})();
