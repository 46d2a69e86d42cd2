"use strict";
// The live sale dashboard: one card per product, updated from the
// server-sent events of /v1/progress/stream. Every value is written with
// textContent; the page has no inline script (the Content-Security-Policy
// allows scripts from this origin only).
//
// The purchase rate is measured here, from the change in confirmed orders
// sampled on a timer: the stream sends a product only when its figures
// change, so a rate worked out per event would keep showing the last burst
// after sales stop. The chart keeps one sample a second for CHART_SECONDS
// and is redrawn at most once per sample, so thousands of orders a second
// cost the page the same as ten.
const RATE_WINDOW_MS = 5000;
const RATE_SAMPLE_MS = 1000;
const CHART_SECONDS = 300;
const CHART_SECONDS_MIN = 60;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 30000;
const cards = new Map();
const format = (n) => Number(n).toLocaleString("en-US");

// "1h 02m", "3m 07s", "12s".
function duration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return "–";
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(r).padStart(2, "0")}s`;
  return `${r}s`;
}

function card(id) {
  let entry = cards.get(id);
  if (entry) return entry;
  document.getElementById("empty")?.remove();
  const root = document.getElementById("product-card").content.firstElementChild.cloneNode(true);
  root.dataset.productId = id;
  root.querySelector(".name").textContent = id;
  root.querySelector(".product-id").textContent = "";
  document.getElementById("products").appendChild(root);
  entry = { root, orders: 0, samples: [], chart: [], progress: null, rate: 0 };
  cards.set(id, entry);
  return entry;
}

function show(progress) {
  const entry = card(progress.product_id);
  const { root } = entry;
  entry.progress = progress;
  const pct = (n) => progress.quota > 0 ? (100 * n / progress.quota) + "%" : "0%";
  root.querySelector(".bar .confirmed").style.width = pct(progress.confirmed);
  root.querySelector(".bar .reserved").style.width = pct(progress.reserved);
  const named = typeof progress.name === "string" && progress.name.length > 0;
  root.querySelector(".name").textContent = named ? progress.name : progress.product_id;
  root.querySelector(".product-id").textContent = named ? progress.product_id : "";
  root.querySelector(".status").textContent = progress.status.replaceAll("_", " ");
  root.querySelector(".quota").textContent = format(progress.quota);
  root.querySelector(".confirmed-n").textContent = format(progress.confirmed);
  root.querySelector(".reserved-n").textContent = format(progress.reserved);
  root.querySelector(".available-n").textContent = format(progress.available);
  root.querySelector(".orders").textContent = format(progress.orders);
  if (entry.samples.length === 0) entry.samples.push({ at: performance.now(), orders: progress.orders });
  entry.orders = progress.orders;
  for (const key of ["quota", "confirmed", "reserved", "available", "orders", "status", "position"]) {
    root.dataset[key] = progress[key];
  }
  clocks(entry);
}

// Time since the sale opened, and to sell-out: the time it took once sold
// out, else what is available at the current rate (unknown at rate 0).
function clocks(entry) {
  const { root, progress } = entry;
  if (!progress) return;
  const opened = progress.opened_at ? Date.parse(progress.opened_at) : NaN;
  const soldOut = progress.sold_out_at ? Date.parse(progress.sold_out_at) : NaN;
  const since = root.querySelector(".since-open");
  const toSellOut = root.querySelector(".to-sell-out");
  since.textContent = Number.isFinite(opened) ? duration((Number.isFinite(soldOut) ? soldOut : Date.now()) - opened) : "not opened";
  if (Number.isFinite(soldOut)) {
    toSellOut.textContent = "sold out";
  } else if (progress.status === "open" && entry.rate > 0 && progress.orders > 0) {
    const perOrder = progress.confirmed / progress.orders;
    toSellOut.textContent = "≈ " + duration(1000 * progress.available / (perOrder * entry.rate));
  } else {
    toSellOut.textContent = "–";
  }
  root.dataset.sinceOpen = since.textContent;
}

// One bar a sample, newest at the right. The axis spans the samples kept
// (at least CHART_SECONDS_MIN, at most CHART_SECONDS), so a sale that
// started a minute ago fills the chart rather than its last pixels.
function draw(entry) {
  const canvas = entry.root.querySelector(".chart");
  const width = canvas.clientWidth || canvas.width;
  if (canvas.width !== width) canvas.width = width;
  const context = canvas.getContext("2d");
  const { height } = canvas;
  context.clearRect(0, 0, canvas.width, height);
  const span = Math.max(entry.chart.length, CHART_SECONDS_MIN);
  const step = canvas.width / span;
  const peak = Math.max(1, ...entry.chart);
  context.fillStyle = "#eceff1";
  context.fillRect(0, height - 1, canvas.width, 1);
  context.fillStyle = "#2e7d32";
  const offset = span - entry.chart.length;
  entry.chart.forEach((rate, i) => {
    const bar = Math.round((height - 2) * rate / peak);
    if (bar > 0) context.fillRect((offset + i) * step, height - 1 - bar, Math.max(1, step - 1), bar);
  });
  entry.root.querySelector(".peak").textContent = format(Math.round(Math.max(0, ...entry.chart)));
  entry.root.dataset.chartPoints = entry.chart.length;
  entry.root.dataset.chartNonzero = entry.chart.filter((r) => r > 0).length;
}

// Orders per second over the last RATE_WINDOW_MS, for every card, whether
// or not an event came in since the last sample; one chart point a sample.
function sampleRates() {
  const now = performance.now();
  for (const entry of cards.values()) {
    const { samples } = entry;
    samples.push({ at: now, orders: entry.orders });
    while (samples.length > 2 && now - samples[1].at >= RATE_WINDOW_MS) samples.shift();
    const first = samples[0];
    const rate = now > first.at ? (entry.orders - first.orders) * 1000 / (now - first.at) : 0;
    entry.rate = Math.max(0, rate);
    entry.root.querySelector(".rate").textContent = format(Math.round(entry.rate));
    entry.chart.push(entry.rate);
    if (entry.chart.length > CHART_SECONDS) entry.chart.shift();
    clocks(entry);
    draw(entry);
  }
}

// The browser retries a stream that drops by itself, but gives up for good
// on an HTTP error (429 rate limited, 503 draining, a proxy's 502 while the
// server restarts): then reconnect here, backing off, with jitter so that
// many dashboards do not come back at once.
let retryMs = RETRY_MIN_MS;
function connect() {
  const status = document.getElementById("connection");
  const events = new EventSource("/v1/progress/stream");
  events.addEventListener("open", () => {
    retryMs = RETRY_MIN_MS;
    status.textContent = "live";
    status.className = "";
  });
  events.addEventListener("progress", (e) => show(JSON.parse(e.data)));
  events.addEventListener("stats", (e) => {
    document.getElementById("lag").textContent = format(JSON.parse(e.data).projection_lag);
  });
  events.addEventListener("error", () => {
    status.textContent = "reconnecting…";
    status.className = "down";
    if (events.readyState === EventSource.CLOSED) {
      events.close();
      setTimeout(connect, retryMs * (1 + Math.random() / 2));
      retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setInterval(sampleRates, RATE_SAMPLE_MS);
  connect();
});
