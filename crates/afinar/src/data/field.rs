//! Field paths into a JSON record: `label`, `a.b[0].c`, `input[-1].content`.
//!
//! A path is dot-separated keys, each optionally followed by `[N]` indices;
//! a negative index counts from the end (`[-1]` is the last element), as in
//! Python, so chat-style records (`messages[-1].content`) need no preprocessing.
//! Keys may hold any character but `.`, `[` and `]`.

use crate::{Error, Result};
use serde_json::Value;
use std::fmt;

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(i64),
}

/// A parsed path into a JSON value. Keeps the text it was parsed from, which
/// is what errors print and what CSV sources use as the column name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FieldPath {
    raw: String,
    #[serde(skip)]
    segments: Vec<Segment>,
}

impl FieldPath {
    /// Parse `a.b[0].c`; the error names the path and what is wrong with it.
    pub fn parse(raw: &str) -> Result<Self> {
        let bad = |why: String| Error::Data(format!("invalid field path `{raw}`: {why}"));
        if raw.is_empty() {
            return Err(bad("empty path".into()));
        }
        let mut segments = Vec::new();
        for (k, part) in raw.split('.').enumerate() {
            // `part` is `key[i][j]...`; the key is everything before the first `[`.
            let (key, mut rest) = match part.find('[') {
                Some(p) => (&part[..p], &part[p..]),
                None => (part, ""),
            };
            if key.contains(']') {
                return Err(bad(format!("unexpected `]` in `{part}`")));
            }
            // Only a leading `[N]` may stand without a key.
            let leading_index = k == 0 && !rest.is_empty();
            if key.is_empty() && !leading_index {
                return Err(bad(if part.is_empty() {
                    "empty key (two dots in a row, or a leading/trailing dot)".into()
                } else {
                    format!("missing key before `{part}`")
                }));
            }
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_string()));
            }
            while !rest.is_empty() {
                let Some(stripped) = rest.strip_prefix('[') else {
                    return Err(bad(format!("expected `[` or `.` at `{rest}`")));
                };
                let Some(close) = stripped.find(']') else {
                    return Err(bad(format!("unclosed `[` in `{part}`")));
                };
                let idx = &stripped[..close];
                let i: i64 = idx
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("index `[{idx}]` is not an integer")))?;
                segments.push(Segment::Index(i));
                rest = &stripped[close + 1..];
            }
        }
        Ok(Self {
            raw: raw.to_string(),
            segments,
        })
    }

    /// The text the path was parsed from.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The value at this path, or `None` when a key is missing, an index is
    /// out of range or a step meets the wrong kind of value.
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.lookup(value).ok()
    }

    /// Like [`get`](Self::get) but says where the path broke off, for error messages:
    /// "key `input` not found (keys: text, label)".
    pub fn lookup<'v>(&self, value: &'v Value) -> std::result::Result<&'v Value, String> {
        let mut cur = value;
        for (k, seg) in self.segments.iter().enumerate() {
            let at = || {
                if k == 0 {
                    "the record".to_string()
                } else {
                    format!("`{}`", display_prefix(&self.segments[..k]))
                }
            };
            cur = match seg {
                Segment::Key(key) => match cur {
                    Value::Object(map) => map.get(key).ok_or_else(|| {
                        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                        format!(
                            "key `{key}` not found in {} (keys: {})",
                            at(),
                            keys.join(", ")
                        )
                    })?,
                    other => {
                        return Err(format!(
                            "cannot take key `{key}`: {} is {}, not an object",
                            at(),
                            kind(other)
                        ))
                    }
                },
                Segment::Index(i) => match cur {
                    Value::Array(items) => {
                        let n = items.len() as i64;
                        let j = if *i < 0 { n + i } else { *i };
                        if j < 0 || j >= n {
                            return Err(format!(
                                "index [{i}] out of range: {} has {n} element(s)",
                                at()
                            ));
                        }
                        &items[j as usize]
                    }
                    other => {
                        return Err(format!(
                            "cannot take index [{i}]: {} is {}, not an array",
                            at(),
                            kind(other)
                        ))
                    }
                },
            };
        }
        Ok(cur)
    }
}

fn display_prefix(segs: &[Segment]) -> String {
    let mut s = String::new();
    for seg in segs {
        match seg {
            Segment::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Segment::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// "a string", "a number", ...: for messages about a value of the wrong kind.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl std::str::FromStr for FieldPath {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for FieldPath {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<FieldPath> for String {
    fn from(p: FieldPath) -> String {
        p.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_keys_and_indices() {
        let p = FieldPath::parse("input[-1].content").unwrap();
        assert_eq!(
            p.segments(),
            &[
                Segment::Key("input".into()),
                Segment::Index(-1),
                Segment::Key("content".into())
            ]
        );
        let p = FieldPath::parse("a.b[0][2].c").unwrap();
        assert_eq!(p.segments().len(), 5);
        assert_eq!(
            FieldPath::parse("label").unwrap().segments(),
            &[Segment::Key("label".into())]
        );
        assert_eq!(
            FieldPath::parse("[1].x").unwrap().segments()[0],
            Segment::Index(1)
        );
        assert_eq!(p.to_string(), "a.b[0][2].c");
    }

    #[test]
    fn parse_errors_name_the_path() {
        for bad in ["", "a..b", "a.", ".a", "a[", "a[x]", "a[0]b", "a.[0]", "a]"] {
            let err = FieldPath::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn gets_values_including_negative_index() {
        let v = json!({
            "input": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            "a": {"b": [{"c": 3}]},
            "label": "pos"
        });
        let get = |p: &str| FieldPath::parse(p).unwrap().get(&v).cloned();
        assert_eq!(get("input[-1].content"), Some(json!("yo")));
        assert_eq!(get("input[0].content"), Some(json!("hi")));
        assert_eq!(get("input[-2].role"), Some(json!("user")));
        assert_eq!(get("a.b[0].c"), Some(json!(3)));
        assert_eq!(get("label"), Some(json!("pos")));
        // Missing key, out-of-range index, wrong kind: all None.
        assert_eq!(get("missing"), None);
        assert_eq!(get("input[2].content"), None);
        assert_eq!(get("input[-3].content"), None);
        assert_eq!(get("label.x"), None);
        assert_eq!(get("a[0]"), None);
    }

    #[test]
    fn lookup_says_where_it_broke() {
        let v = json!({"input": [], "text": "x"});
        let why = FieldPath::parse("input[-1].content")
            .unwrap()
            .lookup(&v)
            .unwrap_err();
        assert!(
            why.contains("index [-1] out of range") && why.contains("`input` has 0"),
            "{why}"
        );
        let why = FieldPath::parse("label").unwrap().lookup(&v).unwrap_err();
        assert!(
            why.contains("key `label` not found") && why.contains("input, text"),
            "{why}"
        );
    }

    #[test]
    fn serde_round_trip() {
        let p: FieldPath = serde_json::from_str("\"messages[-1].content\"").unwrap();
        assert_eq!(p.segments().len(), 3);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            "\"messages[-1].content\""
        );
        assert!(serde_json::from_str::<FieldPath>("\"a..b\"").is_err());
    }
}
