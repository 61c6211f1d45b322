"""The console's dead-letter pages and audit log over real HTTP, on real dead letters (the
scenario of test_dlt_cli.py: six dead letters of a private group, A..F), read and carried out
through the same code as `orderpipe dlt`:

- the list applies the filters of `dlt list`; a message page shows every header, the exception
  and the traceback, escaped (a `<script>` in a traceback is text);
- a viewer's preview or run is refused (403); an operator's preview is a dry run (nothing sent,
  nothing recorded), the confirmed run replays (to the retry topic) or purges, and the audit
  topic names the console's user;
- /audit lists the run with that user; anonymous browsers go to the login.
"""

from __future__ import annotations

import html as std_html
import re
from datetime import timedelta

import pytest

from conftest import settings_for
from services.ops.audit import AuditLog
from services.ops.broker import OpsKafka
from services.runtime import failure_headers as fh
from services.runtime.kafka import make_producer
from test_dlt_cli import DELIVERY, T0, Letter, Scenario, dead_letter_headers, order_id_on, order_value, \
    replayed_names, scenario  # noqa: F401 - scenario is a fixture
from test_ops_console import console, csrf_of, logged_in  # noqa: F401 - console is a fixture
from reading import delivered, read_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def web(scenario: Scenario, monkeypatch, request):  # noqa: F811
    return request.getfixturevalue("console")


def names_on(page: str, s: Scenario) -> list[str]:
    return sorted(n for n in s.letters if s.ref(n) in page)


def audit_records(s: Scenario) -> list[dict]:
    with OpsKafka(settings_for(s.bootstrap)) as kafka:
        return [r for r in AuditLog(kafka).read() if s.dlt in r.get("selection", {}).get("topics", [])]


def confirm_fields(page: str) -> dict[str, str]:
    form = page.split('action="/dead-letters/run"', 1)[1].split("</form>", 1)[0]
    return {k: std_html.unescape(v) for k, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">',
                                                           form)}


def test_anonymous_browsers_go_to_the_login(web):
    import httpx

    with httpx.Client(base_url=web.url, timeout=30) as anonymous:
        for path in ("/dead-letters", "/dead-letters/x.dlt:0:1", "/audit", "/groups"):
            answer = anonymous.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == f"/login?next={path}", path
        for path in ("/dead-letters/preview", "/dead-letters/run"):
            assert anonymous.post(path, data={"csrf": "x"}).status_code == 303


def test_the_list_applies_the_filters_of_dlt_list(web, scenario: Scenario):  # noqa: F811
    s, g = scenario, scenario.group.name
    with logged_in(web, "vic") as client:
        counts = client.get("/dead-letters").text
        assert "Unhandled dead letters" in counts and "MailDeliveryError" in counts and "6 in total" in counts
        assert names_on(client.get("/dead-letters", params={"group": g}).text, s) == list("ABCDEF")
        page = client.get("/dead-letters", params={"group": g, "exception": "MailRejected"}).text
        assert names_on(page, s) == ["B", "E"] and "2 dead letter(s)" in page
        assert f'href="/dead-letters/{s.ref("B")}"' in page
        assert names_on(client.get("/dead-letters", params={"group": g, "key": s.letters["C"].order_id}).text,
                        s) == ["C"]
        assert names_on(client.get("/dead-letters", params={"event_type": "OrderCreated", "group": g}).text,
                        s) == ["A", "B", "C", "E", "F"]
        since, until = (T0 + timedelta(minutes=30)).isoformat(), (T0 + timedelta(hours=2, minutes=30)).isoformat()
        assert names_on(client.get("/dead-letters", params={"group": g, "since": since, "until": until}).text,
                        s) == ["C", "D", "E"]
        assert len(names_on(client.get("/dead-letters", params={"group": g, "limit": "2"}).text, s)) == 2
        assert "Only operators replay or purge" in page

        bad = client.get("/dead-letters", params={"since": "yesterday"})
        assert bad.status_code == 400 and "bad time &#x27;yesterday&#x27;" not in bad.text
        assert '<p class="error">bad time \'yesterday\'' in bad.text
        assert client.get("/dead-letters", params={"group": "nope"}).status_code == 400


def test_a_message_shows_its_headers_and_traceback_escaped(web, scenario: Scenario):  # noqa: F811
    s = scenario
    letter = Letter("X", order_id_on(0), "evt-x", order_value("o-x"), 0)
    headers = [(k, v) for k, v in dead_letter_headers(s, letter, DELIVERY, None) if k != fh.H_EXC_TRACEBACK]
    headers.append((fh.H_EXC_TRACEBACK, b'Traceback:\n  <script>alert("x")</script>\nMailDeliveryError: <b>boom'))
    producer = make_producer(settings_for(s.bootstrap))
    offsets = []
    producer.produce(s.dlt, key=letter.order_id.encode(), value=letter.value, partition=0, headers=headers,
                     on_delivery=lambda err, msg: offsets.append(msg.offset()))
    delivered(producer)
    ref = f"{s.dlt}:0:{offsets[0]}"
    with logged_in(web, "vic") as client:
        page = client.get(f"/dead-letters/{ref}")
        assert page.status_code == 200, page.text
        assert "<script>alert" not in page.text and "&lt;script&gt;alert(\"x\")&lt;/script&gt;" in page.text
        assert "&lt;b&gt;boom" in page.text and "<pre>Traceback:" in page.text
        for name in (fh.H_EXC_TYPE, fh.H_REASON, fh.H_ORIGINAL_TOPIC, fh.H_ATTEMPT, "event_id"):
            assert f"<td>{name}</td>" in page.text, name
        assert "retries exhausted after 2 attempts" in page.text and "not handled" in page.text
        assert '"order_id": "o-x"' in std_html.unescape(page.text)  # the decoded value

        d = client.get(f"/dead-letters/{s.ref('D')}").text
        assert "cannot decode" in d and "services.runtime.codec.DecodeError" in d
        assert client.get("/dead-letters/not-a-ref").status_code == 400
        assert "no message at" in client.get(f"/dead-letters/{s.dlt}:0:999").text


def test_a_viewer_may_neither_preview_nor_run(web, scenario: Scenario):  # noqa: F811
    s = scenario
    with logged_in(web, "vic") as client:
        token = csrf_of(client.get("/dead-letters").text)
        form = {"csrf": token, "group": s.group.name, "action": "replay", "to": "retry"}
        assert client.post("/dead-letters/preview", data=form).status_code == 403
        answer = client.post("/dead-letters/run", data={**form, "confirm": "yes"})
        assert answer.status_code == 403 and "only operators may change anything" in answer.text
    assert read_all(s.bootstrap, s.retry) == [] and audit_records(s) == []


def test_an_operator_previews_confirms_and_replays_as_recorded(web, scenario: Scenario):  # noqa: F811
    s = scenario
    with logged_in(web, "ada") as client:
        listing = client.get("/dead-letters", params={"group": s.group.name, "exception": "MailDeliveryError"}).text
        assert 'action="/dead-letters/preview"' in listing
        form = {"csrf": csrf_of(listing), "group": s.group.name, "exception": "MailDeliveryError",
                "action": "replay", "to": "retry", "rate": "20/s", "max_replays": "3"}
        preview = client.post("/dead-letters/preview", data=form)
        assert preview.status_code == 200, preview.text
        assert "3 dead letter(s) selected in " + s.dlt in preview.text
        assert f"replay 3 → {s.retry}" in preview.text
        assert "dry run: nothing was sent, nothing recorded" in preview.text
        assert names_on(preview.text, s) == ["A", "C", "F"]
        assert read_all(s.bootstrap, s.retry) == [] and audit_records(s) == []  # a preview changes nothing

        fields = confirm_fields(preview.text)
        assert fields["exception"] == "MailDeliveryError" and fields["rate"] == "20/s" and fields["plan"]
        not_confirmed = client.post("/dead-letters/run", data=fields)
        assert not_confirmed.status_code == 400 and "not confirmed; nothing was changed" in not_confirmed.text
        assert read_all(s.bootstrap, s.retry) == []

        done = client.post("/dead-letters/run", data={**fields, "confirm": "yes"})
        assert done.status_code == 200, done.text
        assert "replayed 3 of 3" in done.text and "recorded in the audit log as ada" in done.text
        assert replayed_names(s, s.retry) == ["A", "C", "F"] and read_all(s.bootstrap, s.source) == []

        [run] = [r for r in audit_records(s) if r["outcome"] == "completed"]
        assert (run["user"], run["source"], run["action"], run["count"]) == ("ada", "console", "replay", 3)
        assert run["selection"]["filter"] == {"exception_type": "MailDeliveryError"}
        assert run["selection"]["rate_per_s"] == 20.0 and run["host"]

        again = client.post("/dead-letters/run", data={**fields, "confirm": "yes"})  # a stale confirmation
        assert again.status_code == 409 and "the selection changed since the preview" in again.text
        assert replayed_names(s, s.retry) == ["A", "C", "F"]

        audit = client.get("/audit").text
        assert run["run_id"] in audit and "ada@" in audit and "console" in audit and "completed" in audit
        assert names_on(client.get("/dead-letters", params={"group": s.group.name}).text, s) == ["B", "D", "E"]


def test_an_operators_purge_marks_the_selection_handled(web, scenario: Scenario):  # noqa: F811
    s = scenario
    with logged_in(web, "ada") as client:
        token = csrf_of(client.get("/dead-letters").text)
        preview = client.post("/dead-letters/preview", data={
            "csrf": token, "group": s.group.name, "key": s.letters["B"].order_id, "action": "purge"})
        assert preview.status_code == 200 and "1 dead letter(s) selected" in preview.text
        assert "They will not be replayed" in preview.text and audit_records(s) == []
        done = client.post("/dead-letters/run", data={**confirm_fields(preview.text), "confirm": "yes"})
        assert done.status_code == 200 and "purged 1 of 1" in done.text, done.text
        assert names_on(client.get("/dead-letters", params={"group": s.group.name}).text, s) == list("ACDEF")
        everything = client.get("/dead-letters", params={"group": s.group.name, "key": s.letters["B"].order_id,
                                                         "include_handled": "1"}).text
        assert s.ref("B") in everything and "<td>yes</td>" in everything
        [run] = [r for r in audit_records(s) if r["outcome"] == "completed"]
        assert (run["user"], run["action"], run["first"]) == ("ada", "purge", s.ref("B"))
        assert read_all(s.bootstrap, s.retry) == []

        bad = client.post("/dead-letters/preview", data={"csrf": token, "group": s.group.name, "action": "replay",
                                                         "rate": "fast"})
        assert bad.status_code == 400 and "bad rate &#x27;fast&#x27;" not in bad.text and "bad rate 'fast'" in bad.text
