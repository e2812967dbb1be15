// Test-only authorisation server (panva's oidc-provider) and resource server for behalf's
// integration tests. One process, two origins on 127.0.0.1: the AS on AS_PORT, the API on
// API_PORT (0 = pick a free port; the chosen URLs are written to AS_READY_FILE).
//
// Why a real, independent AS: our OAuth client must be proven against someone else's reading of
// the RFCs (PKCE, rotation with reuse detection, RFC 7009/7662/7591/8707/9207), not our own.
// What is ours here is only the glue: interaction pages, the resource server, and /_test/ hooks
// (grant revocation, request statistics, fault injection, what was issued) that a real SaaS
// would not expose.
//
// Environment:
//   AS_PORT, API_PORT            listening ports (default 0: any free port)
//   AS_READY_FILE                where to write {"issuer", "api_base", "pid"} once both listen
//   AS_ACCESS_TOKEN_TTL          access token lifetime, seconds (default 300)
//   AS_REFRESH_TOKEN_TTL         refresh token lifetime, seconds (default 14 days)
//   AS_API_SCOPES                space-separated API scopes (default below)
//   AS_EXIT_ON_STDIN_EOF         "0" to keep running when stdin closes (default: exit)

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as querystring from 'node:querystring';

import { Provider, errors } from 'oidc-provider';

const HOST = '127.0.0.1';
const env = process.env;

function intFromEnv(name, fallback) {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw new Error(`${name} must be a non-negative integer, got ${JSON.stringify(raw)}`);
  }
  return value;
}

const settings = {
  asPort: intFromEnv('AS_PORT', 0),
  apiPort: intFromEnv('API_PORT', 0),
  accessTokenTTL: intFromEnv('AS_ACCESS_TOKEN_TTL', 300),
  refreshTokenTTL: intFromEnv('AS_REFRESH_TOKEN_TTL', 14 * 24 * 3600),
  apiScopes: (env.AS_API_SCOPES || 'reports:read reports:write calendar:read')
    .split(/\s+/).filter(Boolean),
  readyFile: env.AS_READY_FILE,
  exitOnStdinEof: env.AS_EXIT_ON_STDIN_EOF !== '0',
};

const OIDC_SCOPES = ['openid', 'offline_access', 'profile', 'email'];
const PASSWORD = 'pass';
const epoch = () => Math.floor(Date.now() / 1000);
const sleep = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

// ---------------------------------------------------------------------------------------------
// Storage

/**
 * Unbounded in-memory storage behind oidc-provider's adapter interface.
 *
 * The bundled development adapter is an LRU capped at about a thousand entries; a long pytest
 * session (every token, session, and client-assertion jti is an entry) can overflow it and
 * silently lose grants, which would look exactly like the bugs these tests hunt for.
 * Payloads are cloned in and out, like a real database, so callers cannot alias stored state.
 */
class Store {
  #models = new Map();

  // Every secret this AS issued or was shown (never pruned: revoked tokens count too), for
  // leak scans: {kind, value}. Opaque tokens and codes are stored under their own value.
  issued = [];

  #seen = new Set();

  noteIssued(kind, value) {
    if (typeof value !== 'string' || !value) return;
    const key = `${kind}\u0000${value}`;
    if (this.#seen.has(key)) return;
    this.#seen.add(key);
    this.issued.push({ kind, value });
  }

  model(name) {
    if (!this.#models.has(name)) this.#models.set(name, new Map());
    return this.#models.get(name);
  }

  live(name) {
    const now = Date.now();
    const out = [];
    for (const [id, entry] of this.model(name)) {
      if (entry.expiresAt > now) out.push([id, entry.payload]);
    }
    return out;
  }

  sweep() {
    const now = Date.now();
    for (const entries of this.#models.values()) {
      for (const [id, entry] of entries) {
        if (entry.expiresAt <= now) entries.delete(id);
      }
    }
  }
}

class StoreAdapter {
  // Entries outlive their `exp` by this much so that oidc-provider, not the store, decides
  // expiry (it reports "expired" rather than "not found", and applies its clock tolerance).
  static GRACE_MS = 60_000;

  static SECRET_MODELS = new Set(['AccessToken', 'RefreshToken', 'AuthorizationCode',
    'RegistrationAccessToken', 'ClientCredentials', 'DeviceCode', 'BackchannelAuthenticationRequest']);

  constructor(name, store) {
    this.name = name;
    this.store = store;
    this.entries = store.model(name);
  }

  #get(id) {
    const entry = this.entries.get(id);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      this.entries.delete(id);
      return undefined;
    }
    return entry;
  }

  async upsert(id, payload, expiresIn) {
    if (StoreAdapter.SECRET_MODELS.has(this.name)) this.store.noteIssued(this.name, id);
    if (this.name === 'Client') this.store.noteIssued('ClientSecret', payload.client_secret);
    const expiresAt = typeof expiresIn === 'number'
      ? Date.now() + expiresIn * 1000 + StoreAdapter.GRACE_MS
      : Infinity;
    this.entries.set(id, { payload: structuredClone(payload), expiresAt });
  }

  async find(id) {
    const entry = this.#get(id);
    return entry ? structuredClone(entry.payload) : undefined;
  }

  async #findBy(field, value) {
    for (const [id, entry] of this.entries) {
      if (entry.payload[field] === value) return this.find(id);
    }
    return undefined;
  }

  async findByUid(uid) { return this.#findBy('uid', uid); }

  async findByUserCode(userCode) { return this.#findBy('userCode', userCode); }

  async consume(id) {
    const entry = this.#get(id);
    if (entry) entry.payload.consumed = epoch();
  }

  async destroy(id) { this.entries.delete(id); }

  async revokeByGrantId(grantId) {
    for (const [id, entry] of this.entries) {
      if (entry.payload.grantId === grantId) this.entries.delete(id);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fault injection and request statistics

const FAULT_MODES = new Set(['status', 'hang', 'drop', 'lose_response']);
const AS_FAULT_ENDPOINTS = {
  token: '/token',
  revocation: '/token/revocation',
  introspection: '/token/introspection',
  registration: '/reg',
  userinfo: '/me',
  authorization: '/auth',
  jwks: '/jwks',
  discovery: '/.well-known/openid-configuration',
};

class BadRequest extends Error {}

/** A queue of fault rules; each applies to the next `count` requests it matches. */
class Faults {
  #rules = [];

  add(spec, { endpoints } = {}) {
    const rule = {
      mode: spec.mode ?? 'status',
      count: spec.count ?? 1,
      status: spec.status ?? 503,
      retry_after: spec.retry_after,
      error: spec.error,
      error_description: spec.error_description,
      seconds: spec.seconds ?? 30,
      then: spec.then ?? 'drop',
      endpoint: spec.endpoint,
      grant_type: spec.grant_type,
      path: spec.path,
    };
    if (!FAULT_MODES.has(rule.mode)) throw new BadRequest(`unknown fault mode ${rule.mode}`);
    if (!Number.isInteger(rule.count) || rule.count < 1) throw new BadRequest('count must be >= 1');
    if (!Number.isInteger(rule.status) || rule.status < 100 || rule.status > 599) {
      throw new BadRequest('status must be an HTTP status code');
    }
    if (typeof rule.seconds !== 'number' || rule.seconds < 0) throw new BadRequest('bad seconds');
    if (!['drop', 'process'].includes(rule.then)) throw new BadRequest('then must be drop|process');
    if (endpoints && !(rule.endpoint in endpoints)) {
      throw new BadRequest(`endpoint must be one of ${Object.keys(endpoints).join(', ')}`);
    }
    this.#rules.push(rule);
    return rule;
  }

  /** Consume one use of the first rule that matches, if any. */
  take(matches) {
    const index = this.#rules.findIndex(matches);
    if (index === -1) return undefined;
    const rule = this.#rules[index];
    rule.count -= 1;
    if (rule.count === 0) this.#rules.splice(index, 1);
    return rule;
  }

  list() { return this.#rules.map((rule) => ({ ...rule })); }

  clear() { this.#rules = []; }
}

function faultBody(rule) {
  const headers = {};
  if (rule.retry_after !== undefined && rule.retry_after !== null) {
    headers['retry-after'] = String(rule.retry_after);
  }
  if (rule.error) {
    headers['content-type'] = 'application/json; charset=utf-8';
    const body = { error: rule.error };
    if (rule.error_description) body.error_description = rule.error_description;
    return { headers, body: JSON.stringify(body) };
  }
  headers['content-type'] = 'text/plain; charset=utf-8';
  return { headers, body: `injected fault: HTTP ${rule.status}\n` };
}

function dropConnection(req) {
  req.socket.destroy();
}

function readBody(req, limit = 1024 * 1024) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > limit) {
        reject(new BadRequest('request body too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function parseJson(text) {
  if (!text) return {};
  try {
    const value = JSON.parse(text);
    if (value === null || typeof value !== 'object' || Array.isArray(value)) {
      throw new BadRequest('expected a JSON object');
    }
    return value;
  } catch (err) {
    if (err instanceof BadRequest) throw err;
    throw new BadRequest('invalid JSON body');
  }
}

/** Which client a token-endpoint style request claims to be (for statistics only, unverified). */
function claimedClientId(headers, form) {
  const auth = headers.authorization || '';
  if (auth.toLowerCase().startsWith('basic ')) {
    const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
    const user = decoded.split(':', 1)[0];
    try {
      return decodeURIComponent(user.replace(/\+/g, ' '));
    } catch {
      return user;
    }
  }
  if (typeof form.client_assertion === 'string') {
    try {
      const payload = JSON.parse(Buffer.from(form.client_assertion.split('.')[1], 'base64url'));
      return payload.sub ?? payload.iss ?? null;
    } catch {
      return null;
    }
  }
  return typeof form.client_id === 'string' ? form.client_id : null;
}

const COUNTED_ENDPOINTS = { '/token': 'token', '/token/revocation': 'revocation', '/token/introspection': 'introspection' };

class Stats {
  requests = [];

  record(entry) {
    this.requests.push(entry);
    return entry;
  }

  summary() {
    const out = {};
    for (const name of Object.values(COUNTED_ENDPOINTS)) {
      out[name] = { total: 0, by_client_id: {} };
    }
    out.token.by_grant_type = {};
    for (const r of this.requests) {
      const bucket = out[r.endpoint];
      bucket.total += 1;
      const client = r.client_id ?? '(unknown)';
      if (r.endpoint === 'token') {
        const gty = r.grant_type ?? '(none)';
        bucket.by_grant_type[gty] = (bucket.by_grant_type[gty] ?? 0) + 1;
        bucket.by_client_id[client] ??= {};
        bucket.by_client_id[client][gty] = (bucket.by_client_id[client][gty] ?? 0) + 1;
      } else {
        bucket.by_client_id[client] = (bucket.by_client_id[client] ?? 0) + 1;
      }
    }
    out.requests = this.requests;
    return out;
  }

  reset() { this.requests = []; }
}

// ---------------------------------------------------------------------------------------------
// HTML

function esc(value) {
  return String(value)
    .replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;').replace(/'/g, '&#39;');
}

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${esc(title)}</title>
<style>body{font-family:sans-serif;max-width:32em;margin:3em auto}label{display:block;margin:.5em 0}</style>
</head><body>
<h1>${esc(title)}</h1>
${body}
</body></html>`;
}

function loginPage({ uid, clientName, error }) {
  return page('Sign in', `
<p>to continue to <strong id="client">${esc(clientName)}</strong></p>
${error ? `<p class="error" id="error" role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" id="login-form">
  <label>Username <input type="text" name="login" id="login" autocomplete="username" autofocus required></label>
  <label>Password <input type="password" name="password" id="password" autocomplete="current-password" required></label>
  <button type="submit" id="submit">Sign in</button>
</form>`);
}

function consentPage({
  uid, clientName, accountId, scopes,
}) {
  const items = scopes.map((scope) => (scope === 'openid'
    // openid cannot be declined (oidc-provider never rejects it); shown for completeness.
    ? `<li><label><input type="checkbox" name="scope" value="openid" checked disabled> openid (required)</label></li>`
    : `<li><label><input type="checkbox" name="scope" value="${esc(scope)}" checked> ${esc(scope)}</label></li>`));
  return page('Authorise access', `
<p><strong id="client">${esc(clientName)}</strong> wants to act as
<strong id="account">${esc(accountId)}</strong> with:</p>
<form method="post" action="/interaction/${esc(uid)}/consent" id="consent-form">
  <ul id="scopes">
    ${items.join('\n    ')}
  </ul>
  <button type="submit" name="decision" value="allow" id="allow">Allow</button>
  <button type="submit" name="decision" value="deny" id="deny">Deny</button>
</form>`);
}

// ---------------------------------------------------------------------------------------------
// Authorisation server

function signingKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), use: 'sig', alg: 'RS256',
  };
}

function removeScope(list, scope) {
  return (list ?? '').split(' ').filter((s) => s && s !== scope).join(' ');
}

/** Grant a scope again that an earlier consent on the same grant rejected. */
function unreject(grant, scope, indicator) {
  if (!grant.rejected) return;
  if (indicator === undefined && grant.rejected.openid?.scope) {
    grant.rejected.openid.scope = removeScope(grant.rejected.openid.scope, scope);
  } else if (indicator !== undefined && grant.rejected.resources?.[indicator]) {
    grant.rejected.resources[indicator] = removeScope(grant.rejected.resources[indicator], scope);
  }
}

function buildProvider({ issuer, apiBase, store }) {
  const apiScopes = new Set(settings.apiScopes);
  const isApi = (indicator) => {
    try {
      return new URL(indicator).href === `${apiBase}/`;
    } catch {
      return false;
    }
  };
  const requestsApiScope = (ctx) => (ctx.oidc.params.scope ?? '')
    .split(' ').some((scope) => apiScopes.has(scope));

  const configuration = {
    adapter: (name) => new StoreAdapter(name, store),
    jwks: { keys: [signingKey()] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
    scopes: OIDC_SCOPES,
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    // Any username is an account; its subject is what was typed.
    async findAccount(_ctx, sub) {
      return {
        accountId: sub,
        async claims() {
          return {
            sub, name: sub, preferred_username: sub, email: `${sub}@example.test`, email_verified: true,
          };
        },
      };
    },
    pkce: { required: () => true },
    // Refresh tokens for every client allowed the refresh_token grant, without offline_access
    // or prompt=consent (the library default ties them to offline_access).
    async issueRefreshToken(_ctx, client) {
      return client.grantTypeAllowed('refresh_token');
    },
    // Rotate on every use. A rotated (consumed) token presented again makes oidc-provider
    // destroy it and revoke the whole grant: every token issued under it dies.
    rotateRefreshToken: true,
    // Delegations outlive the user's browser session at the AS.
    async expiresWithSession() { return false; },
    ttl: {
      AccessToken: (_ctx, token) => token.resourceServer?.accessTokenTTL ?? settings.accessTokenTTL,
      AuthorizationCode: 60,
      IdToken: 3600,
      RefreshToken: settings.refreshTokenTTL,
      Interaction: 3600,
      Session: 14 * 24 * 3600,
      Grant: Math.max(settings.refreshTokenTTL, 365 * 24 * 3600),
    },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Authorisation error', `
<p id="error">${esc(out.error)}</p>
<p id="error_description">${esc(out.error_description ?? '')}</p>`);
    },
    features: {
      devInteractions: { enabled: false },
      registration: { enabled: true, initialAccessToken: false },
      // RFC 7592: clients read and update their registration (e.g. to rotate a private_key_jwt
      // key: publish old + new, then drop the old); the access token rotates on each update.
      registrationManagement: { enabled: true },
      // Clients may revoke only their own tokens (RFC 7009 says so).
      revocation: {
        enabled: true,
        async allowedPolicy(_ctx, client, token) {
          if (token.clientId !== client.clientId) {
            throw new errors.InvalidRequest('client is not authorized to revoke the presented token');
          }
          return true;
        },
      },
      // Any authenticated client may introspect any token, as a resource server would.
      introspection: { enabled: true, allowedPolicy: async () => true },
      userinfo: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Authorisation requests that ask for API scopes target the API without a `resource`
        // parameter; pure sign-in requests (openid profile ...) get a userinfo token instead.
        async defaultResource(ctx, _client, oneOf) {
          if (oneOf) return oneOf;
          return requestsApiScope(ctx) ? apiBase : undefined;
        },
        // Without this, a code or refresh grant that includes `openid` yields a token for
        // userinfo (no audience, no API scopes) unless the client repeats `resource`.
        async useGrantedResource() { return true; },
        async getResourceServerInfo(_ctx, indicator) {
          if (!isApi(indicator)) {
            throw new errors.InvalidTarget(`unknown resource ${indicator}`);
          }
          return {
            scope: settings.apiScopes.join(' '),
            audience: apiBase,
            accessTokenFormat: 'opaque',
            accessTokenTTL: settings.accessTokenTTL,
          };
        },
      },
    },
  };

  const provider = new Provider(issuer, configuration);
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  for (const event of ['grant.error', 'authorization.error', 'registration_create.error',
    'revocation.error', 'introspection.error', 'userinfo.error']) {
    provider.on(event, (_ctx, err) => {
      // error_detail says why (e.g. "refresh token already used"); clients never see it.
      console.error(event, err.error ?? err.name, err.error_detail ?? err.error_description ?? err.message);
    });
  }
  return provider;
}

/** The scopes a consent page offers: requested ones this AS knows, openid first. */
function offeredScopes(params) {
  const known = new Set([...OIDC_SCOPES, ...settings.apiScopes]);
  const requested = [...new Set((params.scope ?? '').split(' '))].filter((s) => known.has(s));
  return requested.sort((a, b) => (a === 'openid' ? -1 : b === 'openid' ? 1 : 0));
}

function interactionRoutes(provider, apiBase) {
  const apiScopes = new Set(settings.apiScopes);

  async function clientName(clientId) {
    const client = await provider.Client.find(clientId);
    return client?.clientName ?? clientId;
  }

  async function show(ctx, uid, error) {
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid) throw new BadRequest('interaction mismatch');
    const name = await clientName(details.params.client_id);
    ctx.type = 'html';
    if (details.prompt.name === 'login') {
      ctx.body = loginPage({ uid, clientName: name, error });
    } else if (details.prompt.name === 'consent') {
      ctx.body = consentPage({
        uid, clientName: name, accountId: details.session.accountId, scopes: offeredScopes(details.params),
      });
    } else {
      throw new BadRequest(`unsupported prompt ${details.prompt.name}`);
    }
  }

  async function finish(ctx, result, options) {
    const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, options);
    ctx.status = 303;
    ctx.redirect(returnTo);
  }

  async function login(ctx, uid) {
    const form = querystring.parse(await readBody(ctx.req));
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid || details.prompt.name !== 'login') throw new BadRequest('not a login');
    const username = typeof form.login === 'string' ? form.login.trim() : '';
    if (!username || form.password !== PASSWORD) {
      ctx.status = 401;
      await show(ctx, uid, 'Wrong username or password.');
      return;
    }
    await finish(ctx, { login: { accountId: username } }, { mergeWithLastSubmission: false });
  }

  async function consent(ctx, uid) {
    const form = querystring.parse(await readBody(ctx.req));
    const details = await provider.interactionDetails(ctx.req, ctx.res);
    if (details.uid !== uid || details.prompt.name !== 'consent') throw new BadRequest('not a consent');
    if (form.decision === 'deny') {
      await finish(ctx, { error: 'access_denied', error_description: 'End-User denied the request' });
      return;
    }
    const { params, session: { accountId } } = details;
    // An earlier grant of this browser session, unless it was revoked meanwhile.
    const existing = details.grantId ? await provider.Grant.find(details.grantId) : undefined;
    const grant = existing ?? new provider.Grant({ accountId, clientId: params.client_id });
    const ticked = new Set([].concat(form.scope ?? []));
    const missing = details.prompt.details.missingResourceScopes ?? {};
    const indicator = Object.keys(missing)[0] ?? (typeof params.resource === 'string' ? params.resource : apiBase);
    for (const scope of offeredScopes(params)) {
      const api = apiScopes.has(scope) ? indicator : undefined;
      if (scope === 'openid' || ticked.has(scope)) {
        unreject(grant, scope, api);
        if (api) grant.addResourceScope(api, scope); else grant.addOIDCScope(scope);
      } else if (api) {
        grant.rejectResourceScope(api, scope);
      } else {
        grant.rejectOIDCScope(scope);
      }
    }
    if (details.prompt.details.missingOIDCClaims) {
      grant.addOIDCClaims(details.prompt.details.missingOIDCClaims);
    }
    const grantId = await grant.save();
    await finish(ctx, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }

  return async (ctx, next) => {
    const match = ctx.path.match(/^\/interaction\/([^/]+)(?:\/(login|consent))?$/);
    if (!match) return next();
    const [, uid, action] = match;
    try {
      if (ctx.method === 'GET' && !action) return await show(ctx, uid);
      if (ctx.method === 'POST' && action === 'login') return await login(ctx, uid);
      if (ctx.method === 'POST' && action === 'consent') return await consent(ctx, uid);
      ctx.status = 405;
      return undefined;
    } catch (err) {
      if (!(err instanceof BadRequest) && err.name !== 'SessionNotFound') throw err;
      ctx.status = 400;
      ctx.type = 'html';
      ctx.body = page('Authorisation error', `
<p id="error">${err.name === 'SessionNotFound' ? 'session_not_found' : 'invalid_request'}</p>
<p id="error_description">${esc(err.error_description ?? err.message)}</p>`);
      return undefined;
    }
  };
}

function sendJson(ctx, status, body) {
  ctx.status = status;
  ctx.type = 'application/json';
  ctx.body = JSON.stringify(body);
}

/** Test-only admin endpoints on the AS origin; a real SaaS would not have these. */
function asAdminRoutes({ provider, store, stats, faults }) {
  const grantsOf = (sub, clientId) => store.live('Grant')
    .filter(([, p]) => (!sub || p.accountId === sub) && (!clientId || p.clientId === clientId));

  async function tokenInfo(token) {
    for (const model of ['AccessToken', 'RefreshToken', 'AuthorizationCode']) {
      const found = await provider[model].find(token, { ignoreExpiration: true });
      if (!found) continue;
      const grant = found.grantId ? await provider.Grant.find(found.grantId) : undefined;
      return {
        kind: model,
        active: found.isValid && !!grant,
        expired: found.isExpired,
        consumed: !!found.consumed,
        grant_exists: !!grant,
        sub: found.accountId,
        client_id: found.clientId,
        scope: found.scope,
        aud: found.aud,
        exp: found.exp,
        grant_id: found.grantId,
      };
    }
    return { kind: null, active: false };
  }

  const routes = {
    'POST /_test/revoke-grants': async (body) => {
      if (typeof body.sub !== 'string') throw new BadRequest('sub is required');
      const grants = grantsOf(body.sub, body.client_id);
      for (const [grantId] of grants) {
        await Promise.all(['AccessToken', 'RefreshToken', 'AuthorizationCode']
          .map((model) => provider[model].adapter.revokeByGrantId(grantId)));
        await provider.Grant.adapter.destroy(grantId);
      }
      return { revoked_grants: grants.length };
    },
    'GET /_test/grants': async (_body, query) => ({
      grants: grantsOf(query.sub, query.client_id).map(([id, p]) => ({
        grant_id: id, sub: p.accountId, client_id: p.clientId, openid: p.openid, resources: p.resources, rejected: p.rejected,
      })),
    }),
    'POST /_test/token-info': async (body) => {
      if (typeof body.token !== 'string') throw new BadRequest('token is required');
      return tokenInfo(body.token);
    },
    // Who the calling browser is signed in as (by its session cookie), or null.
    'GET /_test/whoami': async (_body, _query, ctx) => {
      const id = ctx.cookies.get(provider.cookieName('session'));
      const session = id ? await provider.Session.find(id) : undefined;
      return { sub: session?.accountId ?? null };
    },
    // Every token, code, client secret and assertion issued or presented so far (leak scans).
    'GET /_test/issued': async () => ({ issued: store.issued }),
    'GET /_test/stats': async () => stats.summary(),
    'POST /_test/reset-stats': async () => { stats.reset(); return {}; },
    'GET /_test/faults': async () => ({ faults: faults.list() }),
    'POST /_test/faults': async (body) => ({ fault: faults.add(body, { endpoints: AS_FAULT_ENDPOINTS }) }),
    'POST /_test/reset-faults': async () => { faults.clear(); return {}; },
  };

  return async (ctx, next) => {
    if (!ctx.path.startsWith('/_test/')) return next();
    const handler = routes[`${ctx.method} ${ctx.path}`];
    if (!handler) return sendJson(ctx, 404, { error: 'not_found' });
    try {
      const body = ctx.method === 'POST' ? parseJson(await readBody(ctx.req)) : {};
      return sendJson(ctx, 200, await handler(body, ctx.query, ctx));
    } catch (err) {
      if (err instanceof BadRequest) return sendJson(ctx, 400, { error: 'invalid_request', error_description: err.message });
      throw err;
    }
  };
}

/**
 * Run `fn` after every earlier call with the same key has finished.
 *
 * Token requests presenting the same refresh token (or code) are processed one at a time, as a
 * database row lock would: oidc-provider reads, checks and consumes a token in separate async
 * steps, so two concurrent uses could otherwise both succeed. Serialised, the second is always
 * seen as reuse (invalid_grant, grant revoked), which is what a product race must be punished by.
 */
function serializer() {
  const tails = new Map();
  return async (key, fn) => {
    if (!key) return fn();
    const previous = tails.get(key) ?? Promise.resolve();
    let release;
    const mine = new Promise((resolve) => { release = resolve; });
    const tail = previous.then(() => mine);
    tails.set(key, tail);
    await previous;
    try {
      return await fn();
    } finally {
      release();
      if (tails.get(key) === tail) tails.delete(key);
    }
  };
}

/** Counts token/revocation/introspection requests and applies injected faults to AS endpoints. */
function asFaultsAndStats({ stats, faults }) {
  const serialized = serializer();
  const endpointOf = (path) => Object.entries(AS_FAULT_ENDPOINTS)
    .find(([, p]) => p === path || (p.startsWith('/.well-known') && path.startsWith('/.well-known/')))?.[0];

  return async (ctx, next) => {
    const endpoint = endpointOf(ctx.path);
    if (!endpoint) return next();
    const counted = COUNTED_ENDPOINTS[ctx.path] && ctx.method === 'POST';
    let form = {};
    if (counted && ctx.is('application/x-www-form-urlencoded')) {
      // Read the body here so that faults can match grant_type and statistics can name the
      // client even for requests that never reach oidc-provider; it then parses req.body.
      ctx.req.body = await readBody(ctx.req, 56 * 1024);
      form = querystring.parse(ctx.req.body);
    }
    const entry = counted ? stats.record({
      time: Date.now() / 1000,
      endpoint: COUNTED_ENDPOINTS[ctx.path],
      grant_type: typeof form.grant_type === 'string' ? form.grant_type : null,
      client_id: claimedClientId(ctx.headers, form),
      status: null,
      fault: null,
    }) : { };
    const rule = faults.take((r) => r.endpoint === endpoint
      && (!r.grant_type || r.grant_type === form.grant_type));
    entry.fault = rule?.mode ?? null;
    const lockKey = endpoint === 'token' && (form.refresh_token || form.code);
    const proceed = () => serialized(typeof lockKey === 'string' ? lockKey : undefined, next);

    if (!rule) {
      await proceed();
      entry.status = ctx.status;
      return undefined;
    }
    switch (rule.mode) {
      case 'status': {
        const { headers, body } = faultBody(rule);
        ctx.status = rule.status;
        ctx.set(headers);
        ctx.body = body;
        entry.status = rule.status;
        return undefined;
      }
      case 'hang':
        await sleep(rule.seconds * 1000);
        if (rule.then === 'process') {
          await proceed();
          entry.status = ctx.status;
          return undefined;
        }
        ctx.respond = false;
        dropConnection(ctx.req);
        return undefined;
      case 'lose_response':
        await proceed();
        entry.processed_status = ctx.status;
        ctx.respond = false;
        dropConnection(ctx.req);
        return undefined;
      default: // drop
        ctx.respond = false;
        dropConnection(ctx.req);
        return undefined;
    }
  };
}

/**
 * Notes the secrets in token and registration answers (id_token, which is never stored, and
 * the rest, belt and braces) and those clients present (code_verifier, client_assertion,
 * client_secret_post, the secret inside Basic credentials) in `store.issued`.
 */
function issuedRecorder({ store }) {
  const answered = ['access_token', 'refresh_token', 'id_token', 'client_secret', 'registration_access_token'];
  const presented = ['code', 'code_verifier', 'client_assertion', 'client_secret', 'refresh_token', 'token'];
  return async (ctx, next) => {
    await next();
    const body = ctx.body;
    if (body && typeof body === 'object' && !Buffer.isBuffer(body) && typeof body.pipe !== 'function') {
      for (const field of answered) store.noteIssued(`response:${field}`, body[field]);
    }
    if (typeof ctx.req.body === 'string') {
      const form = querystring.parse(ctx.req.body);
      for (const field of presented) store.noteIssued(`request:${field}`, form[field]);
    }
    const auth = ctx.headers.authorization || '';
    if (auth.toLowerCase().startsWith('basic ')) {
      const decoded = Buffer.from(auth.slice(6).trim(), 'base64').toString('utf8');
      const secret = decoded.slice(decoded.indexOf(':') + 1);
      try {
        store.noteIssued('request:basic_secret', decodeURIComponent(secret.replace(/\+/g, ' ')));
      } catch {
        store.noteIssued('request:basic_secret', secret);
      }
    }
  };
}

/** Serves RFC 8414 metadata (same document) and lists the API scopes in scopes_supported. */
function metadata() {
  return async (ctx, next) => {
    if (ctx.method === 'GET' && ctx.path === '/.well-known/oauth-authorization-server') {
      ctx.path = '/.well-known/openid-configuration';
    }
    const isDiscovery = ctx.path === '/.well-known/openid-configuration';
    await next();
    if (isDiscovery && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
      ctx.body.scopes_supported = [...new Set([...ctx.body.scopes_supported, ...settings.apiScopes])];
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Resource server ("the SaaS API")

function resourceServer({ provider, apiBase }) {
  const calls = [];
  const faults = new Faults();
  const reports = new Map(); // sub -> [{id, title, ...}]
  let seq = 0;

  /** Resolve a bearer token the way a real RS would: it must be live, for us, and granted. */
  async function resolve(token) {
    const at = await provider.AccessToken.find(token);
    if (!at) return { error: 'unknown or revoked token' };
    if (at.isExpired) return { error: 'token expired' };
    if (at.aud !== apiBase) return { error: 'token not issued for this API' };
    const grant = at.grantId ? await provider.Grant.find(at.grantId) : undefined;
    if (!grant) return { error: 'grant revoked' };
    return { at };
  }

  const routes = {
    'GET /v2/me': { scope: null, run: ({ at }) => ({ sub: at.accountId, client_id: at.clientId, scope: at.scope }) },
    'GET /v2/reports': { scope: 'reports:read', run: ({ at }) => ({ reports: reports.get(at.accountId) ?? [] }) },
    'POST /v2/reports': {
      scope: 'reports:write',
      run: ({ at, body }) => {
        const data = parseJson(body);
        const report = { id: crypto.randomUUID(), ...data, owner: at.accountId, created_by: at.clientId };
        reports.set(at.accountId, [...(reports.get(at.accountId) ?? []), report]);
        return [201, report];
      },
    },
    'GET /v2/calendar': {
      scope: 'calendar:read',
      run: ({ at }) => ({ events: [{ id: 'evt-1', title: `Stand-up for ${at.accountId}`, start: '2030-01-01T09:00:00Z' }] }),
    },
    'GET /v2/slow': {
      scope: null,
      run: async ({ url }) => {
        const ms = Math.min(Number(url.searchParams.get('ms') ?? 1000) || 0, 600_000);
        await sleep(ms);
        return { slept_ms: ms };
      },
    },
  };

  function bearerChallenge(fields) {
    return ['Bearer realm="test-api"', ...Object.entries(fields).map(([k, v]) => `${k}="${v}"`)].join(', ');
  }

  /** Who is calling: resolves any bearer token and notes it (hashed) in the call record. */
  async function identify(req, record) {
    const auth = req.headers.authorization ?? '';
    const match = auth.match(/^Bearer\s+(\S+)\s*$/i);
    if (!match) {
      if (auth) record.auth_scheme = auth.split(' ', 1)[0];
      return { bearer: false };
    }
    record.token_sha256 = crypto.createHash('sha256').update(match[1]).digest('hex');
    const { at, error } = await resolve(match[1]);
    if (at) Object.assign(record, { sub: at.accountId, client_id: at.clientId, scope: at.scope });
    return { bearer: true, at, tokenError: error };
  }

  async function handle(req, url, body, { bearer, at, tokenError }) {
    const route = routes[`${req.method} ${url.pathname}`];
    if (!route) return { status: 404, body: { error: 'not_found' } };
    if (!bearer) {
      return { status: 401, headers: { 'www-authenticate': bearerChallenge({}) }, body: { error: 'unauthorized' } };
    }
    if (!at) {
      return {
        status: 401,
        headers: { 'www-authenticate': bearerChallenge({ error: 'invalid_token', error_description: tokenError }) },
        body: { error: 'invalid_token', error_description: tokenError },
      };
    }
    if (route.scope && !at.scopes.has(route.scope)) {
      return {
        status: 403,
        headers: { 'www-authenticate': bearerChallenge({ error: 'insufficient_scope', scope: route.scope }) },
        body: { error: 'insufficient_scope', scope: route.scope },
      };
    }
    const result = await route.run({ at, body, url });
    const [status, payload] = Array.isArray(result) ? result : [200, result];
    return { status, body: payload };
  }

  function write(res, { status, headers = {}, body }) {
    const text = typeof body === 'string' ? body : JSON.stringify(body);
    res.writeHead(status, {
      'content-type': 'application/json; charset=utf-8', 'cache-control': 'no-store', ...headers,
    });
    res.end(text);
  }

  async function admin(req, res, url) {
    const key = `${req.method} ${url.pathname}`;
    try {
      const body = req.method === 'POST' ? parseJson(await readBody(req)) : {};
      if (key === 'GET /_test/api-calls') return write(res, { status: 200, body: { calls } });
      if (key === 'POST /_test/reset-api-calls') { calls.length = 0; return write(res, { status: 200, body: {} }); }
      if (key === 'GET /_test/faults') return write(res, { status: 200, body: { faults: faults.list() } });
      if (key === 'POST /_test/faults') return write(res, { status: 200, body: { fault: faults.add(body) } });
      if (key === 'POST /_test/reset-faults') { faults.clear(); return write(res, { status: 200, body: {} }); }
      return write(res, { status: 404, body: { error: 'not_found' } });
    } catch (err) {
      if (err instanceof BadRequest) return write(res, { status: 400, body: { error: 'invalid_request', error_description: err.message } });
      throw err;
    }
  }

  return async (req, res) => {
    const url = new URL(req.url, apiBase);
    if (url.pathname.startsWith('/_test/')) return admin(req, res, url);

    const started = Date.now();
    seq += 1;
    const record = {
      seq,
      time: started / 1000,
      method: req.method,
      path: url.pathname,
      query: url.search.slice(1),
      status: null,
      sub: null,
      client_id: null,
      scope: null,
      token_sha256: null,
      fault: null,
      aborted: false,
      duration_ms: null,
    };
    calls.push(record);
    res.on('close', () => {
      record.aborted = !res.writableFinished;
      record.duration_ms = Date.now() - started;
    });

    try {
      const body = await readBody(req);
      const identity = await identify(req, record);
      const rule = faults.take((r) => !r.path || url.pathname.startsWith(r.path));
      record.fault = rule?.mode ?? null;
      if (rule?.mode === 'status') {
        const fault = faultBody(rule);
        record.status = rule.status;
        res.writeHead(rule.status, fault.headers);
        return res.end(fault.body);
      }
      if (rule?.mode === 'drop') return dropConnection(req);
      if (rule?.mode === 'hang') {
        await sleep(rule.seconds * 1000);
        if (rule.then !== 'process') return dropConnection(req);
      }
      const response = await handle(req, url, body, identity);
      if (rule?.mode === 'lose_response') {
        record.processed_status = response.status;
        return dropConnection(req);
      }
      record.status = response.status;
      return write(res, response);
    } catch (err) {
      if (err instanceof BadRequest) {
        record.status = 400;
        return write(res, { status: 400, body: { error: 'invalid_request', error_description: err.message } });
      }
      console.error('api error', err);
      record.status = 500;
      return write(res, { status: 500, body: { error: 'server_error' } });
    }
  };
}

// ---------------------------------------------------------------------------------------------
// Start-up and lifetime

function listen(server, port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, HOST, () => resolve(server.address().port));
  });
}

/** Exit with whoever started us: stdin closing (pytest died) or being re-parented. */
function tieLifetimeToParent() {
  if (settings.exitOnStdinEof) {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('close', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
  }
  const parent = process.ppid;
  setInterval(() => { if (process.ppid !== parent) process.exit(0); }, 500).unref();
  for (const signal of ['SIGTERM', 'SIGINT', 'SIGHUP']) process.on(signal, () => process.exit(0));
}

async function main() {
  tieLifetimeToParent();
  const asServer = http.createServer();
  const apiServer = http.createServer();
  const asPort = await listen(asServer, settings.asPort);
  const apiPort = await listen(apiServer, settings.apiPort);
  const issuer = `http://${HOST}:${asPort}`;
  const apiBase = `http://${HOST}:${apiPort}`;

  const store = new Store();
  setInterval(() => store.sweep(), 30_000).unref();
  const stats = new Stats();
  const faults = new Faults();
  const provider = buildProvider({ issuer, apiBase, store });
  provider.use(asAdminRoutes({ provider, store, stats, faults }));
  provider.use(issuedRecorder({ store }));
  provider.use(asFaultsAndStats({ stats, faults }));
  provider.use(metadata());
  provider.use(interactionRoutes(provider, apiBase));

  asServer.on('request', provider.callback());
  apiServer.on('request', resourceServer({ provider, apiBase }));

  const ready = JSON.stringify({ issuer, api_base: apiBase, pid: process.pid });
  if (settings.readyFile) {
    fs.writeFileSync(`${settings.readyFile}.tmp`, ready);
    fs.renameSync(`${settings.readyFile}.tmp`, settings.readyFile);
  }
  console.log(`ready ${ready}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
