//! Preference pairs, as TRL's preference datasets: a `prompt` and two
//! completions of it, `chosen` (preferred) and `rejected`. Each of the three
//! is a string (TRL's standard format) or a list of chat messages (its
//! conversational format: the prompt's turns, then the assistant turns of
//! each completion); one row uses one kind for all three. Reward models
//! score (prompt, completion); DPO compares the policy's log-probabilities
//! of the two completions (loss masks from the chat template, as in SFT).
//!
//! What makes a pair unusable whatever the model is an error naming
//! `file:line`: a missing field, an empty completion, a chosen completion
//! identical to the rejected one (nothing to prefer), kinds mixed in a row.

use super::field::{kind, FieldPath};
use super::sft::{parse_messages, Message, Role};
use super::source::{read_records, Format, Record, Records};
use crate::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A prompt or a completion: text, or chat turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Turns {
    Text(String),
    Chat(Vec<Message>),
}

impl Turns {
    fn is_chat(&self) -> bool {
        matches!(self, Turns::Chat(_))
    }

    /// Nothing to score: blank text, or no assistant turn with content.
    fn is_empty(&self) -> bool {
        match self {
            Turns::Text(s) => s.trim().is_empty(),
            Turns::Chat(m) => m.iter().all(|m| m.content.trim().is_empty()),
        }
    }
}

/// One preference pair and the 1-based line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    pub line: usize,
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
}

/// The pairs of one file.
#[derive(Debug, Clone)]
pub struct PreferenceRows {
    pub path: PathBuf,
    pub rows: Vec<PreferencePair>,
}

/// Where the three fields are in a row (default: `prompt`, `chosen`, `rejected`).
#[derive(Debug, Clone)]
pub struct PreferenceFormat {
    pub prompt: FieldPath,
    pub chosen: FieldPath,
    pub rejected: FieldPath,
}

impl Default for PreferenceFormat {
    fn default() -> Self {
        let p = |s: &str| FieldPath::parse(s).expect("a valid field path");
        PreferenceFormat {
            prompt: p("prompt"),
            chosen: p("chosen"),
            rejected: p("rejected"),
        }
    }
}

/// Read the pairs of a JSONL file (or CSV with string fields).
pub fn read_pairs(
    path: &Path,
    format: &PreferenceFormat,
    file_format: Option<Format>,
) -> Result<PreferenceRows> {
    pairs_from_records(&read_records(path, file_format)?, format)
}

/// [`read_pairs`] for rows already read.
pub fn pairs_from_records(records: &Records, format: &PreferenceFormat) -> Result<PreferenceRows> {
    let rows = records
        .rows
        .iter()
        .map(|rec| {
            parse_pair(rec, format).map_err(|msg| Error::Line {
                path: records.path.clone(),
                line: rec.line,
                msg,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PreferenceRows {
        path: records.path.clone(),
        rows,
    })
}

fn parse_pair(rec: &Record, f: &PreferenceFormat) -> std::result::Result<PreferencePair, String> {
    let turns = |field: &FieldPath, what: &str| -> std::result::Result<Turns, String> {
        let v = rec
            .lookup(field)
            .map_err(|why| format!("{what} field `{field}`: {why}"))?;
        match v {
            Value::String(s) => Ok(Turns::Text(s.clone())),
            Value::Array(_) => Ok(Turns::Chat(parse_messages(v, field)?)),
            other => Err(format!(
                "{what} field `{field}` must be a string or a list of messages, found {}",
                kind(other)
            )),
        }
    };
    let prompt = turns(&f.prompt, "prompt")?;
    let chosen = turns(&f.chosen, "chosen")?;
    let rejected = turns(&f.rejected, "rejected")?;
    if prompt.is_chat() != chosen.is_chat() || chosen.is_chat() != rejected.is_chat() {
        let k = |t: &Turns| if t.is_chat() { "messages" } else { "a string" };
        return Err(format!(
            "prompt is {}, chosen {}, rejected {}: one row uses one kind for all three (TRL's standard or conversational format)",
            k(&prompt),
            k(&chosen),
            k(&rejected)
        ));
    }
    for (name, field, t) in [
        ("chosen", &f.chosen, &chosen),
        ("rejected", &f.rejected, &rejected),
    ] {
        if let Turns::Chat(msgs) = t {
            if let Some((i, m)) = msgs
                .iter()
                .enumerate()
                .find(|(_, m)| m.role != Role::Assistant)
            {
                return Err(format!(
                    "`{field}[{i}]` is a {} turn: a {name} completion holds the assistant's turns only (the prompt's go in `{}`)",
                    m.role.as_str(),
                    f.prompt
                ));
            }
        }
        if t.is_empty() {
            return Err(format!(
                "empty {name} completion (`{field}`): nothing to score"
            ));
        }
    }
    if chosen == rejected {
        return Err(format!(
            "chosen and rejected are identical (`{}`, `{}`): nothing to prefer",
            f.chosen, f.rejected
        ));
    }
    Ok(PreferencePair {
        line: rec.line,
        prompt,
        chosen,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::records_from_reader;

    fn read(jsonl: &str) -> Result<PreferenceRows> {
        let recs = records_from_reader(Path::new("pairs.jsonl"), Format::Jsonl, jsonl.as_bytes())?;
        pairs_from_records(&recs, &PreferenceFormat::default())
    }

    #[test]
    fn standard_and_conversational_pairs() {
        let rows = read(concat!(
            r#"{"prompt": "2+2=", "chosen": "4", "rejected": "5"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": [{"role": "assistant", "content": "Paris"}], "rejected": [{"role": "assistant", "content": "Lyon"}]}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(rows.rows.len(), 2);
        assert_eq!(rows.rows[0].chosen, Turns::Text("4".into()));
        assert_eq!(rows.rows[1].line, 2);
        let Turns::Chat(c) = &rows.rows[1].chosen else {
            panic!("a chat")
        };
        assert_eq!(
            (c[0].role, c[0].content.as_str()),
            (Role::Assistant, "Paris")
        );
    }

    #[test]
    fn unusable_pairs_are_errors_naming_file_line_and_field() {
        let cases = [
            (
                r#"{"prompt": "p", "chosen": "a"}"#,
                "rejected field `rejected`",
            ),
            (
                r#"{"prompt": "p", "rejected": "a"}"#,
                "chosen field `chosen`",
            ),
            (
                r#"{"chosen": "a", "rejected": "b"}"#,
                "prompt field `prompt`",
            ),
            (
                r#"{"prompt": "p", "chosen": "a", "rejected": "a"}"#,
                "chosen and rejected are identical",
            ),
            (
                r#"{"prompt": "p", "chosen": " ", "rejected": "a"}"#,
                "empty chosen completion (`chosen`)",
            ),
            (
                r#"{"prompt": "p", "chosen": "a", "rejected": ""}"#,
                "empty rejected completion (`rejected`)",
            ),
            (
                r#"{"prompt": "p", "chosen": 3, "rejected": "a"}"#,
                "must be a string or a list of messages, found a number",
            ),
            (
                r#"{"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}"#,
                "prompt is a string, chosen messages, rejected a string",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "`chosen[0]` is a user turn",
            ),
        ];
        for (row, want) in cases {
            let err = read(&format!(
                "{{\"prompt\": \"ok\", \"chosen\": \"x\", \"rejected\": \"y\"}}\n{row}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("pairs.jsonl:2") && err.contains(want),
                "{row}: {err}"
            );
        }
    }
}
