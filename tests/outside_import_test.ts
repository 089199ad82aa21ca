/**
 * The library as an application in another folder uses it: imported by path
 * or URL with no configuration of its own, needing no permission until a call
 * needs one, and loading no command-line, TOML or HTTP code.
 *
 * @module
 */

import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

const REPOSITORY = fileURLToPath(new URL("..", import.meta.url));
const decoder = new TextDecoder();

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `deno ARGS` in `cwd` with nothing from this repository's configuration. */
async function deno(cwd: string, ...args: string[]): Promise<Run> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    cwd,
    env: { NO_COLOR: "1" },
    stdin: "null",
  }).output();
  return { code, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
}

/** An application folder with this repository in it as `./one-socket`, as the README says. */
async function withApplication(body: (folder: string) => Promise<void>): Promise<void> {
  const folder = await Deno.makeTempDir({ prefix: "one-socket-app-" });
  try {
    await Deno.symlink(REPOSITORY, `${folder}/one-socket`);
    await body(folder);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
}

/** The README's library example: the first `ts ignore` block under "## Use as a library". */
function readmeLibraryExample(): string {
  const readme = Deno.readTextFileSync(`${REPOSITORY}/README.md`);
  const section = readme.split(/^## /m).find((part) => part.startsWith("Use as a library"));
  assert.ok(section, 'README.md has no "## Use as a library" section');
  const block = section.match(/^```ts ignore\n([\s\S]*?)^```$/m);
  assert.ok(block, 'the "Use as a library" section has no ```ts ignore example');
  return block[1];
}

Deno.test("outside import: the README's library example runs as written in another folder", () =>
  withApplication(async (folder) => {
    await Deno.writeTextFile(`${folder}/app.ts`, readmeLibraryExample());
    const run = await deno(
      folder,
      "run",
      "--check",
      "--allow-ffi",
      "--allow-read",
      "--allow-write",
      "app.ts",
    );
    assert.equal(run.stderr.includes("error"), false, run.stderr);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout, "hello\n");
  }));

Deno.test("outside import: importing needs no permission; the first libc call names the flag", () =>
  withApplication(async (folder) => {
    await Deno.writeTextFile(
      `${folder}/app.ts`,
      [
        'import { getPair, VERSION } from "./one-socket/mod.ts";',
        "console.log(`imported ${VERSION}`);",
        "try {",
        '  await getPair("k", { socket: "/nonexistent/one.socket" });',
        "} catch (error) {",
        "  console.log(`${(error as Error).name}: ${(error as Error).message}`);",
        "}",
      ].join("\n"),
    );
    const run = await deno(folder, "run", "--no-prompt", "app.ts");
    assert.equal(run.code, 0, run.stderr);
    const { version } = JSON.parse(Deno.readTextFileSync(`${REPOSITORY}/deno.json`));
    assert.equal(
      run.stdout,
      `imported ${version}\n` +
        "NotCapable: one-socket calls libc through FFI: run Deno with --allow-ffi\n",
    );
  }));

Deno.test("outside import: mod.ts served over HTTP is importable by URL", () =>
  withApplication(async (folder) => {
    const server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      async (request) => {
        const path = new URL(request.url).pathname;
        try {
          return new Response(await Deno.readFile(`${REPOSITORY}${path}`), {
            headers: {
              "content-type": path.endsWith(".json") ? "application/json" : "text/typescript",
            },
          });
        } catch {
          return new Response("not found", { status: 404 });
        }
      },
    );
    try {
      const url = `http://127.0.0.1:${server.addr.port}/mod.ts`;
      await Deno.writeTextFile(
        `${folder}/app.ts`,
        `import { defaultSocketPath, getPair } from "${url}";\n` +
          "console.log(typeof getPair, defaultSocketPath().endsWith('one.socket'));\n",
      );
      const run = await deno(
        folder,
        "run",
        "--no-prompt",
        "--allow-ffi",
        "--allow-env",
        `--allow-import=127.0.0.1:${server.addr.port}`,
        "app.ts",
      );
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout, "function true\n");
    } finally {
      await server.shutdown();
    }
  }));

Deno.test("outside import: a default path that ignored $ONE_SOCKET_PATH says so", async () => {
  // Root's default, /run/one.socket, may have a broker behind it: an empty /run of our own.
  const probe = await new Deno.Command("unshare", { args: ["--mount", "true"] }).output()
    .catch(() => undefined);
  if (!probe?.success) {
    console.log("skipped: needs unshare --mount (root), for an empty /run");
    return;
  }
  await withApplication(async (folder) => {
    await Deno.writeTextFile(
      `${folder}/app.ts`,
      'import { connectBroker } from "./one-socket/mod.ts";\n' +
        "await connectBroker().catch((error) => console.log(error.message));\n",
    );
    const { code, stdout, stderr } = await new Deno.Command("unshare", {
      args: [
        "--mount",
        "sh",
        "-c",
        'mount -t tmpfs none /run && exec "$0" run --no-prompt --allow-ffi app.ts',
        Deno.execPath(),
      ],
      cwd: folder,
      env: { NO_COLOR: "1", ONE_SOCKET_PATH: `${folder}/elsewhere.socket` },
    }).output();
    assert.equal(code, 0, decoder.decode(stderr));
    assert.equal(
      decoder.decode(stdout),
      "connect /run/one.socket: ENOENT (no socket there; is the broker running?; " +
        "$ONE_SOCKET_PATH not read: run Deno with --allow-env=ONE_SOCKET_PATH)\n",
    );
  });
});

/** The modules mod.ts loads when imported (not run): its static graph, without dynamic imports. */
async function staticGraph(entry: string): Promise<Set<string>> {
  const run = await deno(REPOSITORY, "info", "--json", entry);
  assert.equal(run.code, 0, run.stderr);
  const info = JSON.parse(run.stdout) as {
    modules: {
      specifier: string;
      dependencies?: { specifier: string; code?: { specifier: string }; isDynamic?: boolean }[];
    }[];
  };
  const bySpecifier = new Map(info.modules.map((module) => [module.specifier, module]));
  const reached = new Set<string>();
  const pending = [info.modules.find((module) => module.specifier.endsWith("/mod.ts"))!.specifier];
  while (pending.length > 0) {
    const specifier = pending.pop()!;
    if (reached.has(specifier)) continue;
    reached.add(specifier);
    for (const dependency of bySpecifier.get(specifier)?.dependencies ?? []) {
      if (!dependency.isDynamic && dependency.code) pending.push(dependency.code.specifier);
    }
  }
  return reached;
}

Deno.test("outside import: the library loads no command-line, TOML or HTTP code", async () => {
  const loaded = [...await staticGraph("mod.ts")];
  assert.ok(loaded.some((specifier) => specifier.endsWith("/client/pair.ts")), loaded.join("\n"));
  const unwanted = loaded.filter((specifier) =>
    /\/(command|cli|ctl|policy|control|control_server)\.ts$|smol-toml|^node:http/.test(specifier)
  );
  assert.deepEqual(unwanted, []);
});
