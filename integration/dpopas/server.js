// A DPoP authorization server for the token broker's integration tests:
// panva's oidc-provider with DPoP (RFC 9449), client credentials, pushed
// authorization requests (RFC 9126), refresh tokens and JWT access tokens
// carrying cnf.jkt, signed with keys made at start (served at jwks_uri).
//
// Usage: node server.js CONFIG.json
//
// CONFIG.json:
//   clients           oidc-provider client metadata (client_id, client_secret,
//                     token_endpoint_auth_method, jwks, grant_types,
//                     redirect_uris, dpop_bound_access_tokens, ...)
//   resource          the resource indicator every access token is for
//                     (its aud); requests without "resource" get it
//   scopes            the resource's scopes, space separated
//   access_token_ttl  access token lifetime in seconds
//   require_nonce     true: every DPoP proof must carry a server nonce
//                     (use_dpop_nonce challenges at the token and PAR endpoints)
//
// It listens on 127.0.0.1 on a port the system chooses and prints one JSON
// line on stdout once it serves: {"issuer", "token_endpoint", ...}. Login
// and consent are oidc-provider's development interactions (any login is
// accepted). It stops on SIGTERM, SIGINT, or when its standard input closes
// (the test process that started it is gone).
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';

import Provider from 'oidc-provider';

function fail(message) {
  process.stderr.write(`dpopas: ${message}\n`);
  process.exit(2);
}

if (process.argv.length !== 3) {
  fail('usage: node server.js CONFIG.json');
}

let config;
try {
  config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
} catch (err) {
  fail(`reading the configuration ${process.argv[2]}: ${err.message}`);
}

const resource = config.resource;
const scopes = config.scopes || '';
const accessTokenTTL = config.access_token_ttl || 600;
const requireNonce = config.require_nonce === true;
if (typeof resource !== 'string' || resource === '') {
  fail('the configuration has no "resource": give the resource indicator the access tokens are for');
}
if (!Array.isArray(config.clients) || config.clients.length === 0) {
  fail('the configuration has no "clients": give at least one client\'s metadata');
}

// Signing keys made at start: ES256 for the access tokens, RS256 for ID
// tokens (oidc-provider's default ID token algorithm).
function signingKey(type, options, alg) {
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, alg, use: 'sig', kid: `${alg.toLowerCase()}-${crypto.randomUUID()}` };
}
const jwks = {
  keys: [
    signingKey('ec', { namedCurve: 'P-256' }, 'ES256'),
    signingKey('rsa', { modulusLength: 2048 }, 'RS256'),
  ],
};

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;

  const provider = new Provider(issuer, {
    clients: config.clients,
    jwks,
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access'],
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      pushedAuthorizationRequests: { enabled: true },
      revocation: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: crypto.randomBytes(32),
        requireNonce: () => requireNonce,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resource,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, indicator) => {
          if (indicator !== resource) {
            throw new Provider.errors.InvalidTarget(`unknown resource ${indicator}`);
          }
          return {
            scope: scopes,
            audience: resource,
            accessTokenTTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
    },
    enabledJWA: {
      dPoPSigningAlgValues: ['ES256', 'PS256', 'RS256', 'EdDSA'],
    },
    // A refresh token for every code grant of a client allowed the
    // refresh_token grant, without offline_access.
    issueRefreshToken: (ctx, client) => client.grantTypeAllowed('refresh_token'),
    ttl: { AccessToken: accessTokenTTL, ClientCredentials: accessTokenTTL },
    // Tokens are not logged: only the error and its description.
    renderError: (ctx, out) => {
      ctx.type = 'json';
      ctx.body = out;
    },
  });

  for (const event of ['server_error', 'grant.error', 'pushed_authorization_request.error', 'authorization.error']) {
    provider.on(event, (ctx, err) => {
      const detail = [err.error_description, err.error_detail].filter(Boolean).join(': ');
      process.stderr.write(`dpopas: ${event}: ${err.name}: ${err.message}${detail ? ` (${detail})` : ''}\n`);
    });
  }

  server.on('request', provider.callback());

  const url = (route) => `${issuer}${provider.pathFor(route)}`;
  process.stdout.write(`${JSON.stringify({
    issuer,
    port,
    token_endpoint: url('token'),
    authorization_endpoint: url('authorization'),
    pushed_authorization_request_endpoint: url('pushed_authorization_request'),
    jwks_uri: url('jwks'),
    revocation_endpoint: url('revocation'),
  })}\n`);
});

function stop() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
process.stdin.on('end', stop);
process.stdin.resume();
