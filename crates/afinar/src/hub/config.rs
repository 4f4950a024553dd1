//! Hugging Face `config.json`: read raw (`serde_json::Value`) or into a model's
//! typed `Config`, with errors naming the file and serde's line and column.

use crate::{Error, Result};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.json";

/// `dir/config.json`, or `path` itself when it names a file.
fn config_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CONFIG_FILE)
    } else {
        path.to_path_buf()
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Read `config.json` (from a model folder, or a file path) as untyped JSON.
pub fn read_config_value(path: impl AsRef<Path>) -> Result<serde_json::Value> {
    let path = config_path(path.as_ref());
    let text = read_text(&path)?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path,
        msg: e.to_string(),
    })
}

/// Read `config.json` into `T`. A missing field or a wrong type is an error
/// naming the file, the problem and its line/column (serde's message).
pub fn read_config<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = config_path(path.as_ref());
    let text = read_text(&path)?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path,
        msg: e.to_string(),
    })
}

/// `raw`, the JSON read from `file`, into `T`. A wrong type or a missing
/// field names the file, and, where serde can place it in the file's text,
/// the line and what that line says (`config.json:9: `"hidden_size": "32",`:
/// invalid type: string "32", expected usize`).
pub fn from_value_in<T: DeserializeOwned>(raw: &serde_json::Value, file: &Path) -> Result<T> {
    let e = match T::deserialize(raw) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let located = std::fs::read_to_string(file).ok().and_then(|text| {
        let line = serde_json::from_str::<T>(&text).err()?.line();
        let src = text.lines().nth(line.checked_sub(1)?)?.trim();
        Some((line, src.to_string()))
    });
    Err(match located {
        // A missing field is reported at the closing brace: the line says nothing.
        Some((line, src)) if src.len() > 1 => Error::Line {
            path: file.to_path_buf(),
            line,
            msg: format!("`{src}`: {e}"),
        },
        _ => Error::file(file, e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Cfg {
        hidden_size: usize,
        #[serde(default)]
        layer_norm_eps: f64,
    }

    #[test]
    fn typed_and_untyped_with_located_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "{\n  \"hidden_size\": 384,\n  \"model_type\": \"bert\"\n}",
        )
        .unwrap();
        let v = read_config_value(dir.path()).unwrap();
        assert_eq!(v["model_type"], "bert");
        let c: Cfg = read_config(dir.path()).unwrap();
        assert_eq!(c.hidden_size, 384);

        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "{\n  \"hidden_size\": \"big\"\n}",
        )
        .unwrap();
        let err = read_config::<Cfg>(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("line 2"),
            "{err}"
        );
        assert!(err.contains("invalid type"), "{err}");

        std::fs::write(dir.path().join(CONFIG_FILE), "{\"model_type\": \"bert\",}").unwrap();
        let err = read_config_value(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("column"),
            "{err}"
        );

        let err = read_config_value(dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let err = read_config::<Cfg>(tempfile::tempdir().unwrap().path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
    }

    #[test]
    fn typed_from_a_value_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(CONFIG_FILE);
        std::fs::write(
            &file,
            "{\n  \"model_type\": \"bert\",\n  \"hidden_size\": \"32\"\n}",
        )
        .unwrap();
        let raw = read_config_value(&file).unwrap();
        let err = from_value_in::<Cfg>(&raw, &file).unwrap_err().to_string();
        assert!(
            err.contains("config.json:3: `\"hidden_size\": \"32\"`: invalid type: string \"32\", expected usize"),
            "{err}"
        );
        // A missing field has no line of its own: the file and the field.
        std::fs::write(&file, "{\n  \"model_type\": \"bert\"\n}").unwrap();
        let raw = read_config_value(&file).unwrap();
        let err = from_value_in::<Cfg>(&raw, &file).unwrap_err().to_string();
        assert!(
            err.contains("config.json: missing field `hidden_size`"),
            "{err}"
        );
    }
}
