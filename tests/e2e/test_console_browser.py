"""The ops console in a real browser: Debian's headless Chromium, driven by Playwright, against the
whole pipeline as `orderpipe up` starts it (Stack, the embedded broker by default).

The pipeline gets three orders that complete, one whose address the SMTP server refuses for good
(550 for the `.invalid` domain: its e-mail is dead-lettered as not retryable, the order STALLED),
and one placed while the SMTP server is down (connection refused, retryable: after two short
retries the e-mail is dead-lettered and the order STALLED too). The server is back by the time
the operator looks, so replaying that second dead letter succeeds.

1. Logging in: a wrong password is refused, the right one leads to the overview, which shows the
   orders and refreshes its panels every 5 s without reloading the page; logging out ends it.
2. A viewer reads the dead letters but is shown no replay form, and one posted anyway (with the
   session's CSRF token, from the console's own page) is refused: the 403 page.
3. The operator finds the stalled order (orders search by state STALLED), reads its timeline
   (the dead-letter hop), filters the dead letters by the order's key, previews the replay, confirms
   it, and watches the order become COMPLETED; the audit log shows the run.

Every page gets a screenshot (ORDERPIPE_CONSOLE_SCREENSHOTS=docs/console refreshes the README's).
The pipeline and the browser are stopped at the end; no process is left (checked).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from console_browser import VIEWPORT, chromium, screenshot
from services.console.auth import hash_password
from services.email.smtp_sink import SmtpSink
from services.pipeline.demo import sample_orders
from services.pipeline.stack import Stack
from services.runtime.settings import Settings
from services.tools.brokers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

OPERATOR, VIEWER = ("olga", "operator password 1"), ("vic", "viewer password 2")
TIMEOUT_MS = 30_000  # Playwright's auto-waiting, generous: the pipeline runs beside the browser


def wait_until(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.3)
    return value


def states(client: httpx.Client, order_ids) -> dict[str, str | None]:
    return {oid: client.get(f"/orders/{oid}").json().get("state") for oid in order_ids}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, stack_broker: str):
    data_dir = tmp_path_factory.mktemp("console") / "data"
    smtp_port = free_port()
    env = {
        "ORDERPIPE_SMTP_HOST": "127.0.0.1", "ORDERPIPE_SMTP_PORT": str(smtp_port),
        # short retries and no circuit breaker: a send that cannot connect is dead-lettered in about a second
        "ORDERPIPE_WORKERS": json.dumps({"email": {"retry_delays_s": [0.3, 0.3], "breaker_enabled": False}}),
        "ORDERPIPE_CONSOLE_USERS": ",".join(f"{name}:{role}:{hash_password(password)}" for (name, password), role
                                            in ((OPERATOR, "operator"), (VIEWER, "viewer"))),
    }
    samples = sample_orders(5, seed=17, reject_every=0)
    normal, refused, outage = samples[:3], samples[3], samples[4]
    refused.body["customer_email"] = "refused@example.invalid"
    maildir = data_dir / "maildir"  # where the console's order page looks for an order's mails
    maildir.mkdir(parents=True)
    sink = SmtpSink(maildir, port=smtp_port).start()
    try:
        with Stack(Settings(data_dir=data_dir), data_dir=data_dir, broker=stack_broker, smtp_sink=False,
                   extra_env=env) as info, httpx.Client(base_url=info.api_url, timeout=10) as client:

            def place(order) -> str:
                answer = client.post("/orders", json=order.body)
                assert answer.status_code == 202, answer.text
                return answer.json()["order_id"]

            completed = [place(order) for order in normal]
            refused_id = place(refused)
            wait_until(lambda: states(client, completed) == dict.fromkeys(completed, "COMPLETED")
                       and states(client, [refused_id]) == {refused_id: "STALLED"}, "the first orders' final states")
            sink.stop()  # the SMTP server goes down: the next order's e-mail cannot be sent
            outage_id = place(outage)
            wait_until(lambda: states(client, [outage_id]) == {outage_id: "STALLED"},
                       "the order placed during the outage to stall")
            sink = SmtpSink(maildir, port=smtp_port).start()  # and is back
            yield SimpleNamespace(info=info, url=info.console_url, api=client, completed=completed,
                                  refused=refused_id, outage=outage_id)
    finally:
        sink.stop()
    wait_until(lambda: not [pid for pid in info.processes.values() if _alive(pid)],
               "every process of the pipeline to end", timeout=30)


def _alive(pid: int) -> bool:
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def new_page(browser, pipeline):
    contexts = []

    def make():
        context = browser.new_context(viewport=VIEWPORT, base_url=pipeline.url)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def log_in(page, user: tuple[str, str], then: str = "/"):
    from playwright.sync_api import expect

    page.goto(f"/login?next={then}")
    page.get_by_label("Name").fill(user[0])
    page.get_by_label("Password").fill(user[1])
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("header .who")).to_contain_text(user[0])


def test_login_the_live_overview_and_logout(new_page, pipeline):
    from playwright.sync_api import expect

    page = new_page()
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))  # no session: to the login
    expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    screenshot(page, "login")

    page.get_by_label("Name").fill(OPERATOR[0])
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(r"/login\?failed=1"))
    expect(page.locator(".error")).to_have_text("Wrong name or password.")

    page.get_by_label("Name").fill(OPERATOR[0])
    page.get_by_label("Password").fill(OPERATOR[1])
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{pipeline.url}/")
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator("header .who")).to_contain_text(f"{OPERATOR[0]} (operator)")

    # the orders placed: three COMPLETED, two STALLED, and the e-mail group's two dead letters
    now = page.locator("section.panel", has=page.get_by_role("heading", name="Orders per state now"))
    # up to 60 s: the page refreshes every 5 s, and the view may answer 503 for a moment while the
    # worker rebalances (seen once on Apache Kafka; the cause there, a join before Faust's own
    # topic was readable, is fixed at its root: fix 6 in streams/order_status/transport.py)
    expect(now.locator("tr", has=page.get_by_role("link", name="COMPLETED", exact=True))).to_contain_text(
        "3", timeout=60_000)
    expect(now.locator("tr", has=page.get_by_role("link", name="STALLED", exact=True))).to_contain_text("2")
    dead = page.locator("section.panel", has=page.get_by_role("heading", name="Dead letters"))
    expect(dead.get_by_role("link", name="email").first).to_be_visible()
    expect(dead).to_contain_text("MailDeliveryError")
    expect(dead).to_contain_text("MailRejected")
    for panel in ("The last hour", "Lag per group", "Held keys"):
        expect(page.get_by_role("heading", name=panel)).to_be_visible()
    screenshot(page, "overview")

    # live: the panels and the "last refresh" time change without a reload (the marker survives)
    first = page.locator("#updated").inner_text()
    page.evaluate("window.__still_this_page = true")
    expect(page.locator("#updated")).not_to_have_text(first, timeout=15_000)
    assert page.evaluate("window.__still_this_page === true"), "the page was reloaded"
    expect(now.locator("tr", has=page.get_by_role("link", name="COMPLETED", exact=True))).to_contain_text("3")

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))


def change_as(page, action: str, fields: dict[str, str]):
    """POST a form from the page the way its own forms do (with the session's CSRF token, from this
    origin): what a viewer would send by crafting the form the console does not show them."""
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith(action)) as answer:
        page.evaluate("""([action, fields]) => {
            const form = document.createElement("form");
            form.method = "post"; form.action = action;
            const all = {...fields, csrf: document.querySelector("input[name=csrf]").value};
            for (const [name, value] of Object.entries(all)) {
                const input = document.createElement("input");
                input.type = "hidden"; input.name = name; input.value = value; form.appendChild(input);
            }
            document.body.appendChild(form); form.submit();
        }""", [action, fields])
    page.wait_for_load_state()
    return answer.value


def test_a_viewer_reads_the_dead_letters_but_may_not_replay_them(new_page, pipeline):
    from playwright.sync_api import expect

    page = new_page()
    log_in(page, VIEWER)
    expect(page.locator("header .who")).to_contain_text(f"{VIEWER[0]} (viewer)")
    expect(page.get_by_role("heading", name="Orders per state now")).to_be_visible()

    page.locator("header").get_by_role("link", name="Dead letters", exact=True).click()
    expect(page.get_by_role("heading", name="Dead letters", exact=True)).to_be_visible()
    page.get_by_label("Group").select_option("email")
    page.get_by_label("Key (order id)").fill(pipeline.outage)
    page.get_by_role("button", name="Show").click()
    expect(page.locator("main table")).to_contain_text(pipeline.outage)
    expect(page.get_by_text("Only operators replay or purge dead letters.")).to_be_visible()
    expect(page.get_by_role("button", name="Preview (dry run)")).to_have_count(0)

    # the console shows a viewer no replay form; one crafted by hand is refused all the same
    for action, extra in (("/dead-letters/preview", {}), ("/dead-letters/run", {"confirm": "yes", "plan": "x"})):
        answer = change_as(page, action, {"group": "email", "key": pipeline.outage, "action": "replay", "to": "retry",
                                          **extra})
        assert answer.status == 403, (action, answer.status)
        expect(page.get_by_role("heading", name="Not allowed")).to_be_visible()
        expect(page.locator(".error")).to_have_text(f"{VIEWER[0]} is a viewer: only operators may change anything")
        page.go_back()
    assert states(pipeline.api, [pipeline.outage]) == {pipeline.outage: "STALLED"}, "nothing was replayed"


def test_the_operator_replays_a_dead_letter_and_watches_the_order_complete(new_page, pipeline):
    from playwright.sync_api import expect

    page = new_page()
    log_in(page, OPERATOR)

    # find the stalled orders: the search by state
    page.locator("header").get_by_role("link", name="Orders", exact=True).click()
    expect(page.get_by_role("heading", name="Orders", exact=True)).to_be_visible()
    page.get_by_label("State").select_option("STALLED")
    page.get_by_role("button", name="Search").click()
    expect(page).to_have_url(re.compile(r"/orders\?.*state=STALLED"))
    found = page.locator("main table")
    for stalled in (pipeline.outage, pipeline.refused):
        expect(found.get_by_role("link", name=stalled)).to_be_visible()
    for completed in pipeline.completed:
        expect(found.get_by_role("link", name=completed)).to_have_count(0)
    screenshot(page, "orders")

    # its timeline: the event, the two retries and the dead letter, with the connection error
    found.get_by_role("link", name=pipeline.outage).click()
    expect(page.get_by_role("heading", name=f"Order {pipeline.outage}")).to_be_visible()
    timeline = page.locator("section", has=page.get_by_role("heading", name="Timeline", exact=True))
    expect(timeline.locator("tr", has_text="OrderCreated").first).to_be_visible()
    retried = timeline.locator("tr", has_text=re.compile(r"retry \d+ in email"))
    expect(retried).to_have_count(2)  # the two retry tiers
    expect(retried.first).to_contain_text("MailDeliveryError")
    expect(timeline.locator("tr", has_text="dead-lettered in email")).to_contain_text("orders.created.email.dlt")
    status = page.locator("section", has=page.get_by_role("heading", name="Status", exact=True))
    expect(status.locator(".bad")).to_have_text("STALLED")
    screenshot(page, "order-timeline")

    # its dead letter: the list filtered by the order's key
    page.locator("header").get_by_role("link", name="Dead letters", exact=True).click()
    expect(page.locator("main")).to_contain_text("MailRejected")  # the counts: both dead letters
    expect(page.locator("main")).to_contain_text("MailDeliveryError")
    page.get_by_label("Group").select_option("email")
    page.get_by_label("Key (order id)").fill(pipeline.outage)
    page.get_by_role("button", name="Show").click()
    letters = page.locator("main table").first
    expect(letters.locator("tr", has_text=pipeline.outage)).to_contain_text("MailDeliveryError")
    expect(letters).not_to_contain_text(pipeline.refused)
    screenshot(page, "dead-letters")

    # the dry run first: the plan, nothing sent
    page.get_by_label("Action").select_option("replay")
    page.get_by_label("Replay to").select_option("retry")
    page.get_by_role("button", name="Preview (dry run)").click()
    expect(page.get_by_role("heading", name="Dry run: replay")).to_be_visible()
    expect(page.locator("main")).to_contain_text("1 dead letter(s) selected")
    plan = page.locator("main table")
    expect(plan.locator("tr", has_text=pipeline.outage)).to_contain_text("replay")
    expect(page.locator("main")).to_contain_text("dry run: nothing was sent, nothing recorded.")
    assert states(pipeline.api, [pipeline.outage]) == {pipeline.outage: "STALLED"}, "a preview replays nothing"
    screenshot(page, "replay-preview")

    # confirm: the run
    page.get_by_label(re.compile(r"Replay 1 dead letter\(s\)\?")).check()
    page.get_by_role("button", name="Replay 1 dead letter(s)").click()
    expect(page.locator("p.ok")).to_contain_text("replayed 1 of 1")
    expect(page.locator("p.ok")).to_contain_text(f"recorded in the audit log as {OPERATOR[0]}")

    # watch the order complete: the overview's live panels count it without a reload ...
    page.locator("header").get_by_role("link", name="Overview", exact=True).click()
    now = page.locator("section.panel", has=page.get_by_role("heading", name="Orders per state now"))
    expect(now.locator("tr", has=page.get_by_role("link", name="COMPLETED", exact=True))).to_contain_text(
        "4", timeout=60_000)
    expect(now.locator("tr", has=page.get_by_role("link", name="STALLED", exact=True))).to_contain_text("1")
    # ... and its page says so, with the mail the SMTP server received
    page.goto(f"/orders/{pipeline.outage}")
    status = page.locator("section", has=page.get_by_role("heading", name="Status", exact=True))
    expect(status.locator(".ok").first).to_have_text("COMPLETED")
    mails = page.locator("section", has=page.get_by_role("heading", name="Mails", exact=True))
    expect(mails.locator("tr", has_text="confirmation")).to_be_visible()
    assert states(pipeline.api, [pipeline.outage, pipeline.refused]) == {
        pipeline.outage: "COMPLETED", pipeline.refused: "STALLED"}

    # the audit log: who replayed what, from the console
    page.locator("header").get_by_role("link", name="Audit log", exact=True).click()
    run = page.locator("main table tr", has_text="replay").first
    expect(run).to_contain_text(f"{OPERATOR[0]}@")
    expect(run).to_contain_text("console")
    expect(run).to_contain_text("completed")
    screenshot(page, "audit")

    # the consumer groups: nothing left to do for email
    page.locator("header").get_by_role("link", name="Consumer groups", exact=True).click()
    expect(page.get_by_role("heading", name="Consumer groups")).to_be_visible()
    expect(page.locator("section#email")).to_be_visible()
    screenshot(page, "groups")
