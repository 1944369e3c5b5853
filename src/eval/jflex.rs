//! A small JFlex-style regular-expression engine over UTF-16 code units.
//!
//! It understands the subset of JFlex syntax that the PTB lexer rules use: literals (ASCII
//! letters are caseless, as under `%caseless`), escapes (`\uXXXX`, `\xXX`, `\t`, `\n`, `\r`,
//! `\f`, `\0`, `\c`), classes `[...]` / `[^...]` (ranges, escapes, no case folding), the named
//! classes `[:letter:]`, `[:digit:]`, `[:uppercase:]`, `.`, macros `{NAME}`, grouping,
//! alternation and the postfix operators `*`, `+`, `?`, `{n}`, `{n,m}`.
//!
//! Patterns are compiled to one Thompson NFA; matching simulates state sets, so the longest
//! match over all rules (ties to the earliest rule) is found in a single left-to-right pass,
//! exactly the scanner semantics of a JFlex-generated lexer.

use std::collections::HashMap;

type Ranges = Vec<(u16, u16)>;

#[derive(Clone, Debug)]
pub(crate) enum Re {
    Set(Ranges),
    Cat(Vec<Re>),
    Alt(Vec<Re>),
    Star(Box<Re>),
    Plus(Box<Re>),
    Opt(Box<Re>),
    Rep(Box<Re>, u32, u32),
}

fn normalize(mut r: Ranges) -> Ranges {
    r.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(r.len());
    for (a, b) in r {
        if let Some(last) = out.last_mut() {
            if u32::from(a) <= u32::from(last.1) + 1 {
                if b > last.1 {
                    last.1 = b;
                }
                continue;
            }
        }
        out.push((a, b));
    }
    out
}

fn complement(r: &Ranges) -> Ranges {
    let mut out = Vec::new();
    let mut next: u32 = 0;
    for &(a, b) in r {
        if u32::from(a) > next {
            out.push((next as u16, a - 1));
        }
        next = u32::from(b) + 1;
    }
    if next <= 0xFFFF {
        out.push((next as u16, 0xFFFF));
    }
    out
}

/// Named character classes available to patterns as `[:name:]`.
pub(crate) struct NamedClasses {
    pub letter: &'static [(u16, u16)],
    pub digit: &'static [(u16, u16)],
    pub uppercase: &'static [(u16, u16)],
}

struct Parser<'a> {
    s: Vec<u16>,
    i: usize,
    macros: &'a HashMap<&'static str, &'static str>,
    cache: &'a mut HashMap<String, Re>,
    named: &'a NamedClasses,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u16> {
        self.s.get(self.i).copied()
    }

    fn err(&self, msg: &str) -> String {
        format!(
            "pattern {:?} at {}: {}",
            String::from_utf16_lossy(&self.s),
            self.i,
            msg
        )
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.peek() == Some(c as u16) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected {c:?}")))
        }
    }

    fn alt(&mut self) -> Result<Re, String> {
        let mut alts = vec![self.cat()?];
        while self.peek() == Some(b'|' as u16) {
            self.i += 1;
            alts.push(self.cat()?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().unwrap()
        } else {
            Re::Alt(alts)
        })
    }

    fn cat(&mut self) -> Result<Re, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == b'|' as u16 || c == b')' as u16 {
                break;
            }
            items.push(self.postfix()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap()
        } else {
            Re::Cat(items)
        })
    }

    fn number(&mut self) -> Option<u32> {
        let start = self.i;
        let mut v: u32 = 0;
        while let Some(c) = self.peek() {
            if (b'0' as u16..=b'9' as u16).contains(&c) {
                v = v * 10 + u32::from(c - b'0' as u16);
                self.i += 1;
            } else {
                break;
            }
        }
        (self.i > start).then_some(v)
    }

    fn postfix(&mut self) -> Result<Re, String> {
        let mut re = self.atom()?;
        loop {
            match self.peek().map(|c| c as u8 as char) {
                Some('*') => {
                    self.i += 1;
                    re = Re::Star(Box::new(re));
                }
                Some('+') => {
                    self.i += 1;
                    re = Re::Plus(Box::new(re));
                }
                Some('?') => {
                    self.i += 1;
                    re = Re::Opt(Box::new(re));
                }
                Some('{')
                    if self
                        .s
                        .get(self.i + 1)
                        .is_some_and(|&c| (b'0' as u16..=b'9' as u16).contains(&c)) =>
                {
                    self.i += 1;
                    let n = self.number().ok_or_else(|| self.err("repeat count"))?;
                    let m = if self.peek() == Some(b',' as u16) {
                        self.i += 1;
                        self.number().ok_or_else(|| self.err("repeat max"))?
                    } else {
                        n
                    };
                    self.expect('}')?;
                    re = Re::Rep(Box::new(re), n, m);
                }
                _ => return Ok(re),
            }
        }
    }

    /// One (possibly escaped) character; `None` when the escape is not a single char.
    fn char_item(&mut self) -> Result<u16, String> {
        let c = self.peek().ok_or_else(|| self.err("unexpected end"))?;
        self.i += 1;
        if c != b'\\' as u16 {
            return Ok(c);
        }
        let e = self.peek().ok_or_else(|| self.err("dangling escape"))?;
        self.i += 1;
        let hex = |p: &mut Self, n: usize| -> Result<u16, String> {
            let digits =
                p.s.get(p.i..p.i + n)
                    .ok_or_else(|| p.err("short hex escape"))?;
            let txt = String::from_utf16_lossy(digits);
            p.i += n;
            u16::from_str_radix(&txt, 16).map_err(|_| p.err("bad hex escape"))
        };
        Ok(match e as u8 {
            b'u' => hex(self, 4)?,
            b'x' => hex(self, 2)?,
            b't' => 9,
            b'n' => 10,
            b'r' => 13,
            b'f' => 12,
            b'b' => 8,
            b'0' => 0,
            _ => e,
        })
    }

    fn class(&mut self) -> Result<Re, String> {
        // after '['
        let mut neg = false;
        if self.peek() == Some(b'^' as u16) {
            neg = true;
            self.i += 1;
        }
        let mut ranges = Vec::new();
        while self.peek() != Some(b']' as u16) {
            let a = self.char_item()?;
            if self.peek() == Some(b'-' as u16) && self.s.get(self.i + 1) != Some(&(b']' as u16)) {
                self.i += 1;
                let b = self.char_item()?;
                if b < a {
                    return Err(self.err("reversed range"));
                }
                ranges.push((a, b));
            } else {
                ranges.push((a, a));
            }
        }
        self.i += 1;
        let r = normalize(ranges);
        Ok(Re::Set(if neg { complement(&r) } else { r }))
    }

    fn atom(&mut self) -> Result<Re, String> {
        let c = self.peek().ok_or_else(|| self.err("unexpected end"))?;
        match c as u8 as char {
            '(' if c < 0x80 => {
                self.i += 1;
                let re = self.alt()?;
                self.expect(')')?;
                Ok(re)
            }
            '[' if c < 0x80 => {
                self.i += 1;
                if self.peek() == Some(b':' as u16) {
                    let rest = String::from_utf16_lossy(&self.s[self.i..]);
                    for (name, set) in [
                        (":letter:]", self.named.letter),
                        (":digit:]", self.named.digit),
                        (":uppercase:]", self.named.uppercase),
                    ] {
                        if rest.starts_with(name) {
                            self.i += name.len();
                            return Ok(Re::Set(set.to_vec()));
                        }
                    }
                }
                self.class()
            }
            '{' if c < 0x80 => {
                self.i += 1;
                let start = self.i;
                while self.peek().is_some_and(|c| c != b'}' as u16) {
                    self.i += 1;
                }
                let name = String::from_utf16_lossy(&self.s[start..self.i]);
                self.expect('}')?;
                self.macro_re(&name)
            }
            '.' if c < 0x80 => {
                self.i += 1;
                Ok(Re::Set(complement(&vec![(10, 10)])))
            }
            _ => {
                let ch = self.char_item()?;
                let lower = (ch as u8).to_ascii_lowercase();
                if ch < 0x80 && (ch as u8).is_ascii_alphabetic() {
                    let upper = (ch as u8).to_ascii_uppercase();
                    Ok(Re::Set(normalize(vec![
                        (u16::from(lower), u16::from(lower)),
                        (u16::from(upper), u16::from(upper)),
                    ])))
                } else {
                    Ok(Re::Set(vec![(ch, ch)]))
                }
            }
        }
    }

    fn macro_re(&mut self, name: &str) -> Result<Re, String> {
        if let Some(re) = self.cache.get(name) {
            return Ok(re.clone());
        }
        let pat = *self
            .macros
            .get(name)
            .ok_or_else(|| self.err(&format!("unknown macro {name}")))?;
        if self.depth > 32 {
            return Err(self.err("macro recursion"));
        }
        let re = {
            let mut p = Parser {
                s: pat.encode_utf16().collect(),
                i: 0,
                macros: self.macros,
                cache: self.cache,
                named: self.named,
                depth: self.depth + 1,
            };
            let re = p.alt()?;
            if p.i != p.s.len() {
                return Err(p.err("trailing input"));
            }
            re
        };
        self.cache.insert(name.to_string(), re.clone());
        Ok(re)
    }
}

#[derive(Clone, Debug)]
enum State {
    Char(u32, u32),
    Fork(Vec<u32>),
    Accept(u32),
}

/// A compiled set of patterns sharing one NFA.
pub(crate) struct Nfa {
    states: Vec<State>,
    classes: Vec<Ranges>,
    class_ids: HashMap<Ranges, u32>,
}

/// Matching state: NFA simulation buffers plus a lazily built DFA (subset construction on
/// demand, cached per NFA state set and input code unit).
pub(crate) struct Sim {
    mark: Vec<u32>,
    gen: u32,
    next: Vec<u32>,
    stack: Vec<u32>,
    dstates: Vec<DState>,
    dindex: HashMap<std::sync::Arc<[u32]>, u32>,
    /// Sum of the set sizes of `dstates` (bounds the cache's memory).
    dsize: usize,
    dtrans: HashMap<(u32, u16), u32>,
    dstart: HashMap<u32, u32>,
}

struct DState {
    set: std::sync::Arc<[u32]>,
    accept: Option<u32>,
}

const DEAD: u32 = u32::MAX;
const ACCEPT_MARK: u32 = 1 << 31;
/// Cache size (NFA state entries over all DFA states) after which the cache is dropped.
const MAX_DSIZE: usize = 4_000_000;

impl Nfa {
    pub(crate) fn new() -> Self {
        Nfa {
            states: Vec::new(),
            classes: Vec::new(),
            class_ids: HashMap::new(),
        }
    }

    pub(crate) fn sim(&self) -> Sim {
        Sim {
            mark: vec![0; self.states.len()],
            gen: 0,
            next: Vec::new(),
            stack: Vec::new(),
            dstates: Vec::new(),
            dindex: HashMap::new(),
            dsize: 0,
            dtrans: HashMap::new(),
            dstart: HashMap::new(),
        }
    }

    fn push(&mut self, s: State) -> u32 {
        self.states.push(s);
        (self.states.len() - 1) as u32
    }

    fn class_id(&mut self, r: &Ranges) -> u32 {
        if let Some(&id) = self.class_ids.get(r) {
            return id;
        }
        let id = self.classes.len() as u32;
        self.classes.push(r.clone());
        self.class_ids.insert(r.clone(), id);
        id
    }

    fn compile(&mut self, re: &Re, next: u32) -> u32 {
        match re {
            Re::Set(r) => {
                let c = self.class_id(r);
                self.push(State::Char(c, next))
            }
            Re::Cat(items) => {
                let mut s = next;
                for r in items.iter().rev() {
                    s = self.compile(r, s);
                }
                s
            }
            Re::Alt(items) => {
                let entries = items.iter().map(|r| self.compile(r, next)).collect();
                self.push(State::Fork(entries))
            }
            Re::Opt(r) => {
                let e = self.compile(r, next);
                self.push(State::Fork(vec![e, next]))
            }
            Re::Star(r) => {
                let fork = self.push(State::Fork(Vec::new()));
                let body = self.compile(r, fork);
                self.states[fork as usize] = State::Fork(vec![body, next]);
                fork
            }
            Re::Plus(r) => {
                let fork = self.push(State::Fork(Vec::new()));
                let body = self.compile(r, fork);
                self.states[fork as usize] = State::Fork(vec![body, next]);
                body
            }
            Re::Rep(r, n, m) => {
                let mut s = next;
                for _ in *n..*m {
                    let e = self.compile(r, s);
                    s = self.push(State::Fork(vec![e, next]));
                }
                for _ in 0..*n {
                    s = self.compile(r, s);
                }
                s
            }
        }
    }

    /// Parses `pattern` (with `macros`) and compiles it so that a match ends in `Accept(tag)`.
    /// Returns the entry state.
    pub(crate) fn add(
        &mut self,
        pattern: &str,
        tag: u32,
        macros: &HashMap<&'static str, &'static str>,
        cache: &mut HashMap<String, Re>,
        named: &NamedClasses,
    ) -> Result<u32, String> {
        let mut p = Parser {
            s: pattern.encode_utf16().collect(),
            i: 0,
            macros,
            cache,
            named,
            depth: 0,
        };
        let re = p.alt()?;
        if p.i != p.s.len() {
            return Err(p.err("trailing input"));
        }
        let acc = self.push(State::Accept(tag));
        Ok(self.compile(&re, acc))
    }

    /// A state that forks to all `entries`.
    pub(crate) fn add_fork(&mut self, entries: Vec<u32>) -> u32 {
        self.push(State::Fork(entries))
    }

    fn in_class(&self, class: u32, c: u16) -> bool {
        let r = &self.classes[class as usize];
        // binary search over sorted disjoint ranges
        let idx = r.partition_point(|&(_, b)| b < c);
        idx < r.len() && r[idx].0 <= c
    }

    fn new_gen(sim: &mut Sim) {
        sim.gen = sim.gen.wrapping_add(1);
        if sim.gen == 0 {
            sim.mark.iter_mut().for_each(|m| *m = u32::MAX);
            sim.gen = 1;
        }
    }

    /// Adds the epsilon closure of `s` to `sim.next`, lowering `best` to the smallest accept
    /// tag reached.
    fn closure(&self, sim: &mut Sim, s: u32, best: &mut Option<u32>) {
        sim.stack.push(s);
        while let Some(s) = sim.stack.pop() {
            if sim.mark[s as usize] == sim.gen {
                continue;
            }
            sim.mark[s as usize] = sim.gen;
            match &self.states[s as usize] {
                State::Char(..) => sim.next.push(s),
                State::Fork(v) => {
                    for &e in v.iter().rev() {
                        sim.stack.push(e);
                    }
                }
                State::Accept(t) => {
                    if best.is_none_or(|b| *t < b) {
                        *best = Some(*t);
                    }
                }
            }
        }
    }

    /// Interns the state set in `sim.next` (with its accept tag) as a DFA state.
    fn intern(sim: &mut Sim, accept: Option<u32>) -> u32 {
        if sim.next.is_empty() && accept.is_none() {
            return DEAD;
        }
        sim.next.sort_unstable();
        // the key is the state set plus a marker for the accept tag (above any state id)
        sim.next.push(ACCEPT_MARK | accept.unwrap_or(!ACCEPT_MARK));
        if let Some(&d) = sim.dindex.get(sim.next.as_slice()) {
            return d;
        }
        let d = sim.dstates.len() as u32;
        let set: std::sync::Arc<[u32]> = sim.next.as_slice().into();
        sim.dsize += set.len() + 8;
        sim.dstates.push(DState {
            set: set.clone(),
            accept,
        });
        sim.dindex.insert(set, d);
        d
    }

    fn dfa_start(&self, sim: &mut Sim, start: u32) -> u32 {
        if let Some(&d) = sim.dstart.get(&start) {
            return d;
        }
        Self::new_gen(sim);
        sim.next.clear();
        let mut best = None;
        self.closure(sim, start, &mut best);
        let d = Self::intern(sim, best);
        sim.dstart.insert(start, d);
        d
    }

    fn dfa_step(&self, sim: &mut Sim, d: u32, c: u16) -> u32 {
        if let Some(&n) = sim.dtrans.get(&(d, c)) {
            return n;
        }
        Self::new_gen(sim);
        sim.next.clear();
        let mut best = None;
        let set = sim.dstates[d as usize].set.clone();
        for &s in set.iter() {
            if s >= ACCEPT_MARK {
                break;
            }
            if let State::Char(cls, nx) = self.states[s as usize] {
                if self.in_class(cls, c) {
                    self.closure(sim, nx, &mut best);
                }
            }
        }
        let n = Self::intern(sim, best);
        sim.dtrans.insert((d, c), n);
        n
    }

    /// Runs from `start` at `text[pos..]` and calls `on_accept(end, smallest_tag)` for every
    /// end position (in increasing order) where some pattern accepts. Stops at `limit`.
    pub(crate) fn run(
        &self,
        sim: &mut Sim,
        start: u32,
        text: &[u16],
        pos: usize,
        limit: usize,
        mut on_accept: impl FnMut(usize, u32),
    ) {
        if sim.dsize + sim.dtrans.len() > MAX_DSIZE {
            sim.dstates.clear();
            sim.dindex.clear();
            sim.dtrans.clear();
            sim.dstart.clear();
            sim.dsize = 0;
        }
        let mut d = self.dfa_start(sim, start);
        let mut i = pos;
        loop {
            if d == DEAD {
                return;
            }
            if let Some(t) = sim.dstates[d as usize].accept {
                on_accept(i, t);
            }
            if i >= limit || sim.dstates[d as usize].set.len() <= 1 {
                return;
            }
            d = self.dfa_step(sim, d, text[i]);
            i += 1;
        }
    }
}

pub(crate) type ReCache = HashMap<String, Re>;

#[cfg(test)]
mod tests {
    use super::*;

    const NAMED: NamedClasses = NamedClasses {
        letter: &[(0x41, 0x5A), (0x61, 0x7A)],
        digit: &[(0x30, 0x39)],
        uppercase: &[(0x41, 0x5A)],
    };

    fn longest(pats: &[&str], text: &str) -> Option<(usize, u32)> {
        let macros: HashMap<&'static str, &'static str> =
            [("D", "[0-9]"), ("W", "[:letter:]+")].into_iter().collect();
        let mut cache = ReCache::new();
        let mut nfa = Nfa::new();
        let entries = pats
            .iter()
            .enumerate()
            .map(|(i, p)| nfa.add(p, i as u32, &macros, &mut cache, &NAMED).unwrap())
            .collect();
        let start = nfa.add_fork(entries);
        let mut sim = nfa.sim();
        let t: Vec<u16> = text.encode_utf16().collect();
        let mut best = None;
        nfa.run(&mut sim, start, &t, 0, t.len(), |e, r| best = Some((e, r)));
        best
    }

    #[test]
    fn longest_match_and_priority() {
        assert_eq!(longest(&["{W}", "[a-z]+"], "abc1"), Some((3, 0)));
        assert_eq!(longest(&["ab", "{W}"], "ab"), Some((2, 0)));
        assert_eq!(longest(&["{D}{1,2}", "{D}+"], "1234"), Some((4, 1)));
        assert_eq!(longest(&["x{D}{2}"], "x123"), Some((3, 0)));
        // caseless literals, case-sensitive classes
        assert_eq!(longest(&["cannot"], "CanNot"), Some((6, 0)));
        assert_eq!(longest(&["[a]b"], "Ab"), None);
        // `,-_` inside a class is a range
        assert_eq!(longest(&["[^,-_]+"], "ab5c"), Some((2, 0)));
        assert_eq!(longest(&["[,-]+"], ",-,"), Some((3, 0)));
        assert_eq!(longest(&["a(b|cd)*e?"], "abcdbe"), Some((6, 0)));
    }
}
