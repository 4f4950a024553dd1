//! SpamAssassin's own rules as labelling rules: the `.cf` files of its
//! rules folder (Debian's `/usr/share/spamassassin`, read in name order as
//! SpamAssassin reads them), imported as text tests with their scores.
//!
//! What is imported, as `Mail::SpamAssassin::Conf` defines it:
//! - `body NAME /re/flags`: the rendered text (subject first, HTML turned to
//!   text), one paragraph per line;
//! - `rawbody NAME /re/`: the decoded text parts, HTML as is;
//! - `header NAME Field =~ /re/` (or `!~`, `[if-unset: X]`, the `:raw`,
//!   `:addr`, `:name`, `:first`, `:last` modifiers, `ALL`, `ToCc`,
//!   `MESSAGEID`, `EnvelopeFrom`) and `header NAME exists:Field`;
//! - `uri NAME /re/`: each link of the body;
//! - `full NAME /re/`: the whole message as it came.
//!
//! `score NAME s0 [s1 s2 s3]` gives each its weight: score set 0 (no Bayes,
//! no network tests, which is what runs here); the last definition wins, a
//! rule without one scores 1 (`T_` test rules 0.01). A positive score votes
//! spam, a negative one ham. Skipped, each with its reason: `eval:` tests
//! (Perl code), `meta` rules (combinations of other rules), `__` sub-rules
//! (only metas read them), `mimeheader` and other kinds, rules scored 0,
//! header fields SpamAssassin computes itself (`X-Spam-Relays-*`, the
//! trust path), and patterns the regex engine refuses.
//!
//! Conditional blocks (`if` / `ifplugin` / `else` / `endif`) are evaluated
//! as SpamAssassin 4.0.1 would with every plugin loaded except ReplaceTags
//! and MIMEHeader, which this importer does not implement: their `if
//! !plugin(...)` blocks hold the plain-regex versions of the same rules.
//!
//! Patterns are Perl regexes, matched with `fancy_regex` (look-around and
//! back-references; `\Z` is rewritten as `(?=\n?\z)`).

use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Which part of a mail a rule reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Body,
    RawBody,
    Uri,
    Full,
    /// A header field (`name` as written: `Subject`, `ALL`, `ToCc`, ...).
    Header {
        name: String,
        modifier: Option<String>,
        /// `!~`: the rule fires when the pattern does *not* match.
        negate: bool,
        /// `[if-unset: X]`: the text tested when the field is absent.
        if_unset: Option<String>,
    },
    /// `exists:Field`.
    Exists(String),
}

/// One imported rule.
#[derive(Debug, Clone)]
pub struct SaRule {
    pub name: String,
    pub target: Target,
    /// None for `exists:`.
    pub pattern: Option<fancy_regex::Regex>,
    /// The pattern as written in the `.cf` file.
    pub source: String,
    pub score: f64,
    /// `file:line` of the definition.
    pub at: String,
}

/// A rule left out, and why.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SkippedRule {
    pub name: String,
    pub kind: String,
    pub reason: String,
    pub at: String,
}

/// What an import gives.
#[derive(Debug, Default)]
pub struct Import {
    pub rules: Vec<SaRule>,
    pub skipped: Vec<SkippedRule>,
    /// The `.cf` files read, in order.
    pub files: Vec<PathBuf>,
    /// `required_score`: from this total a mail is spam (5 in 4.0.1).
    pub required_score: Option<f64>,
}

impl Import {
    /// Skipped rules counted by reason (the reason's first words).
    pub fn skipped_by_reason(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for s in &self.skipped {
            let key = s.reason.split(':').next().unwrap_or(&s.reason).to_string();
            *m.entry(key).or_insert(0) += 1;
        }
        m
    }
}

/// Read a rules folder (its `*.cf` files in name order) or one `.cf` file.
pub fn import(path: &Path) -> Result<Import> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cf"))
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(Error::file(path, "no `*.cf` file in this folder"));
        }
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut texts = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        // The rule files are mostly ASCII, with some Latin-1 and UTF-8 patterns.
        let text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => e.into_bytes().iter().map(|&b| b as char).collect(),
        };
        texts.push((f.display().to_string(), text));
    }
    let mut imp = import_texts(&texts);
    imp.files = files;
    Ok(imp)
}

/// A definition before the scores are known.
struct Def {
    kind: String,
    rest: String,
    at: String,
}

/// Import the rules of `.cf` texts, each given with its name.
pub fn import_texts(texts: &[(String, String)]) -> Import {
    let mut defs: BTreeMap<String, Def> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut scores: HashMap<String, f64> = HashMap::new();
    let mut required_score = None;
    for (file, text) in texts {
        // Each open block: is it taken?
        let mut stack: Vec<bool> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            let (word, rest) = split_word(line);
            let active = stack.iter().all(|&b| b);
            match word {
                "ifplugin" => {
                    stack.push(plugin_loaded(rest.trim()));
                    continue;
                }
                "if" => {
                    stack.push(eval_condition(rest.trim()).unwrap_or(false));
                    continue;
                }
                "else" => {
                    if let Some(top) = stack.last_mut() {
                        *top = !*top;
                    }
                    continue;
                }
                "endif" => {
                    stack.pop();
                    continue;
                }
                _ => {}
            }
            if !active {
                continue;
            }
            let at = format!("{file}:{}", i + 1);
            match word {
                "body" | "rawbody" | "header" | "uri" | "full" | "meta" | "mimeheader"
                | "uri_detail" => {
                    let (name, def) = split_word(rest.trim());
                    if name.is_empty() {
                        continue;
                    }
                    if !defs.contains_key(name) {
                        order.push(name.to_string());
                    }
                    defs.insert(
                        name.to_string(),
                        Def {
                            kind: word.to_string(),
                            rest: def.trim().to_string(),
                            at,
                        },
                    );
                }
                "required_score" | "required_hits" => {
                    required_score = rest.trim().parse::<f64>().ok().or(required_score);
                }
                "score" => {
                    let (name, vals) = split_word(rest.trim());
                    let first = vals.split_whitespace().next().unwrap_or("");
                    let first = first.trim_start_matches('(').trim_end_matches(')');
                    if let Ok(v) = first.parse::<f64>() {
                        scores.insert(name.to_string(), v);
                    }
                }
                _ => {}
            }
        }
    }
    let mut imp = Import {
        required_score,
        ..Default::default()
    };
    for name in order {
        let d = &defs[&name];
        let skip = |reason: String| SkippedRule {
            name: name.clone(),
            kind: d.kind.clone(),
            reason,
            at: d.at.clone(),
        };
        if name.starts_with("__") {
            imp.skipped.push(skip(
                "sub-rule: `__` rules are read by meta rules only".into(),
            ));
            continue;
        }
        let score = scores
            .get(&name)
            .copied()
            .unwrap_or(if name.starts_with("T_") { 0.01 } else { 1.0 });
        match parse_def(&d.kind, &d.rest) {
            Err(reason) => imp.skipped.push(skip(reason)),
            Ok(_) if score == 0.0 => imp
                .skipped
                .push(skip("score 0: the rule is disabled".into())),
            Ok((target, pattern, source)) => imp.rules.push(SaRule {
                name: name.clone(),
                target,
                pattern,
                source,
                score,
                at: d.at.clone(),
            }),
        }
    }
    imp
}

/// A `#` starts a comment unless escaped (`\#` inside patterns).
fn strip_comment(line: &str) -> &str {
    let b = line.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'#' && (i == 0 || b[i - 1] != b'\\') {
            return &line[..i];
        }
    }
    line
}

fn split_word(s: &str) -> (&str, &str) {
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

/// The plugins whose rules this importer cannot read as plain regexes.
const NOT_LOADED: &[&str] = &["ReplaceTags", "MIMEHeader"];

fn plugin_loaded(name: &str) -> bool {
    let short = name.rsplit("::").next().unwrap_or(name);
    !NOT_LOADED.contains(&short)
}

/// Evaluate an `if` condition: `plugin(X)`, `can(X)` (true: every feature
/// of 4.0.1), `has(X)`, `version` (4.000001), `perl_version` (5.036), numbers,
/// `!`, `&&`, `||`, comparisons and parentheses. None: not understood (the
/// block is left out).
fn eval_condition(s: &str) -> Option<bool> {
    let mut p = Cond {
        s: s.as_bytes(),
        i: 0,
        depth: 0,
    };
    let v = p.or()?;
    p.ws();
    (p.i == p.s.len()).then_some(v != 0.0)
}

struct Cond<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Cond<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, t: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Option<f64> {
        let mut v = self.and()?;
        while self.eat("||") {
            let r = self.and()?;
            v = f64::from(v != 0.0 || r != 0.0);
        }
        Some(v)
    }
    fn and(&mut self) -> Option<f64> {
        let mut v = self.cmp()?;
        while self.eat("&&") {
            let r = self.cmp()?;
            v = f64::from(v != 0.0 && r != 0.0);
        }
        Some(v)
    }
    fn cmp(&mut self) -> Option<f64> {
        let l = self.unary()?;
        for op in [">=", "<=", "==", "!=", ">", "<"] {
            if self.eat(op) {
                let r = self.unary()?;
                return Some(f64::from(match op {
                    ">=" => l >= r,
                    "<=" => l <= r,
                    "==" => l == r,
                    "!=" => l != r,
                    ">" => l > r,
                    _ => l < r,
                }));
            }
        }
        Some(l)
    }
    fn unary(&mut self) -> Option<f64> {
        // Real conditions nest two or three deep; a deeper one is not read.
        self.depth += 1;
        if self.depth > 64 {
            return None;
        }
        if self.eat("!") {
            let v = self.unary()?;
            self.depth -= 1;
            return Some(f64::from(v == 0.0));
        }
        if self.eat("(") {
            let v = self.or()?;
            self.depth -= 1;
            return self.eat(")").then_some(v);
        }
        self.depth -= 1;
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || matches!(self.s[self.i], b'_' | b'.'))
        {
            self.i += 1;
        }
        let word = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        match word {
            "version" => Some(4.000001),
            "perl_version" => Some(5.036),
            "plugin" | "can" | "has" => {
                if !self.eat("(") {
                    return None;
                }
                let a = self.i;
                while self.i < self.s.len() && self.s[self.i] != b')' {
                    self.i += 1;
                }
                if self.i == self.s.len() {
                    return None; // no closing parenthesis
                }
                let arg = std::str::from_utf8(&self.s[a..self.i]).ok()?.trim();
                self.i += 1;
                Some(f64::from(word != "plugin" || plugin_loaded(arg)))
            }
            _ => word.parse().ok(),
        }
    }
}

/// The target and compiled pattern of a definition, or why it is skipped.
fn parse_def(
    kind: &str,
    rest: &str,
) -> std::result::Result<(Target, Option<fancy_regex::Regex>, String), String> {
    let target = match kind {
        "body" => Target::Body,
        "rawbody" => Target::RawBody,
        "uri" => Target::Uri,
        "full" => Target::Full,
        "header" => {
            if let Some(f) = rest.strip_prefix("exists:") {
                return Ok((Target::Exists(f.trim().to_string()), None, rest.into()));
            }
            if rest.starts_with("eval:") {
                return Err("eval: a Perl function, not a text test".into());
            }
            let (field, after) = split_word(rest);
            let after = after.trim_start();
            let (negate, pat) = if let Some(p) = after.strip_prefix("=~") {
                (false, p.trim())
            } else if let Some(p) = after.strip_prefix("!~") {
                (true, p.trim())
            } else {
                return Err(format!("unreadable: header test `{rest}`"));
            };
            let (name, modifier) = match field.split_once(':') {
                Some((n, m)) => (n.to_string(), Some(m.to_string())),
                None => (field.to_string(), None),
            };
            if name.starts_with("X-Spam-Relays") || name.starts_with("ALL-") || name == "X-Spam-DCC"
            {
                return Err(format!(
                    "computed header: `{name}` is made by SpamAssassin from the Received chain and its trust path"
                ));
            }
            if let Some(m) = &modifier {
                if !matches!(m.as_str(), "raw" | "addr" | "name" | "first" | "last") {
                    return Err(format!("header modifier: `:{m}` is not supported"));
                }
            }
            let (pat, if_unset) = split_if_unset(pat);
            let (re, src) = compile(pat)?;
            return Ok((
                Target::Header {
                    name,
                    modifier,
                    negate,
                    if_unset,
                },
                Some(re),
                src,
            ));
        }
        "meta" => return Err("meta: a combination of other rules".into()),
        other => return Err(format!("kind: `{other}` rules are not imported")),
    };
    if rest.starts_with("eval:") {
        return Err("eval: a Perl function, not a text test".into());
    }
    let (re, src) = compile(rest)?;
    Ok((target, Some(re), src))
}

/// `/re/ [if-unset: X]` -> the pattern part and X.
fn split_if_unset(s: &str) -> (&str, Option<String>) {
    match s.rfind("[if-unset:") {
        Some(i) if s.trim_end().ends_with(']') => {
            let v = s[i + "[if-unset:".len()..].trim_end();
            (s[..i].trim(), Some(v[..v.len() - 1].trim().to_string()))
        }
        _ => (s, None),
    }
}

/// Compile a Perl match (`/re/flags`, `m{re}flags`, `m!re!`...).
fn compile(s: &str) -> std::result::Result<(fancy_regex::Regex, String), String> {
    let (body, flags) = perl_match(s).ok_or_else(|| format!("unreadable: pattern `{s}`"))?;
    let mut inline = String::new();
    for f in flags.chars() {
        match f {
            'i' | 'm' | 's' | 'x' => inline.push(f),
            'g' | 'o' => {}
            other => return Err(format!("unsupported flag: `{other}` in `{s}`")),
        }
    }
    let translated = translate(&body);
    let full = if inline.is_empty() {
        translated
    } else {
        format!("(?{inline}){translated}")
    };
    let re = fancy_regex::RegexBuilder::new(&full)
        .backtrack_limit(100_000)
        .build()
        .map_err(|e| format!("pattern refused by the regex engine: {e}"))?;
    Ok((re, s.to_string()))
}

/// Split a Perl match operator into its pattern and flags.
fn perl_match(s: &str) -> Option<(String, String)> {
    let s = s.trim();
    let (open, rest) = if let Some(r) = s.strip_prefix('m') {
        let c = r.chars().next()?;
        if c.is_alphanumeric() || c.is_whitespace() {
            return None;
        }
        (c, &r[c.len_utf8()..])
    } else if let Some(r) = s.strip_prefix('/') {
        ('/', r)
    } else {
        return None;
    };
    let close = match open {
        '{' => '}',
        '(' => ')',
        '[' => ']',
        '<' => '>',
        c => c,
    };
    let mut body = String::new();
    let mut depth = 0usize;
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            if let Some((_, n)) = chars.next() {
                // An escaped delimiter is the character itself.
                if n == close || n == open {
                    if n.is_alphanumeric() {
                        body.push('\\');
                    }
                    if "{}()[]<>".contains(n) {
                        body.push('\\');
                    }
                    body.push(n);
                } else {
                    body.push('\\');
                    body.push(n);
                }
            }
            continue;
        }
        if c == open && open != close {
            depth += 1;
        } else if c == close {
            if depth == 0 {
                let flags = rest[i + c.len_utf8()..].trim().to_string();
                return Some((body, flags));
            }
            depth -= 1;
        }
        body.push(c);
    }
    None
}

/// Perl regex syntax the engine spells otherwise.
fn translate(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('Z') => out.push_str("(?=\\n?\\z)"),
                Some(n) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push_str("\\\\"),
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp(text: &str) -> Import {
        import_texts(&[("t.cf".into(), text.into())])
    }

    #[test]
    fn a_sample_of_real_cf_lines() {
        let i = imp(r#"
# comment
required_score 5
body     GTUBE		/XJS\*C4JDBQADN1\.NSBN3\*2IDNEN\*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL\*C\.34X/
describe GTUBE		Generic Test for Unsolicited Bulk Email
score GTUBE 1000
header   FROM_UNBAL2	From:raw =~ /^ [^<]* > /xm
header DRUGS_HDIA       Subject =~ /\bhoodia\b/i
header   MISSING_DATE	!exists:Date
header   HAS_DATE	exists:Date
header SUBJ_ALL_CAPS   eval:subject_is_all_caps()
header CK_HELO_GENERIC   X-Spam-Relays-Untrusted =~ /^[^\]]+helo=/i
meta     SOME_META      (GTUBE && DRUGS_HDIA)
body     __SUB_RULE     /viagra/i
rawbody  HTML_TAG_X     m{<blink>}i
uri      URI_HEX        /^https?:\/\/[^\/]*\%[0-9a-f]{2}/i
body     BAD_SCORE0     /foo/
score    BAD_SCORE0     0
body     BROKEN         /(unclosed/
mimeheader MIME_X      Content-Type =~ /foo/
body     TEST_RULE      /bar/
score    DRUGS_HDIA     2.5 2.6 2.7 2.8
score    FROM_UNBAL2    (-1.5) (0) (-1.5) (0)
header   BACKREF        Subject =~ /(\w)\1\1/
header   FROM_NAME      From:name =~ /^bob$/i [if-unset: bob]
"#);
        let names: Vec<&str> = i.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "GTUBE",
                "FROM_UNBAL2",
                "DRUGS_HDIA",
                "HAS_DATE",
                "HTML_TAG_X",
                "URI_HEX",
                "TEST_RULE",
                "BACKREF",
                "FROM_NAME"
            ]
        );
        let score = |n: &str| i.rules.iter().find(|r| r.name == n).unwrap().score;
        assert_eq!(score("GTUBE"), 1000.0);
        assert_eq!(score("DRUGS_HDIA"), 2.5); // score set 0
        assert_eq!(score("FROM_UNBAL2"), -1.5); // parenthesised: kept as is
        assert_eq!(score("URI_HEX"), 1.0); // no score line: 1
        let reason = |n: &str| {
            i.skipped
                .iter()
                .find(|s| s.name == n)
                .unwrap()
                .reason
                .clone()
        };
        assert!(reason("SUBJ_ALL_CAPS").starts_with("eval:"));
        assert!(reason("CK_HELO_GENERIC").starts_with("computed header"));
        assert!(reason("SOME_META").starts_with("meta"));
        assert!(reason("__SUB_RULE").starts_with("sub-rule"));
        assert!(reason("BAD_SCORE0").starts_with("score 0"));
        assert!(
            reason("BROKEN").starts_with("pattern refused"),
            "{}",
            reason("BROKEN")
        );
        assert!(reason("MIME_X").starts_with("kind"));
        // `!exists:` is not `exists:`: an unreadable header test.
        assert!(reason("MISSING_DATE").starts_with("unreadable"));
        let r = i.rules.iter().find(|r| r.name == "FROM_NAME").unwrap();
        assert!(
            matches!(&r.target, Target::Header { modifier: Some(m), if_unset: Some(u), .. } if m == "name" && u == "bob")
        );
        let re = |n: &str| {
            i.rules
                .iter()
                .find(|r| r.name == n)
                .unwrap()
                .pattern
                .clone()
                .unwrap()
        };
        assert!(re("BACKREF").is_match("zzz top").unwrap());
        assert!(!re("BACKREF").is_match("zz top").unwrap());
        assert!(re("URI_HEX").is_match("http://ex%41mple.com/").unwrap());
        assert!(re("HTML_TAG_X").is_match("<BLINK>").unwrap());
        assert!(re("FROM_UNBAL2").is_match(" bob > x").unwrap());
        assert_eq!(i.skipped_by_reason()["eval"], 1);
        assert_eq!(i.required_score, Some(5.0));
    }

    #[test]
    fn conditional_blocks_and_overrides() {
        let i = imp(r#"
ifplugin Mail::SpamAssassin::Plugin::ReplaceTags
body TAGGED /<A>foo/
endif
if !plugin(Mail::SpamAssassin::Plugin::ReplaceTags)
body UNTAGGED /foo/
endif
if (version >= 3.004002)
body NEW_ENOUGH /x/
else
body TOO_OLD /y/
endif
if (version >= 5.000000)
body FUTURE /z/
endif
if can(Mail::SpamAssassin::Conf::feature_bug6558_free) && !(version < 3.0)
body BOTH /w/
endif
body REDEFINED /first/
body REDEFINED /second/
"#);
        let names: Vec<&str> = i.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["UNTAGGED", "NEW_ENOUGH", "BOTH", "REDEFINED"]);
        // Conditions it cannot read leave their block out.
        assert_eq!(eval_condition("plugin(Mail::SpamAssassin::Plugin::X"), None);
        assert_eq!(eval_condition(&"(".repeat(10_000)), None);
        assert_eq!(eval_condition("version >= 3.0 &&"), None);
        assert_eq!(i.rules[3].source, "/second/");
    }

    #[test]
    fn perl_delimiters_flags_and_z() {
        let (re, _) = compile(r"m!a/b!i").unwrap();
        assert!(re.is_match("A/B").unwrap());
        let (re, _) = compile(r"/a\/b/").unwrap();
        assert!(re.is_match("a/b").unwrap());
        let (re, _) = compile(r"/end\Z/").unwrap();
        assert!(re.is_match("the end\n").unwrap() && re.is_match("the end").unwrap());
        assert!(!re.is_match("end of it").unwrap());
        let (re, _) = compile(r"/ a \s b /x").unwrap();
        assert!(re.is_match("a b").unwrap());
        assert!(compile("/x/e").unwrap_err().contains("unsupported flag"));
        assert!(compile("not a match").unwrap_err().contains("unreadable"));
    }

    /// The real rules, when fetched: most text rules import.
    #[test]
    fn the_debian_rules_import() {
        let Some(dir) = crate::hub::assets::testing::real_asset("spamassassin-rules") else {
            return;
        };
        let i = import(&dir).unwrap();
        assert!(i.files.len() > 50, "{}", i.files.len());
        // SpamAssassin 4 keeps most of its logic in `__` sub-rules combined
        // by metas: 177 scored text rules import from 4.0.1's files.
        assert!(i.rules.len() > 150, "imported {}", i.rules.len());
        let by = i.skipped_by_reason();
        assert!(by.get("sub-rule").copied().unwrap_or(0) > 1000, "{by:?}");
        assert!(by.get("meta").copied().unwrap_or(0) > 300, "{by:?}");
        assert!(by.get("eval").copied().unwrap_or(0) > 100, "{by:?}");
        // Refused patterns are few.
        let refused = by
            .get("pattern refused by the regex engine")
            .copied()
            .unwrap_or(0);
        assert!(
            refused * 20 < i.rules.len(),
            "{refused} refused of {}",
            i.rules.len()
        );
    }
}
