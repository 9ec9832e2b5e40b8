"""A stdio MCP server (2026-07-28) that handles one request at a time, as many simple servers
do: a long tool call holds up everything after it, health probes included. Standard library
only. Its `sleep` tool says on stderr when it starts, so a test knows the call is under way."""

import json
import sys
import time


def reply(msg_id, result=None, error=None):
    out = {"jsonrpc": "2.0", "id": msg_id}
    if error is None:
        out["result"] = result
    else:
        out["error"] = error
    print(json.dumps(out), flush=True)


for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    msg = json.loads(line)
    if "id" not in msg or "method" not in msg:
        continue
    method, msg_id = msg["method"], msg["id"]
    if method == "server/discover":
        reply(msg_id, {
            "supportedVersions": ["2026-07-28"],
            "capabilities": {"tools": {}},
            "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "serial", "version": "1"}},
            "resultType": "complete",
        })
    elif method == "tools/call" and msg["params"]["name"] == "sleep":
        ms = msg["params"]["arguments"]["ms"]
        print(f"serial: sleeping {ms} ms", file=sys.stderr, flush=True)
        time.sleep(ms / 1000)
        reply(msg_id, {"content": [{"type": "text", "text": f"slept {ms} ms"}],
                       "resultType": "complete"})
    else:
        reply(msg_id, error={"code": -32601, "message": "Method not found"})
