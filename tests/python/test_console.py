"""The owner console in a real browser: Debian's headless Chromium and chromedriver,
driven by selenium, against `airlock demo --console-listen 127.0.0.1:0`.

The analyst asks through ADBC; the owner sees the request appear in the open page,
approves it, and the analyst's rerun succeeds. The analyst, signed in, sees only their
own requests and is refused the owner's pages and a direct approve POST; forged POSTs
(no CSRF token, or from another site) are refused. A screenshot of the requests page is
kept under $CARGO_TARGET_DIR/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ROOT, airlock_binary

CHROMIUM = os.environ.get("AIRLOCK_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("AIRLOCK_CHROMEDRIVER", "/usr/bin/chromedriver")
WAIT = 20

# The request the tests share: the owner approves it, the analyst reruns it.
RAW = "SELECT * FROM hospital.patients"


def artifacts() -> Path:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    path = target / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser(tmp_path):
    """A fresh headless Chromium (Debian's, never a downloaded one) per test."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: apt-get install -y chromium chromium-driver (scripts/test.sh does)")
    # Selenium Manager must not look for (or download) a driver or browser.
    os.environ["SE_OFFLINE"] = "true"
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def connect(server, user):
    return flightsql.connect(server.uri, db_kwargs={"username": user, "password": user})


def pending_request(server, sql) -> str:
    """Runs `sql` as the analyst; returns the id of the approval request it makes."""
    with connect(server, "analyst") as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as err:
            cur.execute(sql)
            cur.fetchall()
    m = re.search(r"\[APPROVAL_PENDING\] request (\w+):", str(err.value))
    assert m, str(err.value)
    return m.group(1)


def owner_cli(server, *args):
    env = dict(os.environ, AIRLOCK_URL=server.uri, AIRLOCK_USER="owner", AIRLOCK_PASSWORD="owner")
    out = subprocess.run([airlock_binary(), "approvals", *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def sign_in(driver, server, user):
    driver.get(server.console + "/login")
    driver.find_element(By.ID, "user").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(user)
    driver.find_element(By.ID, "sign-in").click()
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.ID, "who"))
    assert driver.find_element(By.ID, "who").text == user


def post_from_page(driver, path, body) -> int:
    """A same-origin POST from the signed-in page (fetch); returns the HTTP status."""
    return driver.execute_async_script(
        """
        const [path, body, done] = arguments;
        fetch(path, {method: "POST", body, redirect: "manual",
                     headers: {"Content-Type": "application/x-www-form-urlencoded"}})
          .then(r => done(r.status), e => done(String(e)));
        """,
        path,
        body,
    )


def text_of(driver, element_id: str) -> str | None:
    """An element's text read in the page, at once: htmx may swap the element between a
    WebDriver lookup and a read of it (a stale element)."""
    return driver.execute_script(
        "const e = document.getElementById(arguments[0]);"
        "return e ? e.textContent.replace(/\\s+/g, ' ').trim() : null;",
        element_id,
    )


def cell_texts(driver, selector) -> list[str]:
    """The texts of a table row's cells, read at once (htmx may swap the row any time).

    `textContent`, not `innerText`: the latter depends on layout, and a row htmx is still
    settling can lay out without its text."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' td'))"
        ".map(td => td.textContent.replace(/\\s+/g, ' ').trim());",
        selector,
    )


def page_token(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "form.signout input[name=csrf]").get_attribute("value")


def test_owner_approves_in_the_browser_and_the_analyst_rerun_succeeds(server, browser):
    assert server.console, "the demo serves the console"
    sign_in(browser, server, "owner")
    assert browser.current_url.endswith("/requests")
    # The page is open before the request exists: it must appear without a reload.
    marker = browser.execute_script("window.__airlock_no_reload = 1; return window.__airlock_no_reload;")
    assert marker == 1
    request = pending_request(server, RAW)
    row = f'#pending tr[data-request="{request}"]'
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
    assert browser.execute_script("return window.__airlock_no_reload;") == 1, "the page was not reloaded"
    cells = cell_texts(browser, row)
    assert cells[1] == "analyst"
    assert "hospital.patients" in cells[3]
    assert "AGGREGATE_REQUIRED" in cells[4]
    # The rows it would release appear once counted (the next refresh at the latest).
    WebDriverWait(browser, WAIT).until(lambda d: cell_texts(d, row)[5:6] == ["5000"])
    browser.save_screenshot(str(artifacts() / "console-requests.png"))

    # The list is swapped every two seconds: follow the link's address, not the element.
    href = browser.execute_script(f"return document.querySelector('{row} a.request-link').href")
    assert href.endswith(f"/requests/{request}")
    browser.get(href)
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.ID, "approve"))
    assert browser.find_element(By.ID, "sql").text == RAW
    assert browser.find_element(By.ID, "plan").text.strip(), "the rewritten plan is shown"
    assert browser.find_element(By.ID, "explanation").text.strip()
    assert browser.find_element(By.ID, "requester").text.startswith("analyst")
    browser.save_screenshot(str(artifacts() / "console-request.png"))
    browser.find_element(By.ID, "approve").click()
    WebDriverWait(browser, WAIT).until(lambda d: text_of(d, "request-state") == "approved")
    assert "single use" in browser.find_element(By.ID, "outcome").text

    with connect(server, "analyst") as conn, conn.cursor() as cur:
        cur.execute(RAW)
        table = cur.fetch_arrow_table()
    assert table.num_rows == 5000
    assert set(table.column("name").to_pylist()) == {"*"}, "masks still apply"

    # The activity page shows the decision and a verified chain.
    browser.get(server.console + "/activity?decision=approved")
    assert "chain intact" in browser.find_element(By.ID, "chain").text
    assert request in browser.find_element(By.ID, "records").text
    browser.save_screenshot(str(artifacts() / "console-activity.png"))


def test_the_analyst_sees_only_their_own_requests_and_no_owner_page(server, browser):
    mine = pending_request(server, "SELECT zip, age FROM hospital.patients WHERE age > 91")
    sign_in(browser, server, "analyst")
    assert browser.current_url.endswith("/mine")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-request="{mine}"]'))
    shown = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('#my-requests tbody tr')).map(tr => tr.dataset.request);"
    ))
    everyone = owner_cli(server, "list", "--all")
    theirs = {r["id"] for r in everyone if r["key"]["principal"] == "analyst"}
    assert mine in shown and shown == theirs, "exactly the analyst's own requests"
    assert all(r["key"]["principal"] == "analyst" for r in everyone if r["id"] in shown)
    assert not browser.find_elements(By.CSS_SELECTOR, 'a[href="/requests"]'), "no owner menu"

    for page in ("/requests", "/activity", "/policy", f"/requests/{mine}"):
        browser.get(server.console + page)
        assert browser.find_element(By.ID, "error-title").text.startswith("403"), page

    browser.get(server.console + "/access")
    access = browser.find_element(By.TAG_NAME, "main").text
    assert "hospital.patients" in access and "hospital.staff" not in access

    browser.get(server.console + "/mine")
    token = page_token(browser)
    status = post_from_page(browser, f"/requests/{mine}/approve", f"csrf={token}&max_rows=&expires_in_secs=86400")
    assert status == 403
    assert owner_cli(server, "show", mine)["status"] == "pending"


def test_forged_posts_are_refused(server, browser):
    request = pending_request(server, "SELECT zip, age FROM hospital.patients WHERE age > 92")
    sign_in(browser, server, "owner")
    approve = f"/requests/{request}/approve"
    # From the owner's own page but without the session's CSRF token.
    assert post_from_page(browser, approve, "max_rows=&expires_in_secs=86400") == 403
    assert post_from_page(browser, approve, "csrf=forged&max_rows=&expires_in_secs=86400") == 403
    # From another site, with the owner's cookie and even the right token.
    token = page_token(browser)
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in browser.get_cookies())
    forged = urllib.request.Request(
        server.console + approve,
        data=f"csrf={token}&max_rows=&expires_in_secs=86400".encode(),
        headers={
            "Cookie": cookie,
            "Origin": "https://attacker.example",
            "Sec-Fetch-Site": "cross-site",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(forged, timeout=10)
    assert err.value.code == 403
    assert owner_cli(server, "show", request)["status"] == "pending"
    # The same token from the page itself works: the refusals above were the CSRF checks.
    assert post_from_page(browser, f"/requests/{request}/deny", f"csrf={token}&reason=not+needed") in (0, 303)
    assert owner_cli(server, "show", request)["status"] == "denied"
