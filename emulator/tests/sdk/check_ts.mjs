// Checks that the emulator's answers parse with the official TypeScript SDK.
//
//     node emulator/tests/sdk/check_ts.mjs SCENARIO BASE_URL [SCENARIO BASE_URL ...]
//
// The twin of check_python.py, with the same scenarios, emulator settings,
// output and exit codes (1: a check failed, 2: usage, 3: the SDK is missing).
// `emulator/tests/sdk_compat.rs` runs it once against one emulator per scenario. The
// SDK is looked up from this folder: `.ci/run` installs the pinned version
// into emulator/tests/sdk/node_modules (ignored by git); by hand:
//
//     npm install --prefix emulator/tests/sdk --no-save --no-package-lock "@anthropic-ai/sdk@1.14.0"
//
// Talks to BASE_URL only, which must be a loopback address: retries are off,
// the API key is a dummy (so the SDK looks up no other credentials).

// The version that .ci/run installs (and that these checks were written against).
const PINNED = '1.14.0';
const MODEL = 'claude-sonnet-4-6';
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;
const EXIT_NO_SDK = 3;
const SCENARIOS = ['ok', 'rate_limited', 'overloaded', 'stream_error', 'spend_cap'];

class CheckFailed extends Error {}

function expect(condition, message) {
  if (!condition) throw new CheckFailed(message);
}

function expectEq(actual, expected, what) {
  if (actual !== expected) {
    throw new CheckFailed(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

function words(text) {
  return text.split(/\s+/).filter((w) => w !== '').length;
}

class Checks {
  constructor(scenario) {
    this.scenario = scenario;
    this.count = 0;
  }

  async run(name, fn) {
    try {
      await fn();
    } catch (e) {
      const detail = e instanceof CheckFailed ? '' : `\n${e?.stack ?? e}`;
      console.log(`FAIL ${this.scenario}: ${name}: ${e?.constructor?.name}: ${e?.message}${detail}`);
      process.exit(EXIT_FAILED);
    }
    this.count += 1;
    console.log(`ok   ${this.scenario}: ${name}`);
  }
}

function ask(text, maxTokens = 64) {
  return { model: MODEL, max_tokens: maxTokens, messages: [{ role: 'user', content: text }] };
}

/** Expects `promise` to reject with an instance of `cls`; returns the error. */
async function rejects(promise, cls) {
  try {
    await promise;
  } catch (e) {
    expect(e instanceof cls, `${e?.constructor?.name} is not ${cls.name}: ${e?.message}`);
    return e;
  }
  throw new CheckFailed(`no ${cls.name}`);
}

/** A `Message` from JSON or a stream's final message: shape and usage. */
function checkMessage(msg, maxTokens, inputTokens) {
  expectEq(msg.type, 'message', 'type');
  expectEq(msg.role, 'assistant', 'role');
  expectEq(msg.model, MODEL, 'model');
  expect(msg.id.startsWith('msg_'), `id ${msg.id} does not start with msg_`);
  expectEq(msg.content.length, 1, 'number of content blocks');
  const block = msg.content[0];
  expectEq(block.type, 'text', 'content[0].type');
  expect(block.text.trim() !== '', 'empty text');
  const usage = msg.usage;
  expect(usage.output_tokens >= 1 && usage.output_tokens <= maxTokens,
    `usage.output_tokens ${usage.output_tokens} not in 1..=${maxTokens}`);
  // The emulator's words are one token each.
  expectEq(words(block.text), usage.output_tokens, 'words in the text vs usage.output_tokens');
  expect(usage.input_tokens > 0, `usage.input_tokens ${usage.input_tokens}`);
  if (inputTokens !== undefined) expectEq(usage.input_tokens, inputTokens, 'usage.input_tokens vs countTokens');
  expectEq(usage.cache_read_input_tokens, 0, 'usage.cache_read_input_tokens');
  expectEq(usage.cache_creation_input_tokens, 0, 'usage.cache_creation_input_tokens');
  const stop = usage.output_tokens === maxTokens ? 'max_tokens' : 'end_turn';
  expectEq(msg.stop_reason, stop, 'stop_reason');
  expectEq(msg.stop_sequence, null, 'stop_sequence');
}

function checkRateLimitHeaders(headers, requestsLimit) {
  expectEq(headers.get('anthropic-ratelimit-requests-limit'), String(requestsLimit),
    'anthropic-ratelimit-requests-limit');
  for (const dim of ['requests', 'tokens', 'input-tokens', 'output-tokens']) {
    for (const part of ['limit', 'remaining', 'reset']) {
      const name = `anthropic-ratelimit-${dim}-${part}`;
      const value = headers.get(name);
      expect(value !== null, `header ${name} missing`);
      if (part === 'reset') {
        expect(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/.test(value) && !Number.isNaN(Date.parse(value)),
          `${name}: ${value} is not RFC 3339 UTC`);
      } else {
        expect(/^\d+$/.test(value), `${name}: ${value} is not an integer`);
      }
    }
  }
  expect((headers.get('request-id') ?? '').startsWith('req_'), 'request-id header');
}

async function scenarioOk(Anthropic, client, checks) {
  const body = ask('Hello, SDK! Please answer briefly.');
  const state = {};

  await checks.run('messages.countTokens returns input_tokens', async () => {
    const counted = await client.messages.countTokens({ model: MODEL, messages: body.messages });
    expect(Number.isInteger(counted.input_tokens) && counted.input_tokens > 0, `input_tokens ${counted.input_tokens}`);
    state.inputTokens = counted.input_tokens;
  });
  await checks.run('messages.create parses: content, usage, stop_reason', async () => {
    const msg = await client.messages.create(body);
    checkMessage(msg, body.max_tokens, state.inputTokens);
    expect((msg._request_id ?? '').startsWith('req_'), `_request_id ${msg._request_id}`);
    expectEq(msg.usage.service_tier, 'standard', 'usage.service_tier');
    state.json = msg;
  });
  await checks.run('the same request gets the same answer length', async () => {
    const msg = await client.messages.create(body);
    expectEq(msg.usage.output_tokens, state.json.usage.output_tokens, 'output_tokens of the same request sent twice');
  });
  await checks.run('withResponse: anthropic-ratelimit-* and request-id headers', async () => {
    const { data, response, request_id } = await client.messages.create(ask('Headers, please.', 16)).withResponse();
    checkRateLimitHeaders(response.headers, 1000);
    const remaining = Number(response.headers.get('anthropic-ratelimit-requests-remaining'));
    expect(remaining < 1000, `requests-remaining ${remaining} after several requests`);
    expectEq(request_id, response.headers.get('request-id'), 'request_id');
    checkMessage(data, 16);
  });
  await checks.run('messages.stream: events and finalMessage usage', async () => {
    const req = ask('Stream it with the helper.', 48);
    const stream = client.messages.stream(req);
    const kinds = [];
    for await (const event of stream) kinds.push(event.type);
    const final = await stream.finalMessage();
    expectEq(kinds[0], 'message_start', 'first event');
    expectEq(kinds[kinds.length - 1], 'message_stop', 'last event');
    for (const kind of ['content_block_start', 'content_block_delta', 'content_block_stop', 'message_delta']) {
      expect(kinds.includes(kind), `no ${kind} event in ${kinds}`);
    }
    checkMessage(final, req.max_tokens);
  });
  await checks.run("messages.stream: 'text' events match the final message", async () => {
    let text = '';
    const stream = client.messages.stream(ask('Stream only the text.', 40)).on('text', (delta) => {
      text += delta;
    });
    const final = await stream.finalMessage();
    expectEq(text, final.content[0].text, "'text' events joined vs final text");
    expectEq(words(text), final.usage.output_tokens, 'streamed words vs final usage');
  });
  await checks.run('messages.create({stream: true}): raw events and cumulative usage', async () => {
    const req = ask('Raw events, please.', 32);
    const events = [];
    for await (const event of await client.messages.create({ ...req, stream: true })) events.push(event);
    const kinds = events.map((e) => e.type);
    expectEq(kinds[0], 'message_start', 'first event');
    expectEq(kinds[kinds.length - 1], 'message_stop', 'last event');
    const start = events[0].message;
    expect(start.usage.input_tokens > 0, 'message_start usage.input_tokens');
    expectEq(start.content.length, 0, 'message_start content');
    expectEq(start.stop_reason, null, 'message_start stop_reason');
    const text = events
      .filter((e) => e.type === 'content_block_delta' && e.delta.type === 'text_delta')
      .map((e) => e.delta.text)
      .join('');
    const deltas = events.filter((e) => e.type === 'message_delta');
    expectEq(deltas.length, 1, 'message_delta events');
    const delta = deltas[0];
    expectEq(delta.usage.output_tokens, words(text), 'message_delta usage.output_tokens vs words');
    expectEq(delta.usage.input_tokens, start.usage.input_tokens, 'message_delta usage.input_tokens');
    const stop = delta.usage.output_tokens === req.max_tokens ? 'max_tokens' : 'end_turn';
    expectEq(delta.delta.stop_reason, stop, 'message_delta stop_reason');
  });
  await checks.run('unknown path raises NotFoundError', async () => {
    const e = await rejects(client.get('/v1/no_such_endpoint'), Anthropic.NotFoundError);
    expectEq(e.status, 404, 'status');
    expectEq(e.type, 'not_found_error', 'error.type');
  });
  await checks.run('invalid body raises BadRequestError', async () => {
    const e = await rejects(
      client.messages.create({ model: MODEL, max_tokens: 16, messages: 'not a list' }),
      Anthropic.BadRequestError,
    );
    expectEq(e.status, 400, 'status');
    expectEq(e.type, 'invalid_request_error', 'error.type');
  });
}

async function scenarioRateLimited(Anthropic, client, checks) {
  await checks.run('first request of the minute passes', async () => {
    checkMessage(await client.messages.create(ask('First of the minute.', 8)), 8);
  });
  await checks.run('second raises RateLimitError with retry-after and anthropic-ratelimit-*', async () => {
    const e = await rejects(client.messages.create(ask('Second of the minute.', 8)), Anthropic.RateLimitError);
    expectEq(e.status, 429, 'status');
    expectEq(e.type, 'rate_limit_error', 'error.type');
    expectEq(e.errorCode, null, 'errorCode on a per-minute 429');
    expect((e.apiMessage ?? '').includes('requests per minute'), `message ${e.apiMessage}`);
    const retryAfter = e.headers.get('retry-after');
    expect(/^\d+$/.test(retryAfter ?? ''), `retry-after ${retryAfter}`);
    expect(Number(retryAfter) >= 1 && Number(retryAfter) <= 60, `retry-after ${retryAfter} not in 1..=60`);
    expectEq(e.headers.get('x-should-retry'), 'true', 'x-should-retry');
    checkRateLimitHeaders(e.headers, 1);
    expectEq(e.headers.get('anthropic-ratelimit-requests-remaining'), '0', 'requests-remaining');
    expect((e.requestID ?? '').startsWith('req_'), `requestID ${e.requestID}`);
  });
  await checks.run('a streamed request raises RateLimitError before any event', async () => {
    const e = await rejects(client.messages.stream(ask('A stream over the limit.', 8)).finalMessage(),
      Anthropic.RateLimitError);
    expect(/^\d+$/.test(e.headers.get('retry-after') ?? ''), 'retry-after on a streamed 429');
  });
}

async function scenarioOverloaded(Anthropic, client, checks) {
  const cls = Anthropic.OverloadedError ?? Anthropic.InternalServerError;
  await checks.run(`529 raises ${cls.name}`, async () => {
    const e = await rejects(client.messages.create(ask('Busy?', 8)), cls);
    expectEq(e.status, 529, 'status');
    expectEq(e.type, 'overloaded_error', 'error.type');
  });
  await checks.run(`streamed request answered 529 raises ${cls.name}`, async () => {
    const e = await rejects((async () => {
      for await (const _ of await client.messages.create({ ...ask('Busy stream?', 8), stream: true })) {
        // no event is expected
      }
    })(), cls);
    expectEq(e.status, 529, 'status');
  });
}

async function scenarioStreamError(Anthropic, client, checks) {
  await checks.run('messages.stream: event: error raises APIError during iteration', async () => {
    const seen = [];
    const e = await rejects((async () => {
      for await (const event of client.messages.stream(ask('A stream that breaks.', 64))) seen.push(event.type);
    })(), Anthropic.APIError);
    expectEq(seen[0], 'message_start', 'first event before the error');
    expect(!seen.includes('message_stop'), 'message_stop before the error');
    expectEq(e.type, 'overloaded_error', 'error.type of the error event');
    expectEq(e.apiMessage, 'Overloaded', 'error.message of the error event');
  });
  await checks.run('create({stream: true}): event: error raises APIError during iteration', async () => {
    const seen = [];
    const e = await rejects((async () => {
      for await (const event of await client.messages.create({ ...ask('Another stream that breaks.', 64), stream: true })) {
        seen.push(event.type);
      }
    })(), Anthropic.APIError);
    expectEq(seen[0], 'message_start', 'first event before the error');
    expectEq(e.type, 'overloaded_error', 'error.type of the error event');
  });
  await checks.run('a JSON request is not hit by the stream fault', async () => {
    checkMessage(await client.messages.create(ask('Not streamed.', 8)), 8);
  });
}

async function scenarioSpendCap(Anthropic, client, checks) {
  const cls = Anthropic.EnforcedSpendLimitReachedError ?? Anthropic.RateLimitError;
  await checks.run(`spend cap raises ${cls.name} with details.error_code, no retry-after`, async () => {
    const e = await rejects(client.messages.create(ask('Over budget?', 8)), cls);
    expect(e instanceof Anthropic.RateLimitError, 'not a RateLimitError');
    expectEq(e.status, 429, 'status');
    expectEq(e.type, 'rate_limit_error', 'error.type');
    expectEq(e.error?.error?.details?.error_code, 'enforced_spend_limit_reached', 'body error.details.error_code');
    expectEq(e.errorCode, 'enforced_spend_limit_reached', 'SDK errorCode');
    expectEq(e.headers.get('retry-after'), null, 'retry-after on the spend-cap 429');
    expect((e.apiMessage ?? '').includes('regain access'), `message ${e.apiMessage}`);
  });
}

const SCENARIO_FUNCTIONS = {
  ok: scenarioOk,
  rate_limited: scenarioRateLimited,
  overloaded: scenarioOverloaded,
  stream_error: scenarioStreamError,
  spend_cap: scenarioSpendCap,
};

function loopback(baseUrl) {
  try {
    const host = new URL(baseUrl).hostname;
    return host === 'localhost' || host === '[::1]' || /^127\.\d+\.\d+\.\d+$/.test(host);
  } catch {
    return false;
  }
}

async function main(args) {
  const pairs = [];
  for (let i = 0; i + 1 < args.length; i += 2) pairs.push([args[i], args[i + 1]]);
  if (args.length < 2 || args.length % 2 === 1 || pairs.some(([s]) => !SCENARIOS.includes(s))) {
    console.error(`usage: check_ts.mjs SCENARIO BASE_URL [SCENARIO BASE_URL ...]\nscenarios: ${SCENARIOS.join(', ')}`);
    return EXIT_USAGE;
  }
  for (const [, baseUrl] of pairs) {
    if (!loopback(baseUrl)) {
      console.error(`refusing ${baseUrl}: only loopback addresses are allowed`);
      return EXIT_USAGE;
    }
  }

  let sdk;
  try {
    sdk = await import('@anthropic-ai/sdk');
  } catch (e) {
    console.error(`@anthropic-ai/sdk not installed (${e.message}); install it with ` +
      `\`npm install --prefix emulator/tests/sdk --no-save --no-package-lock "@anthropic-ai/sdk@${PINNED}"\``);
    return EXIT_NO_SDK;
  }
  const Anthropic = sdk.default;
  const { VERSION } = await import('@anthropic-ai/sdk/version');
  const note = VERSION === PINNED ? '' : ` (pinned: ${PINNED}; results may differ)`;
  console.log(`@anthropic-ai/sdk ${VERSION}${note}`);
  for (const [scenario, baseUrl] of pairs) {
    console.log(`scenario ${scenario} at ${baseUrl}`);
    const client = new Anthropic({ baseURL: baseUrl, apiKey: 'test', maxRetries: 0, timeout: 20_000 });
    const checks = new Checks(scenario);
    await SCENARIO_FUNCTIONS[scenario](Anthropic, client, checks);
    console.log(`all ${checks.count} checks of scenario ${scenario} passed`);
  }
  return 0;
}

process.exitCode = await main(process.argv.slice(2));
