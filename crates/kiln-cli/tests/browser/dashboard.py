"""Drives the dashboard in headless Chromium (Debian's, through Playwright) against a real daemon:
sign in, create a sandbox, snapshot it, fork it, snapshot the fork, run a command, see a snapshot made
through the API appear, delete it with confirmation; the lineage tree must show each step.

Usage: dashboard.py URL TOKEN SCREENSHOT. Exits non-zero with a message on the first failed step."""
import json
import re
import sys
import urllib.request

from playwright.sync_api import expect, sync_playwright

URL, TOKEN, SHOT = sys.argv[1], sys.argv[2], sys.argv[3]
API = URL.split("/ui")[0]
SLOW = 240_000  # ms: VMs run under software emulation on a shared machine
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def api(method, path, body=None):
    req = urllib.request.Request(API + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": "Bearer " + TOKEN, "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read() or b"null")


def tree_child(parent_kind, parent_name, kind, name_prefix):
    # li > div.node + ul > li > div.node: a direct child in the lineage tree
    # ([data-name^=""] would match nothing)
    prefix = f'[data-name^="{name_prefix}"]' if name_prefix else ""
    return (f'.node[data-kind="{parent_kind}"][data-name="{parent_name}"] + ul > li > '
            f'.node[data-kind="{kind}"]{prefix}')


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    urls, console_errors = [], []
    page.on("request", lambda r: urls.append(r.url))
    # The browser logs each refused response (the wrong token's 401, a missing /v1/events' 404) itself.
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
            and console_errors.append(m.text))
    page.goto(URL)

    print("step: the page asks for the token (the listener is TCP)", flush=True)
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "wrong-token-wrong-token")
    page.click("#login button")
    expect(page.locator("#login-error")).to_contain_text("refused")
    page.fill("#token", TOKEN)
    page.click("#login button")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    # /v1/events when the daemon has it, else the 2 s poll
    expect(page.locator("#live")).to_have_text(re.compile("^(live|polling every 2 s)$"))

    print("step: create web-1 through the form", flush=True)
    page.select_option("#create-template", "tiny")
    page.fill("#create-name", "web-1")
    page.click("#create button")
    row = page.locator('tr[data-sandbox="web-1"]')
    expect(row.locator(".state")).to_have_text("running", timeout=SLOW)
    expect(page.locator(tree_child("template", "tiny", "sandbox", "web-1"))).to_be_visible()

    print("step: snapshot web-1", flush=True)
    row.get_by_role("button", name="snapshot").click()
    expect(page.locator(tree_child("sandbox", "web-1", "snapshot", ""))).to_have_count(1, timeout=SLOW)

    print("step: fork web-1", flush=True)
    row.get_by_role("button", name="fork").click()
    fork_node = page.locator(tree_child("sandbox", "web-1", "sandbox", "web-1-fork-"))
    expect(fork_node).to_have_count(1, timeout=SLOW)
    fork_name = fork_node.get_attribute("data-name")
    fork_row = page.locator(f'tr[data-sandbox="{fork_name}"]')
    expect(fork_row.locator(".state")).to_have_text("running", timeout=SLOW)
    expect(fork_row).to_contain_text("fork of web-1")

    print("step: snapshot the fork", flush=True)
    fork_row.get_by_role("button", name="snapshot").click()
    expect(page.locator(tree_child("sandbox", fork_name, "snapshot", ""))).to_have_count(1, timeout=SLOW)

    print("step: run a command in web-1 and read its console", flush=True)
    row.locator("td").first.click()
    expect(page.locator("#detail")).to_be_visible()
    page.fill("#exec-cmd", "echo hello-from-the-dashboard")
    page.click("#exec button")
    expect(page.locator("#exec-out")).to_contain_text("hello-from-the-dashboard\n[exit 0]", timeout=SLOW)
    expect(page.locator("#logs")).not_to_be_empty()

    print("step: a snapshot made through the API appears by itself", flush=True)
    api("POST", "/v1/sandboxes/web-1/snapshots", {"name": "api-snap"})
    snap = page.locator(tree_child("sandbox", "web-1", "snapshot", "api-snap"))
    expect(snap).to_have_count(1, timeout=30_000)
    expect(snap).to_contain_text("delete frees")
    page.screenshot(path=SHOT, full_page=True)

    print("step: delete api-snap after confirming", flush=True)
    snap.get_by_role("button", name="delete").click()
    expect(page.locator("#confirm")).to_be_visible()
    expect(page.locator("#confirm-text")).to_contain_text("Frees up to")
    page.click("#confirm button[value=cancel]")
    expect(snap).to_have_count(1)
    snap.get_by_role("button", name="delete").click()
    page.click("#confirm-ok")
    expect(snap).to_have_count(0, timeout=SLOW)

    leaked = [u for u in urls if TOKEN in u]
    assert not leaked, f"the token appeared in a URL: {leaked}"
    assert not console_errors, f"console errors: {console_errors}"
    browser.close()
print("dashboard flow passed", flush=True)
