#!/usr/bin/env python3
"""Drive an MCP server with the official Python SDK (PyPI `mcp`, pinned in requirements.txt).

Switchboard's tests run this against a server directly and through the proxy
(`http://127.0.0.1:<api port>/mcp/<slug>`). It prints exactly one JSON object on
stdout (except `hold-call`, which prints JSON lines, see below); on failure it exits 1
and explains on stderr (usage errors exit 2). The checking commands (`sampling`,
`elicitation`, `roots`, `concurrent`, `hold-call`) print their JSON object even when
the check fails, with "ok": false, and then exit 1 with the reason on stderr.

    mcp_client.py --url URL [--era legacy|modern|auto] [--transport streamable-http|sse] COMMAND

Eras (Streamable HTTP):
  legacy  the 2025-11-25 `initialize` handshake with an `Mcp-Session-Id` session
          (`Client(<transport>, mode="legacy")`; the session is DELETEd on exit).
  modern  the stateless 2026-07-28 revision: one real `server/discover` at 2026-07-28,
          no session, no fallback; a legacy-only server fails.
          (`Client(<transport>, mode="2026-07-28")`, then `session.send_discover` + `session.adopt`.)
  auto    the SDK default: probe `server/discover`, fall back to `initialize`. The
          output's "era" says which one was used.
With MCP_CLIENT_BEARER in the environment (not a flag: a secret stays out of `ps`), every
request carries `Authorization: Bearer <it>`, as a client of a Switchboard with client keys does.
`--transport sse` is the deprecated 2024-11-05 HTTP+SSE transport (`mcp.client.sse.sse_client`;
URL of the GET stream, e.g. .../sse); it only has the legacy era.

<transport> is `streamable_http_client(url, http_client=...)` on an httpx2 client of its own
(the SDK's default timeouts) whose event hooks record
the HTTP exchanges (method, JSON-RPC method, status, content type, session id, and
"at": time.monotonic() when the response headers came). So the
output's "session_id" is the `Mcp-Session-Id` the server minted (null in the modern era),
and "http" (where printed) lists the exchanges, e.g. whether the SDK opened the GET stream.

Commands:
  list-tools                       {"era","protocol_version","server_name","session_id","tools":[names]}
  call-tool NAME [--args JSON]     {"era","protocol_version","result":<CallToolResult>,...}
                                   (a tool-level error is a result with "isError": true; exit 0)
  progress [--tool NAME] [--args JSON]
                                   calls the tool with a progress callback:
                                   {"progress":[{"progress","total","message","at"}],
                                    "started_at","result_at","result",...}; times are
                                   time.monotonic() seconds in this process.
                                   Default: server-everything's `trigger-long-running-operation`
                                   {"duration":4,"steps":4} (one notifications/progress per
                                   duration/steps seconds, progress 1..steps, total=steps,
                                   no message; the result text is "Long running operation
                                   completed. Duration: 4 seconds, Steps: 4.").
  sampling [--marker M] [--tool NAME] [--args JSON]
                                   declares the sampling capability and calls the tool; the
                                   sampling_callback answers every sampling/createMessage with
                                   the text "sampled by mcp_client.py: <M>":
                                   {"result","sampling_requests":[params],"callback_invoked",
                                    "marker","marker_in_result","ok","http",...}.
                                   Default: server-everything's `trigger-sampling-request`
                                   {"prompt":"switchboard sampling test","maxTokens":50}; it is
                                   registered only for clients declaring `sampling`, and sends
                                   its request on the tool call's POST SSE stream. The result
                                   text embeds the sampled message, so it contains M.
                                   ok = callback invoked and M in the result.
  elicitation [--marker M] [--tool NAME] [--args JSON] [--content JSON]
                                   the same with elicitation: the elicitation_callback accepts
                                   with content {"name": M, "check": true} (or --content):
                                   {"result","elicitation_requests":[params],"callback_invoked",
                                    "marker","marker_in_result","ok","http",...}.
                                   Default: server-everything's `trigger-elicitation-request` {}
                                   (registered only for clients declaring `elicitation`; it
                                   answers "- Name: M" among the accepted fields).
  roots [--marker M] [--tool NAME] [--args JSON]
                                   the same with roots: the list_roots_callback answers
                                   [{"uri":"file:///switchboard-test/M","name":M}].
                                   Default: server-everything's `get-roots-list` {}. Its
                                   roots/list request is NOT related to the tool call, so
                                   server-everything sends it on the session's GET stream:
                                   this exercises the standalone GET stream through a proxy.
  concurrent [--sessions N] [--calls M] [--tool echo] [--arg NAME] [--parallel]
                                   opens N clients at once (legacy: N sessions; modern: N
                                   stateless clients); each calls the tool M times with a
                                   message unique to (session, call), "<nonce:sI:cJ>", and
                                   checks that its reply contains its own message and no other.
                                   M calls of one session run one after another, or all at
                                   once with --parallel. The argument name is --arg, else the
                                   tool's only required string property (server-everything's
                                   echo: "message", the repo's mcp-test-server: "text").
                                   {"era","sessions","calls","ok_calls","crossed","crossings",
                                    "errors":[{"session","call","error"}],"session_ids",
                                    "distinct_session_ids","elapsed","ok"}; ok = every call
                                   answered with its own message and (legacy) the minted
                                   session ids are distinct. Bounded by --timeout overall.
  hold-call [--tool NAME] [--args JSON] [--call-timeout S] [--echo-tool echo] [--echo-arg NAME]
            [--new-session-retry S]
                                   for "the child dies mid-request" tests. LINE-ORIENTED: prints
                                   one JSON object per line, flushed, as things happen:
                                     {"event":"session","session_id","era","protocol_version"}
                                     {"event":"calling","tool","at"}   the tools/call POST is
                                                                       being sent
                                     {"event":"call_accepted","status","content_type","at"}
                                                                       its response headers came
                                     {"event":"progress","progress","total","at"}  first
                                                                       notifications/progress only
                                     {"event":"call_failed","error","error_type","code",
                                      "message","data","clean","elapsed"}   (or "call_completed"
                                                                       with "result": the call was
                                                                       not interrupted)
                                     {"event":"same_session","ok","error","error_type","code",...}
                                                                       one more request (echo) on the
                                                                       same session/client
                                     {"event":"new_session","ok","session_id","attempts","reply",
                                      "error"...}                      a fresh client, echo; retried
                                                                       for --new-session-retry s
                                     {"event":"done","ok",...}         the summary, always last
                                   Kill the server once "progress" (or "call_accepted") is
                                   printed. (A modern-era rmcp server sends the response headers
                                   only with the result: there, wait a moment after "calling".) Default tool: server-everything's
                                   `trigger-long-running-operation` {"duration":30,"steps":30}
                                   (progress every second); for the repo's mcp-test-server use
                                   --tool sleep --args '{"ms":30000}' (no progress). ok = the call
                                   failed "clean" (an MCPError, i.e. a JSON-RPC error, whether the
                                   server's or one the SDK synthesised; or a transport error; not a
                                   hang past --call-timeout) and the new session's echo worked.
                                   "error_type" is the exception's class; for an MCPError "code"
                                   and "message" are its JSON-RPC error. What the SDK (mcp 2.3.0)
                                   reports, seen against real and fake servers:
                                   - a JSON-RPC error for the call (an SSE event on its POST
                                     stream, or a non-2xx application/json body with "id", even
                                     null): MCPError with the server's code/message/data, at once;
                                   - its POST SSE stream closed, no event had an `id:` field:
                                     MCPError -32000 "SSE stream ended without a response", at once;
                                   - closed after an event WITH `id:` (server-everything primes
                                     one at 2025-11-25; rmcp too, with retry: 3000): the SDK first
                                     tries 2 GETs with Last-Event-ID, each after `retry` ms
                                     (default 1000), then MCPError -32000 "SSE stream ended and
                                     reconnection attempts were exhausted" (~2-3 s
                                     server-everything, ~6.6 s rmcp);
                                   - the connection dropped before response headers, or refused:
                                     NOT a JSON-RPC error: the httpx2 error (RemoteProtocolError,
                                     ConnectError) fails the SDK transport's task group, the client
                                     closes with an ExceptionGroup ("wrapped_in", "raised_at":
                                     "client exit"; same_session is then "skipped");
                                   - a later request on the dead session: 404 without a JSON body
                                     -> MCPError -32600 "Session terminated"; a JSON-RPC error
                                     body with "id" -> that error; a body without "id" (e.g.
                                     server-everything's 400 for an unknown session) -> MCPError
                                     -32603 "Server returned an error response".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

MODERN_VERSION = "2026-07-28"
SESSION_HEADER = "mcp-session-id"
LINE_COMMANDS = ("hold-call",)
CHECK_COMMANDS = ("sampling", "elicitation", "roots", "concurrent", "hold-call")


class UsageError(Exception):
    pass


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _parse_json_object(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object")
    return value


def _emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once (line-oriented commands)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# HTTP recording


def _rpc_method(request: httpx2.Request) -> str | None:
    """The JSON-RPC method of a POST body; "response" / "error" for the client's replies."""
    if request.method != "POST":
        return None
    try:
        body = json.loads(request.content)
    except (ValueError, httpx2.RequestNotRead):
        return None
    if not isinstance(body, dict):
        return None
    if "method" in body:
        return str(body["method"])
    if "result" in body:
        return "response"
    if "error" in body:
        return "error"
    return None


class HttpLog:
    """The HTTP exchanges of one client, recorded by httpx2 event hooks."""

    def __init__(self, on_request: Callable[[httpx2.Request], None] | None = None,
                 on_response: Callable[[httpx2.Response], None] | None = None) -> None:
        self.exchanges: list[dict[str, Any]] = []
        self.session_ids: list[str] = []
        self._on_request = on_request
        self._on_response = on_response

    async def request_hook(self, request: httpx2.Request) -> None:
        if self._on_request is not None:
            self._on_request(request)

    async def response_hook(self, response: httpx2.Response) -> None:
        request = response.request
        minted = response.headers.get(SESSION_HEADER)
        if minted and minted not in self.session_ids:
            self.session_ids.append(minted)
        self.exchanges.append({
            "http": request.method,
            "rpc": _rpc_method(request),
            "status": response.status_code,
            "content_type": response.headers.get("content-type"),
            "session_id": request.headers.get(SESSION_HEADER) or minted,
            "at": time.monotonic(),
        })
        if self._on_response is not None:
            self._on_response(response)

    @property
    def session_id(self) -> str | None:
        return self.session_ids[0] if self.session_ids else None


@asynccontextmanager
async def _recorded_transport(url: str, log: HttpLog) -> AsyncIterator[Any]:
    """`streamable_http_client(url)` on an httpx2 client with the SDK's default timeouts plus `log`'s hooks."""
    http = httpx2.AsyncClient(
        timeout=httpx2.Timeout(30.0, read=300.0),
        headers=_auth_headers(),
        event_hooks={"request": [log.request_hook], "response": [log.response_hook]},
    )
    async with http:
        async with streamable_http_client(url, http_client=http) as streams:
            yield streams


def _auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $MCP_CLIENT_BEARER` when it is set."""
    token = os.environ.get("MCP_CLIENT_BEARER")
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------------------
# Clients


def _make_client(opts: argparse.Namespace, log: HttpLog | None = None, **callbacks: Any) -> tuple[Client, HttpLog | None]:
    """A client for opts.url/era/transport; `callbacks` go to `Client(...)` (sampling_callback etc.)."""
    common: dict[str, Any] = {"cache": None, "read_timeout_seconds": opts.timeout, **callbacks}
    if opts.transport == "sse":
        if opts.era not in ("legacy", "auto"):
            raise UsageError("--transport sse has only the legacy era (the 2024-11-05 HTTP+SSE transport)")
        return Client(sse_client(opts.url, headers=_auth_headers(), timeout=opts.timeout), mode="legacy", **common), None
    log = log if log is not None else HttpLog()
    server = _recorded_transport(opts.url, log)
    if opts.era == "legacy":
        return Client(server, mode="legacy", **common), log
    if opts.era == "modern":
        # mode=<modern version> adopts a synthesized DiscoverResult without any wire traffic;
        # the real probe happens in _connect below.
        return Client(server, mode=MODERN_VERSION, **common), log
    return Client(server, mode="auto", **common), log


async def _connect(client: Client, opts: argparse.Namespace) -> None:
    """Finish the era-specific handshake after `async with client` entered."""
    if opts.transport != "sse" and opts.era == "modern":
        session = client.session
        raw = await session.send_discover(MODERN_VERSION)
        session.adopt(types.DiscoverResult.model_validate(raw))


def _describe(client: Client, opts: argparse.Namespace, log: HttpLog | None) -> dict[str, Any]:
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
        "session_id": log.session_id if log is not None else None,
    }


async def _list_tools(client: Client) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(100):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools
    raise RuntimeError("tools/list pagination did not end after 100 pages")


async def _string_arg(client: Client, tool: str, explicit: str | None) -> str:
    """--arg, else the tool's only required string property (echo: "message" or "text")."""
    if explicit:
        return explicit
    for t in await _list_tools(client):
        if t.name == tool:
            schema = t.input_schema or {}
            props = schema.get("properties") or {}
            required = [n for n in schema.get("required") or [] if (props.get(n) or {}).get("type") == "string"]
            if len(required) == 1:
                return required[0]
            raise RuntimeError(f"cannot tell which argument of {tool!r} takes the message "
                               f"(required string properties: {required}); pass --arg")
    raise RuntimeError(f"the server lists no tool {tool!r}")


def _result_text(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


# ---------------------------------------------------------------------------------------
# Errors


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


# What counts as a clean failure of an interrupted request: a JSON-RPC error (the server's, or
# the one the SDK synthesises for a dead stream) or a transport-level error, not a hang.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx2.TransportError,
    httpx2.HTTPStatusError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
    ConnectionError,
)


def _error_report(exc: BaseException) -> dict[str, Any]:
    """JSON for an exception (or an exception group: its first real leaf, all of them in "errors")."""
    leaves = _leaves(exc)
    first = leaves[0]
    report: dict[str, Any] = {
        "error": "; ".join(_explain(leaf) for leaf in leaves),
        "error_type": f"{type(first).__module__}.{type(first).__qualname__}",
        "code": None,
        "message": str(first),
        "data": None,
        "clean": isinstance(first, (MCPError, *_TRANSPORT_ERRORS)),
    }
    if isinstance(first, MCPError):
        report.update(code=first.code, message=first.message, data=first.data)
    if len(leaves) > 1 or first is not exc:
        report["wrapped_in"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return report


# ---------------------------------------------------------------------------------------
# Commands on one client


def _marker(opts: argparse.Namespace) -> str:
    return opts.marker or f"sb-marker-{secrets.token_hex(6)}"


async def _callback_check(opts: argparse.Namespace) -> dict[str, Any]:
    """sampling / elicitation / roots: one call answered through a client callback."""
    marker = _marker(opts)
    requests: list[Any] = []
    callbacks: dict[str, Any] = {}
    if opts.command == "sampling":

        async def on_sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
            requests.append(_dump(params))
            return types.CreateMessageResult(
                role="assistant",
                content=types.TextContent(type="text", text=f"sampled by mcp_client.py: {marker}"),
                model="mcp_client.py",
                stop_reason="endTurn",
            )

        callbacks["sampling_callback"] = on_sampling
    elif opts.command == "elicitation":
        content = opts.content_obj if opts.content_obj is not None else {"name": marker, "check": True}

        async def on_elicitation(context: ClientRequestContext, params: Any) -> Any:
            requests.append(_dump(params))
            return types.ElicitResult(action="accept", content=content)

        callbacks["elicitation_callback"] = on_elicitation
    else:

        async def on_roots(context: ClientRequestContext) -> Any:
            requests.append({"at": time.monotonic()})
            return types.ListRootsResult(roots=[types.Root(uri=f"file:///switchboard-test/{marker}", name=marker)])

        callbacks["list_roots_callback"] = on_roots

    client, log = _make_client(opts, **callbacks)
    async with client:
        await _connect(client, opts)
        out = _describe(client, opts, log)
        result = await client.call_tool(opts.tool, opts.arguments)
    dumped = _dump(result)
    key = {"sampling": "sampling_requests", "elicitation": "elicitation_requests", "roots": "roots_requests"}[opts.command]
    out.update({
        "tool": opts.tool,
        "result": dumped,
        key: requests,
        "callback_invoked": bool(requests),
        "marker": marker,
        "marker_in_result": marker in json.dumps(dumped),
        "http": log.exchanges if log is not None else None,
    })
    problems = []
    if result.is_error:
        problems.append(f"the tool answered an error: {_result_text(result)!r}")
    if not requests:
        problems.append(f"the {opts.command} callback was never invoked")
    if not out["marker_in_result"]:
        problems.append(f"the marker {marker!r} is not in the result")
    out["ok"] = not problems
    if problems:
        out["failure"] = "; ".join(problems)
    return out


# ---------------------------------------------------------------------------------------
# concurrent


async def _concurrent(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.sessions < 1 or opts.calls < 1:
        raise UsageError("--sessions and --calls must be at least 1")
    nonce = secrets.token_hex(4)
    token = re.compile(r"<" + nonce + r":s(\d+):c(\d+)>")
    errors: list[dict[str, Any]] = []
    crossings: list[dict[str, Any]] = []
    session_ids: list[str | None] = [None] * opts.sessions
    ok_calls = 0
    era: list[str | None] = []
    started = time.monotonic()

    async def one_call(client: Client, arg: str, i: int, j: int) -> None:
        nonlocal ok_calls
        mine = f"<{nonce}:s{i}:c{j}>"
        try:
            result = await client.call_tool(opts.tool, {arg: f"switchboard {mine}"})
        except Exception as e:  # boundary: every failure is one entry in "errors"
            errors.append({"session": i, "call": j, **_error_report(e)})
            return
        seen = {(int(a), int(b)) for a, b in token.findall(json.dumps(_dump(result)))}
        others = sorted(seen - {(i, j)})
        if others:
            crossings.append({"session": i, "call": j, "got": [f"s{a}:c{b}" for a, b in others],
                              "own_present": (i, j) in seen})
        elif result.is_error or (i, j) not in seen:
            errors.append({"session": i, "call": j, "error": f"reply without the message {mine}",
                           "result": _dump(result)})
        else:
            ok_calls += 1

    async def session(i: int) -> None:
        client, log = _make_client(opts)
        try:
            async with client:
                await _connect(client, opts)
                era.append(_describe(client, opts, log)["era"])
                if log is not None:
                    session_ids[i] = log.session_id
                arg = await _string_arg(client, opts.tool, opts.arg)
                if opts.parallel:
                    async with anyio.create_task_group() as tg:
                        for j in range(opts.calls):
                            tg.start_soon(one_call, client, arg, i, j)
                else:
                    for j in range(opts.calls):
                        await one_call(client, arg, i, j)
        except Exception as e:  # boundary: a failed session is one entry, the others go on
            errors.append({"session": i, "call": None, **_error_report(e)})

    async with anyio.create_task_group() as tg:
        for i in range(opts.sessions):
            tg.start_soon(session, i)

    minted = [s for s in session_ids if s is not None]
    out: dict[str, Any] = {
        "transport": opts.transport,
        "era": (era[0] if all(e == era[0] for e in era) else era) if era else None,
        "tool": opts.tool,
        "sessions": opts.sessions,
        "calls": opts.sessions * opts.calls,
        "parallel": opts.parallel,
        "ok_calls": ok_calls,
        "crossed": len(crossings),
        "crossings": crossings[:20],
        "errors": errors[:50],
        "error_count": len(errors),
        "session_ids": session_ids,
        "distinct_session_ids": len(set(minted)),
        "elapsed": round(time.monotonic() - started, 3),
    }
    problems = []
    if crossings:
        problems.append(f"{len(crossings)} replies carried another call's message")
    if errors:
        problems.append(f"{len(errors)} errors, first: {errors[0].get('error')}")
    if len(set(minted)) != len(minted):
        problems.append(f"session ids are not distinct: {minted}")
    if ok_calls != out["calls"] and not problems:
        problems.append(f"only {ok_calls} of {out['calls']} calls answered correctly")
    out["ok"] = not problems
    if problems:
        out["failure"] = "; ".join(problems)
    return out


# ---------------------------------------------------------------------------------------
# hold-call


async def _hold_call(opts: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    summary: dict[str, Any] = {"event": "done", "tool": opts.tool}
    state = {"calling": False, "accepted": False, "progress": 0}

    def on_request(request: httpx2.Request) -> None:
        if not state["calling"] and _rpc_method(request) == "tools/call":
            state["calling"] = True
            _emit({"event": "calling", "tool": opts.tool, "at": time.monotonic()})

    def on_response(response: httpx2.Response) -> None:
        if state["calling"] and not state["accepted"] and _rpc_method(response.request) == "tools/call":
            state["accepted"] = True
            _emit({"event": "call_accepted", "status": response.status_code,
                   "content_type": response.headers.get("content-type"), "at": time.monotonic()})

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        state["progress"] += 1
        if state["progress"] == 1:
            _emit({"event": "progress", "progress": progress, "total": total, "message": message,
                   "at": time.monotonic()})

    call: dict[str, Any] | None = None
    same: dict[str, Any] | None = None
    call_started: float | None = None
    client, log = _make_client(opts, HttpLog(on_request, on_response))
    try:
        async with client:
            await _connect(client, opts)
            described = _describe(client, opts, log)
            _emit({"event": "session", **{k: described[k] for k in ("session_id", "era", "protocol_version")}})
            call_started = time.monotonic()
            try:
                with anyio.fail_after(opts.call_timeout):
                    result = await client.call_tool(opts.tool, opts.arguments, progress_callback=on_progress)
                call = {"event": "call_completed", "result": _dump(result),
                        "elapsed": round(time.monotonic() - call_started, 3)}
            except Exception as e:  # boundary: the failure is the measurement
                call = {"event": "call_failed", **_error_report(e), "elapsed": round(time.monotonic() - call_started, 3)}
                if isinstance(e, TimeoutError):
                    call.update(clean=False, error=f"no outcome within --call-timeout {opts.call_timeout} s (a hang)")
            _emit(call)
            same = await _echo_once(client, opts, "same_session", "after the interrupted call")
            _emit(same)
    except Exception as e:  # boundary: the transport's task group failed (or the handshake)
        report = _error_report(e)
        if call is None:
            # A transport error on the call's POST (connection refused or dropped before a
            # response) is not turned into a JSON-RPC error: it fails the SDK transport's task
            # group, which cancels the call and closes the client with an ExceptionGroup.
            elapsed = None if call_started is None else round(time.monotonic() - call_started, 3)
            call = {"event": "call_failed", **report, "elapsed": elapsed, "raised_at": "client exit"}
            _emit(call)
            same = {"event": "same_session", "ok": False, "skipped": True, "error": "not tried: the call's "
                    "transport error closed the client", "error_type": None, "code": None, "clean": None}
            _emit(same)
        elif same is None:
            same = {"event": "same_session", "ok": False, **report, "raised_at": "client exit"}
            _emit(same)
        else:
            summary["teardown_error"] = report

    new = await _new_session(opts)
    _emit(new)
    summary.update({
        "call": call,
        "same_session": same,
        "new_session": new,
        "progress_notifications": state["progress"],
        "http": log.exchanges if log is not None else None,
        "elapsed": round(time.monotonic() - started, 3),
    })
    problems = []
    if call is None or call["event"] != "call_failed":
        problems.append("the held call was not interrupted (it completed)")
    elif not call.get("clean"):
        problems.append(f"the held call did not fail cleanly: {call.get('error')}")
    if not new.get("ok"):
        problems.append(f"the new session did not work: {new.get('error')}")
    summary["ok"] = not problems
    if problems:
        summary["failure"] = "; ".join(problems)
    return summary


async def _echo_once(client: Client, opts: argparse.Namespace, event: str, note: str) -> dict[str, Any]:
    mine = f"{event} {secrets.token_hex(4)} {note}"
    try:
        with anyio.fail_after(opts.followup_timeout):
            arg = await _string_arg(client, opts.echo_tool, opts.echo_arg)
            result = await client.call_tool(opts.echo_tool, {arg: mine})
    except Exception as e:  # boundary: reported, not raised
        report = _error_report(e)
        if isinstance(e, TimeoutError):
            report.update(clean=False, error=f"no answer within {opts.followup_timeout} s")
        return {"event": event, "ok": False, **report}
    text = _result_text(result)
    return {"event": event, "ok": (not result.is_error) and mine in text, "reply": text}


async def _new_session(opts: argparse.Namespace) -> dict[str, Any]:
    """A fresh client and one echo, retried until --new-session-retry seconds have passed."""
    deadline = time.monotonic() + opts.new_session_retry
    attempts = 0
    while True:
        attempts += 1
        client, log = _make_client(opts)
        outcome: dict[str, Any]
        try:
            with anyio.fail_after(opts.followup_timeout):
                async with client:
                    await _connect(client, opts)
                    outcome = await _echo_once(client, opts, "new_session", "on a new session")
            outcome["session_id"] = log.session_id if log is not None else None
        except Exception as e:  # boundary: retried, then reported
            outcome = {"event": "new_session", "ok": False, **_error_report(e)}
        outcome["attempts"] = attempts
        if outcome["ok"] or time.monotonic() >= deadline:
            return outcome
        await anyio.sleep(0.5)


# ---------------------------------------------------------------------------------------
# main


async def _run(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.command in ("sampling", "elicitation", "roots"):
        return await _callback_check(opts)
    if opts.command == "concurrent":
        return await _concurrent(opts)
    if opts.command == "hold-call":
        return await _hold_call(opts)
    client, log = _make_client(opts)
    async with client:
        await _connect(client, opts)
        out = _describe(client, opts, log)
        if opts.command == "list-tools":
            out["tools"] = [t.name for t in await _list_tools(client)]
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
    for name, tool, args, what in (
        ("sampling", "trigger-sampling-request", '{"prompt":"switchboard sampling test","maxTokens":50}',
         "call a tool that makes the server sample through this client"),
        ("elicitation", "trigger-elicitation-request", "{}", "call a tool that makes the server elicit through this client"),
        ("roots", "get-roots-list", "{}", "call a tool that makes the server ask this client for its roots"),
    ):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("--tool", default=tool)
        cmd.add_argument("--args", default=args, help="arguments as a JSON object")
        cmd.add_argument("--marker", help="text the callback answers with (default: a random sb-marker-...)")
        if name == "elicitation":
            cmd.add_argument("--content", help='the accepted content as a JSON object (default {"name": MARKER, "check": true})')
    conc = sub.add_parser("concurrent", help="N clients at once, M echo calls each, replies checked")
    conc.add_argument("--sessions", type=int, default=4)
    conc.add_argument("--calls", type=int, default=5)
    conc.add_argument("--tool", default="echo")
    conc.add_argument("--arg", help="the tool's message argument (default: its only required string property)")
    conc.add_argument("--parallel", action="store_true", help="also run each session's calls at once")
    hold = sub.add_parser("hold-call", help="hold a long call open, report how it fails when the server dies (JSON lines)")
    hold.add_argument("--tool", default="trigger-long-running-operation")
    hold.add_argument("--args", default='{"duration":30,"steps":30}', help="arguments as a JSON object")
    hold.add_argument("--call-timeout", type=float, default=40.0, help="give up waiting for the call's outcome (a hang)")
    hold.add_argument("--echo-tool", default="echo", help="the tool of the follow-up requests")
    hold.add_argument("--echo-arg", help="its message argument (default: its only required string property)")
    hold.add_argument("--followup-timeout", type=float, default=10.0, help="deadline of each follow-up request, seconds")
    hold.add_argument("--new-session-retry", type=float, default=10.0,
                      help="keep trying the new session this long (a restarted server may need time)")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = _parser().parse_args(argv)
    # The SDK logs a few warnings (e.g. a DELETE answered 202); keep them on stderr, labelled.
    logging.basicConfig(level=logging.WARNING, format="mcp_client.py: [sdk %(name)s] %(levelname)s: %(message)s")

    async def bounded() -> dict[str, Any]:
        with anyio.fail_after(opts.timeout):
            return await _run(opts)

    try:
        opts.arguments = _parse_json_object(opts.args, "--args") if hasattr(opts, "args") else None
        content = getattr(opts, "content", None)
        opts.content_obj = _parse_json_object(content, "--content") if content is not None else None
        out = anyio.run(bounded)
    except UsageError as e:
        print(f"mcp_client.py: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # boundary: report every failure as one clear line, exit 1
        where = f"{opts.command} on {opts.url} (era {opts.era}, transport {opts.transport})"
        reasons = "; ".join(_explain(leaf) for leaf in _leaves(e))
        print(f"mcp_client.py: {where} failed: {reasons}", file=sys.stderr)
        if opts.command in LINE_COMMANDS:
            _emit({"event": "done", "ok": False, "failure": reasons})
        if opts.traceback:
            traceback.print_exception(e)
        return 1
    if opts.command in LINE_COMMANDS:
        _emit(out)
    else:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    if opts.command in CHECK_COMMANDS and not out.get("ok"):
        print(f"mcp_client.py: {opts.command} on {opts.url} (era {opts.era}): check failed: {out.get('failure')}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
