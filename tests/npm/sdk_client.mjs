// The official TypeScript SDK client (@modelcontextprotocol/sdk, installed in tests/npm with
// server-everything, which depends on it): connects over Streamable HTTP, lists the tools and
// calls one, printing one JSON object on stdout.
//
//   node tests/npm/sdk_client.mjs URL TOOL [ARGS_JSON]
//
// With MCP_CLIENT_BEARER in the environment (not an argument: a secret stays out of `ps`),
// every request carries `Authorization: Bearer <it>`. On failure it prints
// {"error", "code"} (code: the HTTP status when the SDK reports one) and exits 1.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, tool, args] = process.argv.slice(2);
if (!url || !tool) {
  console.error("usage: sdk_client.mjs URL TOOL [ARGS_JSON]");
  process.exit(2);
}
const bearer = process.env.MCP_CLIENT_BEARER;
const headers = bearer ? { Authorization: `Bearer ${bearer}` } : {};
const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit: { headers } });
const client = new Client({ name: "switchboard-tests", version: "0" });
try {
  await client.connect(transport);
  const tools = (await client.listTools()).tools.map((t) => t.name);
  const result = await client.callTool({ name: tool, arguments: JSON.parse(args ?? "{}") });
  console.log(JSON.stringify({ tools, result }));
  await client.close();
} catch (e) {
  console.log(JSON.stringify({ error: String(e?.message ?? e), code: e?.code ?? null }));
  process.exit(1);
}
