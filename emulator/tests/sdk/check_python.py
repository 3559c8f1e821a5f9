#!/usr/bin/env python3
"""Checks that the emulator's answers parse with the official Python SDK.

    python3 emulator/tests/sdk/check_python.py SCENARIO BASE_URL [SCENARIO BASE_URL ...]

`emulator/tests/sdk_compat.rs` starts one emulator per scenario on 127.0.0.1 and runs
this script once against all of them (importing the SDK takes a second). By
hand, the `ok` scenario runs against `cargo run -p tower-llm-limits-emulator --
--no-latency --rpm 1000 --itpm 1000000 --otpm 1000000`.
Scenarios, and the emulator settings each one expects:

- ok            no faults, 1,000 RPM: JSON and streamed messages,
                count_tokens, rate-limit headers, 400 and 404;
- rate_limited  1 request per minute: the second request is a 429;
- overloaded    every request draws the 529 fault;
- stream_error  every streamed request draws the mid-stream `event: error`;
- spend_cap     `set_spend_limit_reached(true)`: the spend-cap 429.

Prints one line per check and exits 1 on the first failure (with the
reason), 2 on a usage error, 3 when the `anthropic` package is missing.
Talks to BASE_URL only, which must be a loopback address: proxies from the
environment are dropped, retries are off, the API key is a dummy.
"""

import ipaddress
import os
import sys
import traceback
from urllib.parse import urlsplit

# The version that .ci/run installs (and that these checks were written against).
PINNED = "2.10.0"
MODEL = "claude-sonnet-4-6"
EXIT_FAILED, EXIT_USAGE, EXIT_NO_SDK = 1, 2, 3
SCENARIOS = ("ok", "rate_limited", "overloaded", "stream_error", "spend_cap")

# Drop proxies before the SDK (and its HTTP client) reads the environment.
for _key in list(os.environ):
    if _key.lower() in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy"):
        del os.environ[_key]
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"

try:
    import anthropic
except ImportError as e:
    print(f"anthropic SDK not installed ({e}); install it with "
          f"`python3 -m pip install anthropic=={PINNED}`", file=sys.stderr)
    sys.exit(EXIT_NO_SDK)


class CheckFailed(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise CheckFailed(message)


def expect_eq(actual, expected, what):
    if actual != expected:
        raise CheckFailed(f"{what}: expected {expected!r}, got {actual!r}")


class Checks:
    def __init__(self, scenario):
        self.scenario = scenario
        self.count = 0

    def run(self, name, fn):
        try:
            fn()
        except Exception as e:  # report any failure, SDK errors included, then stop
            detail = "" if isinstance(e, CheckFailed) else "\n" + traceback.format_exc()
            print(f"FAIL {self.scenario}: {name}: {type(e).__name__}: {e}{detail}", flush=True)
            sys.exit(EXIT_FAILED)
        self.count += 1
        print(f"ok   {self.scenario}: {name}", flush=True)


def ask(text, max_tokens=64):
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }


def check_message(msg, max_tokens, input_tokens=None):
    """A `Message` from JSON or a stream's final message: shape and usage."""
    expect(isinstance(msg, anthropic.types.Message), f"not a Message: {type(msg)}")
    expect_eq(msg.type, "message", "type")
    expect_eq(msg.role, "assistant", "role")
    expect_eq(msg.model, MODEL, "model")
    expect(msg.id.startswith("msg_"), f"id {msg.id!r} does not start with msg_")
    expect_eq(len(msg.content), 1, "number of content blocks")
    block = msg.content[0]
    expect_eq(block.type, "text", "content[0].type")
    expect(block.text.strip() != "", "empty text")
    usage = msg.usage
    expect(1 <= usage.output_tokens <= max_tokens,
           f"usage.output_tokens {usage.output_tokens} not in 1..={max_tokens}")
    # The emulator's words are one token each.
    expect_eq(len(block.text.split()), usage.output_tokens, "words in the text vs usage.output_tokens")
    expect(usage.input_tokens > 0, f"usage.input_tokens {usage.input_tokens}")
    if input_tokens is not None:
        expect_eq(usage.input_tokens, input_tokens, "usage.input_tokens vs count_tokens")
    expect_eq(usage.cache_read_input_tokens, 0, "usage.cache_read_input_tokens")
    expect_eq(usage.cache_creation_input_tokens, 0, "usage.cache_creation_input_tokens")
    stop = "max_tokens" if usage.output_tokens == max_tokens else "end_turn"
    expect_eq(msg.stop_reason, stop, "stop_reason")
    expect(msg.stop_sequence is None, f"stop_sequence {msg.stop_sequence!r}")


def check_rate_limit_headers(headers, requests_limit):
    expect_eq(headers.get("anthropic-ratelimit-requests-limit"), str(requests_limit),
              "anthropic-ratelimit-requests-limit")
    for dim in ("requests", "tokens", "input-tokens", "output-tokens"):
        for part in ("limit", "remaining", "reset"):
            name = f"anthropic-ratelimit-{dim}-{part}"
            value = headers.get(name)
            expect(value is not None, f"header {name} missing")
            if part == "reset":
                expect(value.endswith("Z") and "T" in value, f"{name}: {value!r} is not RFC 3339 UTC")
            else:
                expect(value.isdigit(), f"{name}: {value!r} is not an integer")
    expect((headers.get("request-id") or "").startswith("req_"), "request-id header")


def scenario_ok(client, checks):
    body = ask("Hello, SDK! Please answer briefly.")
    state = {}

    def count_tokens():
        counted = client.messages.count_tokens(model=MODEL, messages=body["messages"])
        expect(isinstance(counted, anthropic.types.MessageTokensCount), f"{type(counted)}")
        expect(counted.input_tokens > 0, f"input_tokens {counted.input_tokens}")
        state["input_tokens"] = counted.input_tokens

    def create_json():
        msg = client.messages.create(**body)
        check_message(msg, body["max_tokens"], state["input_tokens"])
        expect((msg._request_id or "").startswith("req_"), f"_request_id {msg._request_id!r}")
        expect_eq(msg.usage.service_tier, "standard", "usage.service_tier")
        state["json"] = msg

    def same_body_same_answer():
        msg = client.messages.create(**body)
        expect_eq(msg.usage.output_tokens, state["json"].usage.output_tokens,
                  "output_tokens of the same request sent twice")

    def raw_headers():
        raw = client.messages.with_raw_response.create(**ask("Headers, please.", 16))
        check_rate_limit_headers(raw.headers, 1_000)
        remaining = int(raw.headers["anthropic-ratelimit-requests-remaining"])
        expect(remaining < 1_000, f"requests-remaining {remaining} after several requests")
        check_message(raw.parse(), 16)

    def stream_helper():
        req = ask("Stream it with the helper.", 48)
        with client.messages.stream(**req) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        expect_eq(kinds[0], "message_start", "first event")
        expect_eq(kinds[-1], "message_stop", "last event")
        for kind in ("content_block_start", "content_block_delta", "content_block_stop", "message_delta"):
            expect(kind in kinds, f"no {kind} event in {kinds}")
        check_message(final, req["max_tokens"])

    def stream_text():
        req = ask("Stream only the text.", 40)
        with client.messages.stream(**req) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        expect_eq(text, final.content[0].text, "text_stream joined vs final text")
        expect_eq(len(text.split()), final.usage.output_tokens, "streamed words vs final usage")

    def create_stream_true():
        req = ask("Raw events, please.", 32)
        events = list(client.messages.create(**req, stream=True))
        kinds = [e.type for e in events]
        expect_eq(kinds[0], "message_start", "first event")
        expect_eq(kinds[-1], "message_stop", "last event")
        start = events[0].message
        expect(start.usage.input_tokens > 0, "message_start usage.input_tokens")
        expect_eq(start.content, [], "message_start content")
        expect(start.stop_reason is None, "message_start stop_reason")
        text = "".join(e.delta.text for e in events
                       if e.type == "content_block_delta" and e.delta.type == "text_delta")
        deltas = [e for e in events if e.type == "message_delta"]
        expect_eq(len(deltas), 1, "message_delta events")
        delta = deltas[0]
        expect_eq(delta.usage.output_tokens, len(text.split()), "message_delta usage.output_tokens vs words")
        expect_eq(delta.usage.input_tokens, start.usage.input_tokens, "message_delta usage.input_tokens")
        stop = "max_tokens" if delta.usage.output_tokens == req["max_tokens"] else "end_turn"
        expect_eq(delta.delta.stop_reason, stop, "message_delta stop_reason")

    def not_found():
        try:
            client.get("/v1/no_such_endpoint", cast_to=object)
        except anthropic.NotFoundError as e:
            expect_eq(e.status_code, 404, "status")
            expect_eq(e.type, "not_found_error", "error.type")
            return
        raise CheckFailed("no NotFoundError")

    def bad_request():
        try:
            client.messages.create(model=MODEL, max_tokens=16, messages="not a list")
        except anthropic.BadRequestError as e:
            expect_eq(e.status_code, 400, "status")
            expect_eq(e.type, "invalid_request_error", "error.type")
            return
        raise CheckFailed("no BadRequestError")

    checks.run("messages.count_tokens returns input_tokens", count_tokens)
    checks.run("messages.create parses: content, usage, stop_reason", create_json)
    checks.run("the same request gets the same answer length", same_body_same_answer)
    checks.run("with_raw_response: anthropic-ratelimit-* and request-id headers", raw_headers)
    checks.run("messages.stream: events and get_final_message usage", stream_helper)
    checks.run("messages.stream: text_stream matches the final message", stream_text)
    checks.run("messages.create(stream=True): raw events and cumulative usage", create_stream_true)
    checks.run("unknown path raises NotFoundError", not_found)
    checks.run("invalid body raises BadRequestError", bad_request)


def scenario_rate_limited(client, checks):
    def first_passes():
        check_message(client.messages.create(**ask("First of the minute.", 8)), 8)

    def second_is_429():
        try:
            client.messages.create(**ask("Second of the minute.", 8))
        except anthropic.RateLimitError as e:
            expect_eq(e.status_code, 429, "status")
            expect_eq(e.type, "rate_limit_error", "error.type")
            expect(e.error_code is None, f"error_code {e.error_code!r} on a per-minute 429")
            expect("requests per minute" in (e.api_message or ""), f"message {e.api_message!r}")
            headers = e.response.headers
            retry_after = headers.get("retry-after")
            expect(retry_after is not None and retry_after.isdigit(), f"retry-after {retry_after!r}")
            expect(1 <= int(retry_after) <= 60, f"retry-after {retry_after} not in 1..=60")
            expect_eq(headers.get("x-should-retry"), "true", "x-should-retry")
            check_rate_limit_headers(headers, 1)
            expect_eq(headers.get("anthropic-ratelimit-requests-remaining"), "0", "requests-remaining")
            expect((e.request_id or "").startswith("req_"), f"request_id {e.request_id!r}")
            return
        raise CheckFailed("no RateLimitError")

    def stream_is_429():
        try:
            with client.messages.stream(**ask("A stream over the limit.", 8)) as stream:
                stream.get_final_message()
        except anthropic.RateLimitError as e:
            expect(e.response.headers.get("retry-after", "").isdigit(), "retry-after on a streamed 429")
            return
        raise CheckFailed("no RateLimitError for a stream")

    checks.run("first request of the minute passes", first_passes)
    checks.run("second raises RateLimitError with retry-after and anthropic-ratelimit-*", second_is_429)
    checks.run("a streamed request raises RateLimitError before any event", stream_is_429)


def scenario_overloaded(client, checks):
    overloaded_class = getattr(anthropic, "OverloadedError", anthropic.InternalServerError)

    def json_529():
        try:
            client.messages.create(**ask("Busy?", 8))
        except anthropic.APIStatusError as e:
            expect(isinstance(e, overloaded_class),
                   f"{type(e).__name__} is not {overloaded_class.__name__}")
            expect_eq(e.status_code, 529, "status")
            expect_eq(e.type, "overloaded_error", "error.type")
            return
        raise CheckFailed("no error")

    def stream_529():
        try:
            for _ in client.messages.create(**ask("Busy stream?", 8), stream=True):
                pass
        except anthropic.APIStatusError as e:
            expect(isinstance(e, overloaded_class),
                   f"{type(e).__name__} is not {overloaded_class.__name__}")
            expect_eq(e.status_code, 529, "status")
            return
        raise CheckFailed("no error")

    checks.run(f"529 raises {overloaded_class.__name__}", json_529)
    checks.run(f"streamed request answered 529 raises {overloaded_class.__name__}", stream_529)


def scenario_stream_error(client, checks):
    def helper_raises():
        seen = []
        try:
            with client.messages.stream(**ask("A stream that breaks.", 64)) as stream:
                for event in stream:
                    seen.append(event.type)
        except anthropic.APIStatusError as e:
            expect(seen and seen[0] == "message_start", f"events before the error: {seen}")
            expect("message_stop" not in seen, "message_stop before the error")
            expect_eq(e.type, "overloaded_error", "error.type of the error event")
            expect_eq(e.api_message, "Overloaded", "error.message of the error event")
            return
        raise CheckFailed(f"no error raised; events: {seen}")

    def raw_raises():
        seen = []
        try:
            for event in client.messages.create(**ask("Another stream that breaks.", 64), stream=True):
                seen.append(event.type)
        except anthropic.APIStatusError as e:
            expect(seen and seen[0] == "message_start", f"events before the error: {seen}")
            expect_eq(e.type, "overloaded_error", "error.type of the error event")
            return
        raise CheckFailed(f"no error raised; events: {seen}")

    def json_unaffected():
        check_message(client.messages.create(**ask("Not streamed.", 8)), 8)

    checks.run("messages.stream: event: error raises APIStatusError during iteration", helper_raises)
    checks.run("create(stream=True): event: error raises APIStatusError during iteration", raw_raises)
    checks.run("a JSON request is not hit by the stream fault", json_unaffected)


def scenario_spend_cap(client, checks):
    spend_class = getattr(anthropic, "EnforcedSpendLimitReachedError", anthropic.RateLimitError)

    def spend_429():
        try:
            client.messages.create(**ask("Over budget?", 8))
        except anthropic.RateLimitError as e:
            expect(isinstance(e, spend_class), f"{type(e).__name__} is not {spend_class.__name__}")
            expect_eq(e.status_code, 429, "status")
            expect_eq(e.type, "rate_limit_error", "error.type")
            expect_eq(e.body["error"]["details"]["error_code"], "enforced_spend_limit_reached",
                      "body error.details.error_code")
            expect_eq(e.error_code, "enforced_spend_limit_reached", "SDK error_code")
            expect("retry-after" not in e.response.headers, "retry-after on the spend-cap 429")
            expect("regain access" in (e.api_message or ""), f"message {e.api_message!r}")
            return
        raise CheckFailed("no RateLimitError")

    checks.run(f"spend cap raises {spend_class.__name__} with details.error_code, no retry-after",
               spend_429)


def loopback(base_url):
    host = urlsplit(base_url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv):
    pairs = list(zip(argv[1::2], argv[2::2]))
    if len(argv) < 3 or len(argv) % 2 == 0 or any(s not in SCENARIOS for s, _ in pairs):
        print(f"usage: {argv[0]} SCENARIO BASE_URL [SCENARIO BASE_URL ...]\n"
              f"scenarios: {', '.join(SCENARIOS)}", file=sys.stderr)
        return EXIT_USAGE
    for _, base_url in pairs:
        if not loopback(base_url):
            print(f"refusing {base_url!r}: only loopback addresses are allowed", file=sys.stderr)
            return EXIT_USAGE

    version = anthropic.__version__
    note = "" if version == PINNED else f" (pinned: {PINNED}; results may differ)"
    print(f"anthropic {version}{note}", flush=True)
    for scenario, base_url in pairs:
        print(f"scenario {scenario} at {base_url}", flush=True)
        client = anthropic.Anthropic(
            base_url=base_url,
            api_key="test",
            max_retries=0,
            timeout=20.0,
            http_client=anthropic.DefaultHttpxClient(trust_env=False),
        )
        checks = Checks(scenario)
        with client:
            SCENARIO_FUNCTIONS[scenario](client, checks)
        print(f"all {checks.count} checks of scenario {scenario} passed", flush=True)
    return 0


SCENARIO_FUNCTIONS = {
    "ok": scenario_ok,
    "rate_limited": scenario_rate_limited,
    "overloaded": scenario_overloaded,
    "stream_error": scenario_stream_error,
    "spend_cap": scenario_spend_cap,
}


if __name__ == "__main__":
    sys.exit(main(sys.argv))
