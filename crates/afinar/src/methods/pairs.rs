//! Building preference pairs from data that has one right answer per
//! prompt (docs/preference-data.md):
//!
//! - [`generate_pairs`] (`afinar pairs generate`): on-policy pairs from SFT
//!   rows (OpenAI evals' `input` + `ideal`): `chosen` = the ideal answer,
//!   `rejected` = the model's own greedy answer where it is not the ideal
//!   one (exact match after trimming, as SFT's exact match scores it). Rows
//!   per file are capped by the same seeded choice SFT makes
//!   (`data.max_rows_per_file` with `split_seed`), so the pairs come from
//!   the rows an SFT run with the same cap and seed reads. Each answer is
//!   appended to a journal (`<out>.partial.jsonl`) as it is generated: a
//!   stopped run continues where it stopped; the output is written (to a
//!   temporary name, renamed) when every row has its answer.
//! - [`pairs_from_choices`] (`afinar pairs from-choices`): multiple-choice
//!   items (a chat prompt listing options `A. ...` to `D. ...`, `ideal` the
//!   letter): `chosen` = the right option, `rejected` = a seeded random wrong
//!   one, each as an assistant turn `"C. <the option's text>"`.

use crate::data::sft::{read_sft, Message, Role, SftExample, SftFormat, SftRows};
use crate::data::{read_records, seeded_split, FieldPath, Format};
use crate::event::Event;
use crate::fsutil;
use crate::generate::{generate, GenerateConfig};
use crate::heads::CausalLm;
use crate::hub::chat_template::ChatTemplate;
use crate::hub::tokenizer::TextTokenizer;
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `pairs generate` does.
pub struct GenerateOptions {
    /// SFT files (OpenAI evals' `input` / `ideal`), one task each.
    pub files: Vec<PathBuf>,
    /// At most this many rows per file (SFT's seeded choice).
    pub max_rows_per_file: Option<usize>,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// A `.jsonl` file for all pairs, or a folder for one file per task.
    pub out: PathBuf,
}

/// What `pairs generate` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateReport {
    pub rows: usize,
    pub pairs: usize,
    /// Rows whose greedy answer is the ideal one (no pair).
    pub model_right: usize,
    /// Rows answered by an earlier run (read from the journal).
    pub resumed: usize,
    pub per_task: BTreeMap<String, (usize, usize)>,
    pub wall_s: f64,
}

/// One row to answer: its task, line, prompt turns and ideal answer.
struct Row {
    task: String,
    line: usize,
    prompt: Vec<Message>,
    ideal: String,
}

fn rows_of(files: &[PathBuf], cap: Option<usize>, seed: u64) -> Result<Vec<Row>> {
    let format = SftFormat::OpenAiEvals {
        input: FieldPath::parse("input")?,
        ideal: FieldPath::parse("ideal")?,
    };
    let mut out = Vec::new();
    for f in files {
        let SftRows { rows, path } = read_sft(f, &format, Some(Format::Jsonl))?;
        let keep: Vec<usize> = match cap.filter(|&c| c < rows.len()) {
            // The rows SFT's `max_rows_per_file` keeps (methods::sft).
            Some(c) => seeded_split(rows.len(), [1.0, 0.0, 0.0], seed)?
                .train
                .into_iter()
                .take(c)
                .collect(),
            None => (0..rows.len()).collect(),
        };
        let task = f
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        for i in keep {
            let r = &rows[i];
            let SftExample::Chat(m) = &r.example else {
                return Err(Error::Line {
                    path: path.clone(),
                    line: r.line,
                    msg: "expected chat rows (`input` messages and `ideal`)".into(),
                });
            };
            let (last, prompt) = m.split_last().ok_or_else(|| Error::Line {
                path: path.clone(),
                line: r.line,
                msg: "empty conversation".into(),
            })?;
            out.push(Row {
                task: task.clone(),
                line: r.line,
                prompt: prompt.to_vec(),
                ideal: last.content.trim().to_string(),
            });
        }
    }
    Ok(out)
}

fn turns(m: &[Message]) -> Value {
    Value::Array(
        m.iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
            .collect(),
    )
}

fn answer(text: &str) -> Value {
    json!([{"role": "assistant", "content": text}])
}

/// Write `rows` (JSON values) as JSONL at `path`, atomically.
fn write_jsonl(path: &Path, rows: &[Value]) -> Result<()> {
    let mut bytes = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut bytes, r).map_err(|e| Error::file(path, e.to_string()))?;
        bytes.push(b'\n');
    }
    fsutil::write_atomic(path, &bytes)
}

/// The journal of answers already generated: `(task, line) -> answer`.
fn read_journal(path: &Path) -> Result<BTreeMap<(String, usize), String>> {
    let mut done = BTreeMap::new();
    if !path.exists() {
        return Ok(done);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    for (i, line) in text.lines().enumerate() {
        // A line cut by a kill mid-write is the last one: answer it again.
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            if i + 1 == text.lines().count() {
                break;
            }
            return Err(Error::Line {
                path: path.to_path_buf(),
                line: i + 1,
                msg: "not a journal row of `pairs generate`".into(),
            });
        };
        let (Some(t), Some(l), Some(a)) =
            (v["task"].as_str(), v["line"].as_u64(), v["answer"].as_str())
        else {
            return Err(Error::Line {
                path: path.to_path_buf(),
                line: i + 1,
                msg: "a journal row needs `task`, `line` and `answer`".into(),
            });
        };
        done.insert((t.to_string(), l as usize), a.to_string());
    }
    Ok(done)
}

/// Generate on-policy pairs (see the module docs).
pub fn generate_pairs(
    model: &CausalLm,
    tok: &TextTokenizer,
    template: &ChatTemplate,
    max_positions: usize,
    opts: &GenerateOptions,
    on: &mut dyn FnMut(Event),
) -> Result<GenerateReport> {
    let t0 = Instant::now();
    let rows = rows_of(&opts.files, opts.max_rows_per_file, opts.seed)?;
    if rows.is_empty() {
        return Err(Error::Data("no rows to answer".into()));
    }
    let per_file = opts.out.extension().is_none_or(|e| e != "jsonl");
    let journal = if per_file {
        opts.out.join(".pairs.partial.jsonl")
    } else {
        let mut p = opts.out.clone().into_os_string();
        p.push(".partial.jsonl");
        PathBuf::from(p)
    };
    if let Some(dir) = journal.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut done = read_journal(&journal)?;
    let resumed = rows
        .iter()
        .filter(|r| done.contains_key(&(r.task.clone(), r.line)))
        .count();
    if resumed > 0 {
        on(Event::Info(format!(
            "{resumed} of {} rows answered by an earlier run ({})",
            rows.len(),
            journal.display()
        )));
    }
    let mut jf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&journal)
        .map_err(|e| Error::io(&journal, e))?;
    let cfg = GenerateConfig {
        max_new_tokens: opts.max_new_tokens,
        eos_ids: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let decode = |ids: &[u32]| tok.decode(ids, true);
    let total = rows.len();
    for (k, r) in rows.iter().enumerate() {
        let key = (r.task.clone(), r.line);
        if done.contains_key(&key) {
            continue;
        }
        let text = template.render(&r.prompt, true)?;
        let ids = tok.encode_raw(&text, false)?;
        let g = generate(model, None, &ids, max_positions, &cfg, &decode, &mut |_| {})?;
        let a = g.text.trim().to_string();
        let line = json!({"task": r.task, "line": r.line, "answer": a});
        writeln!(jf, "{line}").map_err(|e| Error::io(&journal, e))?;
        done.insert(key, a);
        on(Event::Progress {
            what: "answers".into(),
            done: (k + 1) as u64,
            total: Some(total as u64),
            finished: k + 1 == total,
        });
    }
    jf.sync_all().map_err(|e| Error::io(&journal, e))?;

    // ---- the pairs
    let mut by_task: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut report = GenerateReport {
        rows: total,
        pairs: 0,
        model_right: 0,
        resumed,
        per_task: BTreeMap::new(),
        wall_s: 0.0,
    };
    for r in &rows {
        let a = &done[&(r.task.clone(), r.line)];
        let e = report.per_task.entry(r.task.clone()).or_insert((0, 0));
        e.0 += 1;
        if *a == r.ideal || a.is_empty() {
            report.model_right += usize::from(*a == r.ideal);
            continue;
        }
        e.1 += 1;
        report.pairs += 1;
        by_task.entry(r.task.clone()).or_default().push(json!({
            "prompt": turns(&r.prompt),
            "chosen": answer(&r.ideal),
            "rejected": answer(a),
            "task": r.task,
            "source_line": r.line,
        }));
    }
    if per_file {
        std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
        for (task, rows) in &by_task {
            write_jsonl(&opts.out.join(format!("{task}.jsonl")), rows)?;
        }
    } else {
        let all: Vec<Value> = by_task.into_values().flatten().collect();
        write_jsonl(&opts.out, &all)?;
    }
    std::fs::remove_file(&journal).map_err(|e| Error::io(&journal, e))?;
    report.wall_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// What `pairs from-choices` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChoiceReport {
    pub items: usize,
    pub pairs: usize,
}

/// The options `A. text` .. listed one per line in `text`, in order.
fn options(text: &str) -> Vec<(char, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let mut c = l.chars();
            let letter = c.next()?;
            let rest = c.as_str().strip_prefix(". ")?;
            // Some sources repeat the label inside the text ("A. A.Zhao ...").
            let rest = rest.strip_prefix(&format!("{letter}.")).unwrap_or(rest);
            letter
                .is_ascii_uppercase()
                .then(|| (letter, rest.trim().to_string()))
        })
        .collect()
}

/// Multiple-choice items to pairs (see the module docs). Every item gives
/// one pair; an item whose `ideal` letter is not among its options, or
/// with fewer than two options, is an error naming `file:line`.
pub fn pairs_from_choices(path: &Path, seed: u64, out: &Path) -> Result<ChoiceReport> {
    let recs = read_records(path, Some(Format::Jsonl))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(recs.rows.len());
    for rec in &recs.rows {
        let err = |msg: String| Error::Line {
            path: path.to_path_buf(),
            line: rec.line,
            msg,
        };
        let input = rec
            .lookup(&FieldPath::parse("input")?)
            .map_err(|e| err(format!("`input`: {e}")))?;
        let msgs =
            crate::data::sft::parse_messages(input, &FieldPath::parse("input")?).map_err(err)?;
        let user = msgs
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .ok_or_else(|| err("no user turn".into()))?;
        let ideal = match rec
            .lookup(&FieldPath::parse("ideal")?)
            .map_err(|e| err(format!("`ideal`: {e}")))?
        {
            Value::String(s) => s.trim().to_string(),
            Value::Array(a) => a
                .first()
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .trim()
                .to_string(),
            other => return Err(err(format!("`ideal` must be a letter, found {other}"))),
        };
        let opts = options(&user.content);
        if opts.len() < 2 {
            return Err(err(format!(
                "{} options (lines `A. ...`) in the user turn: a pair needs two",
                opts.len()
            )));
        }
        let right = opts
            .iter()
            .find(|(l, _)| ideal.len() == 1 && ideal.starts_with(*l))
            .ok_or_else(|| {
                err(format!(
                    "`ideal` {ideal:?} is not one of the options {:?}",
                    opts.iter().map(|o| o.0).collect::<String>()
                ))
            })?;
        let wrong: Vec<&(char, String)> = opts.iter().filter(|o| o.0 != right.0).collect();
        let w = wrong[rng.gen_range(0..wrong.len())];
        rows.push(json!({
            "prompt": turns(&msgs),
            "chosen": answer(&format!("{}. {}", right.0, right.1)),
            "rejected": answer(&format!("{}. {}", w.0, w.1)),
            "source_line": rec.line,
        }));
    }
    write_jsonl(out, &rows)?;
    Ok(ChoiceReport {
        items: recs.rows.len(),
        pairs: rows.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_become_right_and_wrong_options() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("mc.jsonl");
        let item = |ideal: &str| {
            json!({"input": [
                {"role": "system", "content": "Answer with a letter."},
                {"role": "user", "content": "Passage: x. Question: y?\nA. one \nB. two\nC. three\nD. four"}
            ], "ideal": ideal})
            .to_string()
        };
        std::fs::write(&src, format!("{}\n{}\n", item("C"), item("A"))).unwrap();
        let out = dir.path().join("pairs.jsonl");
        let r = pairs_from_choices(&src, 7, &out).unwrap();
        assert_eq!((r.items, r.pairs), (2, 2));
        let rows: Vec<Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["chosen"][0]["content"], "C. three");
        assert_eq!(rows[1]["chosen"][0]["content"], "A. one");
        for r in &rows {
            let rej = r["rejected"][0]["content"].as_str().unwrap();
            assert_ne!(rej, r["chosen"][0]["content"].as_str().unwrap());
            assert!(["A. one", "B. two", "C. three", "D. four"].contains(&rej));
        }
        // A label repeated inside the option's text is not kept twice.
        assert_eq!(
            options("Q?\nA. A.one\nB. B.two"),
            [('A', "one".to_string()), ('B', "two".to_string())]
        );
        // The same seed gives the same pairs.
        let again = dir.path().join("again.jsonl");
        pairs_from_choices(&src, 7, &again).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
        // An ideal that is not an option names the line.
        std::fs::write(&src, format!("{}\n{}\n", item("C"), item("E"))).unwrap();
        let e = pairs_from_choices(&src, 7, &out).unwrap_err().to_string();
        assert!(e.contains("mc.jsonl:2") && e.contains("\"E\""), "{e}");
    }
}
