"""The official Python SDK through the gateway: a JSON message and a stream.

Usage: python3 gateway_python.py BASE_URL API_KEY
Exit code 3 when the SDK cannot be imported; prints one line per check.
"""

import sys

try:
    import anthropic
except ImportError:
    sys.exit(3)


def main() -> None:
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0)
    message = client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=16,
        messages=[{"role": "user", "content": "Hello through the gateway"}],
    )
    assert message.usage.input_tokens > 0, message
    print("json ok", message.usage.input_tokens, message.usage.output_tokens)
    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=16,
        messages=[{"role": "user", "content": "Stream through the gateway"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0, final
    print("stream ok", len(text), final.usage.output_tokens)
    try:
        anthropic.Anthropic(base_url=base_url, api_key="wrong", max_retries=0).messages.create(
            model="claude-sonnet-4-5",
            max_tokens=16,
            messages=[{"role": "user", "content": "x"}],
        )
        raise SystemExit("an unknown key was accepted")
    except anthropic.AuthenticationError:
        print("auth ok")


if __name__ == "__main__":
    main()
