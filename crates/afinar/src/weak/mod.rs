//! Weak supervision: labels from rules instead of people (Snorkel's
//! labelling functions, Ratner et al. 2017), aggregated by a label model,
//! for COSINE's two stages (`methods::cosine`).
//!
//! A rule reads one field of a row and votes a label or abstains:
//! - `keywords`: any of a list of words or phrases (whole words, case-
//!   insensitive unless `case_sensitive`);
//! - `regex`: a pattern (Perl syntax, `fancy_regex`);
//! - `lexicon`: the sum of a scored word list's matches (AFINN), voted as
//!   the label whose threshold it meets;
//! - SpamAssassin's rules, imported from its `.cf` files
//!   ([`spamassassin`]), each voting spam (positive score) or ham.
//!
//! Rules come from rule files (TOML, `[[rule]]` tables) and the run
//! config's `[[weak.rule]]`; [`analyse`] gives Snorkel's `LFAnalysis`
//! (coverage, overlaps, conflicts, empirical accuracy) and the label
//! model's numbers. The label model is a majority vote or a weighted vote
//! (the rule's `weight`; a SpamAssassin rule's |score|); ties and rows
//! without votes abstain.

pub mod lexicon;
pub mod mail;
pub mod spamassassin;

use crate::data::{FieldPath, Records};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a rule does, as written in a rule file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Keywords,
    Regex,
    Lexicon,
}

/// One `[[rule]]` of a rule file (or `[[weak.rule]]` of a run config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    pub kind: RuleKind,
    /// Field path of the text the rule reads (default `text`).
    pub field: Option<String>,
    /// The label voted (`keywords`, `regex`).
    pub label: Option<String>,
    /// `keywords`: the words or phrases.
    pub words: Option<Vec<String>>,
    #[serde(default)]
    pub case_sensitive: bool,
    /// `regex`: the pattern.
    pub pattern: Option<String>,
    /// `lexicon`: the word list (`word<TAB>score` lines; a path, relative to
    /// the rule file, or `asset:NAME`).
    pub file: Option<String>,
    /// `lexicon`: label -> condition on the summed score (`">= 2"`, `"<= -2"`,
    /// `"== 0"`); the first label in name order whose condition holds wins.
    pub thresholds: Option<BTreeMap<String, String>>,
    /// `lexicon`: fewest matched words for a vote (default 1: no match abstains).
    pub min_matches: Option<usize>,
    /// The rule's weight in the weighted vote (default 1).
    pub weight: Option<f64>,
}

/// A rule file: `[[rule]]` tables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

/// `[weak.spamassassin]`: SpamAssassin's rules over a field holding mails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpamAssassinSpec {
    /// The rules folder (its `*.cf` files) or one file; `asset:NAME`.
    pub rules: String,
    /// Field holding the whole message (default `text`).
    pub field: Option<String>,
    /// The label a positive score votes (default `spam`).
    pub spam: Option<String>,
    /// The label a negative score votes (default `ham`).
    pub ham: Option<String>,
}

/// The label model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelModel {
    /// The label most rules vote.
    Majority,
    /// The label with the largest sum of rule weights.
    #[default]
    Weighted,
    /// SpamAssassin's decision, for two labels: the votes' weights summed
    /// with a sign (+ for `score_label`, - for the other); at least
    /// `at_least` votes `score_label`, at most `at_most` the other label
    /// (a row no rule fires on scores 0), in between abstains.
    Score,
}

/// The thresholds of [`LabelModel::Score`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreRule {
    /// The label positive totals vote.
    pub label: usize,
    pub at_least: f64,
    pub at_most: f64,
}

/// A label model with its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Aggregator {
    pub model: LabelModel,
    /// Set for [`LabelModel::Score`].
    pub score: Option<ScoreRule>,
}

impl From<LabelModel> for Aggregator {
    fn from(model: LabelModel) -> Self {
        Aggregator { model, score: None }
    }
}

enum Matcher {
    Keywords(regex::Regex, usize),
    Regex(fancy_regex::Regex, usize),
    Lexicon(lexicon::Lexicon, Vec<(lexicon::Cond, usize)>, usize),
    Sa(spamassassin::SaRule, usize),
}

/// A compiled rule.
pub struct Rule {
    pub name: String,
    /// `keywords`, `regex`, `lexicon`, or `spamassassin:<body|header|...>`.
    pub kind: String,
    pub field: FieldPath,
    pub weight: f64,
    /// Where it was defined (`file` or `file:line`).
    pub at: String,
    matcher: Matcher,
}

/// The rules of a run, the labels they vote, and what was skipped.
pub struct RuleSet {
    pub rules: Vec<Rule>,
    /// Label names, indexed by the votes' label ids.
    pub labels: Vec<String>,
    pub skipped: Vec<spamassassin::SkippedRule>,
    /// `.cf` files read (SpamAssassin).
    pub cf_files: Vec<PathBuf>,
    /// SpamAssassin's `required_score` in those files.
    pub required_score: Option<f64>,
}

/// Each row's votes: `(rule, label)` pairs.
pub type Votes = Vec<Vec<(u32, u32)>>;

fn resolve(spec: &str, base: &Path) -> Result<PathBuf> {
    if let Some(name) = spec.strip_prefix("asset:") {
        return crate::hub::assets::resolve_asset_path(name);
    }
    Ok(base.join(spec))
}

impl RuleSet {
    /// Compile rule specs (each with the file it came from, for errors and
    /// relative paths) and an optional SpamAssassin import. `labels`: the
    /// data's label names; a rule voting another label is an error.
    pub fn build(
        specs: &[(RuleSpec, PathBuf)],
        sa: Option<(&SpamAssassinSpec, &Path)>,
        labels: &[String],
    ) -> Result<RuleSet> {
        let label_id = |l: &str, at: &Path, rule: &str| -> Result<usize> {
            labels.iter().position(|x| x == l).ok_or_else(|| {
                Error::file(
                    at,
                    format!("rule `{rule}` votes `{l}`, which is not a label of the data (labels: {labels:?})"),
                )
            })
        };
        let mut rules = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (s, from) in specs {
            let err = |msg: String| Error::file(from, format!("rule `{}`: {msg}", s.name));
            if !seen.insert(s.name.clone()) {
                return Err(err("a second rule with this name".into()));
            }
            let field = FieldPath::parse(s.field.as_deref().unwrap_or("text"))
                .map_err(|e| err(format!("`field`: {e}")))?;
            let need = |v: bool, what: &str| {
                if v {
                    Ok(())
                } else {
                    Err(err(
                        format!("a `{:?}` rule needs `{what}`", s.kind).to_lowercase()
                    ))
                }
            };
            let weight = s.weight.unwrap_or(1.0);
            if !(weight.is_finite() && weight > 0.0) {
                return Err(err(format!(
                    "`weight` must be a positive number, got {weight}"
                )));
            }
            let matcher = match s.kind {
                RuleKind::Keywords => {
                    need(s.label.is_some(), "label")?;
                    let words = s.words.as_deref().unwrap_or_default();
                    need(!words.is_empty(), "words")?;
                    let alts: Vec<String> = words.iter().map(|w| regex::escape(w.trim())).collect();
                    let pat = format!(
                        "{}\\b(?:{})\\b",
                        if s.case_sensitive { "" } else { "(?i)" },
                        alts.join("|")
                    );
                    let re = regex::Regex::new(&pat).map_err(|e| err(e.to_string()))?;
                    Matcher::Keywords(
                        re,
                        label_id(s.label.as_deref().unwrap_or(""), from, &s.name)?,
                    )
                }
                RuleKind::Regex => {
                    need(s.label.is_some(), "label")?;
                    need(s.pattern.is_some(), "pattern")?;
                    let re = fancy_regex::Regex::new(s.pattern.as_deref().unwrap_or(""))
                        .map_err(|e| err(format!("`pattern`: {e}")))?;
                    Matcher::Regex(
                        re,
                        label_id(s.label.as_deref().unwrap_or(""), from, &s.name)?,
                    )
                }
                RuleKind::Lexicon => {
                    need(s.file.is_some(), "file")?;
                    let th = s.thresholds.as_ref().filter(|t| !t.is_empty());
                    need(th.is_some(), "thresholds")?;
                    let base = from.parent().unwrap_or(Path::new("."));
                    let path = resolve(s.file.as_deref().unwrap_or(""), base)?;
                    let lex = lexicon::Lexicon::read(&path)?;
                    let mut conds = Vec::new();
                    for (label, c) in th.into_iter().flatten() {
                        let cond = lexicon::Cond::parse(c)
                            .map_err(|e| err(format!("`thresholds.{label}`: {e}")))?;
                        conds.push((cond, label_id(label, from, &s.name)?));
                    }
                    Matcher::Lexicon(lex, conds, s.min_matches.unwrap_or(1))
                }
            };
            if s.kind != RuleKind::Lexicon && (s.thresholds.is_some() || s.file.is_some()) {
                return Err(err(
                    "`file` and `thresholds` belong to `lexicon` rules".into()
                ));
            }
            rules.push(Rule {
                name: s.name.clone(),
                kind: format!("{:?}", s.kind).to_lowercase(),
                field,
                weight,
                at: from.display().to_string(),
                matcher,
            });
        }
        let mut skipped = Vec::new();
        let mut cf_files = Vec::new();
        let mut required_score = None;
        if let Some((sa, config)) = sa {
            let base = config.parent().unwrap_or(Path::new("."));
            let path = resolve(&sa.rules, base)?;
            let imp = spamassassin::import(&path)?;
            let field = FieldPath::parse(sa.field.as_deref().unwrap_or("text"))
                .map_err(|e| Error::file(config, format!("`weak.spamassassin.field`: {e}")))?;
            let spam = label_id(sa.spam.as_deref().unwrap_or("spam"), config, "spamassassin")?;
            let ham = label_id(sa.ham.as_deref().unwrap_or("ham"), config, "spamassassin")?;
            for r in imp.rules {
                if !seen.insert(r.name.clone()) {
                    return Err(Error::file(
                        config,
                        format!(
                            "SpamAssassin's rule `{}` has the name of a rule of the rule files",
                            r.name
                        ),
                    ));
                }
                let label = if r.score > 0.0 { spam } else { ham };
                rules.push(Rule {
                    name: r.name.clone(),
                    kind: format!("spamassassin:{}", target_kind(&r.target)),
                    field: field.clone(),
                    weight: r.score.abs(),
                    at: r.at.clone(),
                    matcher: Matcher::Sa(r, label),
                });
            }
            skipped = imp.skipped;
            cf_files = imp.files;
            required_score = imp.required_score;
        }
        if rules.is_empty() {
            return Err(Error::msg(
                "`[weak]` defines no rule (rule files, `[[weak.rule]]` or `[weak.spamassassin]`)",
            ));
        }
        Ok(RuleSet {
            rules,
            labels: labels.to_vec(),
            skipped,
            cf_files,
            required_score,
        })
    }

    /// The votes of every row of `records` (`rows`: which rows, in order).
    /// A row whose field is missing or not a string: an error naming the
    /// file, the line and the field.
    pub fn votes(&self, records: &Records, rows: &[usize]) -> Result<Votes> {
        rows.par_iter()
            .map(|&r| {
                let rec = &records.rows[r];
                let mut texts: Vec<(&FieldPath, &str, Option<mail::Mail>)> = Vec::new();
                let mut out = Vec::new();
                for (ri, rule) in self.rules.iter().enumerate() {
                    let k = match texts.iter().position(|(f, _, _)| *f == &rule.field) {
                        Some(k) => k,
                        None => {
                            let v = rec.lookup(&rule.field).map_err(|e| Error::Line {
                                path: records.path.clone(),
                                line: rec.line,
                                msg: format!("rule `{}`: {e}", rule.name),
                            })?;
                            let s = v.as_str().ok_or_else(|| Error::Line {
                                path: records.path.clone(),
                                line: rec.line,
                                msg: format!(
                                    "rule `{}`: field `{}` is not a string",
                                    rule.name,
                                    rule.field.as_str()
                                ),
                            })?;
                            texts.push((&rule.field, s, None));
                            texts.len() - 1
                        }
                    };
                    if matches!(rule.matcher, Matcher::Sa(..)) && texts[k].2.is_none() {
                        texts[k].2 = Some(mail::Mail::parse(texts[k].1));
                    }
                    let (_, text, parsed) = &texts[k];
                    if let Some(l) = rule.apply(text, parsed.as_ref()) {
                        out.push((ri as u32, l as u32));
                    }
                }
                Ok(out)
            })
            .collect()
    }
}

fn target_kind(t: &spamassassin::Target) -> &'static str {
    use spamassassin::Target::*;
    match t {
        Body => "body",
        RawBody => "rawbody",
        Uri => "uri",
        Full => "full",
        Header { .. } | Exists(_) => "header",
    }
}

impl Rule {
    /// The label this rule votes on `text`, if any (`mail`: the parsed mail
    /// for SpamAssassin's rules).
    fn apply(&self, text: &str, mail: Option<&mail::Mail>) -> Option<usize> {
        match &self.matcher {
            Matcher::Keywords(re, l) => re.is_match(text).then_some(*l),
            Matcher::Regex(re, l) => re.is_match(text).unwrap_or(false).then_some(*l),
            Matcher::Lexicon(lex, conds, min) => {
                let (score, n) = lex.score(text);
                if n < *min {
                    return None;
                }
                conds.iter().find(|(c, _)| c.holds(score)).map(|(_, l)| *l)
            }
            Matcher::Sa(r, l) => sa_fires(r, mail?).then_some(*l),
        }
    }
}

/// Does a SpamAssassin rule fire on a mail?
fn sa_fires(r: &spamassassin::SaRule, m: &mail::Mail) -> bool {
    use spamassassin::Target::*;
    let is = |s: &str| {
        r.pattern
            .as_ref()
            .is_some_and(|p| p.is_match(s).unwrap_or(false))
    };
    match &r.target {
        Body => m.body.lines().any(is),
        RawBody => m.raw_body.lines().any(is),
        Uri => m.uris.iter().any(|u| is(u)),
        Full => is(&format!("{}\n{}", m.all_headers(true), m.raw_body)),
        Exists(f) => m.header_raw(f).is_some(),
        Header {
            name,
            modifier,
            negate,
            if_unset,
        } => {
            let raw = modifier.as_deref() == Some("raw");
            let value = match name.as_str() {
                "ALL" => Some(m.all_headers(raw)),
                "ToCc" => {
                    let v: Vec<String> = ["To", "Cc"].iter().filter_map(|h| m.header(h)).collect();
                    (!v.is_empty()).then(|| v.join("\n"))
                }
                "MESSAGEID" => {
                    let v: Vec<String> = ["Message-Id", "Resent-Message-Id", "X-Message-Id"]
                        .iter()
                        .filter_map(|h| m.header(h))
                        .collect();
                    (!v.is_empty()).then(|| v.join("\n"))
                }
                "EnvelopeFrom" => m.header("Return-Path"),
                _ if raw => m.header_raw(name),
                _ => m.header(name),
            };
            let value = value.map(|v| match modifier.as_deref() {
                Some("addr") => addresses(&v),
                Some("name") => names(&v),
                Some("first") => v.lines().next().unwrap_or("").to_string(),
                Some("last") => v.lines().last().unwrap_or("").to_string(),
                _ => v,
            });
            let Some(v) = value.or_else(|| if_unset.clone()) else {
                // An absent field: `=~` fails, `!~` holds (SpamAssassin tests "").
                return *negate && !is("");
            };
            is(&v) != *negate
        }
    }
}

/// The address part of address fields (`Bob <bob@x>` -> `bob@x`).
fn addresses(v: &str) -> String {
    v.lines()
        .map(|l| match (l.rfind('<'), l.rfind('>')) {
            (Some(a), Some(b)) if a < b => l[a + 1..b].trim().to_string(),
            _ => l
                .split_whitespace()
                .find(|w| w.contains('@'))
                .unwrap_or(l.trim())
                .to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The display-name part of address fields.
fn names(v: &str) -> String {
    v.lines()
        .map(|l| match l.rfind('<') {
            Some(a) => l[..a].trim().trim_matches('"').to_string(),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Read the `[[rule]]` tables of a rule file.
pub fn read_rule_file(path: &Path) -> Result<Vec<RuleSpec>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let f: RuleFile = toml::from_str(&text).map_err(|e| Error::file(path, e.to_string()))?;
    if f.rule.is_empty() {
        return Err(Error::file(path, "no `[[rule]]` in this rule file"));
    }
    Ok(f.rule)
}

/// The label model's label for each row (None: abstain).
pub fn aggregate(
    votes: &Votes,
    rules: &[Rule],
    n_labels: usize,
    agg: Aggregator,
) -> Vec<Option<usize>> {
    votes
        .iter()
        .map(|row| {
            if let (LabelModel::Score, Some(sr)) = (agg.model, agg.score) {
                let total: f64 = row
                    .iter()
                    .map(|&(r, l)| {
                        let w = rules[r as usize].weight;
                        if l as usize == sr.label {
                            w
                        } else {
                            -w
                        }
                    })
                    .sum();
                return if total >= sr.at_least {
                    Some(sr.label)
                } else if total <= sr.at_most {
                    Some(1 - sr.label)
                } else {
                    None
                };
            }
            if row.is_empty() {
                return None;
            }
            let mut tally = vec![0f64; n_labels];
            for &(r, l) in row {
                tally[l as usize] += match agg.model {
                    LabelModel::Majority => 1.0,
                    LabelModel::Weighted | LabelModel::Score => rules[r as usize].weight,
                };
            }
            let best = tally.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let winners: Vec<usize> = (0..n_labels).filter(|&i| tally[i] == best).collect();
            (winners.len() == 1 && best > 0.0).then(|| winners[0])
        })
        .collect()
}

/// One rule's numbers on one split (Snorkel's `LFAnalysis`).
#[derive(Debug, Clone, Serialize)]
pub struct RuleStats {
    pub name: String,
    pub kind: String,
    /// Labels the rule voted on this split.
    pub polarity: Vec<String>,
    pub weight: f64,
    /// Share of rows it votes on.
    pub coverage: f64,
    /// Share of rows it votes on where another rule votes too.
    pub overlaps: f64,
    /// Share of rows it votes on where another rule votes another label.
    pub conflicts: f64,
    pub votes: usize,
    /// Votes equal to the gold label (labelled splits).
    pub correct: Option<usize>,
    /// correct / votes (labelled splits with votes).
    pub accuracy: Option<f64>,
}

/// The label model's numbers on a split.
#[derive(Debug, Clone, Serialize)]
pub struct VoteStats {
    pub rows: usize,
    /// Share of rows with at least one vote.
    pub rule_coverage: f64,
    /// Share of rows the label model labels (not a tie, not unvoted).
    pub label_coverage: f64,
    /// Accuracy on the rows it labels.
    pub accuracy_covered: Option<f64>,
    /// Accuracy on every row, abstains counted wrong.
    pub accuracy_abstain_wrong: Option<f64>,
    /// Accuracy and macro-F1 on every row, abstains given `fallback`.
    pub accuracy_abstain_fallback: Option<f64>,
    pub macro_f1_abstain_fallback: Option<f64>,
    pub fallback: Option<String>,
}

/// Rules and label model on one split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitAnalysis {
    pub split: String,
    pub rules: Vec<RuleStats>,
    pub vote: VoteStats,
}

/// Analyse `votes` of a split; `gold`: the true label ids (labelled
/// splits); `fallback`: the label an abstain becomes in the fallback scores.
pub fn analyse(
    split: &str,
    set: &RuleSet,
    votes: &Votes,
    gold: Option<&[usize]>,
    model: Aggregator,
    fallback: Option<usize>,
) -> Result<SplitAnalysis> {
    let n = votes.len();
    let nr = set.rules.len();
    let mut cov = vec![0usize; nr];
    let mut ovl = vec![0usize; nr];
    let mut cfl = vec![0usize; nr];
    let mut cor = vec![0usize; nr];
    let mut pol: Vec<std::collections::BTreeSet<u32>> = vec![Default::default(); nr];
    for (i, row) in votes.iter().enumerate() {
        for &(r, l) in row {
            let r = r as usize;
            cov[r] += 1;
            pol[r].insert(l);
            if row.len() > 1 {
                ovl[r] += 1;
            }
            if row.iter().any(|&(_, l2)| l2 != l) {
                cfl[r] += 1;
            }
            if gold.is_some_and(|g| g[i] == l as usize) {
                cor[r] += 1;
            }
        }
    }
    let frac = |c: usize| if n == 0 { 0.0 } else { c as f64 / n as f64 };
    let rules = set
        .rules
        .iter()
        .enumerate()
        .map(|(r, rule)| RuleStats {
            name: rule.name.clone(),
            kind: rule.kind.clone(),
            polarity: pol[r]
                .iter()
                .map(|&l| set.labels[l as usize].clone())
                .collect(),
            weight: rule.weight,
            coverage: frac(cov[r]),
            overlaps: frac(ovl[r]),
            conflicts: frac(cfl[r]),
            votes: cov[r],
            correct: gold.map(|_| cor[r]),
            accuracy: gold
                .filter(|_| cov[r] > 0)
                .map(|_| cor[r] as f64 / cov[r] as f64),
        })
        .collect();
    let pred = aggregate(votes, &set.rules, set.labels.len(), model);
    let voted = votes.iter().filter(|r| !r.is_empty()).count();
    let labelled = pred.iter().filter(|p| p.is_some()).count();
    let mut vote = VoteStats {
        rows: n,
        rule_coverage: frac(voted),
        label_coverage: frac(labelled),
        accuracy_covered: None,
        accuracy_abstain_wrong: None,
        accuracy_abstain_fallback: None,
        macro_f1_abstain_fallback: None,
        fallback: fallback.map(|f| set.labels[f].clone()),
    };
    if let Some(g) = gold {
        let right = pred.iter().zip(g).filter(|(p, &g)| **p == Some(g)).count();
        vote.accuracy_covered = (labelled > 0).then(|| right as f64 / labelled as f64);
        vote.accuracy_abstain_wrong = (n > 0).then(|| right as f64 / n as f64);
        if let Some(f) = fallback {
            let filled: Vec<usize> = pred.iter().map(|p| p.unwrap_or(f)).collect();
            if n > 0 {
                vote.accuracy_abstain_fallback = Some(crate::metrics::accuracy(&filled, g)?);
                vote.macro_f1_abstain_fallback =
                    Some(crate::metrics::macro_f1(&filled, g, set.labels.len())?);
            }
        }
    }
    Ok(SplitAnalysis {
        split: split.into(),
        rules,
        vote,
    })
}

/// The analysis as a table: totals per split, then the rules (the `top`
/// most covering on the first split) with coverage, overlaps, conflicts on
/// the first split and accuracy on the second (the labelled validation).
pub fn render(splits: &[SplitAnalysis], set: &RuleSet, top: usize) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} rules ({} skipped); labels {:?}",
        set.rules.len(),
        set.skipped.len(),
        set.labels
    );
    if !set.skipped.is_empty() {
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for k in &set.skipped {
            *by.entry(k.reason.split(':').next().unwrap_or("").to_string())
                .or_insert(0) += 1;
        }
        let _ = writeln!(s, "skipped SpamAssassin rules by reason: {by:?}");
    }
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    for a in splits {
        let v = &a.vote;
        let _ = writeln!(
            s,
            "{:<10} rows {:>6}  rule coverage {:>6}  labelled {:>6}  acc(labelled) {}  acc(abstain=wrong) {}  acc/F1(abstain={}) {} / {}",
            a.split,
            v.rows,
            pct(v.rule_coverage),
            pct(v.label_coverage),
            opt(v.accuracy_covered),
            opt(v.accuracy_abstain_wrong),
            v.fallback.as_deref().unwrap_or("-"),
            opt(v.accuracy_abstain_fallback),
            opt(v.macro_f1_abstain_fallback)
        );
    }
    let Some(first) = splits.first() else {
        return s;
    };
    let acc_split = splits.get(1);
    let mut order: Vec<usize> = (0..first.rules.len()).collect();
    order.sort_by(|&a, &b| first.rules[b].coverage.total_cmp(&first.rules[a].coverage));
    let _ = writeln!(
        s,
        "\n{:<28} {:<22} {:<12} {:>7} {:>8} {:>8} {:>8}  {}",
        "rule",
        "kind",
        "polarity",
        "weight",
        "coverage",
        "overlaps",
        "conflicts",
        acc_split.map_or("accuracy".into(), |a| format!("accuracy ({})", a.split))
    );
    for &r in order.iter().take(top) {
        let st = &first.rules[r];
        let acc = acc_split.and_then(|a| {
            let x = &a.rules[r];
            x.accuracy
                .map(|v| format!("{v:.3} ({}/{})", x.correct.unwrap_or(0), x.votes))
        });
        let _ = writeln!(
            s,
            "{:<28} {:<22} {:<12} {:>7.3} {:>8} {:>8} {:>8}  {}",
            st.name,
            st.kind,
            st.polarity.join(","),
            st.weight,
            pct(st.coverage),
            pct(st.overlaps),
            pct(st.conflicts),
            acc.unwrap_or_else(|| "-".into())
        );
    }
    if order.len() > top {
        let _ = writeln!(
            s,
            "... {} more rules in the saved analysis",
            order.len() - top
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records_from_reader;

    fn spec(name: &str, kind: RuleKind, label: &str) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            kind,
            field: None,
            label: Some(label.into()),
            words: None,
            case_sensitive: false,
            pattern: None,
            file: None,
            thresholds: None,
            min_matches: None,
            weight: None,
        }
    }

    fn records(texts: &[&str]) -> Records {
        let lines: String = texts
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
            .collect();
        records_from_reader(
            Path::new("rows.jsonl"),
            crate::data::Format::Jsonl,
            lines.as_bytes(),
        )
        .unwrap()
    }

    fn labels() -> Vec<String> {
        vec!["ham".into(), "spam".into()]
    }

    #[test]
    fn votes_abstains_and_the_label_models() {
        let mut free = spec("free", RuleKind::Keywords, "spam");
        free.words = Some(vec!["free".into(), "act now".into()]);
        let mut meeting = spec("meeting", RuleKind::Regex, "ham");
        meeting.pattern = Some(r"(?i)\bmeeting\b".into());
        meeting.weight = Some(3.0);
        let mut money = spec("money", RuleKind::Keywords, "spam");
        money.words = Some(vec!["$$$".into(), "cash".into()]);
        let f = PathBuf::from("rules.toml");
        let set = RuleSet::build(
            &[(free, f.clone()), (meeting, f.clone()), (money, f.clone())],
            None,
            &labels(),
        )
        .unwrap();
        let rec = records(&[
            "FREE cash, act now",       // free + money: spam
            "meeting at noon",          // meeting: ham
            "free meeting room",        // free (spam, 1) vs meeting (ham, 3)
            "freedom is not a keyword", // none: whole words only
            "free cash at the meeting", // 2 spam votes (weight 2) vs 1 ham (weight 3)
        ]);
        let v = set.votes(&rec, &[0, 1, 2, 3, 4]).unwrap();
        assert_eq!(v[0], [(0, 1), (2, 1)]);
        assert_eq!(v[1], [(1, 0)]);
        assert_eq!(v[2], [(0, 1), (1, 0)]);
        assert!(v[3].is_empty());
        let maj = aggregate(&v, &set.rules, 2, LabelModel::Majority.into());
        assert_eq!(maj, [Some(1), Some(0), None, None, Some(1)]); // a 1-1 tie abstains
        let wt = aggregate(&v, &set.rules, 2, LabelModel::Weighted.into());
        assert_eq!(wt, [Some(1), Some(0), Some(0), None, Some(0)]);

        let gold = [1, 0, 0, 0, 1];
        let a = analyse(
            "validation",
            &set,
            &v,
            Some(&gold),
            LabelModel::Majority.into(),
            Some(0),
        )
        .unwrap();
        let free = &a.rules[0];
        assert_eq!((free.votes, free.correct), (3, Some(2)));
        assert!((free.coverage - 0.6).abs() < 1e-12);
        assert!((free.overlaps - 0.6).abs() < 1e-12); // rows 0, 2, 4 all have another vote
        assert!((free.conflicts - 0.4).abs() < 1e-12); // rows 2 and 4
        assert_eq!(free.polarity, ["spam"]);
        assert!((a.vote.rule_coverage - 0.8).abs() < 1e-12);
        assert!((a.vote.label_coverage - 0.6).abs() < 1e-12);
        assert_eq!(a.vote.accuracy_covered, Some(1.0)); // rows 0, 1, 4
        assert_eq!(a.vote.accuracy_abstain_wrong, Some(0.6));
        assert_eq!(a.vote.accuracy_abstain_fallback, Some(1.0)); // rows 2, 3 -> ham, right
        let table = render(&[a.clone(), a], &set, 2);
        assert!(
            table.contains("free") && table.contains("... 1 more rules"),
            "{table}"
        );
    }

    #[test]
    fn bad_rules_are_named() {
        let f = PathBuf::from("r.toml");
        let mut k = spec("k", RuleKind::Keywords, "spam");
        let e = RuleSet::build(&[(k.clone(), f.clone())], None, &labels())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("r.toml") && e.contains("rule `k`") && e.contains("needs `words`"),
            "{e}"
        );
        k.words = Some(vec!["x".into()]);
        k.label = Some("eggs".into());
        let e = RuleSet::build(&[(k.clone(), f.clone())], None, &labels())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("votes `eggs`, which is not a label"), "{e}");
        k.label = Some("spam".into());
        let e = RuleSet::build(
            &[(k.clone(), f.clone()), (k.clone(), f.clone())],
            None,
            &labels(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("a second rule with this name"), "{e}");
        let mut r = spec("r", RuleKind::Regex, "ham");
        r.pattern = Some("(unclosed".into());
        let e = RuleSet::build(&[(r, f.clone())], None, &labels())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rule `r`: `pattern`"), "{e}");
        let e = RuleSet::build(&[], None, &labels())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("defines no rule"), "{e}");
        // A row without the field: file, line, rule and field.
        k.field = Some("body".into());
        let set = RuleSet::build(&[(k, f)], None, &labels()).unwrap();
        let e = set.votes(&records(&["x"]), &[0]).unwrap_err().to_string();
        assert!(
            e.contains("rows.jsonl:1") && e.contains("rule `k`") && e.contains("`body`"),
            "{e}"
        );
    }

    #[test]
    fn spamassassin_rules_fire_on_mails() {
        let dir = tempfile::tempdir().unwrap();
        let cf = dir.path().join("rules.cf");
        std::fs::write(
            &cf,
            "body CHEAP /\\bcheap meds\\b/i\nscore CHEAP 2.0\n\
             header SUBJ_NOW Subject =~ /now$/\nscore SUBJ_NOW 0.5\n\
             header NO_UA User-Agent !~ /./\nscore NO_UA 0.1\n\
             header LIST_ID exists:List-Id\nscore LIST_ID -3\n\
             uri CHEAP_URI /cheap\\.example/\n\
             header FROM_ADDR From:addr =~ /^jose\\@example\\.com$/\nscore FROM_ADDR -0.2\n\
             meta BOTH (CHEAP && SUBJ_NOW)\n",
        )
        .unwrap();
        let sa = SpamAssassinSpec {
            rules: cf.display().to_string(),
            field: None,
            spam: None,
            ham: None,
        };
        let set = RuleSet::build(
            &[],
            Some((&sa, dir.path().join("run.toml").as_path())),
            &labels(),
        )
        .unwrap();
        assert_eq!(set.rules.len(), 6);
        assert_eq!(set.skipped.len(), 1);
        let m1 = "From: Jose <jose@example.com>\nSubject: cheap meds now\n\nGet cheap meds at http://cheap.example/x\n";
        let m2 = "From: list@example.org\nList-Id: <dev.example.org>\nUser-Agent: mutt\nSubject: meeting\n\nhi\n";
        let v = set.votes(&records(&[m1, m2]), &[0, 1]).unwrap();
        let names = |row: &Vec<(u32, u32)>| -> Vec<&str> {
            row.iter()
                .map(|&(r, _)| set.rules[r as usize].name.as_str())
                .collect()
        };
        assert_eq!(
            names(&v[0]),
            ["CHEAP", "SUBJ_NOW", "NO_UA", "CHEAP_URI", "FROM_ADDR"]
        );
        assert_eq!(names(&v[1]), ["LIST_ID"]);
        // Weighted: 2 + 0.5 + 0.1 + 1 spam vs 0.2 ham; the list mail is ham.
        assert_eq!(
            aggregate(&v, &set.rules, 2, LabelModel::Weighted.into()),
            [Some(1), Some(0)]
        );
    }
}
