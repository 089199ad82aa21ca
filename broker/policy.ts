/**
 * {@link AccessPolicy}: which local users may claim which keys.
 *
 * A policy is an ordered list of rules, like a firewall's. The first rule
 * whose key pattern, mode and principal all match a request decides it;
 * when none does, the request is denied. Without a policy file the broker
 * admits everyone (the C broker's behaviour).
 *
 * ```toml
 * # /etc/one-socket/policy.toml
 * [[rules]]
 * action = "allow"
 * prefix = "vhost-user-"      # or: key = "exact", or glob = "grpc-*-api"
 * modes = ["client", "server"] # default: every mode
 * uids = [0]                   # uids and/or gids; neither means anyone
 * gids = [107]
 * cross_uid = true             # with --isolate-uids: may pair across uids
 * listen = true                # this allow also lets the principals listen (v2)
 * ```
 *
 * Listening (protocol v2) claims every client of a key, so an `allow` rule
 * covers `LISTEN` requests only when it says `listen = true`; a `deny` rule
 * covers them always. Without an allow that says so, a listener is denied.
 *
 * The same structure in JSON: `{ "rules": [{ "action": "allow", … }] }`.
 * Principals are the peer's uid and primary gid from `SO_PEERCRED`.
 *
 * @module
 */

import { getLogger } from "npm:@logtape/logtape@^2.4.2";
import { parse as parseToml } from "npm:smol-toml@^1.9.1";
import { type Mode, MODES } from "../client/protocol.ts";
import type { AccessDecision, AccessRequest } from "./broker.ts";
import { ByteGlob } from "./glob.ts";

/** One rule as written in the policy file. */
export interface PolicyRule {
  /** What a match means. */
  action: "allow" | "deny";
  /** The key pattern: exactly one of `key`, `prefix`, `glob` (`*` any run, `?` one byte). */
  key?: string;
  /** Keys starting with this. */
  prefix?: string;
  /**
   * Keys matching this glob: `*` any run of bytes, `?` exactly one byte, the
   * rest literal, all compared as UTF-8 bytes; matched without backtracking.
   */
  glob?: string;
  /** Modes it applies to; default all. */
  modes?: Mode[];
  /** Peer uids it applies to. */
  uids?: number[];
  /** Peer primary gids it applies to. */
  gids?: number[];
  /** With `--isolate-uids`: matching keys may pair across uids. */
  cross_uid?: boolean;
  /** For an `allow`: whether it also lets listeners (protocol v2 `LISTEN`) in; default false. A `deny` always covers them. */
  listen?: boolean;
}

/** A policy file that cannot be used, with the file and the rule at fault. */
export class PolicyError extends Error {
  /**
   * A policy problem.
   *
   * @param message what is wrong, already naming the file and rule
   */
  constructor(message: string) {
    super(message);
    this.name = "PolicyError";
  }
}

interface CompiledRule {
  allow: boolean;
  matchKey: (key: Uint8Array) => boolean;
  modes: ReadonlySet<Mode>;
  uids?: ReadonlySet<number>;
  gids?: ReadonlySet<number>;
  crossUid: boolean;
  listen: boolean;
  description: string;
}

// Keys are bytes; patterns are UTF-8 text, compared as their bytes, on the key's own bytes
// (no copy or conversion per request).
function startsWith(key: Uint8Array, prefix: Uint8Array): boolean {
  if (key.length < prefix.length) return false;
  for (let index = 0; index < prefix.length; index++) {
    if (key[index] !== prefix[index]) return false;
  }
  return true;
}

function keyMatcher(kind: string, pattern: string): (key: Uint8Array) => boolean {
  if (kind === "glob") {
    const glob = new ByteGlob(pattern);
    return (key) => glob.matches(key);
  }
  const bytes = new TextEncoder().encode(pattern);
  return kind === "key"
    ? (key) => key.length === bytes.length && startsWith(key, bytes)
    : (key) => startsWith(key, bytes);
}

const logger = getLogger(["one-socket", "policy"]);

const RULE_FIELDS = new Set([
  "action",
  "key",
  "prefix",
  "glob",
  "modes",
  "uids",
  "gids",
  "cross_uid",
  "listen",
]);

function compileRule(rule: unknown, where: string): CompiledRule {
  if (typeof rule !== "object" || rule === null || Array.isArray(rule)) {
    throw new PolicyError(`${where}: a rule is a table of fields`);
  }
  const fields = rule as Record<string, unknown>;
  for (const name of Object.keys(fields)) {
    if (!RULE_FIELDS.has(name)) throw new PolicyError(`${where}: unknown field "${name}"`);
  }
  const { action, key, prefix, glob, modes, uids, gids, cross_uid: crossUid, listen } = fields;
  if (action !== "allow" && action !== "deny") {
    throw new PolicyError(`${where}: action must be "allow" or "deny"`);
  }
  const patterns = [["key", key], ["prefix", prefix], ["glob", glob]].filter(([, v]) =>
    v !== undefined
  );
  if (patterns.length !== 1 || typeof patterns[0][1] !== "string") {
    throw new PolicyError(`${where}: give exactly one of key, prefix or glob, as a string`);
  }
  const [kind, pattern] = patterns[0] as [string, string];
  return {
    allow: action === "allow",
    matchKey: keyMatcher(kind, pattern),
    modes: new Set(modeList(modes, where)),
    uids: idSet(uids, "uids", where),
    gids: idSet(gids, "gids", where),
    crossUid: booleanField(crossUid, "cross_uid", where),
    listen: booleanField(listen, "listen", where),
    description: `${where} (${action} ${kind} ${JSON.stringify(pattern)})`,
  };
}

function modeList(modes: unknown, where: string): Mode[] {
  if (modes === undefined) return [...MODES];
  if (!Array.isArray(modes) || modes.some((mode) => !MODES.includes(mode))) {
    throw new PolicyError(`${where}: modes must be a list of "none", "client", "server"`);
  }
  return modes;
}

function idSet(ids: unknown, name: string, where: string): ReadonlySet<number> | undefined {
  if (ids === undefined) return undefined;
  // Strictly numbers: null, "", true would otherwise coerce to 0 (root) or 1.
  const valid = (id: unknown) =>
    typeof id === "number" && Number.isSafeInteger(id) && id >= 0 && id <= 0xffffffff;
  if (!Array.isArray(ids) || !ids.every(valid)) {
    throw new PolicyError(`${where}: ${name} must be a list of numeric ids`);
  }
  return new Set(ids as number[]);
}

function booleanField(value: unknown, name: string, where: string): boolean {
  if (value === undefined) return false;
  if (typeof value !== "boolean") throw new PolicyError(`${where}: ${name} must be true or false`);
  return value;
}

/**
 * A parsed access policy. Pass {@link AccessPolicy.decide} as the broker's
 * `authorize` option.
 *
 * @example
 * ```ts
 * import { AccessPolicy } from "@one-socket/one-socket/policy";
 * const policy = AccessPolicy.parse(
 *   '{"rules": [{"action": "allow", "prefix": "vhost-", "uids": [0]}]}',
 *   "json",
 *   "inline policy",
 * );
 * const key = new TextEncoder().encode("vhost-1");
 * console.log(policy.decide({ key, mode: "server", peer: { pid: 1, uid: 0, gid: 0 } }).allowed); // true
 * ```
 */
export class AccessPolicy {
  /** Where it was read from, for log lines. */
  readonly source: string;
  readonly #rules: CompiledRule[];

  private constructor(source: string, rules: CompiledRule[]) {
    this.source = source;
    this.#rules = rules;
  }

  /** Number of rules. */
  get size(): number {
    return this.#rules.length;
  }

  /** Parses policy text; throws {@link PolicyError} naming `source` and the rule at fault. */
  static parse(text: string, format: "json" | "toml", source: string): AccessPolicy {
    let document: unknown;
    try {
      document = format === "json" ? JSON.parse(text) : parseToml(text);
    } catch (error) {
      throw new PolicyError(
        `${source}: not valid ${format.toUpperCase()}: ${(error as Error).message}`,
      );
    }
    const rules = (document as { rules?: unknown })?.rules;
    if (!Array.isArray(rules)) throw new PolicyError(`${source}: expected a list named "rules"`);
    return new AccessPolicy(
      source,
      rules.map((rule, index) => compileRule(rule, `${source} rule ${index + 1}`)),
    );
  }

  /** Reads a policy file: TOML if its name ends in `.toml`, JSON otherwise. */
  static async load(path: string): Promise<AccessPolicy> {
    let text: string;
    try {
      text = await Deno.readTextFile(path);
    } catch (error) {
      throw new PolicyError(`policy ${path}: ${(error as Error).message}`);
    }
    return AccessPolicy.parse(text, path.endsWith(".toml") ? "toml" : "json", path);
  }

  /**
   * The first matching rule's verdict, or a denial when none matches.
   *
   * The cost is bounded by the rules tried before the verdict: a rule for
   * other modes or principals costs a set lookup; a `key` or `prefix` rule at
   * most its pattern's length; a glob rule at most its first and last segment
   * (which rule out most keys) plus `n × ⌈s / 32⌉` word steps for an `n`-byte
   * key, `s` being its longest segment between two stars (see `broker/glob.ts`).
   * Nothing is allocated.
   */
  decide(request: AccessRequest): AccessDecision {
    const { key, mode, peer: { uid, gid } } = request;
    const listen = request.listen === true;
    for (const rule of this.#rules) {
      // A rule needs all to match, so the order is free: the cheap checks go first.
      // Listening needs an allow that says so; a deny applies to listening too.
      if (listen && rule.allow && !rule.listen) continue;
      if (!rule.modes.has(mode)) continue;
      const anyone = rule.uids === undefined && rule.gids === undefined;
      if (!anyone && !rule.uids?.has(uid) && !rule.gids?.has(gid)) continue;
      if (!rule.matchKey(key)) continue;
      return { allowed: rule.allow, rule: rule.description, crossUid: rule.crossUid };
    }
    return { allowed: false, rule: `${this.source} default (no rule matched)` };
  }
}

/**
 * A policy file kept current: loaded at start and again on every SIGHUP. A
 * reload that fails keeps the policy in force and logs why, so a typo never
 * opens the broker to everyone or closes it to all.
 *
 * @example
 * ```ts
 * import { Broker } from "@one-socket/one-socket";
 * import { ReloadingPolicy } from "@one-socket/one-socket/policy";
 * using policy = await ReloadingPolicy.load("/etc/one-socket/policy.toml");
 * await using _broker = await Broker.listen({ socket: "/tmp/b.socket", authorize: policy.authorize });
 * ```
 */
export class ReloadingPolicy implements Disposable {
  #current: AccessPolicy;
  readonly #path: string;
  readonly #onHangup = () => this.reload();

  private constructor(path: string, policy: AccessPolicy) {
    this.#path = path;
    this.#current = policy;
    Deno.addSignalListener("SIGHUP", this.#onHangup);
  }

  /** Loads `path` (throwing {@link PolicyError} if it is unusable) and reloads it on SIGHUP. */
  static async load(path: string): Promise<ReloadingPolicy> {
    const policy = await AccessPolicy.load(path);
    logger.info("access policy {path}: {rules} rules", { path, rules: policy.size });
    return new ReloadingPolicy(path, policy);
  }

  /** The policy in force. */
  get current(): AccessPolicy {
    return this.#current;
  }

  /** Decides with the policy in force: pass it as the broker's `authorize`. */
  readonly authorize = (request: AccessRequest): AccessDecision => this.#current.decide(request);

  /** Reads the file again; on failure the previous policy stays in force. */
  async reload(): Promise<void> {
    try {
      this.#current = await AccessPolicy.load(this.#path);
      logger.info("reloaded access policy {path}: {rules} rules", {
        path: this.#path,
        rules: this.#current.size,
      });
    } catch (error) {
      logger.error("kept the previous access policy: {error}", { error: (error as Error).message });
    }
  }

  /** Stops listening for SIGHUP. */
  [Symbol.dispose](): void {
    Deno.removeSignalListener("SIGHUP", this.#onHangup);
  }
}
