//! Dataset sources: JSON Lines and CSV/TSV files, read into records and then
//! into [`RawExample`]s by a [`DataSpec`] of field paths.
//!
//! Every record keeps the 1-based line it starts on, so any later complaint
//! (a missing field, a label unseen in training) can point at `file:line`.
//! Files are read whole into memory: fine-tuning sets are small next to the
//! model, and a second pass (labels, splits) needs them anyway.

use super::field::{kind, FieldPath};
use crate::{Error, Result};
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// On-disk format of a dataset file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line (`.jsonl`, `.json`); a config may write "json".
    #[serde(alias = "json")]
    Jsonl,
    /// Comma-separated with a header row, RFC 4180 quoting.
    Csv,
    /// Tab-separated with a header row. Quotes are ordinary characters, as in
    /// GLUE's `.tsv` files, where a text may start with `"`.
    Tsv,
}

impl Format {
    /// The format named by the file's extension.
    pub fn infer(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("jsonl") | Some("json") | Some("ndjson") => Ok(Format::Jsonl),
            Some("csv") => Ok(Format::Csv),
            Some("tsv") => Ok(Format::Tsv),
            _ => Err(Error::file(
                path,
                "cannot tell the data format from the extension (expected .jsonl, .json, .csv or .tsv); name the format explicitly",
            )),
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "jsonl" | "json" | "ndjson" => Ok(Format::Jsonl),
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            _ => Err(Error::Data(format!(
                "unknown data format `{s}` (expected jsonl, csv or tsv)"
            ))),
        }
    }
}

/// One row of a dataset file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line the row starts on (for CSV the header is line 1).
    pub line: usize,
    /// The row as JSON. CSV rows become an object of column name -> string.
    pub value: Value,
    /// CSV rows are looked up by column name, not by walking a path: a
    /// column may be called `a.b`.
    columns: bool,
}

impl Record {
    /// The value at `field`, or why it is not there.
    pub fn lookup(&self, field: &FieldPath) -> std::result::Result<&Value, String> {
        if self.columns {
            self.value
                .get(field.as_str())
                .ok_or_else(|| format!("no column `{field}`"))
        } else {
            field.lookup(&self.value)
        }
    }
}

/// All rows of a file, plus its header when it has one.
#[derive(Debug, Clone)]
pub struct Records {
    pub path: PathBuf,
    pub format: Format,
    /// The header row of CSV/TSV files; `None` for JSON Lines.
    pub columns: Option<Vec<String>>,
    pub rows: Vec<Record>,
}

/// Read every row of `path`; `format: None` infers it from the extension.
/// An error names the file and, for a bad row, its line.
pub fn read_records(path: &Path, format: Option<Format>) -> Result<Records> {
    let format = match format {
        Some(f) => f,
        None => Format::infer(path)?,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    records_from_reader(path, format, std::io::BufReader::new(file))
}

/// [`read_records`] from any reader (bytes in memory, a pipe); `path` only
/// names the source in errors and in [`Records::path`].
pub fn records_from_reader(path: &Path, format: Format, reader: impl BufRead) -> Result<Records> {
    let (columns, rows) = match format {
        Format::Jsonl => (None, read_jsonl(path, reader)?),
        Format::Csv => {
            let (c, r) = read_delimited(path, reader, b',', true)?;
            (Some(c), r)
        }
        Format::Tsv => {
            let (c, r) = read_delimited(path, reader, b'\t', false)?;
            (Some(c), r)
        }
    };
    if rows.is_empty() {
        return Err(Error::file(path, "empty dataset: no rows"));
    }
    Ok(Records {
        path: path.to_path_buf(),
        format,
        columns,
        rows,
    })
}

fn read_jsonl(path: &Path, mut reader: impl BufRead) -> Result<Vec<Record>> {
    let mut rows = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        // Bytes, not `lines()`: a non-UTF-8 byte must become an error that
        // names its line, not an io error for the whole file.
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        line += 1;
        let at = |msg: String| Error::Line {
            path: path.to_path_buf(),
            line,
            msg,
        };
        let mut bytes = &buf[..];
        if line == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let text = std::str::from_utf8(bytes).map_err(|e| {
            at(format!(
                "invalid UTF-8 at byte {} of the line (the file must be UTF-8 encoded)",
                e.valid_up_to() + 1
            ))
        })?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(text).map_err(|e| {
            if rows.is_empty() && text.starts_with('[') {
                at(
                    "expected one JSON object per line (JSON Lines), found a JSON array; \
                    convert the file with `jq -c '.[]' in.json > out.jsonl`"
                        .into(),
                )
            } else {
                at(format!("invalid JSON: {e}"))
            }
        })?;
        if !value.is_object() {
            return Err(at(format!(
                "expected a JSON object, found {}",
                kind(&value)
            )));
        }
        rows.push(Record {
            line,
            value,
            columns: false,
        });
    }
    Ok(rows)
}

fn read_delimited(
    path: &Path,
    reader: impl BufRead,
    delimiter: u8,
    quoting: bool,
) -> Result<(Vec<String>, Vec<Record>)> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        // Row lengths are checked below, so a whitespace-only line can be
        // skipped and a short row reported in our words.
        .flexible(true)
        .from_reader(reader);
    let csv_err = |e: csv::Error| -> Error {
        // Byte records are never UTF-8 checked or deserialised by the csv
        // crate, so only io errors are expected; keep a position if one comes.
        let line = match e.kind() {
            csv::ErrorKind::UnequalLengths { pos: Some(pos), .. }
            | csv::ErrorKind::Utf8 { pos: Some(pos), .. }
            | csv::ErrorKind::Deserialize { pos: Some(pos), .. } => Some(pos.line()),
            _ => None,
        };
        let msg = e.to_string();
        match (line, e.into_kind()) {
            (_, csv::ErrorKind::Io(io)) => Error::io(path, io),
            (Some(line), _) => Error::Line {
                path: path.to_path_buf(),
                line: line as usize,
                msg,
            },
            (None, _) => Error::file(path, msg),
        }
    };
    let header = reader.byte_headers().map_err(csv_err)?.clone();
    let mut columns = Vec::with_capacity(header.len());
    for (j, field) in header.iter().enumerate() {
        let name = std::str::from_utf8(field).map_err(|_| Error::Line {
            path: path.to_path_buf(),
            line: 1,
            msg: format!(
                "invalid UTF-8 in header column {} (the file must be UTF-8 encoded)",
                j + 1
            ),
        })?;
        if columns.iter().any(|c| c == name) {
            return Err(Error::Line {
                path: path.to_path_buf(),
                line: 1,
                msg: format!("duplicate column `{name}` in the header"),
            });
        }
        columns.push(name.to_string());
    }
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).map_err(csv_err)? {
        let line = record.position().map(|p| p.line() as usize).unwrap_or(0);
        // A line holding nothing but whitespace is a blank line, not a row
        // (the csv crate already skips truly empty ones).
        if record.len() == 1 && columns.len() > 1 && record[0].iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if record.len() != columns.len() {
            return Err(Error::Line {
                path: path.to_path_buf(),
                line,
                msg: format!(
                    "row has {} field(s) but the header has {}",
                    record.len(),
                    columns.len()
                ),
            });
        }
        let mut obj = serde_json::Map::with_capacity(columns.len());
        for (name, field) in columns.iter().zip(record.iter()) {
            let s = std::str::from_utf8(field).map_err(|e| Error::Line {
                path: path.to_path_buf(),
                line,
                msg: format!(
                    "invalid UTF-8 in column `{name}` at byte {} of the field (the file must be UTF-8 encoded)",
                    e.valid_up_to() + 1
                ),
            })?;
            obj.insert(name.clone(), Value::String(s.to_string()));
        }
        rows.push(Record {
            line,
            value: Value::Object(obj),
            columns: true,
        });
    }
    Ok((columns, rows))
}

/// A label as found in the file: datasets store class labels both as
/// strings (`"positive"`, `"1"`) and numbers (`1`, `0.5` for regression).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum LabelValue {
    Str(String),
    Num(f64),
}

impl LabelValue {
    /// The label as a class name: strings as they are, numbers without a
    /// trailing `.0` when integral (`1.0` -> `"1"`), so `1` in JSON and `"1"`
    /// in CSV name the same class.
    pub fn to_label_string(&self) -> String {
        match self {
            LabelValue::Str(s) => s.clone(),
            // Rust's `Display` for f64 already prints 1.0 as "1" and 0.5 as "0.5".
            LabelValue::Num(x) => format!("{x}"),
        }
    }

    /// The label as a number, for regression: numbers as they are, strings
    /// parsed (CSV cells are always strings). `None` if it is not a finite number.
    pub fn as_f64(&self) -> Option<f64> {
        let x = match self {
            LabelValue::Num(x) => *x,
            LabelValue::Str(s) => s.trim().parse().ok()?,
        };
        x.is_finite().then_some(x)
    }
}

impl std::fmt::Display for LabelValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_label_string())
    }
}

/// Which fields of a record hold the text, the optional second text of a
/// pair task (NLI, paraphrase) and the optional label.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSpec {
    pub text: FieldPath,
    pub text_pair: Option<FieldPath>,
    pub label: Option<FieldPath>,
}

/// One example before tokenisation.
#[derive(Debug, Clone, PartialEq)]
pub struct RawExample {
    /// 1-based line of the file the example came from.
    pub line: usize,
    pub text: String,
    pub text_pair: Option<String>,
    pub label: Option<LabelValue>,
}

/// Read the examples of `path` as `spec` says; `format: None` infers it from
/// the extension. A missing field, a text that is not a string or a label
/// that is neither string nor number is an error naming `file:line` and the field.
pub fn read_examples(
    path: &Path,
    spec: &DataSpec,
    format: Option<Format>,
) -> Result<Vec<RawExample>> {
    let records = read_records(path, format)?;
    examples_from_records(&records, spec)
}

/// [`read_examples`] for rows already read.
pub fn examples_from_records(records: &Records, spec: &DataSpec) -> Result<Vec<RawExample>> {
    let path = &records.path;
    // A wrong column name is one mistake, not one per row: report it against the header.
    if let Some(columns) = &records.columns {
        let fields = [
            Some(&spec.text),
            spec.text_pair.as_ref(),
            spec.label.as_ref(),
        ];
        for field in fields.into_iter().flatten() {
            if !columns.iter().any(|c| c == field.as_str()) {
                return Err(Error::Line {
                    path: path.clone(),
                    line: 1,
                    msg: format!(
                        "column `{field}` not found in the header (columns: {})",
                        columns.join(", ")
                    ),
                });
            }
        }
    }
    records
        .rows
        .iter()
        .map(|row| {
            let at = |msg: String| Error::Line {
                path: path.clone(),
                line: row.line,
                msg,
            };
            let get = |field: &FieldPath, what: &str| {
                row.lookup(field)
                    .map_err(|why| at(format!("{what} field `{field}`: {why}")))
            };
            let string = |field: &FieldPath, what: &str| -> Result<String> {
                match get(field, what)? {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(at(format!(
                        "{what} field `{field}` must be a string, found {}",
                        kind(other)
                    ))),
                }
            };
            let text = string(&spec.text, "text")?;
            let text_pair = spec
                .text_pair
                .as_ref()
                .map(|f| string(f, "text_pair"))
                .transpose()?;
            let label = match &spec.label {
                None => None,
                Some(field) => Some(match get(field, "label")? {
                    Value::String(s) if s.trim().is_empty() => {
                        return Err(at(format!("label field `{field}` is empty")))
                    }
                    Value::String(s) => LabelValue::Str(s.clone()),
                    Value::Number(n) => LabelValue::Num(n.as_f64().ok_or_else(|| {
                        at(format!(
                            "label field `{field}`: number {n} does not fit an f64"
                        ))
                    })?),
                    other => {
                        return Err(at(format!(
                            "label field `{field}` must be a string or a number, found {}",
                            kind(other)
                        )))
                    }
                }),
            };
            Ok(RawExample {
                line: row.line,
                text,
                text_pair,
                label,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn spec(text: &str, pair: Option<&str>, label: Option<&str>) -> DataSpec {
        DataSpec {
            text: FieldPath::parse(text).unwrap(),
            text_pair: pair.map(|p| FieldPath::parse(p).unwrap()),
            label: label.map(|p| FieldPath::parse(p).unwrap()),
        }
    }

    fn line_of(err: &Error) -> usize {
        match err {
            Error::Line { line, .. } => *line,
            other => panic!("expected a Line error, got {other:?}"),
        }
    }

    #[test]
    fn reads_jsonl_skipping_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "d.jsonl",
            b"\xEF\xBB\xBF{\"text\": \"a\", \"label\": 1}\n\n  \r\n{\"text\": \"b\", \"label\": \"neg\"}\r\n{\"text\": \"c\", \"label\": 0.5}",
        );
        let ex = read_examples(&p, &spec("text", None, Some("label")), None).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!((ex[0].line, ex[1].line, ex[2].line), (1, 4, 5));
        assert_eq!(ex[0].label, Some(LabelValue::Num(1.0)));
        assert_eq!(ex[1].label, Some(LabelValue::Str("neg".into())));
        assert_eq!(ex[2].text, "c");
        assert_eq!(ex[0].label.as_ref().unwrap().to_label_string(), "1");
        assert_eq!(ex[2].label.as_ref().unwrap().to_label_string(), "0.5");
    }

    #[test]
    fn nested_fields_and_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "chat.json",
            br#"{"input": [{"content": "q"}, {"content": "a"}], "meta": {"h": "p"}, "y": {"v": [0, 2]}}
"#,
        );
        let ex = read_examples(
            &p,
            &spec("input[-1].content", Some("meta.h"), Some("y.v[1]")),
            None,
        )
        .unwrap();
        assert_eq!(ex[0].text, "a");
        assert_eq!(ex[0].text_pair.as_deref(), Some("p"));
        assert_eq!(ex[0].label, Some(LabelValue::Num(2.0)));
    }

    #[test]
    fn malformed_json_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "bad.jsonl",
            b"{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n",
        );
        let err = read_examples(&p, &spec("text", None, None), None).unwrap_err();
        assert_eq!(line_of(&err), 3);
        let msg = err.to_string();
        assert!(
            msg.contains("bad.jsonl:3:") && msg.contains("invalid JSON"),
            "{msg}"
        );

        let p = write(&dir, "arr.jsonl", b"[1, 2]\n");
        let msg = read_examples(&p, &spec("text", None, None), None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("arr.jsonl:1:") && msg.contains("expected a JSON object, found an array"),
            "{msg}"
        );

        let p = write(
            &dir,
            "arr2.json",
            b"[{\"text\": \"a\"},\n {\"text\": \"b\"}]\n",
        );
        let msg = read_examples(&p, &spec("text", None, None), None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("JSON Lines") && msg.contains("jq"), "{msg}");
    }

    #[test]
    fn non_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "latin1.jsonl",
            b"{\"text\": \"ok\"}\n{\"text\": \"caf\xE9\"}\n",
        );
        let err = read_examples(&p, &spec("text", None, None), None).unwrap_err();
        assert_eq!(line_of(&err), 2);
        assert!(
            err.to_string().contains("invalid UTF-8 at byte 14"),
            "{err}"
        );

        let p = write(
            &dir,
            "latin1.csv",
            b"text,label\nok,1\n\"two\nlines\",0\ncaf\xE9,1\n",
        );
        let err = read_examples(&p, &spec("text", None, Some("label")), None).unwrap_err();
        // The multi-line record is on lines 3-4, so the bad one starts on line 5.
        assert_eq!(line_of(&err), 5, "{err}");
        assert!(err.to_string().contains("column `text`"), "{err}");
    }

    #[test]
    fn missing_fields_and_wrong_types_name_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "d.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n{\"txt\": \"b\", \"label\": 1}\n",
        );
        let err = read_examples(&p, &spec("text", None, Some("label")), None).unwrap_err();
        let msg = err.to_string();
        assert_eq!(line_of(&err), 2);
        assert!(
            msg.contains("text field `text`") && msg.contains("key `text` not found"),
            "{msg}"
        );

        let p = write(
            &dir,
            "l.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
        );
        let msg = read_examples(&p, &spec("text", None, Some("label")), None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("l.jsonl:2:") && msg.contains("label field `label`"),
            "{msg}"
        );

        let p = write(&dir, "n.jsonl", b"{\"text\": 5}\n");
        let msg = read_examples(&p, &spec("text", None, None), None)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("n.jsonl:1:") && msg.contains("must be a string, found a number"),
            "{msg}"
        );

        let p = write(&dir, "b.jsonl", b"{\"text\": \"x\", \"label\": true}\n");
        let msg = read_examples(&p, &spec("text", None, Some("label")), None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("found a boolean"), "{msg}");
    }

    #[test]
    fn empty_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in [
            ("e.jsonl", &b"\n\n"[..]),
            ("e.csv", b""),
            ("h.csv", b"text,label\n"),
        ] {
            let p = write(&dir, name, bytes);
            let msg = read_examples(&p, &spec("text", None, None), None)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(name) && msg.contains("empty dataset"), "{msg}");
        }
    }

    #[test]
    fn reads_csv_and_tsv() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "d.csv",
            b"sentence,a.b,label\n\"Hello, world\",x,pos\n\"multi\nline\",y,neg\nplain,z,1\n",
        );
        let ex = read_examples(&p, &spec("sentence", Some("a.b"), Some("label")), None).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[0].text, "Hello, world");
        assert_eq!(ex[0].text_pair.as_deref(), Some("x"));
        assert_eq!((ex[0].line, ex[1].line, ex[2].line), (2, 3, 5));
        assert_eq!(ex[2].label, Some(LabelValue::Str("1".into())));

        // TSV: quotes are plain characters.
        let p = write(&dir, "d.tsv", b"sentence\tlabel\n\"quoted\" start\t0\n");
        let ex = read_examples(&p, &spec("sentence", None, Some("label")), None).unwrap();
        assert_eq!(ex[0].text, "\"quoted\" start");

        // A byte-order mark is not part of the first column's name; blank lines are skipped.
        let p = write(&dir, "bom.csv", b"\xEF\xBB\xBFtext,label\n\n   \na,1\n");
        let ex = read_examples(&p, &spec("text", None, Some("label")), None).unwrap();
        assert_eq!((ex.len(), ex[0].line), (1, 4));

        // Explicit format beats the extension.
        let p = write(&dir, "d.txt", b"text\nhi\n");
        assert!(read_examples(&p, &spec("text", None, None), None).is_err());
        let ex = read_examples(&p, &spec("text", None, None), Some(Format::Csv)).unwrap();
        assert_eq!(ex[0].text, "hi");
    }

    #[test]
    fn csv_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(&dir, "d.csv", b"text,label\na,1\nb\n");
        let err = read_examples(&p, &spec("text", None, Some("label")), None).unwrap_err();
        assert_eq!(line_of(&err), 3, "{err}");
        assert!(
            err.to_string().contains("1 field(s) but the header has 2"),
            "{err}"
        );

        let p = write(&dir, "c.csv", b"text,sentiment\na,1\n");
        let err = read_examples(&p, &spec("text", None, Some("label")), None).unwrap_err();
        assert_eq!(line_of(&err), 1);
        assert!(
            err.to_string().contains("column `label` not found")
                && err.to_string().contains("text, sentiment")
        );

        let p = write(&dir, "e.csv", b"text,label\na,\n");
        let err = read_examples(&p, &spec("text", None, Some("label")), None).unwrap_err();
        assert_eq!(line_of(&err), 2);
        assert!(err.to_string().contains("is empty"), "{err}");
    }

    #[test]
    fn label_value_as_number() {
        assert_eq!(LabelValue::Str(" 2.5 ".into()).as_f64(), Some(2.5));
        assert_eq!(LabelValue::Num(3.0).as_f64(), Some(3.0));
        assert_eq!(LabelValue::Str("pos".into()).as_f64(), None);
        assert_eq!(LabelValue::Str("NaN".into()).as_f64(), None);
        assert_eq!(LabelValue::Num(-2.0).to_label_string(), "-2");
    }
}
