#!/usr/bin/env python3
"""Drive an MCP server with the official Python SDK (PyPI `mcp`, pinned in requirements.txt).

Switchboard's tests run this against a server directly and through the proxy
(`http://127.0.0.1:<api port>/mcp/<slug>`). It prints exactly one JSON object on
stdout; on failure it exits 1 and explains on stderr (usage errors exit 2).

    mcp_client.py --url URL [--era legacy|modern|auto] [--transport streamable-http|sse] COMMAND

Eras (Streamable HTTP):
  legacy  the 2025-11-25 `initialize` handshake with an `Mcp-Session-Id` session
          (`Client(url, mode="legacy")`; the session is DELETEd on exit).
  modern  the stateless 2026-07-28 revision: one real `server/discover` at 2026-07-28,
          no session, no fallback; a legacy-only server fails.
          (`Client(url, mode="2026-07-28")`, then `session.send_discover` + `session.adopt`.)
  auto    the SDK default: probe `server/discover`, fall back to `initialize`. The
          output's "era" says which one was used.
`--transport sse` is the deprecated 2024-11-05 HTTP+SSE transport (`mcp.client.sse.sse_client`;
URL of the GET stream, e.g. .../sse); it only has the legacy era.

Commands:
  list-tools                       {"era","protocol_version","server_name","tools":[names]}
  call-tool NAME [--args JSON]     {"era","protocol_version","result":<CallToolResult>}
                                   (a tool-level error is a result with "isError": true; exit 0)
  progress [--tool NAME] [--args JSON]
                                   calls the tool with a progress callback:
                                   {"progress":[{"progress","total","message","at"}],
                                    "started_at","result_at","result",...}; times are
                                   time.monotonic() seconds in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from typing import Any

import anyio
import mcp_types as types
from mcp import Client
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError

MODERN_VERSION = "2026-07-28"


class UsageError(Exception):
    pass


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _parse_args_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--args is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError("--args must be a JSON object")
    return value


def _make_client(opts: argparse.Namespace) -> Client:
    common: dict[str, Any] = {"cache": None, "read_timeout_seconds": opts.timeout}
    if opts.transport == "sse":
        if opts.era not in ("legacy", "auto"):
            raise UsageError("--transport sse has only the legacy era (the 2024-11-05 HTTP+SSE transport)")
        return Client(sse_client(opts.url, timeout=opts.timeout), mode="legacy", **common)
    if opts.era == "legacy":
        return Client(opts.url, mode="legacy", **common)
    if opts.era == "modern":
        # mode=<modern version> adopts a synthesized DiscoverResult without any wire traffic;
        # the real probe happens in _connect below.
        return Client(opts.url, mode=MODERN_VERSION, **common)
    return Client(opts.url, mode="auto", **common)


async def _connect(client: Client, opts: argparse.Namespace) -> None:
    """Finish the era-specific handshake after `async with client` entered."""
    if opts.transport != "sse" and opts.era == "modern":
        session = client.session
        raw = await session.send_discover(MODERN_VERSION)
        session.adopt(types.DiscoverResult.model_validate(raw))


def _describe(client: Client, opts: argparse.Namespace) -> dict[str, Any]:
    session = client.session
    if session.discover_result is not None:
        era = "modern"
    elif session.initialize_result is not None:
        era = "legacy"
    else:  # pragma: no cover - __aenter__ guarantees one of the two
        era = None
    info = session.server_info
    return {
        "transport": opts.transport,
        "era": era,
        "protocol_version": session.protocol_version,
        "server_name": info.name if info is not None else None,
        "server_version": info.version if info is not None else None,
    }


async def _list_tool_names(client: Client) -> list[str]:
    names: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        page = await client.list_tools(cursor=cursor)
        names.extend(tool.name for tool in page.tools)
        cursor = page.next_cursor
        if not cursor:
            return names
    raise RuntimeError("tools/list pagination did not end after 100 pages")


async def _run(opts: argparse.Namespace) -> dict[str, Any]:
    client = _make_client(opts)
    async with client:
        await _connect(client, opts)
        out = _describe(client, opts)
        if opts.command == "list-tools":
            out["tools"] = await _list_tool_names(client)
        elif opts.command == "call-tool":
            result = await client.call_tool(opts.name, opts.arguments)
            out["result"] = _dump(result)
        elif opts.command == "progress":
            events: list[dict[str, Any]] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                events.append({"progress": progress, "total": total, "message": message, "at": time.monotonic()})

            started_at = time.monotonic()
            result = await client.call_tool(opts.tool, opts.arguments, progress_callback=on_progress)
            result_at = time.monotonic()
            out.update(progress=events, started_at=started_at, result_at=result_at, result=_dump(result))
        else:  # pragma: no cover - argparse restricts the choices
            raise UsageError(f"unknown command {opts.command!r}")
        return out


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside (nested) exception groups raised by anyio task groups."""
    if isinstance(exc, BaseExceptionGroup):
        found: list[BaseException] = []
        for sub in exc.exceptions:
            found.extend(_leaves(sub))
        return found
    return [exc]


def _explain(exc: BaseException) -> str:
    if isinstance(exc, MCPError):
        err = exc.error
        text = f"MCP error {err.code}: {err.message}"
        if err.data is not None:
            text += f" (data: {json.dumps(err.data, default=str)})"
        return text
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc}" if str(exc) else "timed out"
    return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="MCP endpoint (Streamable HTTP) or SSE stream URL (--transport sse)")
    p.add_argument("--era", choices=["legacy", "modern", "auto"], default="legacy")
    p.add_argument("--transport", choices=["streamable-http", "sse"], default="streamable-http")
    p.add_argument("--timeout", type=float, default=60.0, help="overall deadline and per-request timeout, seconds")
    p.add_argument("--traceback", action="store_true", help="print the full traceback on failure")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list-tools", help="connect and list the tool names")
    call = sub.add_parser("call-tool", help="call one tool and print the CallToolResult")
    call.add_argument("name")
    call.add_argument("--args", default="{}", help="arguments as a JSON object")
    prog = sub.add_parser("progress", help="call a tool with a progress callback, timestamping each notification")
    prog.add_argument("--tool", default="trigger-long-running-operation")
    prog.add_argument("--args", default='{"duration":4,"steps":4}', help="arguments as a JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    # The SDK logs a few warnings (e.g. a DELETE answered 202); keep them on stderr, labelled.
    logging.basicConfig(level=logging.WARNING, format="mcp_client.py: [sdk %(name)s] %(levelname)s: %(message)s")

    async def bounded() -> dict[str, Any]:
        with anyio.fail_after(opts.timeout):
            return await _run(opts)

    try:
        opts.arguments = _parse_args_json(opts.args) if hasattr(opts, "args") else None
        out = anyio.run(bounded)
    except UsageError as e:
        print(f"mcp_client.py: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # boundary: report every failure as one clear line, exit 1
        where = f"{opts.command} on {opts.url} (era {opts.era}, transport {opts.transport})"
        reasons = "; ".join(_explain(leaf) for leaf in _leaves(e))
        print(f"mcp_client.py: {where} failed: {reasons}", file=sys.stderr)
        if opts.traceback:
            traceback.print_exception(e)
        return 1
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
