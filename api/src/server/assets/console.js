"use strict";
// The support and audit console (/console): plain JavaScript, no build
// step, served from this origin under a Content-Security-Policy that allows
// no inline script. Every value from the server is written with
// textContent (never as HTML). The session token lives only in this
// closure's memory: never in a URL, never in storage, gone on reload.
// The server checks every role; the page only hides what a role may not use.
(() => {
  const LEDGER_PAGE = 20;
  const EXPORT_PAGE = 1000;
  const VERIFY_POLL_MS = 250;
  const READERS = ["support", "operator", "auditor", "admin"];
  const AUDITORS = ["auditor", "admin"];
  const ACTORS = ["operator", "admin"];

  let session = null; // { token, role, username }
  let customer = null; // { accountId, ledgerPages: [after...], next }

  const $ = (id) => document.getElementById(id);
  const format = (n) => (n === null || n === undefined) ? "–" : Number(n).toLocaleString("en-US");
  const short = (id) => (typeof id === "string" && id.length > 13) ? id.slice(0, 8) + "…" : (id ?? "");

  // An element with text (never HTML) and optional class and data.
  function el(tag, text, options = {}) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (options.className) node.className = options.className;
    if (options.title) node.title = String(options.title);
    for (const [key, value] of Object.entries(options.data ?? {})) node.dataset[key] = String(value);
    return node;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }
  const num = (n) => el("td", format(n), { className: "num" });
  function button(text, onClick, className) {
    const b = el("button", text, { className });
    b.type = "button";
    b.addEventListener("click", onClick);
    return b;
  }
  function cellWith(node) {
    const td = document.createElement("td");
    td.appendChild(node);
    return td;
  }

  // One API call with the session's bearer token; JSON in and out. Errors
  // come back as { status, error, message } from the body API.md promises.
  async function api(method, path, body, headers = {}) {
    const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store" };
    if (session) init.headers.Authorization = `Bearer ${session.token}`;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let payload = null;
    try { payload = await response.json(); } catch { payload = null; }
    if (response.status === 401 && session) signedOut("Your session ended; log in again.");
    if (!response.ok) {
      const failure = new Error(payload?.message ?? `HTTP ${response.status}`);
      failure.status = response.status;
      failure.code = payload?.error ?? "";
      throw failure;
    }
    return payload;
  }
  const q = encodeURIComponent;

  // ---- login ------------------------------------------------------------
  async function logIn(event) {
    event.preventDefault();
    $("login-error").textContent = "";
    const username = $("login-username").value;
    const password = $("login-password").value;
    try {
      const answer = await api("POST", "/v1/auth/login", { username, password });
      if (!READERS.includes(answer.role)) {
        $("login-error").textContent = "This console is for staff; customers have their own app.";
        return;
      }
      session = { token: answer.token, role: answer.role, username };
      $("login-password").value = "";
      $("whoami").textContent = username;
      $("role").textContent = answer.role;
      $("login-view").hidden = true;
      $("app-view").hidden = false;
      document.body.dataset.role = answer.role;
      $("tab-forensics").hidden = !AUDITORS.includes(answer.role);
      show(AUDITORS.includes(answer.role) && answer.role === "auditor" ? "forensics-view" : "customers-view");
    } catch (failure) {
      $("login-error").textContent = failure.status === 401 ? "Wrong username or password." : failure.message;
    }
  }

  function signedOut(message) {
    session = null;
    customer = null;
    $("app-view").hidden = true;
    $("login-view").hidden = false;
    $("login-error").textContent = message ?? "";
    delete document.body.dataset.role;
  }

  async function logOut() {
    try { await api("POST", "/v1/auth/logout"); } catch { /* the session is dropped here anyway */ }
    signedOut("Logged out.");
  }

  function show(view) {
    for (const tab of document.querySelectorAll(".tabs button")) {
      const active = tab.dataset.view === view;
      tab.classList.toggle("active", active);
      $(tab.dataset.view).hidden = !active;
    }
  }

  // ---- customers --------------------------------------------------------
  async function search(event) {
    event.preventDefault();
    const text = $("search-text").value.trim();
    const table = $("search-results");
    const body = table.querySelector("tbody");
    body.replaceChildren();
    $("search-message").textContent = "Searching…";
    try {
      const answer = await api("GET", `/v1/customers?q=${q(text)}`);
      const found = answer.customers;
      $("search-message").textContent = found.length === 0 ? "No customer matches." : `${found.length} found.`;
      table.hidden = found.length === 0;
      for (const match of found) {
        const open = button("Open", () => openCustomer(match));
        body.appendChild(row([
          el("td", match.username ?? "(no user)", { className: "username" }),
          el("td", match.account_id, { className: "mono" }),
          el("td", match.matched_by.replaceAll("_", " ")),
          cellWith(open),
        ]));
      }
      if (found.length === 1) await openCustomer(found[0]);
    } catch (failure) {
      $("search-message").textContent = failure.message;
    }
  }

  async function openCustomer(match) {
    customer = { accountId: match.account_id, pages: [0], next: null };
    $("customer").hidden = false;
    $("customer-name").textContent = match.username ?? "(no user)";
    $("customer-account").textContent = match.account_id;
    $("timeline").hidden = true;
    await Promise.all([balances(), ledgerPage(0), orders(), payouts()]);
    if (match.matched_by === "order_id" && match.order_id) await timeline("order", match.order_id);
  }

  async function balances(minPosition) {
    const at = minPosition ? `?min_position=${minPosition}` : "";
    const b = await api("GET", `/v1/accounts/${q(customer.accountId)}${at}`);
    $("balance-available").textContent = format(b.available);
    $("balance-held").textContent = format(b.held);
    $("balance-invested").textContent = format(b.total_invested);
    $("balance-paid-out").textContent = format(b.total_paid_out);
  }

  async function ledgerPage(after) {
    const answer = await api("GET", `/v1/accounts/${q(customer.accountId)}/ledger?after=${after}&limit=${LEDGER_PAGE}`);
    const body = $("ledger").querySelector("tbody");
    body.replaceChildren();
    for (const entry of answer.entries) {
      body.appendChild(row([
        num(entry.position), entry.occurred_at, entry.kind, num(entry.amount), num(entry.balance_after),
        el("td", short(entry.order_id), { className: "mono", title: entry.order_id ?? "" }),
      ]));
    }
    customer.after = after;
    customer.next = answer.next;
    $("ledger-next").disabled = answer.next === null;
    $("ledger-first").disabled = after === 0;
    $("ledger-page").textContent = answer.entries.length === 0
      ? "no entries"
      : `positions ${answer.entries[0].position}–${answer.entries[answer.entries.length - 1].position}`;
  }

  async function orders() {
    const answer = await api("GET", `/v1/accounts/${q(customer.accountId)}/orders?limit=100`);
    const body = $("orders").querySelector("tbody");
    body.replaceChildren();
    for (const order of answer.orders) {
      const tr = row([
        el("td", short(order.order_id), { className: "mono", title: order.order_id }),
        order.product_id, num(order.amount), order.status, order.created_at,
        cellWith(button("Timeline", () => timeline("order", order.order_id))),
      ]);
      tr.dataset.orderId = order.order_id;
      body.appendChild(tr);
    }
  }

  async function timeline(kind, id) {
    const path = kind === "order" ? `/v1/orders/${q(id)}/timeline` : `/v1/payouts/${q(id)}/timeline`;
    const answer = await api("GET", path);
    $("timeline").hidden = false;
    $("timeline").dataset.subject = id;
    $("timeline-subject").textContent = kind;
    $("timeline-id").textContent = id;
    const body = $("timeline-events").querySelector("tbody");
    body.replaceChildren();
    for (const event of answer.events) {
      const meta = event.metadata ?? {};
      body.appendChild(row([
        num(event.position), event.occurred_at, el("td", event.type, { className: "event-type" }),
        el("td", meta.actor_id ?? "system", { className: "who" }), meta.actor_role ?? "system",
        el("td", meta.request_id ?? "", { className: "mono" }),
        el("td", short(meta.causation_id ?? ""), { className: "mono", title: meta.causation_id ?? "" }),
        el("td", JSON.stringify(event.data), { className: "mono" }),
      ]));
    }
    for (const tr of document.querySelectorAll("#orders tbody tr")) {
      tr.classList.toggle("selected", tr.dataset.orderId === id);
    }
  }

  async function payouts() {
    const body = $("payouts").querySelector("tbody");
    body.replaceChildren();
    $("payouts-message").textContent = "";
    let answer;
    try {
      answer = await api("GET", `/v1/accounts/${q(customer.accountId)}/payouts`);
    } catch (failure) {
      $("payouts-message").textContent = failure.message;
      return;
    }
    if (answer.payouts.length === 0) $("payouts-message").textContent = "No payouts.";
    const mayAct = ACTORS.includes(session.role);
    for (const payout of answer.payouts) {
      const actions = document.createElement("td");
      actions.appendChild(button("Timeline", () => timeline("payout", payout.payout_id)));
      if (mayAct && payout.status === "parked") {
        actions.appendChild(button("Retry", () => act(payout.payout_id, "retry"), "primary"));
        actions.appendChild(button("Cancel", () => act(payout.payout_id, "cancel"), "danger"));
      }
      const tr = row([
        el("td", short(payout.payout_id), { className: "mono", title: payout.payout_id }),
        payout.product_id ?? "", payout.period, num(payout.amount), payout.status, num(payout.attempts),
        el("td", payout.provider_ref ?? "–", { className: "mono" }), actions,
      ]);
      tr.dataset.payoutId = payout.payout_id;
      body.appendChild(tr);
    }
  }

  // An operator's retry or cancel of a parked payout; the list is read
  // again at the position the action reached.
  async function act(payoutId, action) {
    if (!window.confirm(`${action} payout ${payoutId}?`)) return;
    try {
      const answer = await api("POST", `/v1/payouts/${q(payoutId)}/${action}`, undefined,
        { "Idempotency-Key": crypto.randomUUID() });
      $("payouts-message").textContent = `${action}: payout is now ${answer.status}`;
      await api("GET", `/v1/payouts?min_position=${answer.position}`);
      await payouts();
      $("payouts-message").textContent = `${action}: payout is now ${answer.status}`;
    } catch (failure) {
      $("payouts-message").textContent = `${action} refused: ${failure.message}`;
    }
  }

  // ---- forensics --------------------------------------------------------
  // Starts a walk of the chain on the server and follows its progress
  // (the last position checked against the head it started from).
  async function verify() {
    $("verify").disabled = true;
    $("verify-result").hidden = true;
    $("verify-progress").hidden = false;
    const bar = $("verify-progress").querySelector("progress");
    bar.removeAttribute("value");
    const started = performance.now();
    try {
      let job = await api("POST", "/v1/audit/verifications");
      while (job.state === "running") {
        bar.max = Math.max(1, job.head);
        bar.value = Math.min(job.checked_position, job.head);
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        $("verify-status").textContent =
          `checked up to position ${format(job.checked_position)} of ${format(job.head)} · ${seconds}s`;
        await new Promise((resolve) => setTimeout(resolve, VERIFY_POLL_MS));
        job = await api("GET", `/v1/audit/verifications/${q(job.verification_id)}`);
      }
      if (job.state !== "done") throw new Error(job.error ?? "the verification failed");
      const report = job.result;
      $("verify-ok").textContent = report.ok ? "ok: every hash matches" : "BROKEN: a stored event does not match its hash";
      $("verify-ok").className = report.ok ? "ok" : "bad";
      $("verify-checked").textContent = format(report.events_checked);
      $("verify-first-bad").textContent = report.first_bad_position === null ? "none" : String(report.first_bad_position);
      $("verify-head-hash").textContent = report.head_hash ?? "–";
      $("verify-result").hidden = false;
      $("verify-result").dataset.ok = String(report.ok);
      $("verify-progress").hidden = true;
    } catch (failure) {
      $("verify-status").textContent = failure.message;
    } finally {
      $("verify").disabled = false;
    }
  }

  async function asOf(event) {
    event.preventDefault();
    const point = $("asof-point").value.trim();
    const account = $("asof-account").value.trim();
    const product = $("asof-product").value.trim();
    $("asof-message").textContent = "";
    for (const id of ["asof-account-result", "asof-product-result"]) $(id).hidden = true;
    if (!account && !product) {
      $("asof-message").textContent = "Give an account id, a product id, or both.";
      return;
    }
    try {
      if (account) {
        const b = await api("GET", `/v1/accounts/${q(account)}?as_of=${q(point)}`);
        const body = $("asof-account-result").querySelector("tbody");
        body.replaceChildren(row([
          el("td", b.account_id, { className: "mono" }), num(b.available), num(b.held), num(b.total_deposited),
          num(b.total_invested), num(b.total_paid_out), num(b.version),
        ]));
        $("asof-account-result").hidden = false;
      }
      if (product) {
        const p = await api("GET", `/v1/audit/products/${q(product)}/progress?as_of=${q(point)}`);
        const body = $("asof-product-result").querySelector("tbody");
        body.replaceChildren(row([
          el("td", `${p.name} (${p.product_id})`), p.status, num(p.quota), num(p.confirmed), num(p.reserved),
          num(p.available), num(p.orders), num(p.position),
        ]));
        $("asof-product-result").hidden = false;
      }
    } catch (failure) {
      $("asof-message").textContent = failure.message;
    }
  }

  // The whole log, page by page through GET /v1/audit/events, as JSON lines
  // (one event with its hashes a line), offered as a file download.
  async function exportLog() {
    $("export").disabled = true;
    const lines = [];
    let after = 0;
    try {
      for (;;) {
        const page = await api("GET", `/v1/audit/events?after=${after}&limit=${EXPORT_PAGE}`);
        for (const event of page.events) lines.push(JSON.stringify(event));
        $("export-status").textContent = `${format(lines.length)} events read…`;
        if (page.next === null) break;
        after = page.next;
      }
      const blob = new Blob([lines.join("\n") + (lines.length ? "\n" : "")], { type: "application/x-ndjson" });
      const link = $("export-link");
      if (link.href) URL.revokeObjectURL(link.href);
      link.href = URL.createObjectURL(blob);
      link.download = `ledger-export-${new Date().toISOString().replaceAll(":", "")}.jsonl`;
      link.click();
      $("export-status").textContent = `${format(lines.length)} events exported.`;
      document.body.dataset.exported = String(lines.length);
    } catch (failure) {
      $("export-status").textContent = failure.message;
    } finally {
      $("export").disabled = false;
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", logIn);
    $("logout").addEventListener("click", logOut);
    for (const tab of document.querySelectorAll(".tabs button")) {
      tab.addEventListener("click", () => show(tab.dataset.view));
    }
    $("search-form").addEventListener("submit", search);
    $("ledger-next").addEventListener("click", () => customer?.next !== null && ledgerPage(customer.next));
    $("ledger-first").addEventListener("click", () => ledgerPage(0));
    $("verify").addEventListener("click", verify);
    $("asof-form").addEventListener("submit", asOf);
    $("export").addEventListener("click", exportLog);
  });
})();
