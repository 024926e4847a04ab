"""The web console (/ui) in a real headless Chromium, against a real gateway over real HTTP.

One test walks what an operator does: log in, deploy two endpoints (OpenAI and Zhipu, on the
fakes), watch them reach RUNNING, compare their streamed answers side by side, copy a request as
curl, undeploy both (one with a fallback on the other: 409, then force), log out. All along, the
provider keys and the admin token must appear nowhere the page keeps or shows things.

Needs Debian's chromium (``make install-browser``) and the ``playwright`` package; nothing is
downloaded at run time. Without them the browser tests are skipped, except where the environment
variable ``CI`` is set: there this module fails (CI must run them). ``GATEWAY_UI_SCREENSHOT=docs/console.png`` also writes the README's
screenshot (the endpoints view with both endpoints running).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid

import pytest

from gateway import Settings, create_app
from tests.procs import ROOT

try:
    from playwright import sync_api
except ImportError:  # (requirements-dev.txt pins it)
    sync_api = None

# (not "chromium-browser": on Ubuntu that is a snap shim, which fails in containers)
BROWSER = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.access(p, os.X_OK)), None)
MISSING = ("no chromium on this machine: `make install-browser` installs Debian's (apt-get install chromium)"
           if BROWSER is None else "the playwright package is missing: pip install -r requirements-dev.txt"
           if sync_api is None else None)
if MISSING and os.environ.get("CI"):
    pytest.fail(f"CI is set, and the console's browser tests must run there: {MISSING}", pytrace=False)
needs_browser = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN_KEY = "llm-gateway.admin-token"  # (gateway/static/ui/app.js)
ADMIN = "ui-admin-" + uuid.uuid4().hex
WAIT_MS = 60_000


@pytest.fixture
def served(ray_head):
    """A gateway with an admin token on the session cluster, served over HTTP on a free port."""
    from tests.procs import serve_front

    dashboard = f"http://{ray_head.settings.dashboard_host}:{ray_head.settings.dashboard_port}"
    app = create_app(Settings.from_env(ray_address=ray_head.address, admin_token=ADMIN, cooldown_s=0,
                                       dashboard_url=dashboard))
    for base in serve_front(app):
        yield base, app, dashboard


def shell_argv(line: str, env: dict) -> list[str]:
    """The arguments a POSIX shell hands to curl for ``line`` (curl replaced by a printer)."""
    out = subprocess.run(["sh", "-c", 'curl() { printf "%s\\0" "$@"; }; ' + line], env={"PATH": os.environ["PATH"], **env},
                         capture_output=True, check=True, timeout=10).stdout
    return out.decode().split("\0")[:-1]


def test_the_console_is_served_with_its_headers_and_no_data(client):
    """The page and its assets need no token (they hold no data); /ui/config tells the page whether to ask for one."""
    for path, kind in (("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                       ("/ui/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and r.mimetype == kind, path
        assert r.headers["Content-Security-Policy"].startswith("default-src 'self'; script-src 'self'; style-src 'self'")
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["Referrer-Policy"] == "no-referrer"
    assert client.get("/ui/").headers["Cache-Control"] == "no-store"
    script = client.get("/ui/app.js").data
    for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write", b"eval("):
        assert sink not in script  # data goes in with textContent / createElement
    r = client.get("/ui/config")
    assert r.status_code == 200 and r.get_json()["auth"] is False  # (the session app has no admin token)
    assert set(r.get_json()) == {"dashboard_url", "auth"}
    for path in ("/ui/ui.py", "/ui/index.html.bak", "/ui/..%2f__init__.py"):
        assert client.get(path).status_code == 404, path
    # with an admin token and client keys too: the page needs neither (its data calls do)
    locked = create_app(Settings.from_env(ray_address="127.0.0.1:1", admin_token=ADMIN, api_keys="ui-client-key-0001"))
    for path in ("/ui/", "/ui/app.js", "/ui/style.css", "/ui/config"):
        assert locked.test_client().get(path).status_code == 200, path
    assert locked.test_client().get("/ui/config").get_json()["auth"] is True


def test_the_deploy_forms_fields_are_titled_as_a_person_writes_them():
    """GET /providers' schemas (what the console's forms are made of) title their fields in sentence case with
    their acronyms as written: "API key", "Base URL", not pydantic's "Api Key", "Base Url"."""
    import providers

    titles = {}
    for name in providers.names():
        schema = providers.get(name).spec_class.model_json_schema()
        titles.update({field: prop.get("title") for field, prop in schema["properties"].items()})
    assert titles["api_key"] == "API key" and titles["base_url"] == "Base URL" and titles["chat_name"] == "Chat name"
    assert titles["max_retries"] == "Max retries" and titles["gpu_memory_utilization"] == "GPU memory utilization"
    assert titles["gpus_per_worker"] == "GPUs per worker" and titles["max_model_len"] == "Max model length"
    acronyms = {"API", "URL", "HTTP", "GPU", "GPUs", "CPU", "CPUs"}
    for field, title in titles.items():  # (sentence case: the first word capitalised, acronyms as they are written)
        first, *rest = title.split()
        assert first[0].isupper() and (first in acronyms or first[1:].islower()), (field, title)
        assert all(word.islower() or word in acronyms for word in rest), (field, title)


@needs_browser
def test_the_console_deploys_compares_and_undeploys(served, fake_openai, fake_zhipu, tmp_path):
    base, app, dashboard = served
    tag = uuid.uuid4().hex[:4]
    first, second = f"openai_ui_{tag}", f"zhipu_ui_{tag}"
    openai_key = "sk-ui-secret-" + uuid.uuid4().hex
    zhipu_key = f"{uuid.uuid4().hex[:8]}.ui-secret-{uuid.uuid4().hex}"
    secrets = {"admin token": ADMIN, "openai key": openai_key, "zhipu key": zhipu_key}
    requests, page_errors, console_errors = [], [], []
    started = time.monotonic()

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=BROWSER, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(WAIT_MS)
            page.on("request", lambda r: requests.append((r.method, r.url, r.headers)))
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("dialog", lambda d: d.accept())  # "Undeploy x?"

            def no_secret_anywhere(where: str) -> None:
                places = {
                    "page.content()": page.content(),
                    "DOM text": page.evaluate("document.documentElement.textContent"),
                    "input values": page.evaluate("JSON.stringify([...document.querySelectorAll('input,textarea')]"
                                                  ".map(i => i.value))"),
                    "localStorage": page.evaluate("JSON.stringify(localStorage)"),
                    "document.cookie": page.evaluate("document.cookie"),
                    "requested URLs": "\n".join(url for _, url, _ in requests),
                    "curl panel": page.text_content("#curl-list") or "",
                }
                for what, secret in secrets.items():
                    for place, text in places.items():
                        assert secret not in text, f"{what} found in {place} ({where})"
                storage = page.evaluate("JSON.stringify(Object.entries(sessionStorage))")
                for what in ("openai key", "zhipu key"):
                    assert secrets[what] not in storage, f"{what} in sessionStorage ({where})"
                assert json.loads(storage) in ([[TOKEN_KEY, ADMIN]], []), f"sessionStorage holds more than the token: {where}"

            # -- the page, and its headers -----------------------------------------------------------
            response = page.goto(base + "/ui/")
            headers = response.headers
            csp = headers["content-security-policy"]
            for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                              "img-src 'self' data:", "frame-ancestors 'none'"):
                assert directive in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
            assert headers["cache-control"] == "no-store"
            html = page.content()
            assert "<script>" not in html and " style=" not in html and "<style" not in html  # nothing inline

            # -- log in: a wrong token is refused, the right one kept in sessionStorage only --------------
            page.wait_for_selector("#login-view:not([hidden])")
            page.screenshot(path=str(tmp_path / "login.png"))
            page.fill("#login-token", "not-the-token")
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#login-error:not([hidden])")
            assert "401" in page.text_content("#login-error")
            assert page.evaluate("sessionStorage.length") == 0
            page.fill("#login-token", ADMIN)
            page.click("#login-form button[type=submit]")
            page.wait_for_selector("#endpoints-view:not([hidden])")
            assert page.evaluate(f"sessionStorage.getItem('{TOKEN_KEY}')") == ADMIN
            assert page.input_value("#login-token") == ""
            link = page.locator("#dashboard-link")  # (a new tab that gets no opener and no referrer)
            link.wait_for(state="visible")  # (asked for once the first listing is in: a busy machine takes a while)
            assert link.get_attribute("href") == dashboard
            assert link.get_attribute("target") == "_blank" and link.get_attribute("rel") == "noopener noreferrer"

            # -- deploy two endpoints from the schema-made forms ----------------------------------------
            def deploy(provider, chat_name, model, key, base_url, fallbacks=""):
                page.select_option("#deploy-provider", provider)
                page.wait_for_selector("#f-api_key[type=password]")
                page.fill("#f-chat_name", chat_name)
                page.fill("#f-model_name", model)
                page.fill("#f-api_key", key)
                if not page.is_visible("#f-base_url"):
                    page.click("#deploy-more summary")
                page.fill("#f-base_url", base_url)
                page.fill("#f-max_retries", "0")
                page.fill("#f-fallbacks", fallbacks)
                page.click("#deploy-submit")
                page.wait_for_selector(f'tr[data-chat-name="{chat_name}"] .badge.RUNNING')
                assert page.input_value("#f-api_key") == ""  # the key is sent and forgotten

            # a bad field first: the API's message shows next to it and at the top
            page.select_option("#deploy-provider", "openai")
            page.fill("#f-chat_name", first)
            page.fill("#f-api_key", openai_key)
            page.click("#deploy-submit")
            page.wait_for_selector('.field.invalid[data-field="model_name"]')
            assert "model_name" in page.text_content('.field[data-field="model_name"] .error')
            assert "model_name" in page.text_content("#deploy-error")
            assert page.input_value("#f-api_key") == ""

            deploy("openai", first, "gpt-4o-mini", openai_key, fake_openai.base_url)
            no_secret_anywhere("after the first deploy")
            deploy("zhipu", second, "glm-4-flash", zhipu_key, fake_zhipu.base_url, fallbacks=first)
            row = page.text_content(f'tr[data-chat-name="{second}"]')
            assert "zhipu" in row and "glm-4-flash" in row and first in row  # (its fallback)
            no_secret_anywhere("after both deploys")
            page.screenshot(path=str(tmp_path / "endpoints.png"), full_page=True)

            # -- compare: both answers stream into their own columns ---------------------------------
            page.click("#tab-compare")
            page.check(f'#compare-targets input[value="{first}"]')
            page.check(f'#compare-targets input[value="{second}"]')
            prompt = f"which of you answers first {tag}?"
            page.fill("#compare-system", "Be brief.")
            page.fill("#compare-prompt", prompt)
            page.click("#compare-ask")
            for chat_name in (first, second):
                column = f'.column[data-chat-name="{chat_name}"]'
                page.wait_for_selector(f"{column}[data-done]")
                assert page.get_attribute(column, "data-done") == "finish", page.text_content(column)
                assert page.text_content(f"{column} .answer") == f"echo: {prompt}"
                stats = page.text_content(f"{column} .stats")
                assert re.search(r"\d ms", stats) and "tokens" in stats, stats
            assert page.get_attribute("#compare-columns", "data-mode") == "stream"
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)

            # -- curl: the exact requests, with the variables, never the secrets ------------------------
            page.click("#curl-panel summary")
            curl = page.text_content("#curl-list")
            assert "$GATEWAY_ADMIN_TOKEN" in curl and "$PROVIDER_API_KEY" in curl
            lines = page.eval_on_selector_all("#curl-list pre", "nodes => nodes.map(n => n.textContent)")
            deploy_line = next(line for line in lines if "/zhipu/deploy" in line)
            argv = shell_argv(deploy_line, {"GATEWAY_ADMIN_TOKEN": "T0", "PROVIDER_API_KEY": "sk-it's-$x"})
            assert argv[argv.index("-X") + 1] == "POST" and f"{base}/zhipu/deploy" in argv
            assert "Authorization: Bearer T0" in argv and "Content-Type: application/json" in argv
            sent = json.loads(argv[argv.index("-d") + 1])
            assert sent["api_key"] == "sk-it's-$x" and sent["chat_name"] == second and sent["fallbacks"] == [first]
            ask_line = next(line for line in lines if "/chat/broadcast" in line)
            assert ask_line.startswith("curl -sS -N ")  # (the copied command streams too)
            asked = json.loads(shell_argv(ask_line, {})[-1])
            assert asked["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
            page.screenshot(path=str(tmp_path / "curl.png"), full_page=True)
            no_secret_anywhere("after compare")

            # -- undeploy: the one the other falls back to is a 409, then force -----------------------
            page.click("#tab-endpoints")
            if os.environ.get("GATEWAY_UI_SCREENSHOT"):  # the README's picture (never in normal runs)
                page.click("#curl-panel summary")  # (folded again)
                import httpx  # (some traffic to show: one chat each, as a legacy caller sends it)

                for chat_name in (first, second):
                    httpx.post(base + "/chat", headers={"Authorization": f"Bearer {ADMIN}"},
                               json={"chat_name": chat_name, "content": "hello"}, timeout=30).raise_for_status()
                try:  # once the next refresh shows it
                    page.wait_for_selector(f'tr[data-chat-name="{second}"] td.traffic:not(:has-text("0 req"))', timeout=8000)
                except sync_api.TimeoutError:
                    pass
                page.mouse.click(1, 1)
                page.screenshot(path=str(ROOT / os.environ["GATEWAY_UI_SCREENSHOT"]), full_page=True)
            page.click(f'tr[data-chat-name="{first}"] button:has-text("Undeploy")')
            page.wait_for_selector("#undeploy-box:not([hidden])")
            assert second in page.text_content("#undeploy-message")
            page.click("#undeploy-force")
            page.wait_for_selector(f'tr[data-chat-name="{first}"]', state="detached")
            page.click(f'tr[data-chat-name="{second}"] button:has-text("Undeploy")')
            page.wait_for_selector(f'tr[data-chat-name="{second}"]', state="detached")

            # every API call carried the token in its header, and nothing else did
            # (/ui/config too, once logged in: the dashboard's URL is for the admin)
            config = base + "/ui/config"
            api_calls = [h.get("authorization") for _, u, h in requests if not u.startswith(base + "/ui")]
            assert api_calls.count("Bearer not-the-token") == 1  # (the refused login)
            assert all(a == f"Bearer {ADMIN}" for a in api_calls if a != "Bearer not-the-token"), set(api_calls)
            assert {h.get("authorization") for _, u, h in requests if u == config} <= {None, f"Bearer {ADMIN}"}
            assert all(a is None for _, u, h in requests if u.startswith(base + "/ui") and u != config
                       for a in [h.get("authorization")])
            assert not any("cookie" in h for _, _, h in requests)
            no_secret_anywhere("after undeploy")

            # -- log out: the token is gone, and a reload asks for it again ---------------------------
            page.click("#logout")
            page.wait_for_selector("#login-view:not([hidden])")
            assert page.evaluate("sessionStorage.length") == 0
            for emptied in ("#endpoints-body", "#budgets-body", "#compare-columns", "#compare-targets", "#deploy-fields"):
                assert page.evaluate(f"document.querySelector('{emptied}').children.length") == 0, emptied
            assert page.is_hidden("#dashboard-link")
            page.reload()
            page.wait_for_selector("#login-view:not([hidden])")
            assert page.is_hidden("#endpoints-view")
            assert not page_errors, page_errors
            # (the refused login, the bad field and the 409 are logged by the browser as failed loads)
            assert not [e for e in console_errors if not e.startswith("Failed to load resource")], console_errors
        finally:
            browser.close()
            client = app.test_client()
            for provider, chat_name in (("zhipu", second), ("openai", first)):
                client.post(f"/{provider}/undeploy", headers={"Authorization": f"Bearer {ADMIN}"},
                            json={"chat_name": chat_name, "force": True})
    print(f"console walk-through: {time.monotonic() - started:.1f}s; screenshots in {tmp_path}")


@needs_browser
def test_the_console_without_a_token_follows_slow_deploys_and_shows_failures(ray_head):
    """What the real flow above cannot reach cheaply, against scripted API answers (the page's own logic):
    a gateway without an admin token (no login), a 202 deploy followed to RUNNING and one to DEPLOY_FAILED,
    a cooling-down endpoint with traffic, a stream with a tool call that fails mid-answer, a curl line that
    hides a base_url's credentials."""
    from flask import Response, jsonify, request
    from werkzeug.serving import make_server

    import providers

    app = create_app(Settings.from_env(ray_address=ray_head.address))  # (these views never reach Ray)
    rows = {"keep": {"chat_name": "keep", "provider": "openai", "model": "m", "workers": 2, "workers_running": 2,
                     "status": "RUNNING", "fallbacks": [], "key_fingerprint": "sk-...zz",
                     "health": {"state": "cooling_down", "cooldown_until": time.time() + 30, "consecutive_failures": 3,
                                "last_error": "upstream_error: boom"},
                     "traffic": {"requests": 5, "errors": 1, "caller_errors": 2, "prompt_tokens": 10,
                                 "completion_tokens": 20},
                     "keys": [{"fingerprint": "sk-...aa11", "weight": 1, "state": "ok"},
                              {"fingerprint": "sk-...bb22", "weight": 2, "state": "cooling", "since": time.time(),
                               "until": time.time() + 20},
                              {"fingerprint": "sk-...cc33", "weight": 1, "state": "disabled", "since": time.time(),
                               "reason": "upstream_quota (insufficient_quota)", "next_check": time.time() + 40}]}}
    usage = {"since": "2026-12-01", "until": "2026-12-03", "truncated": False,
             "usage": [{"day": "2026-12-02", "client_key": "app1", "chat_name": "keep", "requests": 3, "tokens_in": 30,
                        "tokens_out": 12, "spend": 0.5},
                       {"day": "2026-12-03", "client_key": "app1", "chat_name": "keep", "requests": 2, "tokens_in": 20,
                        "tokens_out": 8, "spend": 0.25}],
             "budgets": [{"client_key": "app1",
                          "tokens_per_day": {"limit": 100, "used": 100, "reserved": 0, "resets_at": "2026-12-04T00:00:00Z"},
                          "spend_per_month": {"limit": 5, "used": 0.75, "reserved": 0.1,
                                              "resets_at": "2027-01-01T00:00:00Z"}}]}
    polls: dict = {}
    deployed: list = []

    def deployment(chat_name):
        polls[chat_name] = polls.get(chat_name, 0) + 1
        row, n = rows[chat_name], polls[chat_name]
        if n < 2:
            row.update(workers_running=n - 1, progress={"workers_running": n - 1, "workers": 2, "elapsed_s": float(n)})
        elif chat_name.startswith("bad"):
            row.update(status="DEPLOY_FAILED", workers_running=0, failure={"reason": "out_of_gpu_memory",
                                                                            "message": "CUDA out of memory"})
        else:
            row.update(status="RUNNING", workers_running=2)
        return jsonify(row)

    def deploy():
        body = request.get_json()
        deployed.append(body)
        progress = {"workers_running": 0, "workers": 2, "elapsed_s": 0.1}
        rows[body["chat_name"]] = {"chat_name": body["chat_name"], "provider": "vllm", "model": "q", "workers": 2,
                                   "workers_running": 0, "status": "DEPLOYING", "progress": progress}
        return jsonify(ret="ok", chat_name=body["chat_name"], status="DEPLOYING", progress=progress), 202

    def deploy_openai():
        body = request.get_json()
        deployed.append(body)
        return jsonify(ret="ok", chat_name=body["chat_name"], status="RUNNING")

    def broadcast():
        def events():
            yield "data: " + json.dumps({"chat_name": "keep", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "look_up", "arguments": "{}"}}]}) + "\n\n"
            yield "data: " + json.dumps({"chat_name": "keep", "delta": "partial "}) + "\n\n"
            yield "data: " + json.dumps({"chat_name": "keep", "delta": "answer"}) + "\n\n"
            yield "event: error\r\ndata: " + json.dumps({"chat_name": "keep", "error": {
                "type": "upstream_error", "message": "the provider cut the stream"}, "latency_ms": 3.2}) + "\r\n\r\n"
            yield "data: [DONE]\n\n"
        return Response(events(), mimetype="text/event-stream")

    app.view_functions.update({
        "core.deployments": lambda: jsonify(deployments=list(rows.values())),
        "core.deployment": deployment, "vllm.deploy": deploy, "openai.deploy": deploy_openai,
        "core.broadcast": broadcast, "usage.usage_report": lambda: jsonify(usage),
        "core.provider_list": lambda: jsonify(providers=[
            {"name": n, "kind": providers.get(n).kind, "schema": providers.get(n).spec_class.model_json_schema()}
            for n in ("openai", "vllm")]),
    })
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    page_errors = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=BROWSER, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.goto(base + "/ui/")
            page.wait_for_selector("#endpoints-view:not([hidden])")  # no login without a token
            assert page.is_hidden("#login-view") and page.is_hidden("#logout")
            # health and traffic in words a person reads (the API's own values stay as they are)
            keep = page.text_content('tr[data-chat-name="keep"]')
            assert "3 failures in a row" in keep and "5 requests, 1 failed" in keep, keep
            assert "2 refused (the caller's errors)" in keep and "tokens 10 in / 20 out" in keep, keep
            wait = re.search(r"cooling down, retry in (\d+) s", keep)
            assert wait and 1 <= int(wait.group(1)) <= 30, keep
            assert "cooling_down" not in keep and not re.search(r"\d+ err\b", keep), keep
            # the key pool: each key by fingerprint with its state in words; the budgets card: used of limit, resets
            assert "2 of 3 keys usable" in keep and "sk-...aa11 ok" in keep, keep
            assert re.search(r"sk-\.\.\.bb22 cooling down, back in \d+ s, weight 2", keep), keep
            assert "sk-...cc33 disabled since" in keep and "upstream_quota (insufficient_quota), checked again at" in keep
            page.wait_for_selector("#budgets-card:not([hidden])")
            app1 = page.text_content('#budgets-body tr[data-client-key="app1"]')
            assert "100 of 100" in app1 and "0.75 of 5.00" in app1 and "0.10 held by calls in flight" in app1, app1
            assert "5 requests, tokens 50 in / 20 out, spend 0.75" in app1, app1
            assert page.eval_on_selector('#budgets-body tr[data-client-key="app1"] td:nth-child(2)', "td => td.className") == "over"
            words = page.evaluate("""[
                healthWords({state: "ok", consecutive_failures: 0}, 0),
                healthWords({state: "ok", consecutive_failures: 1}, 0),
                healthWords({state: "probing", consecutive_failures: 3, cooldown_until: 100}, 200),
                healthWords({state: "probe_due", consecutive_failures: 2, cooldown_until: 100}, 200),
                healthWords({state: "cooling_down", consecutive_failures: 5, cooldown_until: 111.2}, 100),
                healthWords({state: "cooling_down", consecutive_failures: 5, cooldown_until: 100}, 101),
                trafficWords({requests: 1, errors: 0, caller_errors: 1, prompt_tokens: 0, completion_tokens: 0}),
                trafficWords({requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0}),
            ]""")
            assert words == [["healthy"], ["healthy", "1 failure in a row"], ["trying one call", "3 failures in a row"],
                             ["ready to try again", "2 failures in a row"],
                             ["cooling down, retry in 12 s", "5 failures in a row"],
                             ["ready to try again", "5 failures in a row"],
                             ["1 request", "1 refused (the caller's error)", "tokens 0 in / 0 out"],
                             ["0 requests", "tokens 0 in / 0 out"]], words

            # the form's fields titled as a person writes them ("API key", not pydantic's "Api Key")
            page.select_option("#deploy-provider", "openai")
            labels = page.eval_on_selector_all("#deploy-form .field label", "ls => ls.map(l => l.textContent)")
            for title, field in (("API key", "api_key"), ("Base URL", "base_url"), ("Max retries", "max_retries"),
                                 ("Chat name", "chat_name")):
                assert any(label.startswith(title) and label.endswith(" " + field) for label in labels), (title, labels)
            assert not [label for label in labels if re.search(r"\b(Api|Url|Http)\b", label)], labels
            page.select_option("#deploy-provider", "vllm")
            labels = page.eval_on_selector_all("#deploy-form .field label", "ls => ls.map(l => l.textContent)")
            assert any(label.startswith("GPU memory utilization") for label in labels), labels
            page.fill("#f-chat_name", "bad_local")
            page.fill("#f-model_path", "/models/q")
            page.click("#deploy-more summary")
            page.select_option("#f-dtype", "float16")
            page.check("#f-trust_remote_code")
            page.fill("#f-engine_args", '{"enforce_eager": true}')
            page.fill("#f-fallbacks", "keep, other")
            page.click("#deploy-submit")
            page.wait_for_selector("#deploy-progress-text:has-text('workers running')")
            page.wait_for_selector("#deploy-error:has-text('DEPLOY_FAILED')")
            assert "out_of_gpu_memory" in page.text_content("#deploy-error")
            assert deployed[0] == {"chat_name": "bad_local", "model_path": "/models/q", "fallbacks": ["keep", "other"],
                                   "dtype": "float16", "trust_remote_code": True, "engine_args": {"enforce_eager": True}}
            page.fill("#f-chat_name", "good_local")
            page.click("#deploy-submit")
            page.wait_for_selector("#deploy-status:has-text('good_local: RUNNING')")
            assert "2/2 workers running" in page.text_content("#deploy-progress-text")
            assert polls["good_local"] == 2  # polled about every second until RUNNING
            page.fill("#f-engine_args", "{not json")
            page.click("#deploy-submit")
            assert "engine_args takes a JSON object" in page.text_content('.field[data-field="engine_args"] .error')
            assert len(deployed) == 2  # (refused before sending)

            # a base_url with credentials (user:pw@, ?token=) is a variable in the curl line, as the key is
            relay = "http://user:pw@relay.example/v1?token=t"
            page.select_option("#deploy-provider", "openai")
            page.fill("#f-chat_name", "relay")
            page.fill("#f-model_name", "m")
            page.fill("#f-api_key", "sk-scripted-key")
            if not page.is_visible("#f-base_url"):
                page.click("#deploy-more summary")
            page.fill("#f-base_url", relay)
            page.fill("#f-proxy", "http://proxy.example:3128")  # (no credentials: shown as it is)
            page.click("#deploy-submit")
            page.wait_for_selector("#deploy-status:has-text('relay: RUNNING')")
            assert deployed[2]["base_url"] == relay
            lines = page.eval_on_selector_all("#curl-list pre", "nodes => nodes.map(n => n.textContent)")
            line = next(line for line in lines if "/openai/deploy" in line)
            assert "$PROVIDER_BASE_URL" in line and "$PROVIDER_API_KEY" in line
            assert "pw" not in line and "token=t" not in line and "sk-scripted-key" not in line, line
            sent = json.loads(shell_argv(line, {"PROVIDER_BASE_URL": "http://u:p@r.example/v1?token=x",
                                                "PROVIDER_API_KEY": "k"})[-1])
            assert sent["base_url"] == "http://u:p@r.example/v1?token=x" and sent["api_key"] == "k"
            assert sent["proxy"] == "http://proxy.example:3128"

            page.click("#tab-compare")
            page.check('#compare-targets input[value="keep"]')
            page.fill("#compare-prompt", "hi")
            page.click("#compare-ask")
            page.wait_for_selector('.column[data-chat-name="keep"][data-done="error"]')
            column = page.text_content('.column[data-chat-name="keep"]')
            assert "the provider cut the stream" in column and "3.2 ms" in column
            assert page.text_content('.column[data-chat-name="keep"] .answer').startswith("partial answer")
            assert "look_up" in page.text_content('.column[data-chat-name="keep"] .tools')  # (the text left it alone)
            ask_line = next(line for line in page.eval_on_selector_all("#curl-list pre", "ns => ns.map(n => n.textContent)")
                            if "/chat/broadcast" in line)
            assert " -N " in ask_line
            browser.close()
    finally:
        server.shutdown()
    assert not page_errors, page_errors
