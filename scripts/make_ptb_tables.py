#!/usr/bin/env python3
r"""Regenerates src/eval/ptb_tables.rs by probing pycocoevalcap's stanford-corenlp-3.4.1.jar.

Usage: python scripts/make_ptb_tables.py [--out FILE] [--jar JAR]

Without --out the Rust source is printed on stdout. The wall time goes to stderr. Needs
`java` and `javac` (any JDK >= 8); the jar defaults to the one inside the installed
pycocoevalcap package (its tokenizer/ folder).

The tables are the JFlex character classes `[:letter:]`, `[:digit:]` and `[:uppercase:]` as
compiled into `edu.stanford.nlp.process.PTBLexer` (JFlex 1.5.1, which works on 16-bit UTF-16
code units, so every code unit 0..0xFFFF, lone surrogates included, is a possible input).
JFlex bakes those classes into the lexer's DFA, so they are not stored anywhere as sets: the
script measures them. A small Java helper (written to a temp dir, compiled with javac) runs
the jar's public `PTBTokenizer` (options `tokenizeNLs,untokenizable=noneKeep`, i.e. what
pycocoevalcap's `-preserveLines` selects, with untokenizable characters kept so that nothing
is logged) on five crafted inputs per code unit `c` and looks only at token offsets, so token
normalisation cannot disturb the result. Each probe hinges on one rule of PTBLexer.flex
whose trailing context or body names the class directly:

* LD(c), input `1_c`: the first token is `1_c` iff `c` is in `[:letter:]` or `[:digit:]`.
  Only `{THING}` = `([:letter:]|[:digit:])+({HYPHEN}([:letter:]|[:digit:])+)*` can span
  `1_` (HYPHEN contains `_`); NUMBER stops at `1`, HTHING needs `-`, EMAIL/URL rules need
  `@`/`.` further on, so otherwise the first token is `1`.
* A(c), input `A'ccc`: the first token is `A'ccc` iff `c` is in `[:letter:]`, through the
  APOWORD alternative `[A-HJ-XZn]{APOSETCETERA}[:letter:]{2}[:letter:]*`; at 5 units it
  outlasts `{WORD}/{REDAUX}` (`A` + `'s` or `'ll`, at most 4 units), which is why `c` is
  tripled. Its only false positive is `c = @` (`{EMAIL}` matches `A'@@@`), which LD rules
  out. So letter(c) = A(c) and LD(c).
* digit(c), input `ca. c`: the first token is `ca.` iff `c` is in `[:digit:]`, through
  `{ABBREV3}/{SPACENL}?[:digit:]`; otherwise it is `ca` (WORD). The space matters: with
  `ca.c`, `{WORD}\./{INSENTP}` would also return `ca.` for `c` in `[,;:\u3001]`.
* R1(c), input `etc. c`: the rule `{ABBREV1}/{SENTEND}` with
  `SENTEND = {SPACENL}({SPACENL}|[:uppercase:]|{SGML})` returns `etc.` and pushes its
  period back, so a second token starts at offset 3 iff `c` is in `[:uppercase:]` or
  `{SPACENL}` (an SGML tag cannot be one unit long); otherwise `{ABBREV1}/[^][^]` (same
  length, later rule) returns `etc.` alone and the next token, if any, starts at 5.
* SP(c), input `etc.cA`: same rule, period pushed back iff `c` is in `{SPACENL}` (`A` is
  uppercase). `[:uppercase:]` is used only in SENTEND, right after a SPACENL, so for SPACENL
  units (none of which is an upper-case letter) membership is unobservable and taken as no:
  uppercase(c) = R1(c) and not SP(c).

JFlex expanded the three classes into its per-code-unit character map when it generated the
lexer, so membership seen through these rules is exactly what the jar's tokenizer uses.
Self-checks (the script fails if one does not hold): letter and digit are disjoint and their
union is LD; SP equals the explicit `{SPACENL}` set of PTBLexer.flex; and each measured set
is a union of the lexer's own JFlex character classes (its `ZZ_CMAP` table, read by
reflection), as a class of JFlex is by construction, so a probe confounded by some other
rule for part of a class would show up.
"""

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time

HEADER = """\
//! Character classes of the Stanford PTBLexer 3.4.1 (JFlex 1.5.1, 16-bit code units),
//! measured by probing the shipped jar: `[:letter:]`, `[:digit:]` and `[:uppercase:]`.
"""

JAVA = r"""
import edu.stanford.nlp.ling.CoreLabel;
import edu.stanford.nlp.process.CoreLabelTokenFactory;
import edu.stanford.nlp.process.PTBTokenizer;
import java.io.StringReader;
import java.lang.reflect.Field;
import java.util.List;

public class PtbProbe {
    static final CoreLabelTokenFactory FACTORY = new CoreLabelTokenFactory();

    static List<CoreLabel> lex(String s) {
        return new PTBTokenizer<CoreLabel>(new StringReader(s), FACTORY,
                "tokenizeNLs,untokenizable=noneKeep").tokenize();
    }

    static int firstEnd(String s) {
        List<CoreLabel> t = lex(s);
        return t.isEmpty() ? -1 : t.get(0).endPosition();
    }

    // True iff the lexer returned a token starting at offset 3 (the pushed-back period).
    static boolean reduplicated(String s) {
        for (CoreLabel l : lex(s)) {
            if (l.beginPosition() == 3) return true;
        }
        return false;
    }

    public static void main(String[] args) throws Exception {
        StringBuilder out = new StringBuilder(65536 * 3);
        for (int u = 0; u <= 0xFFFF; u++) {
            String c = String.valueOf((char) u);
            int bits = 0;
            if (firstEnd("1_" + c) == 3) bits |= 1;          // LD
            if (firstEnd("A'" + c + c + c) == 5) bits |= 2;  // A
            if (firstEnd("ca. " + c) == 3) bits |= 4;        // digit
            if (reduplicated("etc. " + c)) bits |= 8;        // R1
            if (reduplicated("etc." + c + "A")) bits |= 16;  // SP
            out.append(String.format("%02x", bits));
        }
        out.append('\n');
        Field f = Class.forName("edu.stanford.nlp.process.PTBLexer").getDeclaredField("ZZ_CMAP");
        f.setAccessible(true);
        char[] cmap = (char[]) f.get(null);
        for (int u = 0; u <= 0xFFFF; u++) {
            if (u > 0) out.append(' ');
            out.append((int) cmap[u]);
        }
        out.append('\n');
        System.out.print(out);
    }
}
"""

# {SPACENL} of PTBLexer 3.4.1: SPACE = [ \t\u00A0\u2000-\u200A\u3000],
# NEWLINE = \r|\r?\n|\u2028|\u2029|\u000B|\u000C|\u0085.
SPACENL = set(b" \t\r\n\x0b\x0c") | {0x85, 0xA0, 0x2028, 0x2029, 0x3000} | set(range(0x2000, 0x200B))


def default_jar():
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("make_ptb_tables: pycocoevalcap is not installed (run scripts/venv.sh), or pass --jar")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer", "stanford-corenlp-3.4.1.jar")


def probe(jar):
    for tool in ("java", "javac"):
        if shutil.which(tool) is None:
            sys.exit(f"make_ptb_tables: `{tool}` not found on PATH; a JDK is needed to probe the jar")
    if not os.path.isfile(jar):
        sys.exit(f"make_ptb_tables: jar not found: {jar}")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "PtbProbe.java"), "w") as f:
            f.write(JAVA)
        src = os.path.join(tmp, "PtbProbe.java")
        subprocess.run(["javac", "-nowarn", "-cp", jar, "-d", tmp, src], check=True)
        out = subprocess.run(
            ["java", "-cp", jar + os.pathsep + tmp, "PtbProbe"],
            check=True,
            stdout=subprocess.PIPE,
        ).stdout.decode("ascii")
    bits_line, cmap_line = out.split("\n")[:2]
    bits = [int(bits_line[2 * u : 2 * u + 2], 16) for u in range(0x10000)]
    cmap = [int(x) for x in cmap_line.split()]
    assert len(bits) == len(cmap) == 0x10000
    return bits, cmap


def classify(bits, cmap):
    ld = {u for u in range(0x10000) if bits[u] & 1}
    letter = {u for u in ld if bits[u] & 2}
    digit = {u for u in range(0x10000) if bits[u] & 4}
    sp = {u for u in range(0x10000) if bits[u] & 16}
    upper = {u for u in range(0x10000) if bits[u] & 8} - sp

    def check(ok, what):
        if not ok:
            sys.exit(f"make_ptb_tables: self-check failed: {what}")

    check(not (letter & digit), "[:letter:] and [:digit:] overlap")
    check(letter | digit == ld, "[:letter:] | [:digit:] differs from the THING probe")
    check(sp == SPACENL, "the SPACENL probe differs from PTBLexer's {SPACENL}")
    for name, s in (("[:letter:]", letter), ("[:digit:]", digit), ("[:uppercase:]", upper)):
        classes = {cmap[u] for u in s}
        union = all((cmap[u] in classes) == (u in s) for u in range(0x10000))
        check(union, f"{name} is not a union of ZZ_CMAP classes")
    return letter, digit, upper


def ranges(s):
    out = []
    for u in sorted(s):
        if out and out[-1][1] == u - 1:
            out[-1][1] = u
        else:
            out.append([u, u])
    return out


def render(letter, digit, upper):
    parts = [HEADER]
    for name, s in (("LETTER", letter), ("DIGIT", digit), ("UPPERCASE", upper)):
        lines = [f"pub(crate) const {name}: &[(u16, u16)] = &["]
        lines += [f"    (0x{a:04X}, 0x{b:04X})," for a, b in ranges(s)]
        lines.append("];")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write the Rust source here instead of stdout")
    ap.add_argument("--jar", help="stanford-corenlp-3.4.1.jar (default: pycocoevalcap's)")
    args = ap.parse_args()
    t0 = time.monotonic()
    text = render(*classify(*probe(args.jar or default_jar())))
    if args.out:
        with open(args.out, "w", newline="\n") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    print(f"make_ptb_tables: probed 65536 code units in {time.monotonic() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
