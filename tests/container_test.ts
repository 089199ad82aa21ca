/**
 * The seeds' real scenario: a broker on the host and two "containers" that
 * share nothing with it, or with each other, but the broker's socket
 * directory. Each container is a process tree in new mount, PID, network, UTS
 * and IPC namespaces (made with `unshare`) whose root is a fresh tmpfs holding
 * read-only bind mounts of only what its programs need, plus the socket
 * directory at {@link SOCKET_DIRECTORY}; programs are run in it with
 * `nsenter`, as `docker exec` would. The C reference client runs in one, our
 * CLI in the other (and in both, for CLI to CLI).
 *
 * @module
 */

import assert from "node:assert/strict";
import { basename, dirname } from "node:path";
import { tryConnectUnix } from "../ffi/socket.ts";
import { buildCProgram, countOpenDescriptors, eventually } from "./helpers.ts";
import {
  type Cli,
  exists,
  MOD,
  PERMISSIONS,
  type Scope,
  startBroker,
  withScope,
} from "./processes.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Where each container sees the broker's socket directory, as `-v /run/one-socket:/run/one-socket` would. */
const SOCKET_DIRECTORY = "/run/one-socket";
const SOCKET = `${SOCKET_DIRECTORY}/one.socket`;
/** The namespaces a container gets, as unshare and nsenter name them. */
const NAMESPACE_FLAGS = ["--mount", "--pid", "--net", "--uts", "--ipc"];
/** The same, as `/proc/PID/ns` names them. */
const NAMESPACES = ["mnt", "pid", "net", "uts", "ipc"];
const UNSHARE = ["unshare", ...NAMESPACE_FLAGS, "--fork"];
/** The host's system directories a container gets (read-only, or the same symbolic link). */
const SYSTEM_DIRECTORIES = ["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"]
  .filter((top) => exists(`/${top}`));

const cClient = await buildCProgram("sp_client");

function unshareFailure(): string | undefined {
  try {
    const probe = new Deno.Command(UNSHARE[0], { args: [...UNSHARE.slice(1), "true"] })
      .outputSync();
    return probe.success ? undefined : decoder.decode(probe.stderr).trim();
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "no unshare command";
    throw error;
  }
}

/** Why the container tests cannot run here, or undefined if they can. */
const containersMissing: string | undefined = Deno.uid() !== 0
  ? "needs root, to make namespaces and mounts"
  : cClient === undefined
  ? "needs a C compiler (cc), for the C client"
  : unshareFailure();
if (containersMissing !== undefined) {
  console.log(`container_test: ignored: ${containersMissing}`);
}

/**
 * The container's pid 1 before it becomes `sleep infinity`: mounts a tmpfs on
 * $1 (a directory of the host that stays empty there: the mount namespace is
 * private), fills it with read-only bind mounts (the system, and each
 * HOST=INSIDE argument after the third) and the socket directory $3
 * read-write, mounts a /proc of its own PID namespace, names itself $2, then
 * pivots into it and detaches the host's tree, so nothing else of the host is
 * reachable, not even by `..` or a chroot escape.
 */
const CONTAINER_INIT = `
set -eu
root=$1 name=$2 sockets=$3
shift 3
mount -t tmpfs -o mode=0755 "$name" "$root"
cd "$root"
# The host's layout of the system directories, symbolic links included (merged /usr).
for top in ${SYSTEM_DIRECTORIES.join(" ")}; do
  if [ -L "/$top" ]; then
    ln -s "$(readlink "/$top")" "$top"
  else
    mkdir "$top"
    mount -o bind,ro "/$top" "$top"
  fi
done
mkdir dev proc tmp
chmod 1777 tmp
for device in null zero random urandom; do
  touch "dev/$device"
  mount --bind "/dev/$device" "dev/$device"
done
mkdir -p ".${SOCKET_DIRECTORY}"
mount --bind "$sockets" ".${SOCKET_DIRECTORY}"
for bind in "$@"; do
  host=\${bind%%=*} inside=\${bind#*=}
  if [ -d "$host" ]; then
    mkdir -p ".$inside"
  else
    mkdir -p "$(dirname ".$inside")"
    touch ".$inside"
  fi
  mount -o bind,ro "$host" ".$inside"
done
mount -t proc proc proc
hostname "$name"
mkdir .host
pivot_root . .host
umount -l /.host
rmdir /.host
echo "container $name ready"
exec sleep infinity
`;

/**
 * What a container sees, one `NAME VALUE...` line each, after leaving a file
 * of its own in /tmp for the other container not to see. $1 is a host path.
 */
const ISOLATION_PROBE = `
touch "/tmp/left-by-$(hostname)"
echo hostname $(hostname)
echo root $(ls -A /)
echo tmp $(ls -A /tmp)
echo sockets $(ls -A ${SOCKET_DIRECTORY})
echo init $(tr '\\0' ' ' </proc/1/cmdline)
echo interfaces $(cut -s -d: -f1 /proc/net/dev)
echo namespaces $(for ns in ${NAMESPACES.join(" ")}; do readlink /proc/self/ns/$ns; done)
echo host-directory $(if [ -e "$1" ]; then echo visible; else echo absent; fi)
`;

/** Where a container sees the programs and files bound into it. */
const INSIDE = {
  deno: "/opt/bin/deno",
  cClient: "/opt/bin/sp_client",
  repository: "/repo",
  denoDir: "/deno-dir",
};

/** The cache of npm modules that mod.ts imports (the container has no network to fetch them). */
async function hostDenoDir(): Promise<string> {
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"] }).output();
  assert.ok(info.success, decoder.decode(info.stderr));
  return JSON.parse(decoder.decode(info.stdout)).denoDir;
}

/** A process tree in its own namespaces and root, entered with `nsenter` to run programs. */
class Container {
  private constructor(
    readonly name: string,
    /** The host's pid of the container's pid 1. */
    readonly pid: number,
  ) {}

  /** Builds the container `name` from `binds` (host path → path inside) and waits until it is ready. */
  static async start(
    scope: Scope,
    name: string,
    sockets: string,
    binds: Record<string, string>,
  ): Promise<Container> {
    const root = `${scope.dir}/${name}-root`;
    await Deno.mkdir(root);
    // --kill-child: SIGKILL to unshare (the scope's cleanup) kills pid 1, and with it
    // every process and mount of the container.
    const init = scope.spawn(
      [root, name, sockets, ...Object.entries(binds).map(([host, inside]) => `${host}=${inside}`)],
      { command: [...UNSHARE, "--kill-child", "sh", "-c", CONTAINER_INIT, "container-init"] },
    );
    await init.waitForOutput(`container ${name} ready`);
    // unshare stays in the host's PID namespace; its only child is the container's pid 1.
    const children = await Deno.readTextFile(`/proc/${init.pid}/task/${init.pid}/children`);
    return new Container(name, Number(children.trim()));
  }

  /**
   * Runs `program ...args` inside, with an environment of nothing but PATH
   * and DENO_DIR. It gets SIGKILL when its nsenter dies (nsenter forks into
   * the PID namespace and passes on no signal), so that what the scope kills
   * never keeps running inside.
   */
  spawn(scope: Scope, program: string[], args: string[], stdin = false): Cli {
    const enter = ["nsenter", `--target=${this.pid}`, ...NAMESPACE_FLAGS, "--root", "--wd"];
    const dieWithNsenter = ["setpriv", "--pdeathsig=KILL", "--"];
    const environment = ["env", "-i", "PATH=/usr/bin:/bin", `DENO_DIR=${INSIDE.denoDir}`];
    return scope.spawn(args, {
      stdin,
      command: [...enter, ...dieWithNsenter, ...environment, ...program],
    });
  }

  /** Our CLI, `one-socket ...args`, run from the repository mounted read-only. */
  oneSocket(scope: Scope, args: string[], stdin = false): Cli {
    const mod = `${INSIDE.repository}/${basename(MOD)}`;
    return this.spawn(scope, [INSIDE.deno, "run", ...PERMISSIONS, mod], args, stdin);
  }

  /** The C reference client: its echo game on `key` as `mode`. */
  cClient(scope: Scope, key: string, mode: "server" | "client"): Cli {
    return this.spawn(scope, [INSIDE.cClient], [SOCKET, key, mode]);
  }

  /** What the container sees, by {@link ISOLATION_PROBE}. */
  async probe(scope: Scope, hostDirectory: string): Promise<Map<string, string[]>> {
    const done = await this.spawn(scope, ["sh", "-c", ISOLATION_PROBE, "probe", hostDirectory], [])
      .finish();
    assert.equal(done.code, 0, `probe in ${this.name}: ${done.stderr}`);
    return new Map(
      decoder.decode(done.stdout).trimEnd().split("\n").map((line) => {
        const [name, ...values] = line.split(" ");
        return [name, values];
      }),
    );
  }
}

/** Our CLI's `pair` on `key` in `container`, fed `data` on standard input. */
function pair(scope: Scope, container: Container, key: string, mode: string, data: string): Cli {
  const cli = container.oneSocket(scope, ["pair", key, "--mode", mode, "--socket", SOCKET], true);
  cli.feed(encoder.encode(data));
  return cli;
}

/** Waits for `cli` to exit 0, quietly, having read all its stdin and printed `stdout`. */
async function assertPrinted(cli: Cli, stdout: string, who: string): Promise<void> {
  const done = await cli.finish();
  assert.equal(done.code, 0, `${who} exit code; stderr:\n${done.stderr}`);
  assert.equal(done.stderr, "", `${who} stderr`);
  assert.equal(cli.feedError, undefined, `${who} stdin`);
  assert.equal(decoder.decode(done.stdout), stdout, `what ${who} printed`);
}

/** What `ls -A /` prints in a container: {@link CONTAINER_INIT}'s directories and what `binds` add. */
function expectedRoot(binds: Record<string, string>): string[] {
  const bound = [SOCKET_DIRECTORY, ...Object.values(binds)].map((inside) => inside.split("/")[1]);
  return [...new Set([...SYSTEM_DIRECTORIES, "dev", "proc", "tmp", ...bound])].sort();
}

Deno.test({
  name:
    "containers: the C client and our CLI in separate namespaces pair through the host's broker",
  ignore: containersMissing !== undefined,
  fn: (t) =>
    withScope(async (scope) => {
      const sockets = `${scope.dir}/sockets`;
      await Deno.mkdir(sockets);
      // Our broker on the host runs mod.ts first, so the npm modules are in the cache by
      // the time a container reads it.
      const common = {
        [Deno.execPath()]: INSIDE.deno,
        [dirname(MOD)]: INSIDE.repository,
        [await hostDenoDir()]: INSIDE.denoDir,
      };
      const withCClient = { ...common, [cClient!]: INSIDE.cClient };
      const abstract = `@one-socket-container-test-${crypto.randomUUID()}`;
      const [broker, abstractBroker, a, b] = await Promise.all([
        // Debug logs say when a client waits, which orders the arrivals below.
        startBroker(scope, ["--socket", `${sockets}/one.socket`, "--log-level", "debug"], {
          path: `${sockets}/one.socket`,
        }),
        scope.spawn(["broker", "--socket", abstract]),
        Container.start(scope, "a", sockets, withCClient),
        Container.start(scope, "b", sockets, common),
      ]);
      await abstractBroker.waitForOutput(`listening on ${abstract}`);
      const descriptors = countOpenDescriptors(broker.pid);

      await t.step("each container sees only its own root, processes and loopback", async () => {
        // In turn: b's /tmp must not show what a left in its own.
        const seen = { a: await a.probe(scope, scope.dir), b: await b.probe(scope, scope.dir) };
        const hostNamespaces = NAMESPACES.map((ns) => Deno.readLinkSync(`/proc/self/ns/${ns}`));
        const binds = { a: withCClient, b: common };
        for (const [name, view] of Object.entries(seen)) {
          assert.deepEqual(view.get("hostname"), [name]);
          assert.deepEqual(view.get("root"), expectedRoot(binds[name as "a" | "b"]), `${name}'s /`);
          assert.deepEqual(view.get("tmp"), [`left-by-${name}`], `${name}'s /tmp`);
          assert.deepEqual(view.get("sockets"), ["one.socket"], `${name}'s ${SOCKET_DIRECTORY}`);
          assert.deepEqual(view.get("host-directory"), ["absent"], `${name} sees ${scope.dir}`);
          assert.deepEqual(view.get("init"), ["sleep", "infinity"], `${name}'s pid 1`);
          assert.deepEqual(view.get("interfaces"), ["lo"], `${name}'s network interfaces`);
          const namespaces = view.get("namespaces")!;
          assert.equal(namespaces.length, NAMESPACES.length, `${name}'s namespaces`);
          for (const [i, ns] of NAMESPACES.entries()) {
            assert.notEqual(namespaces[i], hostNamespaces[i], `${name} has the host's ${ns}`);
          }
        }
        const [ofA, ofB] = [seen.a, seen.b].map((view) => view.get("namespaces")!);
        for (const [i, ns] of NAMESPACES.entries()) {
          assert.notEqual(ofA[i], ofB[i], `a and b share a ${ns} namespace`);
        }
      });

      await t.step("a C server in a, there first, and our CLI client in b talk", async () => {
        const server = a.cClient(scope, "c-server-first", "server");
        await broker.waitForOutput(`waits on key "c-server-first"`);
        const client = pair(scope, b, "c-server-first", "client", "ping");
        // "Ping" comes only from a C server that read our "ping".
        await assertPrinted(client, "Ping", "our CLI client in b");
        await assertPrinted(server, "server ok\n", "the C server in a");
      });

      await t.step("our CLI server in b, there first, and a C client in a talk", async () => {
        const server = pair(scope, b, "cli-server-first", "server", "Ping");
        await broker.waitForOutput(`waits on key "cli-server-first"`);
        // The C client says "client ok" only if it read exactly "Ping".
        await assertPrinted(
          a.cClient(scope, "cli-server-first", "client"),
          "client ok\n",
          "the C client in a",
        );
        await assertPrinted(server, "ping", "our CLI server in b");
      });

      await t.step("our CLI in a and our CLI in b talk", async () => {
        const inA = pair(scope, a, "cli-to-cli", "none", "from a\n");
        await broker.waitForOutput(`waits on key "cli-to-cli"`);
        const inB = pair(scope, b, "cli-to-cli", "none", "from b\n");
        await assertPrinted(inB, "from a\n", "our CLI in b");
        await assertPrinted(inA, "from b\n", "our CLI in a");
      });

      await t.step("an abstract broker socket serves the host but not a container", async () => {
        using fromHost = tryConnectUnix(abstract);
        assert.ok(fromHost !== undefined, `the host cannot connect to ${abstract}`);
        // --timeout: were the broker reachable, this would end in a second (exit 3, no
        // peer) instead of waiting for one.
        const done = await b.oneSocket(scope, ["pair", "k", "--socket", abstract, "--timeout", "1"])
          .finish();
        assert.equal(done.code, 1, `pair in b on ${abstract}; stderr:\n${done.stderr}`);
        assert.equal(
          done.stderr,
          `one-socket pair: connect ${abstract}: ECONNREFUSED (is the broker running?)\n`,
        );
      });

      await eventually(
        () => countOpenDescriptors(broker.pid) === descriptors,
        `the broker's descriptors to return to ${descriptors}`,
      );
    }),
});
