/**
 * A strict reader of the Prometheus text format 0.0.4, for tests: every line
 * must be a `# HELP`, a `# TYPE` or a sample of a family declared above it,
 * so that a scraper would accept what the broker serves.
 *
 * @module
 */

const NAME = String.raw`[a-zA-Z_:][a-zA-Z0-9_:]*`;
const LABEL = String.raw`[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"`;
const NUMBER = String.raw`[-+]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|Inf|NaN)`;
const SAMPLE = new RegExp(
  String.raw`^(${NAME})(\{(?:${LABEL}(?:,${LABEL})*,?)?\})? (${NUMBER})(?: -?[0-9]+)?$`,
);
const HELP = new RegExp(String.raw`^# HELP (${NAME}) .*$`);
const TYPE = new RegExp(String.raw`^# TYPE (${NAME}) (counter|gauge|histogram|summary|untyped)$`);

/** What a scrape holds. */
export interface Exposition {
  /** Family name → its declared type. */
  types: Map<string, string>;
  /** `name{labels}` exactly as written (or just `name`) → value. */
  samples: Map<string, number>;
}

function parseNumber(text: string): number {
  if (text.endsWith("Inf")) return text.startsWith("-") ? -Infinity : Infinity;
  return Number(text);
}

/** The family a sample belongs to: itself, or a histogram it is a part of. */
function familyOf(name: string, types: Map<string, string>): string | undefined {
  if (types.has(name)) return name;
  const part = /^(.*)_(bucket|sum|count)$/.exec(name);
  return part && types.get(part[1]) === "histogram" ? part[1] : undefined;
}

/** Parses `text`; throws naming the line at the first violation of the format. */
export function parsePrometheus(text: string): Exposition {
  if (!text.endsWith("\n")) throw new Error("the exposition must end with a newline");
  const types = new Map<string, string>();
  const helped = new Set<string>();
  const samples = new Map<string, number>();
  text.slice(0, -1).split("\n").forEach((line, index) => {
    const fail = (why: string) => {
      throw new Error(`line ${index + 1}: ${why}: ${JSON.stringify(line)}`);
    };
    const help = HELP.exec(line);
    if (help) {
      if (helped.has(help[1])) fail("second HELP for the family");
      helped.add(help[1]);
      return;
    }
    const type = TYPE.exec(line);
    if (type) {
      if (types.has(type[1])) fail("second TYPE for the family");
      types.set(type[1], type[2]);
      return;
    }
    if (line.startsWith("#")) return;
    const sample = SAMPLE.exec(line);
    if (!sample) fail("not a sample line");
    const [, name, labels = "", value] = sample!;
    if (familyOf(name, types) === undefined) fail("sample before its family's TYPE");
    const key = name + labels;
    if (samples.has(key)) fail("duplicate sample");
    samples.set(key, parseNumber(value));
  });
  return { types, samples };
}
