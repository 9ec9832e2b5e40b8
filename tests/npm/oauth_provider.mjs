// A real OAuth 2.1 authorization server for Switchboard's tests: oidc-provider (OpenID
// Certified) issuing JWT access tokens by the client-credentials grant, with resource
// indicators (RFC 8707), so a token's `aud` is the resource the client asked for.
//
//   node tests/npm/oauth_provider.mjs
//
// Listens on 127.0.0.1, port 0, and prints one JSON line: {"issuer": "http://127.0.0.1:PORT"}.
// Clients (secret = id + "-secret", scopes "mcp:*" and "mcp:<slug>" for any slug a test asks):
//   rs-client: tokens signed RS256       es-client: tokens signed ES256
//
// Test-only routes beside the provider (the tests' control over the issuer, never part of
// what Switchboard talks to):
//   POST /_test/rotate  a new RSA and EC signing key (new kids) replace the old ones;
//                       answers {"kids": [...]}
//   POST /_test/sign    {"claims", "header"?, "key": "issuer" | "stranger"} -> {"token"}:
//                       a JWT signed with the issuer's current RSA key (to craft tokens whose
//                       only fault is a claim) or with a key the issuer never published, under
//                       the issuer's kid (a forgery)
//   GET  /_test/stats   {"jwks_fetches"}: how often the key set was fetched
import http from "node:http";
import { randomUUID } from "node:crypto";
import Provider from "oidc-provider";
import { SignJWT, exportJWK, generateKeyPair, importJWK } from "jose";

async function signingKey(alg) {
  const { privateKey } = await generateKeyPair(alg, { extractable: true });
  const jwk = await exportJWK(privateKey);
  return { ...jwk, alg, use: "sig", kid: `${alg.toLowerCase()}-${randomUUID()}` };
}

const clients = ["rs", "es"].map((p) => ({
  client_id: `${p}-client`,
  client_secret: `${p}-client-secret`,
  grant_types: ["client_credentials"],
  redirect_uris: [],
  response_types: [],
}));
const algOf = { "rs-client": "RS256", "es-client": "ES256" };

let issuer;
let keys;
let provider;
let jwksFetches = 0;

function build() {
  provider = new Provider(issuer, {
    clients,
    jwks: { keys },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        // Every resource on this machine is a Switchboard tool here; the scope a client asks
        // for is granted if it is one of Switchboard's (mcp:...).
        getResourceServerInfo: (ctx, resource, client) => ({
          scope: String(ctx.oidc.params.scope ?? "")
            .split(" ")
            .filter((s) => s.startsWith("mcp:"))
            .join(" "),
          audience: resource,
          accessTokenFormat: "jwt",
          accessTokenTTL: 300,
          jwt: { sign: { alg: algOf[client.clientId] } },
        }),
      },
    },
  });
  // Test traffic is plain HTTP on loopback.
  provider.proxy = false;
}

async function rotate() {
  keys = [await signingKey("RS256"), await signingKey("ES256")];
  build();
  return keys.map((k) => k.kid);
}

async function sign({ claims, header, key }) {
  const rsa = keys.find((k) => k.alg === "RS256");
  const signer = key === "stranger" ? await signingKey("RS256") : rsa;
  const privateKey = await importJWK(signer, "RS256");
  return new SignJWT(claims)
    .setProtectedHeader({ alg: "RS256", typ: "at+jwt", kid: rsa.kid, ...(header ?? {}) })
    .sign(privateKey);
}

function body(req) {
  return new Promise((resolve, reject) => {
    let data = "";
    req.on("data", (c) => (data += c));
    req.on("end", () => resolve(data ? JSON.parse(data) : {}));
    req.on("error", reject);
  });
}

function reply(res, status, value) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(value));
}

const server = http.createServer(async (req, res) => {
  try {
    if (req.url === "/_test/rotate" && req.method === "POST") {
      return reply(res, 200, { kids: await rotate() });
    }
    if (req.url === "/_test/sign" && req.method === "POST") {
      return reply(res, 200, { token: await sign(await body(req)) });
    }
    if (req.url === "/_test/stats") {
      return reply(res, 200, { jwks_fetches: jwksFetches });
    }
    if (req.url === "/jwks") {
      jwksFetches += 1;
    }
    return provider.callback()(req, res);
  } catch (e) {
    return reply(res, 500, { error: String(e?.message ?? e) });
  }
});

server.listen(0, "127.0.0.1", async () => {
  issuer = `http://127.0.0.1:${server.address().port}`;
  await rotate();
  console.log(JSON.stringify({ issuer }));
});

// The test harness ends this process by closing its stdin (or by a signal).
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
