"""A third-party plugin, as a site would write one: it notes what it saw, rejects on a word
or a tag, records what the observers were handed, and breaks on request (its config)."""

import json
import time

from appliance.hookspecs import AdminRoute, Check, Rejection, Verdict, hookimpl

APPLIANCE_HOOKSPEC = "1.0"
STREAMING = True  # its check_response reads streams as they go

config = {}
seen = {"prepare_request": 0, "check_response": 0, "stream_checks": 0}


def _maybe_break(hook):
    if config.get("fail_in") == hook:
        raise RuntimeError("sample broke; the prompt mentioned alice@example.com")
    if config.get("sleep_in") == hook:
        time.sleep(float(config.get("sleep_seconds", 5)))


def _log(kind, value):
    path = config.get("log_path")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"hook": kind, "value": value}) + "\n")


@hookimpl
def configure(config):
    globals()["config"] = dict(config)
    globals()["STREAMING"] = {"along": True, "blocking": False, "cannot": None}[config.get("streaming", "along")]


@hookimpl
def prepare_request(request, principal):
    _maybe_break("prepare_request")
    seen["prepare_request"] += 1
    request.notes["sample"] = {"team": principal.team, "tags": list(request.tags)}
    if "SAMPLE-BLOCK" in request.text():
        return Rejection("sample-block", "Requests with that marker are refused.")
    if request.messages is not None and "SAMPLE-REWRITE" in request.text():
        request.messages.append({"role": "user", "content": "Reply with the single word: rewritten."})
    return None


@hookimpl
def check_response(request, response):
    _maybe_break("check_response")
    seen["check_response"] += 1
    if not response.done:
        seen["stream_checks"] += 1
    if "sample-reject" in request.tags and (response.done or len(response.text) > 3):
        return Verdict("reject", rule="sample-answer-rule")
    if "sample-retry" in request.tags and response.done:
        return Verdict("retry", rule="sample-wants-another", feedback="Say it differently.")
    return None


@hookimpl
def on_usage(record):
    _maybe_break("on_usage")
    _log("on_usage", {"request_id": record["request_id"], "total": record["prompt_tokens"] + record["completion_tokens"]})


@hookimpl
def on_audit_event(event):
    _maybe_break("on_audit_event")
    _log("on_audit_event", {"idx": event["idx"], "kind": event["kind"], "request_id": event["body"].get("request_id")})


@hookimpl
def register_checks(register):
    def run():
        _maybe_break("check")
        status = config.get("check_status", "ok")
        return {"status": status, "summary": f"the sample says {status}", "widgets": 3}

    register(Check("sample-check", run, interval_seconds=int(config.get("check_interval", 3600))))


@hookimpl
def register_alert_channels(register):
    register("sample-channel", lambda alert: _log("alert", alert))


@hookimpl
def register_admin_routes(register):
    register(AdminRoute("seen", lambda query, body: dict(seen), description="How often each hook ran."))
    register(AdminRoute("echo", lambda query, body: {"query": dict(query), "body": body}, method="POST"))


@hookimpl
def startup(app):
    _log("startup", {"hookspec": app["hookspec"]})


@hookimpl
def shutdown(app):
    _log("shutdown", {})
