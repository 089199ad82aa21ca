/**
 * What every `one-socket` subcommand shares: argument parsing that turns any
 * mistake into a usage message and exit code 2.
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";

/** Exit code for a command line that could not be understood. */
export const EXIT_USAGE = 2;
/** Exit code for a failure while running. */
export const EXIT_FAILURE = 1;

/**
 * A failure with an exit code of its own (a timeout, a program that cannot be
 * run), so that scripts can tell it from other failures; its message is one line.
 */
export class ExitError extends Error {
  /** The process exit code. */
  readonly exitCode: number;

  /**
   * @param message what happened, without the `one-socket COMMAND:` prefix
   * @param exitCode the process exit code
   */
  constructor(message: string, exitCode: number) {
    super(message);
    this.name = "ExitError";
    this.exitCode = exitCode;
  }
}

/** A command line that could not be understood; its message is shown above the usage. */
export class UsageError extends Error {
  /** @param message what was wrong */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** How `parseArgs` names an unknown option. */
const UNKNOWN_OPTION = /^Unknown option '([^']+)'/;
/** How `parseArgs` refuses `--key -k`, over three lines and with `-XYZ` for the value. */
const AMBIGUOUS_VALUE = /^Option '(-[^' ]+)' argument is ambiguous/;

/** The argument in `args` that `parseArgs` reported as the unknown `option`. */
function unknownArgument(args: string[], option: string): string {
  // "-kx" is reported as "-k" (short options are read one letter at a time); "--kk=v" as "--kk".
  return args.find((arg) =>
    arg === option || arg.startsWith(`${option}=`) ||
    (!option.startsWith("--") && !arg.startsWith("--") && arg.startsWith(option))
  ) ?? option;
}

/**
 * `parseArgs` in strict mode, its errors turned into {@link UsageError}.
 *
 * For an unknown option, `parseArgs` advises `-- "-k"`, which is wrong here:
 * our `--` introduces PROGRAM for `pair --exec`. `dashHint` gives the advice
 * that holds instead, for the argument as typed (say, use `--key=-k`).
 *
 * @example
 * ```ts
 * import { parseCommandLine } from "./command_line.ts";
 * const { values, positionals } = parseCommandLine(["k", "--mode", "server"], {
 *   mode: { type: "string" },
 * });
 * console.log(values.mode, positionals); // server [ "k" ]
 * ```
 */
export function parseCommandLine<T extends ParseArgsConfig["options"]>(
  args: string[],
  options: T,
  dashHint?: (argument: string) => string,
): ReturnType<typeof parseArgs<{ args: string[]; options: T; allowPositionals: true }>> {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const ambiguous = AMBIGUOUS_VALUE.exec(message);
    if (ambiguous !== null) {
      const value = args[args.indexOf(ambiguous[1]) + 1];
      throw new UsageError(`${ambiguous[1]} ${value} is ambiguous; write ${ambiguous[1]}=${value}`);
    }
    const unknown = UNKNOWN_OPTION.exec(message);
    if (unknown === null) throw new UsageError(message);
    const argument = unknownArgument(args, unknown[1]);
    const hint = dashHint === undefined ? "" : ` (${dashHint(argument)})`;
    throw new UsageError(`unknown option ${argument}${hint}`);
  }
}

/** The exit code for a command that failed with `error`. */
export function exitCodeOf(error: unknown): number {
  if (error instanceof UsageError) return EXIT_USAGE;
  return error instanceof ExitError ? error.exitCode : EXIT_FAILURE;
}

/** The one line that says why a command failed. */
export function failureMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** How a command's failure is printed: `message` is its one line; `usage` comes with a usage error. */
export type FailureReporter = (message: string, usage?: string) => void;

/** The usual {@link FailureReporter}: `one-socket NAME: message`, then any usage, on stderr. */
export function stderrReporter(name: string): FailureReporter {
  return (message, usage) =>
    console.error(`one-socket ${name}: ${message}${usage === undefined ? "" : `\n\n${usage}`}`);
}

/**
 * Runs a subcommand: a {@link UsageError} prints the message and `usage` and
 * exits 2; any other error prints one line and exits 1, or with an
 * {@link ExitError}'s code. `report` prints them elsewhere or otherwise (the
 * broker's JSON log, say).
 *
 * @example
 * ```ts
 * import { runCommand, UsageError } from "./command_line.ts";
 * const code = await runCommand("demo", "Usage: one-socket demo", () => {
 *   throw new UsageError("missing KEY");
 * });
 * console.log(code); // 2
 * ```
 */
export async function runCommand(
  name: string,
  usage: string,
  body: () => Promise<number>,
  report: FailureReporter = stderrReporter(name),
): Promise<number> {
  try {
    return await body();
  } catch (error) {
    report(failureMessage(error), error instanceof UsageError ? usage : undefined);
    return exitCodeOf(error);
  }
}

/**
 * A whole number from 1 to `max` from a flag's text; a {@link UsageError}
 * otherwise.
 *
 * @example
 * ```ts
 * import { wholeNumber } from "./command_line.ts";
 * console.log(wholeNumber("--max", "8")); // 8
 * ```
 */
export function wholeNumber(flag: string, text: string, max = Number.MAX_SAFE_INTEGER): number {
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 1 || value > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? "from 1 up" : `from 1 to ${max}`;
    throw new UsageError(`${flag} takes a whole number ${range}, not ${text}`);
  }
  return value;
}

/** A positive number of seconds from a flag's text; a {@link UsageError} otherwise. */
export function seconds(flag: string, text: string): number {
  const value = Number(text);
  if (!(value > 0) || !Number.isFinite(value)) {
    throw new UsageError(`${flag} takes a positive number of seconds, not ${text}`);
  }
  return value;
}
