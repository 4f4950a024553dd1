//! The library's typed error. Every variant says what went wrong and where
//! (file, line, key, tensor, expected vs actual), so the CLI can print the
//! whole cause chain and exit non-zero.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },

    #[error("{path}:{line}: {msg}")]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {actual:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("checkpoint {path}: missing tensors: {names:?}")]
    MissingTensors { path: PathBuf, names: Vec<String> },

    #[error("checkpoint {path}: unexpected tensors (not used by the model): {names:?}")]
    UnexpectedTensors { path: PathBuf, names: Vec<String> },

    #[error("data: {0}")]
    Data(String),

    #[error("training stopped: {0}")]
    NonFinite(String),

    #[error("{0}")]
    Msg(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// `bail!`-like helper for the library.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error::Msg(format!($($arg)*))) };
}
