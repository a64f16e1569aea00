"""The beamline web client in a real headless Chromium, against the demo's real processes.

Two web users (alice, bob) in two browser sessions drive the page through its controls: alice
takes m1, bob's m1 setpoint input is disabled (the time printed) with the reason naming alice,
bob's take and write are refused naming alice, alice moves m1, releases it, and bob may write. The
queue panel adds plans (a malformed one refused verbatim), moves and removes one, starts the
queue, shows the running item and lands it in the history. Screenshots go to a temporary folder,
or to ``$PVCOORD_SCREENSHOTS`` when set (``PVCOORD_SCREENSHOTS=docs/img`` refreshes the docs'
images; a plain run leaves the clone unchanged).

Processes: the demo beamline (``pvcoord.demo.beamline.start_beamline``: softIoc, registry,
coordination, RE Manager + redis, queue IOC, guard and the PVWS bridge with its generated users),
all on 127.0.0.1, started once for the module and stopped even on failure.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from pvcoord.demo import beamline, web_part
from pvcoord.procs import client_conf
from pvdb import demo as demo_pvs
from pvdb import queue as qn

from .test_demo_beamline import free_block

pytestmark = pytest.mark.system

PREFIX = "WEB:"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1300",
)
REPO = Path(__file__).resolve().parent.parent
WAIT = 15.0
"""Seconds a page may take to show something that does not depend on a motion or a plan."""
READONLY_WITHIN = 1.0
"""Issue 10: bob's input is disabled within 1 s of alice's lock (printed, not asserted)."""
USERS = web_part.USERS



def _missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} not installed (scripts/setup.sh installs chromium, chromium-driver)"
    return None


@pytest.fixture(scope="module")
def site():
    """The demo beamline with its bridge (writes on, password login for alice and bob)."""
    if (why := _missing()) is not None:
        pytest.fail(why)
    run = Path(tempfile.mkdtemp(prefix="pvcoord-test-web-"))
    run.chmod(0o755)
    out = io.StringIO()
    ctx = None
    try:
        ctx = beamline.start_beamline(PREFIX, ports_from=free_block(), run_dir=run, out=out)
        assert "web" in ctx.procs, "the demo did not start its bridge (pvcoord.demo.web_part)"
        url = web_part.web_url(ctx)
        passwords = web_part.read_users(ctx.files["web-users"])
        assert set(USERS) <= set(passwords), passwords.keys()
        yield {"url": url, "passwords": passwords, "ctx": ctx}
    except BaseException:
        print(out.getvalue())
        if ctx is not None:
            for p in ctx.procs.values():
                print(f"--- {p.name} ---\n{p.output()[-3000:]}")
        raise
    finally:
        if ctx is not None:
            ctx.stop_all()
        shutil.rmtree(run, ignore_errors=True)


class Page:
    """One browser session on the web client, driven through its controls."""

    def __init__(self, url: str, profile: Path) -> None:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={profile}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
        self.driver.get(url)
        self.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"),
                   "the page to start")

    def until(self, cond, what: str, timeout: float = WAIT, poll: float = 0.05):
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=poll,
                                 ignored_exceptions=[StaleElementReferenceException]).until(cond)
        except TimeoutException:
            raise AssertionError(f"page: no {what} within {timeout} s; browser log: "
                                 f"{self.driver.get_log('browser')[-10:]}") from None

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def click(self, css: str) -> None:
        """Click the element at ``css``, finding it again if a live update replaced it."""
        def clicked(d) -> bool:
            try:
                self.find(css).click()
            except StaleElementReferenceException:
                return False
            return True
        self.until(clicked, f"clickable {css}")

    def row(self, device: str, css: str = ""):
        return self.find(f'#devices tr[data-device="{device}"] {css}'.rstrip())

    def login(self, user: str, password: str) -> None:
        self.find("#login-user").send_keys(user)
        self.find("#login-password").send_keys(password)
        self.find("#login-button").click()
        self.until(lambda d: self.find("#whoami").text == user, f"login of {user}")

    def text(self, css: str) -> str:
        return self.find(css).text

    def result(self, device: str) -> tuple[str, str, str]:
        node = self.row(device, ".result")
        return (node.get_attribute("data-code") or "", node.get_attribute("data-holder") or "",
                node.text)

    def readback(self, device: str) -> float:
        text = self.row(device, ".readback").text.split()
        try:
            return float(text[0])
        except (IndexError, ValueError):
            return float("nan")

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def pages(site):
    """Two browser sessions, alice's and bob's, both logged in."""
    made: list[Page] = []
    profiles = [Path(tempfile.mkdtemp(prefix="pvcoord-chromium-")) for _ in USERS]
    try:
        for user, profile in zip(USERS, profiles, strict=True):
            page = Page(site["url"], profile)
            made.append(page)
            page.login(user, site["passwords"][user])
        yield dict(zip(USERS, made, strict=True))
    finally:
        for page in made:
            page.close()
        for profile in profiles:
            shutil.rmtree(profile, ignore_errors=True)


def _setpoint_pv_value(site, motor: str) -> float:
    from p4p.client.thread import Context

    with Context("pva", conf=client_conf(site["ctx"].env), useenv=False) as ctxt:
        return float(ctxt.get(demo_pvs.motor_setpoint(PREFIX, motor), timeout=10.0))


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the screenshots go: ``$PVCOORD_SCREENSHOTS`` (relative to the clone) or a temporary
    folder, so that running the tests does not rewrite the tracked ``docs/img/`` files."""
    where = os.environ.get("PVCOORD_SCREENSHOTS")
    folder = (REPO / where) if where else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_not_logged_in_reads_but_may_not_write(site, pages):
    profile = Path(tempfile.mkdtemp(prefix="pvcoord-chromium-"))
    page = Page(site["url"], profile)
    try:
        page.until(lambda d: page.row("m1", ".lock").text == "Free", "m1's lock state")
        page.until(lambda d: page.row("m1", ".readback").text.endswith(" mm"), "m1's readback")
        assert not page.row("m1", ".setpoint").is_enabled()
        assert page.row("m1", ".reason").text == "log in to write"
        assert not page.row("m1", ".take").is_enabled()
        assert not page.find('button[data-rpc="start"]').is_enabled()
        page.until(lambda d: page.find('#health [data-process="coordination"]')
                   .get_attribute("data-ok") == "true", "coordination healthy")
        assert page.find('#health [data-process="bridge"]').get_attribute("data-ok") == "true"
    finally:
        page.close()
        shutil.rmtree(profile, ignore_errors=True)


def test_two_users_lock_move_release(site, pages, screenshots):
    a, b = pages["alice"], pages["bob"]
    b.until(lambda d: b.driver.execute_script(
        "const s = document.getElementById('plot-pv');"
        "const o = [...s.options].find(o => o.text.startsWith('m1 '));"
        "if (o) { s.value = o.value; s.dispatchEvent(new Event('change')); }"
        "document.getElementById('plot-window').value = '60'; return Boolean(o);"),
        "m1's readback in the plot choices")
    for page in (a, b):
        page.until(lambda d, p=page: p.row("m1", ".setpoint").is_enabled(),
                   "m1 setpoint input enabled while m1 is free")
        assert page.row("m1", ".lock").text == "Free"

    a.row("m1", ".take").click()
    a.until(lambda d: a.result("m1")[0] == "ok", "reply to alice's take")
    t_granted = time.monotonic()
    # a generous wait, the figure printed: issue 10's 1 s (p99 100 ms) is benchmarks/'s to check
    b.until(lambda d: not b.row("m1", ".setpoint").is_enabled(),
            "m1 setpoint disabled for bob", timeout=WAIT, poll=0.02)
    disabled_after = time.monotonic() - t_granted
    print(f"bob's m1 input disabled {disabled_after * 1000:.0f} ms after alice's take reply "
          f"(issue 10: within {READONLY_WITHIN:g} s)")
    a.until(lambda d: a.row("m1", ".lock").text == "ManualOperator", "m1 ManualOperator")
    assert a.row("m1", ".setpoint").is_enabled(), "the holder's own input must stay enabled"
    a.until(lambda d: a.row("m1", ".renew").is_displayed(), "the holder's Renew button")
    assert not b.row("m1", ".renew").is_displayed()
    assert "alice@" in b.row("m1", ".reason").text, b.row("m1", ".reason").text
    b.until(lambda d: b.row("m1", ".owner").text.startswith("alice@"), "alice as m1's owner")
    assert not b.row("m1", ".release").is_enabled()

    # bob's take and bob's write are refused, naming alice, and change nothing
    b.row("m1", ".take").click()
    b.until(lambda d: b.result("m1")[0] == "holder-conflict", "refusal of bob's take")
    code, holder, text = b.result("m1")
    assert holder.startswith("alice@") and "alice@" in text, (code, holder, text)
    before = _setpoint_pv_value(site, "m1")
    b.driver.execute_script("globalThis.pvcoord.writeSetpoint('m1', '7')")
    b.until(lambda d: b.result("m1")[0] == "holder-conflict", "refusal of bob's write")
    code, holder, text = b.result("m1")
    assert holder.startswith("alice@") and "alice@" in text, (code, holder, text)
    assert _setpoint_pv_value(site, "m1") == before

    # alice moves m1 through her input
    target = before + 3.0
    sp = a.row("m1", ".setpoint")
    sp.clear()
    sp.send_keys(f"{target}", Keys.ENTER)
    for page in (a, b):
        page.until(lambda d, p=page: abs(p.readback("m1") - target) < 1e-3,
                   f"m1 readback at {target}", timeout=WAIT + abs(target - before) / 2.0)
    assert a.result("m1")[0] == ""  # no error for the holder's write
    assert not b.row("m1", ".setpoint").is_enabled()
    assert b.driver.save_screenshot(str(screenshots / "web-client-locked.png"))  # bob's view

    # alice renews her lease, then releases; bob may write again
    a.row("m1", ".renew").click()
    a.until(lambda d: a.result("m1")[2].startswith("renewed"), "reply to alice's renew")
    a.row("m1", ".release").click()
    a.until(lambda d: a.result("m1")[2].startswith("released"), "reply to alice's release")
    b.until(lambda d: b.row("m1", ".setpoint").is_enabled(), "m1 setpoint enabled for bob")
    # the lock column follows its own Coord:m1:State subscription, in any order with the above
    b.until(lambda d: b.row("m1", ".lock").text == "Free", "m1 Free for bob")
    assert b.row("m1", ".reason").text == ""
    sp = b.row("m1", ".setpoint")
    sp.clear()
    sp.send_keys(f"{before}", Keys.ENTER)
    b.until(lambda d: abs(b.readback("m1") - before) < 1e-3, f"m1 back at {before}",
            timeout=WAIT + 2.0)
    assert b.result("m1")[0] == ""


def _queue_rows(page: Page) -> list[tuple[str, str]]:
    """(item uid, args) of each row of the queue table, read in one step in the page."""
    rows = page.driver.execute_script(
        "return [...document.querySelectorAll('#queue-items tbody tr')]"
        ".map(r => [r.dataset.uid, r.cells[2].textContent]);")
    return [(uid, args) for uid, args in rows]


def _add(page: Page, plan: str, args: str, kwargs: str) -> None:
    for css, text in (("#add-plan", plan), ("#add-args", args), ("#add-kwargs", kwargs)):
        field = page.find(css)
        field.clear()
        field.send_keys(text)
    page.find("#add-button").click()


def test_queue_panel_add_move_remove_start_history(site, pages, screenshots):
    a = pages["alice"]
    a.until(lambda d: a.text("#manager-state") == "idle", "manager state idle")

    # a malformed argument list: the queue IOC's refusal, verbatim; nothing added
    _add(a, "count", '[["det1"]', "")
    a.until(lambda d: a.find("#queue-error").get_attribute("data-code") == "queue-refused",
            "refusal of a malformed add")
    assert "ItemAdd: args is not valid JSON" in a.text("#queue-error")
    assert _queue_rows(a) == []

    _add(a, "count", '[["det1"]]', '{"num": 10, "delay": 0.5}')
    a.until(lambda d: len(_queue_rows(a)) == 1, "the first item in the queue")
    _add(a, "count", '[["det2"]]', '{"num": 1}')
    a.until(lambda d: len(_queue_rows(a)) == 2, "the second item in the queue")
    first, second = _queue_rows(a)
    assert "det1" in first[1] and "det2" in second[1]
    # added on behalf of the web user: the RE Manager's item (Queue:Items.user) names alice
    users = a.driver.execute_script(
        "return [...document.querySelectorAll('#queue-items tbody tr')]"
        ".map(r => r.cells[3].textContent);")
    assert users == ["alice", "alice"], users

    # move the det2 item up, then remove it
    a.click(f'#queue-items tr[data-uid="{second[0]}"] .up')
    a.until(lambda d: [u for u, _ in _queue_rows(a)] == [second[0], first[0]], "the moved item")
    a.click(f'#queue-items tr[data-uid="{second[0]}"] .remove')
    a.until(lambda d: [u for u, _ in _queue_rows(a)] == [first[0]], "the removed item gone")

    a.click('button[data-rpc="start"]')
    a.until(lambda d: a.find("#running").get_attribute("data-uid") == first[0],
            "the running item", timeout=WAIT)
    a.until(lambda d: a.text("#running").startswith("count(["), "the running item's name")
    a.until(lambda d: "running for" in a.text("#running"), "the running item's elapsed time")
    a.until(lambda d: a.text("#manager-state") == "executing_queue", "executing_queue")
    assert a.driver.save_screenshot(str(screenshots / "web-client-queue.png"))

    # pause at the next checkpoint, then resume
    a.click('button[data-rpc="pause"]')
    a.until(lambda d: a.text("#manager-state") == "paused", "the paused manager")
    a.click('button[data-rpc="resume"]')
    a.until(lambda d: a.text("#manager-state") == "executing_queue", "the resumed plan")
    a.until(lambda d: a.driver.find_elements(
        By.CSS_SELECTOR, f'#history tr[data-uid="{first[0]}"] .exit-completed'),
        "the item in the history as completed", timeout=WAIT + 10.0)
    a.until(lambda d: a.find("#running").get_attribute("data-uid") == "", "no running item")
    assert _queue_rows(a) == []
    console = a.text("#console")
    assert console.strip(), "the console shows the RE Manager's output"


def _http(url: str, body: object | None = None, cookie: str = "") -> tuple[int, dict, str]:
    """POST ``body`` as JSON (GET if None); return (status, JSON reply, Set-Cookie)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=10.0) as r:
            return r.status, json.loads(r.read()), r.headers.get("Set-Cookie", "")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), ""


def test_queue_endpoint_refuses_bad_calls_with_codes(site):
    url = site["url"]
    status, names, _ = _http(url + "pvws/names.json")
    assert status == 200 and names["prefix"] == PREFIX
    assert names["pv"]["managerState"] == qn.MANAGER_STATE.name(PREFIX)
    status, reply, _ = _http(url + "api/queue/start", {})
    assert (status, reply["error"]["code"]) == (401, "not-logged-in")
    status, _, set_cookie = _http(url + "login", {"user": "alice",
                                                  "password": site["passwords"]["alice"]})
    assert status == 200 and set_cookie
    cookie = set_cookie.split(";", 1)[0]
    for key, body, code, want in (
        ("no_such_call", {}, 404, "unknown-rpc"),
        ("start", {"color": "red"}, 400, "bad-request"),
        ("add", ["count"], 400, "bad-request"),
        ("add", {"name": "count", "args": [["det1"]]}, 400, "bad-request"),
        ("remove", {"uid": "no-such-uid"}, 409, "queue-refused"),
    ):
        status, reply, _ = _http(url + f"api/queue/{key}", body, cookie)
        assert (status, reply["error"]["code"]) == (code, want), (key, body, reply)
    status, reply, _ = _http(url + "api/queue/remove", {"uid": "no-such-uid"}, cookie)
    assert "not in the queue" in reply["error"]["message"]  # the RE Manager's words, verbatim


def test_pvws_js_keeps_the_pvws_client_interface(site, pages):
    """Our ``pvws.js`` as a PVWS page uses it: merged updates, ``b64*`` arrays decoded."""
    page = pages["bob"]
    seen = page.driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const url = location.origin.replace(/^http/, "ws") + "/pvws/pv";
        const seen = [];
        const ws = new PVWS(url, (up) => { if (up) ws.subscribe(["sim://sine"]); }, (m) => {
          if (m.type !== "update") return;
          seen.push(Object.assign({}, m));
          if (seen.length === 3) { ws.close(); done(seen); }
        });
        ws.open();
        setTimeout(() => { ws.close(); done(seen); }, 8000);
    """)
    assert len(seen) == 3, seen
    first, later = seen[0], seen[2]
    assert first["pv"] == "sim://sine" and "vtype" in first and first["readonly"] is True
    assert later["vtype"] == first["vtype"], "fields sent once stay in the merged state"
    assert isinstance(later["value"], int | float) and later["seconds"] >= first["seconds"]
    decoded = page.driver.execute_script("""
        const out = {};
        for (const [field, b64] of [["b64dbl", "AAAAAAAA+D8="], ["b64srt", "AQD+/w=="],
                                    ["b64int", "AQAAAP////8="], ["b64flt", "AADAPw=="],
                                    ["b64byt", "Af8="]]) {
          const m = {type: "update", pv: "x", [field]: b64};
          PVWS.decodeArray(m);
          out[field] = [Array.from(m.value), field in m];
        }
        return out;
    """)
    assert decoded == {
        "b64dbl": [[1.5], False], "b64srt": [[1, -2], False], "b64int": [[1, -1], False],
        "b64flt": [[1.5], False], "b64byt": [[1, 255], False],
    }
