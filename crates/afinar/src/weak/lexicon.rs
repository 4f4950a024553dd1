//! Scored word lists (AFINN: `word<TAB>score`, words and phrases scored
//! -5..+5) and the score of a text, as the `afinn` package computes it: the
//! text lowercased, every entry matched at word boundaries (the longest
//! first, so `no fun` wins over `fun`), the scores summed.

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

pub struct Lexicon {
    scores: HashMap<String, f64>,
    re: regex::Regex,
}

impl Lexicon {
    /// Read a `word<TAB>score` file; a bad line is an error naming it.
    pub fn read(path: &Path) -> Result<Lexicon> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Lexicon::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Lexicon> {
        let mut scores = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |msg: &str| Error::Line {
                path: path.to_path_buf(),
                line: i + 1,
                msg: msg.to_string(),
            };
            let (w, s) = line
                .rsplit_once('\t')
                .ok_or_else(|| bad("expected `word<TAB>score`"))?;
            let s: f64 = s
                .trim()
                .parse()
                .map_err(|_| bad(&format!("score `{}` is not a number", s.trim())))?;
            scores.insert(w.trim().to_lowercase(), s);
        }
        if scores.is_empty() {
            return Err(Error::file(path, "the word list is empty"));
        }
        let mut words: Vec<&String> = scores.keys().collect();
        words.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        let alts: Vec<String> = words.iter().map(|w| regex::escape(w)).collect();
        let re = regex::Regex::new(&format!(r"\b(?:{})\b", alts.join("|")))
            .map_err(|e| Error::file(path, format!("cannot build the matcher: {e}")))?;
        Ok(Lexicon { scores, re })
    }

    /// The summed score of `text` and the number of matches.
    pub fn score(&self, text: &str) -> (f64, usize) {
        let lower = text.to_lowercase();
        let mut sum = 0.0;
        let mut n = 0;
        for m in self.re.find_iter(&lower) {
            sum += self.scores[m.as_str()];
            n += 1;
        }
        (sum, n)
    }
}

/// A condition on a score: `>= 2`, `< 0`, `== 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cond {
    op: Op,
    value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Ge,
    Gt,
    Le,
    Lt,
    Eq,
}

impl Cond {
    pub fn parse(s: &str) -> std::result::Result<Cond, String> {
        let s = s.trim();
        let (op, rest) = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("==", Op::Eq),
            (">", Op::Gt),
            ("<", Op::Lt),
        ]
        .iter()
        .find_map(|(p, op)| s.strip_prefix(p).map(|r| (*op, r)))
        .ok_or_else(|| {
            format!("`{s}`: expected a comparison such as \">= 2\", \"< 0\" or \"== 0\"")
        })?;
        let value: f64 = rest
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: `{}` is not a number", rest.trim()))?;
        Ok(Cond { op, value })
    }

    pub fn holds(&self, x: f64) -> bool {
        match self.op {
            Op::Ge => x >= self.value,
            Op::Gt => x > self.value,
            Op::Le => x <= self.value,
            Op::Lt => x < self.value,
            Op::Eq => x == self.value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_as_afinn() {
        let lex = Lexicon::parse(
            "good\t3\nbad\t-3\nno fun\t-3\nfun\t4\nnot working\t-3\n",
            Path::new("l.txt"),
        )
        .unwrap();
        assert_eq!(lex.score("Good, GOOD and bad"), (3.0, 3));
        // The phrase wins over its word; `goods` is not `good`.
        assert_eq!(lex.score("no fun at all, goods"), (-3.0, 1));
        assert_eq!(lex.score("nothing here"), (0.0, 0));
        let e = Lexicon::parse("good 3\n", Path::new("l.txt"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("l.txt:1") && e.contains("word<TAB>score"), "{e}");
        let e = Lexicon::parse("good\tthree\n", Path::new("l.txt"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`three` is not a number"), "{e}");
    }

    #[test]
    fn conditions() {
        assert!(Cond::parse(">= 2").unwrap().holds(2.0));
        assert!(!Cond::parse("> 2").unwrap().holds(2.0));
        assert!(Cond::parse("<-1").unwrap().holds(-2.0));
        assert!(Cond::parse("== 0").unwrap().holds(0.0));
        assert!(Cond::parse("=> 2")
            .unwrap_err()
            .contains("expected a comparison"));
        assert!(Cond::parse(">= two").unwrap_err().contains("not a number"));
    }

    /// AFINN-en-165 (when fetched) scores as the `afinn` package's README says.
    #[test]
    fn the_real_afinn_list() {
        let Some(p) = crate::hub::assets::testing::real_asset("afinn") else {
            return;
        };
        let lex = Lexicon::read(&p).unwrap();
        assert!(lex.scores.len() > 3000);
        // afinn's docstring: `afinn.score('This is utterly excellent!')` == 3.0
        assert_eq!(lex.score("This is utterly excellent!").0, 3.0);
        assert!(lex.score("This is oh so bad.").0 < 0.0);
    }
}
