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
use super::sft::{
    assistant_spans, parse_messages, Message, Role, SftEncoder, SftExample, SftTokens, IGNORE_INDEX,
};
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

/// What to do with a pair whose prompt + completion is longer than
/// `max_length` tokens (`data.truncation_mode`). TRL's two modes cut each
/// sequence: `keep_start` keeps its first `max_length` tokens (TRL's
/// default: the completion's end is lost), `keep_end` its last ones (the
/// prompt's start is lost). afinar adds `skip` and `error`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    #[default]
    KeepStart,
    KeepEnd,
    Skip,
    Error,
}

/// Counts for the log: what encoding a file of pairs did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PairStats {
    pub pairs: usize,
    pub kept: usize,
    /// Pairs with a sequence over `max_length`, cut (`keep_start` / `keep_end`).
    pub truncated: usize,
    /// Pairs left out: over `max_length` (`skip`), or cut to no completion token.
    pub skipped: usize,
}

impl std::fmt::Display for PairStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs, {} kept, {} truncated to max_length, {} skipped",
            self.pairs, self.kept, self.truncated, self.skipped
        )
    }
}

/// Encode every pair of `rows` at most `enc.max_length` tokens per
/// sequence, as `mode` says. A pair cut to no completion token in either
/// sequence is left out (counted as skipped): it has nothing to compare.
pub fn encode_pairs(
    enc: &SftEncoder,
    rows: &PreferenceRows,
    mode: Truncation,
) -> Result<(Vec<PairTokens>, PairStats)> {
    let max = enc.max_length;
    if max == 0 {
        return Err(Error::Data("max_length must be at least 1".into()));
    }
    let mut stats = PairStats {
        pairs: rows.rows.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(rows.rows.len());
    for pair in &rows.rows {
        let mut t = encode_pair(enc, pair).map_err(|e| Error::Line {
            path: rows.path.clone(),
            line: pair.line,
            msg: e.to_string(),
        })?;
        let longest = t.chosen.len().max(t.rejected.len());
        if longest > max {
            match mode {
                Truncation::Error => {
                    return Err(Error::Line {
                        path: rows.path.clone(),
                        line: pair.line,
                        msg: format!(
                            "prompt + completion is {longest} tokens, longer than max_length {max} \
                             (data.truncation_mode = \"keep_start\" or \"keep_end\" cuts it, \"skip\" leaves it out)"
                        ),
                    })
                }
                Truncation::Skip => {
                    stats.skipped += 1;
                    continue;
                }
                Truncation::KeepStart | Truncation::KeepEnd => {
                    for s in [&mut t.chosen, &mut t.rejected] {
                        let n = s.ids.len();
                        if n > max {
                            let from = if mode == Truncation::KeepEnd { n - max } else { 0 };
                            s.ids = s.ids[from..from + max].to_vec();
                            s.labels = s.labels[from..from + max].to_vec();
                        }
                    }
                    stats.truncated += 1;
                    // A causal LM predicts token t from those before it: the first
                    // token is never a target.
                    let has_loss =
                        |s: &SftTokens| s.labels.iter().skip(1).any(|&l| l != IGNORE_INDEX);
                    if !has_loss(&t.chosen) || !has_loss(&t.rejected) {
                        stats.skipped += 1;
                        continue;
                    }
                }
            }
        }
        out.push(t);
    }
    stats.kept = out.len();
    Ok((out, stats))
}

/// The two sequences of a pair, token ids and labels as in SFT
/// (`data::sft`): the prompt's tokens carry no loss, the completion's do.
#[derive(Debug, Clone)]
pub struct PairTokens {
    pub line: usize,
    pub chosen: SftTokens,
    pub rejected: SftTokens,
}

/// Token ids and labels of `prompt + chosen` and `prompt + rejected` at full
/// length. Text pairs: the prompt's tokens, the completion's and eos (TRL's
/// standard format; loss on the completion and eos). Chat pairs: the
/// conversation rendered by the template, loss on the completion's turns
/// only (located by template spans, as SFT; an assistant turn inside the
/// prompt carries none).
pub fn encode_pair(enc: &SftEncoder, pair: &PreferencePair) -> Result<PairTokens> {
    let one = |completion: &Turns| -> Result<SftTokens> {
        let mut t = encode_completion(enc, &pair.prompt, completion)?;
        t.line = pair.line;
        Ok(t)
    };
    Ok(PairTokens {
        line: pair.line,
        chosen: one(&pair.chosen)?,
        rejected: one(&pair.rejected)?,
    })
}

/// Token ids and labels of one `prompt + completion` at full length, as
/// [`encode_pair`] encodes each side of a pair.
pub fn encode_completion(
    enc: &SftEncoder,
    prompt: &Turns,
    completion: &Turns,
) -> Result<SftTokens> {
    match (prompt, completion) {
        (Turns::Text(p), Turns::Text(c)) => enc.encode(&SftExample::PromptCompletion {
            prompt: p.clone(),
            completion: c.clone(),
        }),
        (Turns::Chat(p), Turns::Chat(c)) => encode_chat(enc, p, c),
        _ => Err(Error::Data(
            "prompt and completion mix text and chat turns".into(),
        )),
    }
}

/// A chat prompt and its completion turns: loss on the completion's spans.
fn encode_chat(enc: &SftEncoder, prompt: &[Message], completion: &[Message]) -> Result<SftTokens> {
    let template = enc.template.ok_or_else(|| {
        Error::Data(
            "chat pairs need a chat template, and none was given (the tokenizer has none?)".into(),
        )
    })?;
    let msgs: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
    let (text, spans) = assistant_spans(template, &msgs)?;
    // The completion's turns are the last spans (it holds assistant turns only).
    let spans = &spans[spans.len() - completion.len()..];
    let tokens = enc
        .tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| Error::Data(format!("tokenizer: {e}")))?;
    let ids = tokens.get_ids().to_vec();
    let labels: Vec<i64> = ids
        .iter()
        .zip(tokens.get_offsets())
        .map(|(&id, &(start, _))| {
            if spans.iter().any(|s| s.contains(&start)) {
                i64::from(id)
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    if labels.iter().all(|&l| l == IGNORE_INDEX) {
        return Err(Error::Data(
            "the completion starts no token: the tokenizer merged it into the prompt".into(),
        ));
    }
    Ok(SftTokens {
        line: 0,
        ids,
        labels,
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

    /// Loss on the completion only: with text (completion + eos) and with
    /// chat (the completion's turn; the assistant turn inside the prompt
    /// carries none).
    #[test]
    fn pairs_encode_with_loss_on_the_completion_only() {
        use crate::data::sft::tests::{bpe_tokenizer, id, loss_runs, SMOLLM2};
        use crate::data::sft::Overflow;
        use crate::hub::chat_template::ChatTemplate;
        let tok = bpe_tokenizer();
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let enc = SftEncoder {
            tokenizer: &tok,
            template: Some(&t),
            eos_id: Some(id(&tok, "<|im_end|>")),
            max_length: 4096,
            overflow: Overflow::Error,
        };
        let rows = read(concat!(
            r#"{"prompt": "Is the sky blue?", "chosen": " Yes", "rejected": " No"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "Is the sky blue?"}, {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "And the sea?"}], "chosen": [{"role": "assistant", "content": "also blue"}], "rejected": [{"role": "assistant", "content": "green"}]}"#,
            "\n"
        ))
        .unwrap();
        let text = encode_pair(&enc, &rows.rows[0]).unwrap();
        assert_eq!(loss_runs(&tok, &text.chosen), [" Yes<|im_end|>"]);
        assert_eq!(loss_runs(&tok, &text.rejected), [" No<|im_end|>"]);
        let chat = encode_pair(&enc, &rows.rows[1]).unwrap();
        assert_eq!(chat.line, 2);
        assert_eq!(loss_runs(&tok, &chat.chosen), ["also blue<|im_end|>\n"]);
        assert_eq!(loss_runs(&tok, &chat.rejected), ["green<|im_end|>\n"]);
        // Both share the prompt's tokens.
        let n = chat
            .chosen
            .labels
            .iter()
            .position(|&l| l != IGNORE_INDEX)
            .unwrap();
        assert_eq!(chat.chosen.ids[..n], chat.rejected.ids[..n]);
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
