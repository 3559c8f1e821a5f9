// The official TypeScript SDK through the gateway: a JSON message, a stream,
// and an unknown key. The twin of gateway_python.py.
//
//     node gateway/tests/sdk/gateway_ts.mjs BASE_URL API_KEY SDK_DIR
//
// SDK_DIR is the folder whose node_modules holds @anthropic-ai/sdk: `.ci/run`
// installs the pinned version into emulator/tests/sdk (ignored by git); by hand:
//
//     npm install --prefix emulator/tests/sdk --no-save --no-package-lock "@anthropic-ai/sdk@1.14.0"
//
// Exit codes: 1 a check failed, 2 usage, 3 the SDK is missing. Prints one
// line per check. Talks to BASE_URL only, which must be a loopback address.

import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const EXIT_FAILED = 1;
const EXIT_USAGE = 2;
const EXIT_NO_SDK = 3;

function loopback(url) {
  try {
    const host = new URL(url).hostname;
    return host === '127.0.0.1' || host === 'localhost' || host === '[::1]';
  } catch {
    return false;
  }
}

async function main(argv) {
  if (argv.length !== 3 || !loopback(argv[0])) {
    console.error('usage: node gateway_ts.mjs LOOPBACK_BASE_URL API_KEY SDK_DIR');
    return EXIT_USAGE;
  }
  const [baseURL, apiKey, sdkDir] = argv;
  let Anthropic;
  try {
    const require = createRequire(path.join(path.resolve(sdkDir), 'package.json'));
    const sdk = await import(pathToFileURL(require.resolve('@anthropic-ai/sdk')).href);
    Anthropic = sdk.default.default ?? sdk.default;
  } catch (e) {
    console.error(`@anthropic-ai/sdk not installed under ${sdkDir} (${e.message})`);
    return EXIT_NO_SDK;
  }
  const client = new Anthropic({ baseURL, apiKey, maxRetries: 0, timeout: 20_000 });
  const ask = (content) => ({
    model: 'claude-sonnet-4-5',
    max_tokens: 16,
    messages: [{ role: 'user', content }],
  });
  const message = await client.messages.create(ask('Hello through the gateway'));
  if (!(message.usage.input_tokens > 0)) throw new Error(`no usage: ${JSON.stringify(message)}`);
  console.log('json ok', message.usage.input_tokens, message.usage.output_tokens);
  let text = '';
  const stream = client.messages.stream(ask('Stream through the gateway')).on('text', (d) => {
    text += d;
  });
  const final = await stream.finalMessage();
  if (!(final.usage.output_tokens > 0)) throw new Error(`no output: ${JSON.stringify(final)}`);
  console.log('stream ok', text.length, final.usage.output_tokens);
  const wrong = new Anthropic({ baseURL, apiKey: 'wrong', maxRetries: 0, timeout: 20_000 });
  try {
    await wrong.messages.create(ask('x'));
    console.error('an unknown key was accepted');
    return EXIT_FAILED;
  } catch (e) {
    if (!(e instanceof Anthropic.AuthenticationError)) throw e;
    console.log('auth ok');
  }
  return 0;
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  console.error(e);
  process.exitCode = EXIT_FAILED;
}
