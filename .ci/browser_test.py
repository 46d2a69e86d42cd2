#!/usr/bin/env python3
"""Browser check of the live progress dashboard (`GET /`) and the console (`GET /console`).

Drives a running `ledger serve` through its HTTP API and watches the
dashboard in headless Chromium through chromedriver. Uses only the Python
standard library: chromedriver speaks the W3C WebDriver protocol (JSON over
HTTP), so no client library is installed.

What it checks, on one product of its own (the page is loaded through a
small loopback proxy in this script, so the stream can be cut):
  1. the product's <section> appears on an already open page when the product
     is listed, and follows it from closed to open;
  2. after a few purchases the figures, data attributes, status and bar widths
     (style and rendered) match GET /v1/products/{id}/progress, and
     confirmed + reserved + available = quota on the page;
  3. after a concurrent batch of purchases the bar moves (confirmed width and
     figure grow), orders/s shows it, and the page again matches the API;
  4. the stream is cut and answered 502 for a while (as a reverse proxy does
     while the server restarts): the page shows it is down, keeps retrying,
     and once the stream is back catches up with purchases made meanwhile;
  5. after buying the product out (an oversized purchase refused as
     insufficient_quota on the way, one more refused as sold_out at the end)
     the page shows "sold out" and a full confirmed bar;
  6. orders/s falls back to 0 once nothing sells, the page is live, shows a
     projection lag, and logged no console error; the card shows the
     product's name, the time since opening, and its orders/s chart moved
     during the sale;
  7. console, support: a support user finds a customer named
     `<img src=x onerror=alert(1)>` by username (rendered as that text, no
     element made of it), opens them, sees balances, the ledger, the order
     and its timeline (who, role, request of each event); found by order id,
     the timeline opens by itself;
  8. console, auditor: verifying the chain shows ok and the head hash; after
     a row of `events` is edited in the SQLite file behind the server's back,
     verifying shows the edited position as the first bad one; balances and
     sale progress as of a position; the export downloads every event;
  9. every page is served with a strict Content-Security-Policy.

Exits 0 when every check passed, 1 otherwise; prints a short summary.
Only loopback addresses are contacted.
"""

import argparse
import base64
import concurrent.futures
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

# Loopback only: never go through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

QUOTA = 1_000_000
MIN_PURCHASE = 100
MAX_PURCHASE = 50_000
CUSTOMERS = 4
DEPOSIT = 1_000_000  # per customer; all of them together can buy the quota 4 times
WARMUP = [1_000] * 5
BATCH = [2_500] * 40  # 100_000 in 40 concurrent purchases
OUTAGE = [5_000] * 10  # bought while the page's stream is down
RATE_SETTLE_SECONDS = 12  # orders/s must read 0 this soon after sales stop


class CheckFailed(Exception):
    pass


def log(message):
    print(f"[browser-test] {message}", flush=True)


# --------------------------------------------------------------------------
# HTTP API


class Api:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def call(self, method, path, body=None, token=None, headers=None, expect=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with OPENER.open(request, timeout=15) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        if expect is not None and status not in expect:
            raise CheckFailed(f"{method} {path} answered {status} {payload!r}, expected {expect}")
        return status, payload


def login(api, username, password):
    _, body = api.call("POST", "/v1/auth/login", {"username": username, "password": password}, expect=(200,))
    return body


# --------------------------------------------------------------------------
# A minimal W3C WebDriver client for chromedriver


class WebDriver:
    def __init__(self, chromedriver, chromium, workdir, timeout):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "chromedriver.log")
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [chromedriver, f"--port={self.port}", "--allowed-ips=127.0.0.1", "--allowed-origins=*"],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )
        self.session = None
        try:
            self._start(chromium, workdir, timeout)
        except BaseException:
            self.quit()
            raise

    def _start(self, chromium, workdir, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._raw("GET", "/status").get("value", {}).get("ready"):
                    break
            except (OSError, ValueError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"chromedriver did not start (see {self.log_path})")
            time.sleep(0.1)
        profile = os.path.join(workdir, "chromium-profile")
        args = [
            "--headless=new",
            "--no-sandbox",  # CI runs as root
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1280,1000",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-client-side-phishing-detection",
            "--no-pings",
            "--metrics-recording-only",
            # Anything not on loopback goes to a dead local port (loopback
            # addresses bypass a proxy implicitly).
            "--proxy-server=http://127.0.0.1:9",
        ]
        capabilities = {
            "browserName": "chrome",
            "pageLoadStrategy": "normal",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }
        value = self._call("POST", "/session", {"capabilities": {"alwaysMatch": capabilities}})
        self.session = value["sessionId"]
        self.browser_version = value.get("capabilities", {}).get("browserVersion", "?")
        self._call("POST", f"/session/{self.session}/timeouts", {"script": 10_000, "pageLoad": 15_000})

    def _raw(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        try:
            with OPENER.open(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    def _call(self, method, path, body=None):
        answer = self._raw(method, path, body)
        value = answer.get("value")
        if isinstance(value, dict) and "error" in value:
            raise CheckFailed(f"webdriver {method} {path}: {value['error']}: {value.get('message', '')[:500]}")
        return value

    def get(self, url):
        self._call("POST", f"/session/{self.session}/url", {"url": url})

    def execute(self, script, *args):
        return self._call("POST", f"/session/{self.session}/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, path):
        png = self._call("GET", f"/session/{self.session}/screenshot")
        with open(path, "wb") as out:
            out.write(base64.b64decode(png))

    def browser_log(self):
        """Console entries since the last call (chromedriver's extension)."""
        try:
            return self._call("POST", f"/session/{self.session}/se/log", {"type": "browser"}) or []
        except CheckFailed:
            return []

    def quit(self):
        try:
            if self.session:
                self._raw("DELETE", f"/session/{self.session}")
        except OSError:
            pass
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.log_file.close()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# A loopback reverse proxy the page is loaded through, so the test can cut
# the event stream and answer 502 for a while, as a proxy in front of a
# restarting server does.


class StreamBreaker:
    STREAM = "/v1/progress/stream"

    def __init__(self, upstream_base, page_file=None):
        host, port = upstream_base.split("://", 1)[1].rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.page_file = page_file  # serve GET / from this file instead (dashboard work without a rebuild)
        self.broken = False
        self.refused = 0  # stream requests answered 502 while broken
        self.lock = threading.Lock()
        self.active = set()  # (client socket, upstream connection) of open streams
        breaker = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection; the body ends at close

            def log_message(self, *args):
                pass

            def do_GET(self):
                breaker.forward(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def forward(self, handler):
        is_stream = handler.path.split("?", 1)[0] == self.STREAM
        if self.page_file and handler.path == "/":
            with open(self.page_file, "rb") as page:
                body = page.read()
            handler.send_response(200)
            handler.send_header("Content-Type", "text/html; charset=utf-8")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        with self.lock:
            refuse = is_stream and self.broken
            if refuse:
                self.refused += 1
        if refuse:
            body = b'{"error":"bad_gateway","message":"upstream restarting"}'
            handler.send_response(502)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        entry = (handler.connection, upstream)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() not in ("host", "connection", "accept-encoding", "keep-alive")}
            upstream.request("GET", handler.path, headers=headers)
            response = upstream.getresponse()
            handler.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive"):
                    handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.flush()
            if is_stream:
                with self.lock:
                    self.active.add(entry)
            while True:
                chunk = response.read1(65536)
                if not chunk:
                    break
                handler.wfile.write(chunk)
                handler.wfile.flush()
        except (OSError, http.client.HTTPException):
            pass  # either side hung up (or break_stream cut it)
        finally:
            with self.lock:
                self.active.discard(entry)
            upstream.close()

    def break_stream(self):
        """Cuts every open stream and answers 502 to new ones."""
        with self.lock:
            self.broken = True
            self.refused = 0
            active = list(self.active)
        for client, upstream in active:
            for sock in (client, upstream.sock):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except (OSError, AttributeError):
                    pass

    def restore(self):
        with self.lock:
            self.broken = False

    def refused_count(self):
        with self.lock:
            return self.refused

    def close(self):
        self.break_stream()
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------
# What the page shows

SNAPSHOT_JS = r"""
const id = arguments[0];
const section = [...document.querySelectorAll("section.product")].find((s) => s.dataset.productId === id);
const page = {
  connection: document.getElementById("connection")?.textContent ?? null,
  lag: document.getElementById("lag")?.textContent ?? null,
  sections: document.querySelectorAll("section.product").length,
};
if (!section) return { page, section: null };
const text = (selector) => section.querySelector(selector)?.textContent ?? null;
const box = (selector) => section.querySelector(selector)?.getBoundingClientRect().width ?? null;
return {
  page,
  section: {
    data: { ...section.dataset },
    text: {
      name: text(".name"), status: text(".status"), quota: text(".quota"),
      confirmed: text(".confirmed-n"), reserved: text(".reserved-n"),
      available: text(".available-n"), orders: text(".orders"), rate: text(".rate"),
    },
    style: {
      confirmed: section.querySelector(".bar .confirmed")?.style.width ?? null,
      reserved: section.querySelector(".bar .reserved")?.style.width ?? null,
    },
    px: { bar: box(".bar"), confirmed: box(".bar .confirmed"), reserved: box(".bar .reserved") },
    chartInk: (() => {
      // Pixels of the chart's bars actually drawn (green), not just data.
      const canvas = section.querySelector("canvas.chart");
      if (!canvas || canvas.width === 0) return 0;
      const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
      let ink = 0;
      for (let i = 0; i < pixels.length; i += 4) if (pixels[i + 3] > 0 && pixels[i + 1] > pixels[i] + 40) ink++;
      return ink;
    })(),
  },
};
"""

FIGURES = ("quota", "confirmed", "reserved", "available", "orders")


def shown_number(text):
    """A figure as the page prints it ("1,234,567") back to an integer."""
    if text is None:
        return None
    digits = text.replace(",", "").strip()
    try:
        return int(digits)
    except ValueError:
        return None


def percent(style_width):
    if not style_width or not style_width.endswith("%"):
        return None
    try:
        return float(style_width[:-1])
    except ValueError:
        return None


def page_problems(snapshot, progress):
    """Every way the page's section differs from the API's progress object."""
    section = snapshot.get("section")
    if section is None:
        return ["the product's section is not on the page"]
    problems = []
    data, text, style, px = section["data"], section["text"], section["style"], section["px"]
    quota = progress["quota"]
    for key in FIGURES:
        if shown_number(data.get(key)) != progress[key]:
            problems.append(f"data-{key}={data.get(key)!r}, API says {progress[key]}")
        if shown_number(text.get(key)) != progress[key]:
            problems.append(f"{key} figure shows {text.get(key)!r}, API says {progress[key]}")
    if data.get("status") != progress["status"]:
        problems.append(f"data-status={data.get('status')!r}, API says {progress['status']!r}")
    want_status = progress["status"].replace("_", " ")
    if (text.get("status") or "").strip() != want_status:
        problems.append(f"status shows {text.get('status')!r}, expected {want_status!r}")
    shown = [shown_number(text.get(k)) for k in ("confirmed", "reserved", "available", "quota")]
    if None in shown or shown[0] + shown[1] + shown[2] != shown[3]:
        problems.append(f"page figures do not add up: confirmed + reserved + available != quota ({shown})")
    for part in ("confirmed", "reserved"):
        want = 100.0 * progress[part] / quota if quota else 0.0
        got = percent(style.get(part))
        if got is None or abs(got - want) > 0.01:
            problems.append(f"{part} bar width {style.get(part)!r}, expected {want:.3f}%")
        # The rendered width, once the CSS transition has run, within a pixel.
        if px["bar"] and px[part] is not None:
            rendered = px[part] / px["bar"] * 100.0
            if abs(px[part] - px["bar"] * want / 100.0) > 1.0:
                problems.append(f"{part} bar renders at {rendered:.2f}% of the bar, expected {want:.3f}%")
    if px["bar"] and px["confirmed"] is not None and px["reserved"] is not None:
        if px["confirmed"] + px["reserved"] > px["bar"] + 1.0:
            problems.append("confirmed + reserved bars overflow the bar")
    rate = shown_number(text.get("rate"))
    if rate is None or rate < 0:
        problems.append(f"orders/s shows {text.get('rate')!r}")
    return problems


class Dashboard:
    def __init__(self, driver, product_id):
        self.driver = driver
        self.product_id = product_id

    def snapshot(self):
        return self.driver.execute(SNAPSHOT_JS, self.product_id)

    def wait(self, what, predicate, timeout):
        """Polls the page until predicate(snapshot) is true; returns the snapshot."""
        deadline = time.monotonic() + timeout
        while True:
            snapshot = self.snapshot()
            if predicate(snapshot):
                return snapshot
            if time.monotonic() > deadline:
                raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}; page shows {json.dumps(snapshot)}")
            time.sleep(0.1)

    def wait_matches(self, what, progress, timeout):
        last = {"problems": []}

        def matches(snapshot):
            last["problems"] = page_problems(snapshot, progress)
            return not last["problems"]

        try:
            return self.wait(what, matches, timeout)
        except CheckFailed as failure:
            raise CheckFailed(f"{failure}\n  differences: " + "; ".join(last["problems"])) from None


# --------------------------------------------------------------------------
# The scenario


class Sale:
    def __init__(self, api, admin_token, product_id, customers):
        self.api = api
        self.admin = admin_token
        self.product_id = product_id
        self.customers = customers  # list of (token, account_id)
        self.bought = 0
        self.orders = 0

    def purchase(self, customer, amount, key=None, expect=(201,)):
        token, _ = customer
        key = key or str(uuid.uuid4())
        status, body = self.api.call(
            "POST",
            f"/v1/products/{self.product_id}/purchases",
            {"amount": amount},
            token=token,
            headers={"Idempotency-Key": key},
            expect=expect,
        )
        if status == 201:
            if body.get("status") != "confirmed" or body.get("amount") != amount:
                raise CheckFailed(f"purchase answered {body!r}")
        return status, body

    def buy(self, amounts, parallel=1):
        """Buys each amount (round-robin over the customers); all must succeed."""
        jobs = [(self.customers[i % len(self.customers)], amount) for i, amount in enumerate(amounts)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            for status, body in pool.map(lambda job: self.purchase(*job), jobs):
                self.bought += body["amount"]
                self.orders += 1

    def progress(self, timeout=15):
        """The API's progress (a product just listed is 404 until projected)."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.api.call(
                "GET", f"/v1/products/{self.product_id}/progress", token=self.admin, expect=(200, 404)
            )
            if status == 200:
                return body
            if time.monotonic() > deadline:
                raise CheckFailed(f"GET /v1/products/{self.product_id}/progress still 404 after {timeout}s")
            time.sleep(0.1)

    def settled_progress(self, timeout):
        """The API's progress once the projection shows every purchase made."""
        deadline = time.monotonic() + timeout
        while True:
            progress = self.progress()
            if progress["confirmed"] == self.bought and progress["orders"] == self.orders and progress["reserved"] == 0:
                if progress["confirmed"] + progress["reserved"] + progress["available"] != progress["quota"]:
                    raise CheckFailed(f"API progress does not add up: {progress}")
                return progress
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"API progress never showed {self.bought} confirmed in {self.orders} orders: {progress}"
                )
            time.sleep(0.1)


# --------------------------------------------------------------------------
# The console (/console)

XSS_USERNAME = "<img src=x onerror=alert(1)>"


class Console:
    """The console page driven through small scripts (fill, submit, read)."""

    def __init__(self, driver, base):
        self.driver = driver
        self.base = base

    def open(self):
        self.driver.get(self.base + "/console")

    def js(self, script, *args):
        return self.driver.execute(script, *args)

    def login(self, username, password):
        self.open()
        self.js(
            """
            document.getElementById("login-username").value = arguments[0];
            document.getElementById("login-password").value = arguments[1];
            document.getElementById("login-form").requestSubmit();
            """,
            username, password,
        )
        self.wait("the console to log in", "return !document.getElementById('app-view').hidden;", 10)

    def wait(self, what, script, timeout, *args):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                page = self.js("return document.body.innerText.slice(0, 1500);")
                raise CheckFailed(f"timed out after {timeout}s waiting for {what}; the page reads: {page!r}")
            time.sleep(0.1)

    def search(self, text):
        self.js(
            """
            document.getElementById("tab-customers").click();
            document.getElementById("search-text").value = arguments[0];
            document.getElementById("search-results").querySelector("tbody").replaceChildren();
            document.getElementById("search-form").requestSubmit();
            """,
            text,
        )


def check_security_headers(base, passed):
    for path in ("/", "/console", "/assets/console.js"):
        request = urllib.request.Request(base + path)
        with OPENER.open(request, timeout=10) as response:
            csp = response.headers.get("Content-Security-Policy", "")
            sniff = response.headers.get("X-Content-Type-Options", "")
        for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
            if directive not in csp:
                raise CheckFailed(f"GET {path}: Content-Security-Policy {csp!r} lacks {directive!r}")
        if "unsafe-inline" in csp or "unsafe-eval" in csp or sniff != "nosniff":
            raise CheckFailed(f"GET {path}: weak headers: CSP {csp!r}, X-Content-Type-Options {sniff!r}")
    for path in ("/", "/console"):
        with OPENER.open(urllib.request.Request(base + path), timeout=10) as response:
            page = response.read().decode()
        if "<script>" in page or " on" + "click=" in page or "style=" in page:
            raise CheckFailed(f"GET {path} has inline script or style")
    passed("pages and assets carry a strict Content-Security-Policy; no inline script or style")


def check_no_console_errors(driver, passed):
    errors = [e.get("message", "") for e in driver.browser_log() if e.get("level") == "SEVERE"]
    if errors:
        raise CheckFailed("the console page logged errors: " + "; ".join(errors))
    passed("the console logged no error (no CSP violation, no failed load)")


def check_support(api, admin_token, product_id, console, args, passed):
    password = f"pw-{uuid.uuid4().hex}"
    _, created = api.call(
        "POST", "/v1/users", {"username": XSS_USERNAME, "password": password, "role": "customer"},
        token=admin_token, expect=(201,),
    )
    account = created["account_id"]
    api.call("POST", f"/v1/accounts/{account}/deposits", {"amount": 500_000, "reference": "xss-probe-deposit"},
             token=admin_token, expect=(201,))
    # The product is sold out: the probe buys into a product of its own.
    probe_product = product_id + ".support"
    api.call("POST", "/v1/products", {"product_id": probe_product, "name": "Support probe <b>fund</b>",
             "quota": 1_000_000, "min_purchase": 100, "max_purchase": 100_000, "annual_rate_bps": 300,
             "term_days": 30}, token=admin_token, expect=(201,))
    api.call("POST", f"/v1/products/{probe_product}/open", token=admin_token, expect=(200,))
    token = login(api, XSS_USERNAME, password)["token"]
    _, bought = api.call("POST", f"/v1/products/{probe_product}/purchases", {"amount": 12_300}, token=token,
                         headers={"Idempotency-Key": "xss-probe-order", "X-Request-Id": "browser-probe-req"},
                         expect=(201,))
    order_id = bought["order_id"]
    # Read our own write: the order is in the read models before the page looks.
    api.call("GET", f"/v1/orders/{order_id}?min_position={bought['position']}", token=admin_token, expect=(200,))
    support_password = f"pw-{uuid.uuid4().hex}"
    api.call("POST", "/v1/users", {"username": "browser-support", "password": support_password, "role": "support"},
             token=admin_token, expect=(201,))

    console.login("browser-support", support_password)
    console.search(XSS_USERNAME)
    console.wait("the search to find the probe", "return document.querySelectorAll('#search-results tbody tr').length > 0;", 10)
    found = console.js(
        """
        const cell = document.querySelector("#search-results tbody tr td.username");
        return { text: cell.textContent, children: cell.children.length,
                 images: document.querySelectorAll("img").length,
                 name: document.getElementById("customer-name").textContent };
        """
    )
    if found["text"] != XSS_USERNAME or found["children"] != 0 or found["images"] != 0:
        raise CheckFailed(f"the XSS probe was not rendered as text: {found}")
    console.wait("the customer to open", "return document.querySelectorAll('#orders tbody tr').length > 0;", 10)
    shown = console.js(
        """
        const text = (id) => document.getElementById(id).textContent;
        return { name: text("customer-name"), images: document.querySelectorAll("img").length,
                 available: text("balance-available"), invested: text("balance-invested"),
                 ledger: document.querySelectorAll("#ledger tbody tr").length,
                 orders: [...document.querySelectorAll("#orders tbody tr")].map((tr) => tr.dataset.orderId) };
        """
    )
    if shown["name"] != XSS_USERNAME or shown["images"] != 0:
        raise CheckFailed(f"the customer's name is not rendered as text: {shown}")
    if shown_number(shown["available"]) != 500_000 - 12_300 or shown_number(shown["invested"]) != 12_300:
        raise CheckFailed(f"balances shown {shown}, expected available {500_000 - 12_300}, invested 12,300")
    if order_id not in shown["orders"] or shown["ledger"] < 2:
        raise CheckFailed(f"the order {order_id} or the ledger is missing: {shown}")
    passed(f"support found {XSS_USERNAME!r} by username, shown as text (no element made of it); "
           f"balances and {shown['ledger']} ledger entries shown")
    if args.screenshot_dir:
        console.js("window.scrollTo(0, 0);")
        console.driver.screenshot(os.path.join(args.screenshot_dir, "console-search.png"))

    # Found by the order id, its timeline opens by itself.
    console.search(order_id)
    timeline = console.wait(
        "the order's timeline",
        """
        const box = document.getElementById("timeline");
        if (box.hidden || box.dataset.subject !== arguments[0]) return null;
        const rows = [...document.querySelectorAll("#timeline-events tbody tr")];
        if (rows.length === 0) return null;
        return rows.map((tr) => [...tr.children].map((td) => td.textContent));
        """,
        10, order_id,
    )
    types = [cells[2] for cells in timeline]
    for wanted in ("quota_reserved", "reservation_confirmed"):
        if wanted not in types:
            raise CheckFailed(f"the timeline lacks {wanted}: {types}")
    requested = [cells for cells in timeline if cells[5] == "browser-probe-req"]
    if not requested or any(cells[4] != "customer" or cells[3] == "system" for cells in requested):
        raise CheckFailed(f"the timeline does not show who asked (customer, request browser-probe-req): {timeline}")
    passed(f"found by order id, the purchase's timeline shows {len(timeline)} events ({', '.join(types)}) "
           f"with who, role customer and request browser-probe-req")
    if args.screenshot_dir:
        console.js("document.getElementById('timeline').scrollIntoView();")
        console.driver.screenshot(os.path.join(args.screenshot_dir, "console-support.png"))
    console.js("document.getElementById('logout').click();")


def tamper(database, position):
    """Edits one event's data in the SQLite log behind the server's back."""
    import sqlite3
    connection = sqlite3.connect(database, timeout=30)
    try:
        connection.execute("DROP TRIGGER IF EXISTS events_no_update")
        changed = connection.execute(
            "UPDATE events SET data = replace(data, '1', '9') WHERE position = ? AND data LIKE '%1%'", (position,)
        ).rowcount
        connection.commit()
    finally:
        connection.close()
    if changed != 1:
        raise CheckFailed(f"could not edit the event at position {position}")


def verify_in_page(console, what):
    console.js("document.getElementById('tab-forensics').click(); document.getElementById('verify-result').hidden = true;"
               "document.getElementById('verify').click();")
    return console.wait(
        what,
        """
        const result = document.getElementById("verify-result");
        if (result.hidden) return null;
        const text = (id) => document.getElementById(id).textContent;
        return { ok: result.dataset.ok, checked: text("verify-checked"), first_bad: text("verify-first-bad"),
                 head_hash: text("verify-head-hash"), result: text("verify-ok") };
        """,
        30,
    )


def check_auditor(api, admin_token, console, args, passed):
    password = f"pw-{uuid.uuid4().hex}"
    api.call("POST", "/v1/users", {"username": "browser-auditor", "password": password, "role": "auditor"},
             token=admin_token, expect=(201,))
    console.login("browser-auditor", password)
    clean = verify_in_page(console, "the chain to verify")
    if clean["ok"] != "true" or clean["first_bad"] != "none" or len(clean["head_hash"]) != 64:
        raise CheckFailed(f"verifying the untouched chain shows {clean}")
    passed(f"auditor: chain ok over {clean['checked']} events, head hash {clean['head_hash'][:16]}…")
    if args.screenshot_dir:
        console.driver.screenshot(os.path.join(args.screenshot_dir, "forensics-ok.png"))

    # As of a position: an account and the sale then.
    _, page = api.call("GET", "/v1/audit/events?after=0&limit=1000", token=admin_token, expect=(200,))
    listed = next(e for e in page["events"] if e["type"] == "product_listed")
    deposit = next(e for e in page["events"] if e["type"] == "funds_deposited")
    account = deposit["stream"].split("-", 1)[1]
    # As the product was listed: the first customer funded, nothing sold yet.
    point = listed["position"]
    console.js(
        """
        document.getElementById("asof-point").value = arguments[0];
        document.getElementById("asof-account").value = arguments[1];
        document.getElementById("asof-product").value = arguments[2];
        document.getElementById("asof-form").requestSubmit();
        """,
        str(point), account, listed["data"]["product_id"],
    )
    as_of = console.wait(
        "balances and progress as of a position",
        """
        const a = document.getElementById("asof-account-result"), p = document.getElementById("asof-product-result");
        const failure = document.getElementById("asof-message").textContent;
        if (failure) return { failure };
        if (a.hidden || p.hidden) return null;
        const cells = (t) => [...t.querySelectorAll("tbody td")].map((td) => td.textContent);
        return { account: cells(a), product: cells(p) };
        """,
        10,
    )
    if (
        "failure" in as_of
        or shown_number(as_of["account"][1]) != deposit["data"]["amount"]
        or as_of["product"][1] != "closed"
        or shown_number(as_of["product"][3]) != 0
    ):
        raise CheckFailed(
            f"as of position {point} the page shows {as_of}, expected available {deposit['data']['amount']} "
            "and a closed product with nothing confirmed"
        )
    passed(f"as of position {point}: account available {as_of['account'][1]}, product {as_of['product'][0]!r} {as_of['product'][1]}")

    # The export downloads every event.
    console.js("delete document.body.dataset.exported; document.getElementById('export').click();")
    exported = int(console.wait("the export", "return document.body.dataset.exported;", 30))
    in_log = count_events(api, admin_token)
    if exported != in_log:
        raise CheckFailed(f"the export held {exported} events, the log {in_log}")
    passed(f"export downloaded {exported} events as JSON lines")

    # A row edited in the database: verify names it.
    bad_position = deposit["position"]
    tamper(args.database, bad_position)
    broken = verify_in_page(console, "the tampered chain to verify")
    if broken["ok"] != "false" or broken["first_bad"] != str(bad_position):
        raise CheckFailed(f"after editing position {bad_position}, verify shows {broken}")
    passed(f"after the event at position {bad_position} was edited in the database, verify shows "
           f"{broken['result']!r}, first bad position {broken['first_bad']}")
    if args.screenshot_dir:
        console.driver.screenshot(os.path.join(args.screenshot_dir, "forensics-tampered.png"))


def count_events(api, token):
    """Events in the log, paged through the auditors' route."""
    count, after = 0, 0
    while True:
        _, page = api.call("GET", f"/v1/audit/events?after={after}&limit=1000", token=token, expect=(200,))
        count += len(page["events"])
        if page["next"] is None:
            return count
        after = page["next"]


def run(args, results):
    api = Api(args.base_url)

    def passed(message):
        results.append(message)
        log(f"ok   {message}")

    admin = login(api, args.admin_user, args.admin_password)
    admin_token = admin["token"]
    run_id = uuid.uuid4().hex[:8]

    customers = []
    for n in range(CUSTOMERS):
        username, password = f"browser-{run_id}-{n}", f"pw-{uuid.uuid4().hex}"
        _, user = api.call(
            "POST", "/v1/users", {"username": username, "password": password, "role": "customer"},
            token=admin_token, expect=(201,),
        )
        api.call(
            "POST", f"/v1/accounts/{user['account_id']}/deposits",
            {"amount": DEPOSIT, "reference": f"browser-test-{run_id}-{n}"},
            token=admin_token, expect=(201,),
        )
        session = login(api, username, password)
        customers.append((session["token"], session["account_id"]))
    passed(f"{CUSTOMERS} customers created, {DEPOSIT} deposited each")

    proxy = StreamBreaker(args.base_url, args.page_from)
    if args.page_from:
        log(f"page served from {args.page_from}, not by the server")
    driver = None
    try:
        driver = WebDriver(args.chromedriver, args.chromium, args.workdir, timeout=30)
        log(f"chromium {driver.browser_version}; page loaded through a loopback proxy {proxy.base}")
        driver.get(proxy.base + "/")
        title = driver.execute("return document.title;")
        page = Dashboard(driver, None)
        page.wait("the stream to connect", lambda s: s["page"]["connection"] == "live", 15)
        passed(f"dashboard loaded ({title!r}) and its event stream is live")

        # A product listed while the page is open gets its own section.
        product_id = f"ci-browser.{run_id}"  # a dot, as ids may have
        api.call(
            "POST", "/v1/products",
            {"product_id": product_id, "name": "Browser test note", "quota": QUOTA,
             "min_purchase": MIN_PURCHASE, "max_purchase": MAX_PURCHASE,
             "annual_rate_bps": 350, "term_days": 90},
            token=admin_token, expect=(201,),
        )
        page = Dashboard(driver, product_id)
        sale = Sale(api, admin_token, product_id, customers)
        page.wait_matches("the new product's section (closed)", sale.progress(), 15)
        passed(f"section for {product_id} appeared while the page was open, status closed")

        api.call("POST", f"/v1/products/{product_id}/open", token=admin_token, expect=(200,))
        page.wait_matches("the section to show the sale open", sale.progress(), 15)
        passed("status followed the product to open")

        sale.buy(WARMUP)
        # The same key and body again: same order, nothing more bought.
        key = str(uuid.uuid4())
        _, first = sale.purchase(customers[0], 1_000, key=key)
        _, again = sale.purchase(customers[0], 1_000, key=key)
        if again["order_id"] != first["order_id"]:
            raise CheckFailed(f"repeated Idempotency-Key bought again: {first} then {again}")
        sale.bought += 1_000
        sale.orders += 1
        before = page.wait_matches("the first purchases on the page", sale.settled_progress(15), 15)["section"]
        passed(
            f"after {sale.orders} purchases the page matches the API: confirmed {before['text']['confirmed']}"
            f" ({before['style']['confirmed']} of the bar), available {before['text']['available']}"
        )

        # A concurrent batch: the bar must move, and orders/s show it.
        batch_started = time.monotonic()
        sale.buy(BATCH, parallel=8)
        batch_seconds = time.monotonic() - batch_started
        before_confirmed = shown_number(before["text"]["confirmed"])
        before_width = percent(before["style"]["confirmed"])

        def moved(snapshot):
            section = snapshot.get("section")
            return (
                section is not None
                and (shown_number(section["text"]["confirmed"]) or 0) > before_confirmed
                and (percent(section["style"]["confirmed"]) or 0) > before_width
            )

        page.wait("the confirmed bar to move after the batch", moved, 15)
        after = page.wait_matches("the batch on the page", sale.settled_progress(15), 15)["section"]
        rate = page.wait(
            "orders/s to show the batch",
            lambda s: (shown_number(s["section"]["text"]["rate"]) or 0) > 0, 5,
        )["section"]["text"]["rate"]
        passed(
            f"{len(BATCH)} concurrent purchases in {batch_seconds:.2f}s moved the bar "
            f"{before['style']['confirmed']} -> {after['style']['confirmed']} (orders/s {rate}); page matches "
            f"the API (confirmed {after['text']['confirmed']} + reserved {after['text']['reserved']}"
            f" + available {after['text']['available']} = quota {after['text']['quota']})"
        )
        charted = page.wait(
            "the orders/s chart to draw the batch",
            lambda s: int(s["section"]["data"].get("chartNonzero") or 0) > 0 and s["section"]["chartInk"] > 0, 10,
        )["section"]
        if charted["text"]["name"] != "Browser test note":
            raise CheckFailed(f"the card shows {charted['text']['name']!r}, not the product's name")
        if charted["data"].get("sinceOpen") in (None, "", "–", "not opened"):
            raise CheckFailed(f"time since opening shows {charted['data'].get('sinceOpen')!r}")
        passed(
            f"card shows the name {charted['text']['name']!r}, open for {charted['data']['sinceOpen']}; "
            f"the chart has {charted['data']['chartNonzero']} non-zero bar(s) of {charted['data']['chartPoints']} "
            f"({charted['chartInk']} px drawn)"
        )
        if args.screenshot_dir:
            driver.screenshot(os.path.join(args.screenshot_dir, "dashboard-selling.png"))

        # The stream drops and the proxy answers 502 for a while (a restart
        # behind a reverse proxy): the page must say so, keep trying, and
        # catch up with what was sold meanwhile once the stream is back.
        proxy.break_stream()
        page.wait("the page to notice the stream is down", lambda s: s["page"]["connection"] != "live", 10)
        sale.buy(OUTAGE, parallel=4)
        deadline = time.monotonic() + 15
        while proxy.refused_count() < 2:
            if time.monotonic() > deadline:
                raise CheckFailed(
                    f"the page tried the stream {proxy.refused_count()} time(s) in 15s while it answered 502"
                )
            time.sleep(0.1)
        refused = proxy.refused_count()
        proxy.restore()
        page.wait("the stream to come back", lambda s: s["page"]["connection"] == "live", 30)
        back = page.wait_matches("the purchases made during the outage", sale.settled_progress(15), 15)["section"]
        passed(
            f"stream cut and refused with 502 ({refused} retries): page showed it down, reconnected and "
            f"caught up with {len(OUTAGE)} purchases made meanwhile (confirmed {back['text']['confirmed']})"
        )

        # Buy it out: full-size purchases while they fit, one oversized
        # purchase refused, then exactly what is left.
        left = QUOTA - sale.bought
        full, remainder = divmod(left, MAX_PURCHASE)
        if remainder == 0:
            full, remainder = full - 1, MAX_PURCHASE
        sale.buy([MAX_PURCHASE] * full, parallel=4)
        if remainder < MAX_PURCHASE:
            status, body = sale.purchase(customers[0], MAX_PURCHASE, expect=(409,))
            if body.get("error") != "insufficient_quota":
                raise CheckFailed(f"oversized purchase answered {status} {body!r}, expected insufficient_quota")
        sale.buy([remainder])
        status, body = sale.purchase(customers[1], MIN_PURCHASE, expect=(409,))
        if body.get("error") != "sold_out":
            raise CheckFailed(f"purchase after the last answered {status} {body!r}, expected sold_out")
        sold_out = sale.settled_progress(15)
        if sold_out["status"] != "sold_out" or sold_out["available"] != 0 or sold_out["confirmed"] != QUOTA:
            raise CheckFailed(f"API progress after buying everything: {sold_out}")
        final = page.wait_matches("the sold-out product on the page", sold_out, 15)["section"]
        if final["style"]["confirmed"] != "100%" or abs(final["px"]["confirmed"] - final["px"]["bar"]) > 1.0:
            raise CheckFailed(f"sold out, but the confirmed bar is not full: {final['style']} {final['px']}")
        passed(
            f"bought out in {sale.orders} orders: page shows {final['text']['status']!r}, "
            f"confirmed bar {final['style']['confirmed']} ({final['px']['confirmed']:.0f}/{final['px']['bar']:.0f}px)"
        )

        # Nothing sells any more: orders/s must fall back to 0.
        page.wait(
            "orders/s to fall to 0 once nothing sells",
            lambda s: shown_number(s["section"]["text"]["rate"]) == 0, RATE_SETTLE_SECONDS,
        )
        snapshot = page.wait_matches("the sold-out page to stay put", sold_out, 5)
        if shown_number(snapshot["page"]["lag"]) is None:
            raise CheckFailed(f"projection lag shows {snapshot['page']['lag']!r}")
        if snapshot["page"]["connection"] != "live":
            raise CheckFailed(f"connection shows {snapshot['page']['connection']!r}")
        errors = [
            entry.get("message", "") for entry in driver.browser_log()
            if entry.get("level") == "SEVERE"
            # the 502s the proxy answered on purpose
            and not (StreamBreaker.STREAM in entry.get("message", "") and " 502 " in entry.get("message", ""))
        ]
        if errors:
            raise CheckFailed("the page logged errors: " + "; ".join(errors))
        passed(f"orders/s back to 0, still live, projection lag {snapshot['page']['lag']} events, no console errors")
        if args.screenshot_dir:
            driver.screenshot(os.path.join(args.screenshot_dir, "dashboard-sold-out.png"))

        check_security_headers(args.base_url, passed)
        console = Console(driver, args.base_url)
        check_support(api, admin_token, product_id, console, args, passed)
        check_auditor(api, admin_token, console, args, passed)
        check_no_console_errors(driver, passed)
    except BaseException:
        if args.screenshot_dir and driver is not None and driver.session:
            try:
                driver.screenshot(os.path.join(args.screenshot_dir, "dashboard-failure.png"))
            except Exception:  # noqa: BLE001 - best effort, the failure is reported anyway
                pass
        raise
    finally:
        if driver is not None:
            driver.quit()
        proxy.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--admin-user", default=os.environ.get("LEDGER_ADMIN_USER"))
    parser.add_argument("--admin-password", default=os.environ.get("LEDGER_ADMIN_PASSWORD"))
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--workdir", required=True, help="scratch folder (browser profile, logs)")
    parser.add_argument("--screenshot-dir", help="where to save screenshots of the page")
    parser.add_argument("--page-from", help="serve the dashboard from this file instead of the server's copy")
    parser.add_argument("--database", help="the server's SQLite log (default: WORKDIR/data/ledger.db), edited by the tamper check")
    args = parser.parse_args()
    if not args.database:
        args.database = os.path.join(args.workdir, "data", "ledger.db")
    if not args.admin_user or not args.admin_password:
        parser.error("admin credentials are needed (--admin-user/--admin-password or LEDGER_ADMIN_*)")
    started = time.monotonic()
    results = []
    try:
        run(args, results)
    except CheckFailed as failure:
        log(f"FAIL {failure}")
        print(f"browser test: {len(results)} passed, 1 failed", flush=True)
        return 1
    log(f"{len(results)} checks passed in {time.monotonic() - started:.1f}s")
    print(f"browser test: {len(results)} passed, 0 failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
