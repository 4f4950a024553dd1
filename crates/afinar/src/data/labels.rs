//! Class labels <-> ids, built from the training labels.
//!
//! The order is fixed by the labels themselves, not by the order rows happen
//! to appear in: numerically when every label is a number (so `"2"` < `"10"`
//! and labels `0..k` keep their own ids), lexicographically otherwise. The
//! same training file therefore always gives the same `id2label`, which is
//! what a saved checkpoint's `config.json` records.

use super::source::{LabelValue, RawExample};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "LabelMapRepr", into = "LabelMapRepr")]
pub struct LabelMap {
    id2label: Vec<String>,
    label2id: HashMap<String, usize>,
}

/// What is saved: just the ordered labels.
#[derive(serde::Serialize, serde::Deserialize)]
struct LabelMapRepr {
    id2label: Vec<String>,
}

impl TryFrom<LabelMapRepr> for LabelMap {
    type Error = Error;
    fn try_from(r: LabelMapRepr) -> Result<Self> {
        Self::from_config(r.id2label)
    }
}

impl From<LabelMap> for LabelMapRepr {
    fn from(m: LabelMap) -> Self {
        LabelMapRepr {
            id2label: m.id2label,
        }
    }
}

impl LabelMap {
    /// Build the map from the labels of the training set.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a LabelValue>) -> Result<Self> {
        let mut unique: Vec<String> = labels
            .into_iter()
            .map(LabelValue::to_label_string)
            .collect();
        unique.sort();
        unique.dedup();
        if unique.is_empty() {
            return Err(Error::Data("no labels in the training set".into()));
        }
        let numbers: Option<Vec<f64>> = unique
            .iter()
            .map(|s| s.trim().parse::<f64>().ok().filter(|x| x.is_finite()))
            .collect();
        if let Some(numbers) = numbers {
            // `"1"` and `"1.0"` are different labels with the same value:
            // break the tie by the text so the order stays total.
            let mut pairs: Vec<(f64, String)> = numbers.into_iter().zip(unique).collect();
            pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
            unique = pairs.into_iter().map(|(_, s)| s).collect();
        }
        Self::from_config(unique)
    }

    /// Build the map from the labels of training examples; an example without
    /// a label is an error naming `path:line`.
    pub fn from_examples(examples: &[RawExample], path: &Path) -> Result<Self> {
        let labels = examples
            .iter()
            .map(|ex| {
                ex.label.as_ref().ok_or_else(|| Error::Line {
                    path: path.to_path_buf(),
                    line: ex.line,
                    msg: "example has no label".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_labels(labels)
    }

    /// Rebuild a saved map (e.g. a checkpoint's `id2label`), keeping its order.
    pub fn from_config(id2label: Vec<String>) -> Result<Self> {
        let mut label2id = HashMap::with_capacity(id2label.len());
        for (i, label) in id2label.iter().enumerate() {
            if let Some(j) = label2id.insert(label.clone(), i) {
                return Err(Error::Data(format!(
                    "id2label: label `{label}` appears twice (ids {j} and {i})"
                )));
            }
        }
        Ok(Self { id2label, label2id })
    }

    /// The id of a label; a label never seen in training is an error that
    /// names it and lists the known ones.
    pub fn id(&self, label: &LabelValue) -> Result<usize> {
        let s = label.to_label_string();
        self.label2id.get(&s).copied().ok_or_else(|| {
            Error::Data(format!(
                "label `{s}` was not seen in the training set (known labels: {})",
                self.id2label.join(", ")
            ))
        })
    }

    /// The ids of all examples' labels; errors name `path:line`.
    pub fn ids(&self, examples: &[RawExample], path: &Path) -> Result<Vec<usize>> {
        examples
            .iter()
            .map(|ex| {
                let at = |msg: String| Error::Line {
                    path: path.to_path_buf(),
                    line: ex.line,
                    msg,
                };
                match &ex.label {
                    None => Err(at("example has no label".into())),
                    Some(label) => self.id(label).map_err(|e| match e {
                        Error::Data(msg) => at(msg),
                        other => other,
                    }),
                }
            })
            .collect()
    }

    pub fn label(&self, id: usize) -> Option<&str> {
        self.id2label.get(id).map(String::as_str)
    }

    pub fn id2label(&self) -> &[String] {
        &self.id2label
    }

    pub fn len(&self) -> usize {
        self.id2label.len()
    }

    pub fn is_empty(&self) -> bool {
        self.id2label.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> LabelValue {
        LabelValue::Str(x.into())
    }

    #[test]
    fn numeric_labels_sort_numerically() {
        let labels = [
            s("10"),
            s("2"),
            LabelValue::Num(1.0),
            s("2"),
            LabelValue::Num(-0.5),
        ];
        let m = LabelMap::from_labels(&labels).unwrap();
        assert_eq!(m.id2label(), &["-0.5", "1", "2", "10"]);
        // `1` in JSON and `"1"` in CSV are the same class.
        assert_eq!(m.id(&s("1")).unwrap(), 1);
        assert_eq!(m.id(&LabelValue::Num(10.0)).unwrap(), 3);
    }

    #[test]
    fn text_labels_sort_lexicographically() {
        let labels = [s("positive"), s("negative"), s("10"), s("neutral")];
        let m = LabelMap::from_labels(&labels).unwrap();
        assert_eq!(m.id2label(), &["10", "negative", "neutral", "positive"]);
        assert_eq!(m.label(2), Some("neutral"));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn unseen_label_is_named() {
        let m = LabelMap::from_labels(&[s("neg"), s("pos")]).unwrap();
        let msg = m.id(&s("neutral")).unwrap_err().to_string();
        assert!(
            msg.contains("`neutral`") && msg.contains("known labels: neg, pos"),
            "{msg}"
        );

        let ex = vec![
            RawExample {
                line: 3,
                text: "a".into(),
                text_pair: None,
                label: Some(s("pos")),
            },
            RawExample {
                line: 7,
                text: "b".into(),
                text_pair: None,
                label: Some(s("meh")),
            },
        ];
        let msg = m.ids(&ex, Path::new("val.jsonl")).unwrap_err().to_string();
        assert!(
            msg.starts_with("val.jsonl:7:") && msg.contains("`meh`"),
            "{msg}"
        );
        assert!(LabelMap::from_labels(&[]).is_err());
    }

    #[test]
    fn serde_round_trip_and_duplicates() {
        let m = LabelMap::from_labels(&[s("b"), s("a")]).unwrap();
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#"{"id2label":["a","b"]}"#);
        let back: LabelMap = serde_json::from_str(&j).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.id(&s("b")).unwrap(), 1);
        assert!(serde_json::from_str::<LabelMap>(r#"{"id2label":["a","a"]}"#).is_err());
        assert!(LabelMap::from_config(vec!["x".into(), "x".into()]).is_err());
    }
}
