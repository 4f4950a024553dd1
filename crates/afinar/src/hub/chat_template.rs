//! Hugging Face chat templates (Jinja) rendered with `minijinja`, set up the way
//! transformers renders them (`utils/chat_template_utils.py`, v5:
//! `_cached_compile_jinja_template` + `render_jinja_template`):
//!
//! - `trim_blocks` and `lstrip_blocks` on, no trailing newline kept (Jinja's default);
//! - globals `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`
//!   and `documents` (both `none`: templates test `tools is not none`),
//!   `raise_exception(msg)` (becomes an error naming the template's message) and
//!   `strftime_now(fmt)`;
//! - `tojson` as `json.dumps(x, ensure_ascii=False)` (no HTML escaping, `", "` and
//!   `": "` separators, `indent=` and `sort_keys=` honoured);
//! - Python string/dict methods (`.strip()`, `.startswith()`, `.items()` ...) from
//!   `minijinja-contrib`'s pycompat callback.
//!
//! **A template is untrusted input** (it comes with a model folder), so a render
//! is bounded in work and memory, three ways:
//!
//! 1. minijinja's fuel ([`FUEL`]): one unit per instruction and one per 64 bytes
//!    of data the engine makes (strings, list slots, output), checked before a
//!    known-size allocation (`'x' * n`, `(1,) * n`). Running out is an error
//!    naming the chat template and the budget.
//! 2. What afinar adds or replaces pays into the same fuel before its text grows:
//!    `tojson`, `join`, `string`, `pprint`, `raise_exception`, `strftime_now`, and
//!    pycompat's `str.format` / `str.join` (whose widths and items minijinja
//!    does not charge ahead).
//! 3. A backstop for what no fuel sees (the text of a huge value formatted
//!    inside `~` or `in`, or coerced to a string by another filter): the render
//!    runs under [`crate::mem_guard::limit`] with [`MEMORY_LIMIT`], which stops
//!    the process in binaries that install the guarded allocator (the CLI, the
//!    fuzz targets).
//!
//! Limits: transformers' `{% generation %}` tag is not supported (afinar masks
//! assistant turns from rendering spans instead, see `data::sft`);
//! `strftime_now` uses UTC, not the local time zone, and knows the common
//! directives only (`%Y %y %m %d %e %B %b %A %a %H %I %M %S %p %j %%`).

use crate::{Error, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, ErrorKind, State};
use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

const NAME: &str = "chat_template";
/// Prefix of the error `raise_exception` returns, so it can be told apart.
const RAISED: &str = "raise_exception: ";
/// The memory one render may hold (the backstop, [`crate::mem_guard`]).
pub const MEMORY_LIMIT: usize = 256 << 20;
/// The stack of the thread a render runs on (see `render_counted`): 120,000
/// nested lists formatted by `{{ }}` need between 32 and 128 MiB.
const RENDER_STACK: usize = 256 << 20;
/// Bytes of data one unit of minijinja's fuel pays for (its `UNITS_PER_FUEL`).
const BYTES_PER_FUEL: u64 = 64;
/// minijinja's fuel for one render: at most this many instructions, or 64
/// MiB of data made (a quarter of [`MEMORY_LIMIT`]: a list slot is charged
/// 32 bytes, holds 24, and a growing list or string briefly holds its old
/// and new buffers). Real templates use about 40 per turn plus their text
/// a few times over: a Llama 3 template takes 8% for 2,000 turns of 200
/// bytes, 17% for two turns of 1 MB (tests/chat_template_limits.rs), so
/// about 10 MB of chat fits. A hostile template runs out in well under a
/// second.
pub const FUEL: u64 = (MEMORY_LIMIT as u64 / 4) / BYTES_PER_FUEL;

/// Who speaks a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::System, Role::User, Role::Assistant];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// The role named `s`, or a message naming it and the allowed ones.
    pub fn parse(s: &str) -> std::result::Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}` (allowed: system, user, assistant)"))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Role> {
        Role::parse(s).map_err(Error::Data)
    }
}

impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Role, D::Error> {
        let s = String::deserialize(d)?;
        Role::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One chat turn, as chat templates see it (`message['role']`, `message['content']`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile `source` (the `chat_template` of `tokenizer_config.json` or the GGUF
    /// key `tokenizer.chat_template`). A syntax error names its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(python_methods);
        env.add_function(
            "raise_exception",
            |state: &State, msg: &Value| -> Result<Value, minijinja::Error> {
                let msg = text(state, msg)?;
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{msg}"),
                ))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_filter("join", join);
        env.add_filter("string", string);
        env.add_filter("pprint", pprint);
        env.add_filter("split", split);
        env.add_filter("lines", lines);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| template_error("cannot compile the chat template", &e))?;
        let mut t = ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        t.set_clock(None);
        Ok(t)
    }

    /// Pin what `strftime_now` sees (`None`: the system clock). For reproducible
    /// renders of templates that stamp today's date (Llama 3.x).
    pub fn set_clock(&mut self, fixed: Option<SystemTime>) {
        self.env.add_function(
            "strftime_now",
            move |state: &State, fmt: &Value| -> Result<String, minijinja::Error> {
                let fmt = text(state, fmt)?;
                // A directive expands to at most 9 bytes ("September").
                pay(state, fmt.len().saturating_mul(9))?;
                Ok(strftime(&fmt, fixed.unwrap_or_else(SystemTime::now)))
            },
        );
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Render `messages`; `add_generation_prompt` appends the opening of an
    /// assistant turn (what generation continues from). Bounded by [`FUEL`]
    /// (an error) and [`MEMORY_LIMIT`] (the backstop).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_counted(messages, add_generation_prompt)
            .map(|(out, _)| out)
    }

    /// Render, and keep the peak memory even when the render fails (tests
    /// and measurements of hostile templates).
    #[doc(hidden)]
    pub fn render_measured(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> (Result<String>, usize) {
        let peak = std::cell::Cell::new(0);
        let r = self.render_with(messages, add_generation_prompt, &peak);
        (r.map(|(s, _)| s), peak.get())
    }

    /// [`render`](Self::render), plus what it used: fuel, and the peak of heap
    /// memory (0 where no guarded allocator is installed, see [`crate::mem_guard`]).
    pub fn render_counted(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, RenderStats)> {
        self.render_with(messages, add_generation_prompt, &std::cell::Cell::new(0))
    }

    fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        peak: &std::cell::Cell<usize>,
    ) -> Result<(String, RenderStats)> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error("chat template", &e))?;
        let ctx = context! {
            messages => messages_value(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            tools => Value::from(()),
            documents => Value::from(()),
        };
        let render = || {
            let (r, peak) =
                crate::mem_guard::limit(MEMORY_LIMIT, "rendering the chat template", || {
                    let captured = tmpl.render_captured(ctx)?;
                    let used = captured.state().fuel_levels().map_or(0, |(used, _)| used);
                    Ok((captured.into_output(), used))
                });
            (r, peak)
        };
        // Its own thread, for the stack: minijinja formats, compares and drops
        // nested lists recursively, and fuel allows about 120,000 levels
        // (`{% set ns.x = [ns.x] %}` in a loop), which overflowed the 2 MiB of
        // a test or rayon thread. The stack is reserved, not used, until a
        // template nests that deep.
        let r = std::thread::scope(|s| -> Result<_> {
            let worker = std::thread::Builder::new()
                .name("chat-template".into())
                .stack_size(RENDER_STACK)
                .spawn_scoped(s, render)
                .map_err(|e| {
                    Error::Data(format!("cannot start the chat template's render: {e}"))
                })?;
            match worker.join() {
                Ok(r) => Ok(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })?;
        let (r, peak_bytes) = r;
        peak.set(peak_bytes);
        let (out, fuel) =
            r.map_err(|e: minijinja::Error| template_error("cannot render the chat template", &e))?;
        Ok((out, RenderStats { fuel, peak_bytes }))
    }
}

/// What one render used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderStats {
    /// minijinja fuel, out of [`FUEL`].
    pub fuel: u64,
    /// The most heap the render held at once (0 where unguarded).
    pub peak_bytes: usize,
}

/// `messages` as templates see them: a list of `{role, content}` maps, keys in
/// that order (`tojson` writes them so, as transformers does).
fn messages_value(messages: &[Message]) -> Value {
    messages
        .iter()
        .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
        .collect()
}

/// "chat template raised: Conversation roles must alternate ..." for
/// `raise_exception`, the budget for running out of fuel, else minijinja's
/// message with the template line.
fn template_error(what: &str, e: &minijinja::Error) -> Error {
    let line = e
        .line()
        .map(|l| format!(" (template line {l})"))
        .unwrap_or_default();
    // The raised message sits in the error itself or in one it wraps (a call
    // inside a macro or an include).
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(m) = err.downcast_ref::<minijinja::Error>() {
            if let Some(msg) = m.detail().and_then(|d| d.strip_prefix(RAISED)) {
                return Error::Data(format!("chat template raised an exception: {msg}"));
            }
            if m.kind() == ErrorKind::OutOfFuel {
                return Error::Data(format!(
                    "{what}: it went over its budget of {FUEL} fuel (one per instruction, \
                     one per {BYTES_PER_FUEL} bytes of data: {} MiB){line}",
                    FUEL * BYTES_PER_FUEL >> 20
                ));
            }
        }
        cur = err.source();
    }
    Error::Data(format!("{what}: {e}{line}"))
}

/// Pays for `bytes` of data a filter is about to make, before it makes them.
fn pay(state: &State, bytes: usize) -> Result<(), minijinja::Error> {
    state.consume_fuel((bytes as u64).div_ceil(BYTES_PER_FUEL))
}

/// Text built on a template's behalf that pays into the render's fuel before
/// it grows, so its size is bounded by what is left ([`FUEL`]). Used as a
/// `fmt::Write`, it turns running out into a `fmt::Error` and keeps the fuel
/// error for [`Sink::finish`]. With `keep` off it only counts.
struct Sink<'a, 's, 'e> {
    state: &'a State<'s, 'e>,
    out: String,
    len: usize,
    /// Bytes charged so far: what was written, at least [`MIN_WRITE`] a call,
    /// times `weight`.
    cost: usize,
    paid: usize,
    keep: bool,
    /// Fuel bytes paid per byte written (1; the nesting depth for `pprint`,
    /// whose pretty-printer handles each byte once per level).
    weight: usize,
    err: Option<minijinja::Error>,
}

impl<'a, 's, 'e> Sink<'a, 's, 'e> {
    fn new(state: &'a State<'s, 'e>) -> Self {
        Sink {
            state,
            out: String::new(),
            len: 0,
            cost: 0,
            paid: 0,
            keep: true,
            weight: 1,
            err: None,
        }
    }

    fn counter(state: &'a State<'s, 'e>) -> Self {
        Sink {
            keep: false,
            ..Sink::new(state)
        }
    }

    /// Pays for `n` more bytes (in steps of at least 4 KiB, to call the fuel
    /// tracker rarely).
    fn reserve(&mut self, n: usize) -> Result<(), minijinja::Error> {
        let need = self.cost.saturating_add(n.saturating_mul(self.weight));
        if need > self.paid {
            let step = (need - self.paid).max(4096);
            pay(self.state, step)?;
            self.paid = self.paid.saturating_add(step);
        }
        Ok(())
    }

    fn push_str(&mut self, s: &str) -> Result<(), minijinja::Error> {
        let n = s.len().max(MIN_WRITE);
        self.reserve(n)?;
        self.cost = self.cost.saturating_add(n.saturating_mul(self.weight));
        self.len += s.len();
        if self.keep {
            self.out.push_str(s);
        }
        Ok(())
    }

    fn push_repeat(&mut self, s: &str, n: usize) -> Result<(), minijinja::Error> {
        self.reserve(s.len().saturating_mul(n))?;
        for _ in 0..n {
            self.push_str(s)?;
        }
        Ok(())
    }

    /// Writes `v` as `{}` (or pretty `{:#?}`), paying as it goes.
    fn display(&mut self, v: &Value, debug: bool) -> Result<(), minijinja::Error> {
        let r = if debug {
            write!(self, "{v:#?}")
        } else {
            write!(self, "{v}")
        };
        match (r, self.err.take()) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(_), None) => Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "cannot format a value",
            )),
        }
    }
}

impl std::fmt::Write for Sink<'_, '_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push_str(s).map_err(|e| {
            self.err = Some(e);
            std::fmt::Error
        })
    }
}

/// The least a write costs: formatting a value written in many tiny pieces
/// (`[[1], [1]]`, shared and nested 60 times) is slow per byte, so the pieces
/// pay too (64 MiB of them took 2.8 s).
const MIN_WRITE: usize = 16;

/// `v` as text (`{}`), paid for as it is built.
fn text(state: &State, v: &Value) -> Result<String, minijinja::Error> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    let mut sink = Sink::new(state);
    sink.display(v, false)?;
    Ok(sink.out)
}

/// `v[path]` for a dotted path (`user.name`, `items.0`), undefined if missing.
fn lookup_path(v: &Value, path: &str) -> Value {
    let mut cur = v.clone();
    for part in path.split('.') {
        let next = match part.parse::<i64>() {
            Ok(i) => cur.get_item(&Value::from(i)),
            Err(_) => cur.get_attr(part),
        };
        cur = next.unwrap_or(Value::UNDEFINED);
    }
    cur
}

/// Jinja's `join(d="", attribute=None)`, paying for the text as it grows
/// (minijinja's checks the joiner only, so an empty joiner over a repeated
/// list of long strings grew without bound). Templates here never
/// auto-escape, so no markup handling.
fn join(
    state: &State,
    value: &Value,
    joiner: Option<Value>,
    attribute: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let joiner = match joiner {
        Some(j) => Some(j),
        None => kwargs.get::<Option<Value>>("d")?,
    };
    let attribute = match attribute {
        Some(a) => Some(a),
        None => kwargs.get::<Option<Value>>("attribute")?,
    };
    kwargs.assert_all_used()?;
    let joiner = match &joiner {
        Some(j) if !j.is_undefined() && !j.is_none() => text(state, j)?,
        _ => String::new(),
    };
    let attribute = match &attribute {
        Some(a) if !a.is_undefined() && !a.is_none() => Some(text(state, a)?),
        _ => None,
    };
    let items = value.try_iter().map_err(|e| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot join value of type {}", value.kind()),
        )
        .with_source(e)
    })?;
    let mut sink = Sink::new(state);
    for (i, item) in items.checked().enumerate() {
        let item = item?;
        // One fuel per item visited, as minijinja charges its own filters.
        state.consume_fuel(1)?;
        let item = match &attribute {
            Some(a) => lookup_path(&item, a),
            None => item,
        };
        if i > 0 {
            sink.push_str(&joiner)?;
        }
        match item.as_str() {
            Some(s) => sink.push_str(s)?,
            None => sink.display(&item, false)?,
        }
    }
    Ok(Value::from(sink.out))
}

/// Jinja's `string`, paying for the text of a container as it is built.
fn string(state: &State, value: &Value) -> Result<Value, minijinja::Error> {
    if value.is_undefined() || value.kind() == ValueKind::String {
        return minijinja::filters::string(state, value);
    }
    Ok(Value::from(text(state, value)?))
}

/// Jinja's `pprint` (Rust's pretty `{:#?}` in minijinja), paying for the text
/// as it is built, once per nesting level: the pretty-printer passes each byte
/// through one indenter per level (a 100,000-deep list took 17 s).
fn pprint(state: &State, value: &Value) -> Result<Value, minijinja::Error> {
    let mut sink = Sink::new(state);
    sink.weight = nesting_depth(state, value)?.max(1);
    sink.display(value, true)?;
    Ok(Value::from(sink.out))
}

/// How deeply `v` nests lists and maps, walked without recursion (one fuel
/// per value visited).
fn nesting_depth(state: &State, v: &Value) -> Result<usize, minijinja::Error> {
    let mut deepest = 0;
    let mut todo = vec![(v.clone(), 0usize)];
    while let Some((x, depth)) = todo.pop() {
        state.consume_fuel(1)?;
        deepest = deepest.max(depth);
        match x.kind() {
            ValueKind::Seq | ValueKind::Iterable => {
                for item in x.try_iter()?.checked() {
                    todo.push((item?, depth + 1));
                }
            }
            ValueKind::Map => {
                for k in x.try_iter()?.checked() {
                    todo.push((x.get_item(&k?)?, depth + 1));
                }
            }
            _ => {}
        }
    }
    Ok(deepest)
}

/// One list slot, as minijinja charges it (its `SLOT_COST`).
const SLOT_BYTES: usize = 32;

/// Pays for the list `s.split(sep)` makes (a slot per piece), counted without
/// building it: minijinja's `split` and `lines` materialise the list and only
/// then charge for it ("x " * 10**7 made 10 million pieces, 240 MB).
fn pay_for_split(
    state: &State,
    s: &str,
    sep: Option<&str>,
    max_pieces: Option<usize>,
) -> Result<(), minijinja::Error> {
    let pieces = match sep {
        None => s.split_whitespace().count(),
        Some("\n") => s.lines().count(),
        Some("") => 1,
        Some(sep) => s.matches(sep).count() + 1,
    };
    let pieces = max_pieces.map_or(pieces, |m| pieces.min(m));
    pay(state, pieces.saturating_mul(SLOT_BYTES))
}

/// Jinja's `split`, paid for before the list is built.
fn split(
    state: &State,
    value: &Value,
    sep: Option<Value>,
    maxsplits: Option<i64>,
) -> Result<Value, minijinja::Error> {
    let s = text(state, value)?;
    let sep = match sep {
        Some(v) if !v.is_none() && !v.is_undefined() => Some(text(state, &v)?),
        _ => None,
    };
    let max_pieces = maxsplits.and_then(|n| usize::try_from(n).ok().map(|n| n + 1));
    pay_for_split(state, &s, sep.as_deref(), max_pieces)?;
    minijinja::filters::split(value, sep.map(std::sync::Arc::from), maxsplits)
}

/// Jinja's `lines`, paid for before the list is built.
fn lines(state: &State, value: &Value) -> Result<Value, minijinja::Error> {
    pay_for_split(state, &text(state, value)?, Some("\n"), None)?;
    minijinja::filters::lines(value)
}

/// minijinja-contrib's Python methods, after paying for what they would build
/// unchecked: `str.format` (widths and precisions are not charged: `'{:>9999999999}'`
/// asked for 10 GB) and `str.join` (items are not charged).
fn python_methods(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        match method {
            "format" => {
                // A field writes at most its width or precision in fill
                // characters (4 bytes each), plus the text of one argument,
                // twice over for grouping and zero padding. Both are bounded
                // by every number in the format string and every argument.
                let numbers = s
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|d| !d.is_empty())
                    .fold(0usize, |acc, d| {
                        acc.saturating_add(d.parse::<usize>().unwrap_or(usize::MAX))
                    });
                let mut args_len = Sink::counter(state);
                for a in args {
                    args_len.display(a, false)?;
                }
                let fields = s.matches('{').count();
                let bound = s
                    .len()
                    .saturating_add(numbers.saturating_mul(8))
                    .saturating_add(fields.saturating_mul(args_len.len.saturating_mul(2) + 64));
                pay(state, bound)?;
            }
            "split" | "rsplit" => {
                let sep = args.first().and_then(|a| a.as_str());
                pay_for_split(state, s, sep, None)?;
            }
            "splitlines" => pay_for_split(state, s, Some("\n"), None)?,
            "join" => {
                if let Some(items) = args.first().and_then(|a| a.try_iter().ok()) {
                    let mut sink = Sink::counter(state);
                    for item in items {
                        state.consume_fuel(1)?;
                        sink.push_str(s)?;
                        sink.display(&item, false)?;
                    }
                }
            }
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `json.dumps(x, ensure_ascii=False, indent=None, sort_keys=False)`, the filter
/// transformers installs in place of Jinja's HTML-escaping `tojson`. Its text
/// pays into the render's fuel as it grows (a huge `indent=` or a repeated
/// list is an out-of-fuel error, not an allocation).
fn tojson(state: &State, value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; output is never ASCII-escaped.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<Value>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (text(state, a)?, text(state, b)?),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair (item, key)",
            ))
        }
        // Python's defaults: ", " without indent, "," with it.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let opts = JsonOpts {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = Sink::new(state);
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out.out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

/// Nesting `tojson` follows; deeper is an error (Python's `json` stops at
/// its recursion limit too), not a stack overflow.
const JSON_MAX_DEPTH: usize = 256;

fn write_json(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut Sink,
) -> Result<(), minijinja::Error> {
    if depth > JSON_MAX_DEPTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: value nested deeper than {JSON_MAX_DEPTH} levels"),
        ));
    }
    let newline = |out: &mut Sink, depth: usize| -> Result<(), minijinja::Error> {
        if let Some(n) = o.indent {
            out.push_str("\n")?;
            out.push_repeat(" ", n.saturating_mul(depth))?;
        }
        Ok(())
    };
    let json_str = |out: &mut Sink, s: &str| -> Result<(), minijinja::Error> {
        // Escaping at most doubles a byte (`\n`) or makes six of it (`\u0001`).
        out.reserve(s.len().saturating_mul(6).saturating_add(2))?;
        out.push_str(&serde_json::to_string(s).expect("a string serialises"))
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null")?,
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" })?,
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string())?;
            } else {
                let x = f64::try_from(v.clone())?;
                // Python's float repr keeps a ".0" on integral values.
                out.push_str(&format!("{x:?}"))?;
            }
        }
        ValueKind::String => json_str(out, v.as_str().unwrap_or_default())?,
        ValueKind::Seq | ValueKind::Iterable => {
            // Lazily: a repeated list is not collected before it is paid for.
            let mut empty = true;
            for (i, item) in v.try_iter()?.checked().enumerate() {
                let item = item?;
                out.state.consume_fuel(1)?;
                out.push_str(if i == 0 { "[" } else { &o.item_sep })?;
                newline(out, depth + 1)?;
                write_json(&item, o, depth + 1, out)?;
                empty = false;
            }
            if empty {
                out.push_str("[]")?;
            } else {
                newline(out, depth)?;
                out.push_str("]")?;
            }
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = Vec::new();
            for k in v.try_iter()?.checked() {
                out.state.consume_fuel(1)?;
                keys.push(k?);
            }
            if keys.is_empty() {
                out.push_str("{}")?;
                return Ok(());
            }
            let mut keys: Vec<(String, Value)> = keys
                .into_iter()
                .map(|k| Ok((text(out.state, &k)?, k)))
                .collect::<Result<_, minijinja::Error>>()?;
            if o.sort_keys {
                keys.sort_by(|a, b| a.0.cmp(&b.0));
            }
            for (i, (name, k)) in keys.iter().enumerate() {
                out.push_str(if i == 0 { "{" } else { &o.item_sep })?;
                newline(out, depth + 1)?;
                json_str(out, name)?;
                out.push_str(&o.key_sep)?;
                write_json(&v.get_item(k)?, o, depth + 1, out)?;
            }
            newline(out, depth)?;
            out.push_str("}")?;
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialise a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01 in the
/// proleptic Gregorian calendar (eras of 400 years, March-based years).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Python's `datetime.strftime` for the common directives, in UTC. Unknown
/// directives are copied through, as glibc does.
pub fn strftime(fmt: &str, t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, sod / 60 % 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let wd = (days + 3).rem_euclid(7) as usize;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[m as usize - 1] + d + u32::from(m > 2 && is_leap(y));
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(WEEKDAYS[wd]),
            Some('a') => out.push_str(&WEEKDAYS[wd][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{h12:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `chat_template`, verbatim.
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn golden() -> serde_json::Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/chat/golden.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).expect("golden.json")).unwrap()
    }

    fn messages(v: &serde_json::Value) -> Vec<Message> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// Every conversation x template x generation prompt rendered by transformers
    /// (`scripts/reference/golden_chat.py`) renders to the same string here.
    #[test]
    fn chat_template_matches_transformers_golden() {
        let g = golden();
        let templates = g["templates"].as_object().unwrap();
        let mut n = 0;
        for case in g["cases"].as_array().unwrap() {
            let name = case["template"].as_str().unwrap();
            let t = &templates[name];
            let tmpl = ChatTemplate::new(
                t["source"].as_str().unwrap(),
                t["bos_token"].as_str().unwrap(),
                t["eos_token"].as_str().unwrap(),
            )
            .unwrap();
            let msgs = messages(&case["messages"]);
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            match (&case["rendered"], &case["error"]) {
                (serde_json::Value::String(want), _) => {
                    let got = tmpl.render(&msgs, gen).unwrap();
                    assert_eq!(&got, want, "case {}", case["name"]);
                }
                (_, serde_json::Value::String(want)) => {
                    let err = tmpl.render(&msgs, gen).unwrap_err().to_string();
                    assert!(
                        err.contains("chat template raised an exception")
                            && err.contains(want.as_str()),
                        "case {}: {err}",
                        case["name"]
                    );
                }
                _ => panic!("bad golden case {case}"),
            }
            n += 1;
        }
        assert!(n >= 8, "only {n} golden cases");
    }

    #[test]
    fn chat_template_smollm2_by_hand() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let msgs = [Message::new(Role::User, "Hi")];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let msgs = [
            Message::new(Role::System, "S"),
            Message::new(Role::User, "Q"),
            Message::new(Role::Assistant, "A"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        );
    }

    #[test]
    fn chat_template_errors_are_clear() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot compile the chat template"), "{err}");
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render(&[Message::new(Role::Assistant, "x")], false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "data: chat template raised an exception: first must be user"
        );
        assert_eq!(
            t.render(&[Message::new(Role::User, "x")], false).unwrap(),
            "ok"
        );
        // Undefined methods name what failed.
        let t = ChatTemplate::new("{{ messages[0].content.nosuch() }}", "", "").unwrap();
        let err = t
            .render(&[Message::new(Role::User, "x")], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot render the chat template"), "{err}");
    }

    #[test]
    fn chat_template_tojson_like_python() {
        let t = ChatTemplate::new(
            "{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ {'b': 1, 'a': [1.5, none, true]} | tojson(sort_keys=true) }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .render(&[Message::new(Role::User, "é <b> \"q\"\n")], false)
            .unwrap();
        assert_eq!(
            out,
            "{\"role\": \"user\", \"content\": \"é <b> \\\"q\\\"\\n\"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \"é <b> \\\"q\\\"\\n\"\n  }\n]|{\"a\": [1.5, null, true], \"b\": 1}"
        );
    }

    #[test]
    fn chat_template_strftime_now() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t0 = UNIX_EPOCH + std::time::Duration::from_secs(1_709_211_909);
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %e %%", t0),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 %"
        );
        assert_eq!(strftime("%d %b %Y", UNIX_EPOCH), "01 Jan 1970");
        let mut t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
        t.set_clock(Some(t0));
        assert_eq!(t.render(&[], false).unwrap(), "29 Feb 2024");
        // Civil dates across centuries and leap years.
        for (days, want) in [
            (0, (1970, 1, 1)),
            (-1, (1969, 12, 31)),
            (11_016, (2000, 2, 29)),
            (47_541, (2100, 3, 1)),
        ] {
            assert_eq!(civil_from_days(days), want, "{days}");
        }
    }

    /// A template is data: it cannot read files (no loader: `include`,
    /// `import` and `extends` find nothing), the environment or the network,
    /// and its loops are bounded by minijinja's limits.
    #[test]
    fn chat_template_is_sandboxed() {
        let secret = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(secret.path(), "SECRET").unwrap();
        let p = secret.path().display().to_string();
        for src in [
            format!("{{% include '{p}' %}}"),
            format!("{{% import '{p}' as x %}}"),
            format!("{{% extends '{p}' %}}"),
        ] {
            let t = ChatTemplate::new(&src, "", "").unwrap();
            let err = t.render(&[], false).unwrap_err().to_string();
            assert!(
                err.contains("not found") && !err.contains("SECRET"),
                "{src}: {err}"
            );
        }
        // No functions beyond the ones set up here, and no globals beyond the context.
        for src in [
            "{{ env('HOME') }}",
            "{{ open('/etc/hostname') }}",
            "{{ lipsum() }}",
        ] {
            let err = ChatTemplate::new(src, "", "")
                .and_then(|t| t.render(&[], false))
                .unwrap_err()
                .to_string();
            assert!(err.contains("unknown function"), "{src}: {err}");
        }
        let err = ChatTemplate::new("{% for i in range(1000000) %}x{% endfor %}", "", "")
            .unwrap()
            .render(&[], false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("too many elements"), "{err}");
    }

    /// Llama 3's chat template (the 8B Instruct one, without tools).
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    fn long_chat(turns: usize, content_bytes: usize) -> Vec<Message> {
        (0..turns)
            .map(|i| {
                let role = if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                };
                let mut c = format!("turn {i} ");
                c.push_str(&"lorem ipsum ".repeat(content_bytes / 12));
                Message::new(role, c)
            })
            .collect()
    }

    /// The error of a render that went over the budget names the chat
    /// template and the budget.
    fn assert_over_budget(err: &str) {
        assert!(
            err.contains("cannot render the chat template")
                && err.contains(&format!("budget of {FUEL} fuel")),
            "{err}"
        );
    }

    /// Nested loops stay under the 100,000-item cap of each `range` but not
    /// in their product: without fuel this render ran for about 10^15 steps
    /// (fuzz/regressions/chat_template/nested-ranges).
    #[test]
    fn chat_template_render_is_bounded() {
        let src = "{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}{% endfor %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let start = std::time::Instant::now();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert_over_budget(&err);
        assert!(start.elapsed().as_secs() < 5, "{:?}", start.elapsed());
        // Real templates on a long chat (2,000 turns of 50 bytes) are far
        // from the limit: under a tenth of the fuel.
        let msgs = long_chat(2000, 50);
        for (name, src) in [(
            "smollm2",
            "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        ), ("llama3", LLAMA3)]
        {
            let (out, stats) = ChatTemplate::new(src, "<s>", "</s>")
                .unwrap()
                .render_counted(&msgs, true)
                .unwrap();
            assert!(out.contains("turn 1999"), "{name}");
            assert!(stats.fuel < FUEL / 10, "{name}: {stats:?}");
        }
        // Two 1 MB messages: Llama 3 copies each about 6 times (`+`, `trim`,
        // output), under a fifth of the budget; about 10 MB of chat fits.
        let msgs = long_chat(2, 1 << 20);
        let (_, stats) = ChatTemplate::new(LLAMA3, "<s>", "</s>")
            .unwrap()
            .render_counted(&msgs, true)
            .unwrap();
        assert!(stats.fuel < FUEL / 5, "{stats:?}");
    }

    /// Templates that build huge values end quickly with an error naming the
    /// chat template and the limit (the fuzz regressions are measured, time
    /// and memory, in tests/chat_template_limits.rs).
    #[test]
    fn chat_template_hostile_templates_fail_within_budget() {
        let msgs = [Message::new(Role::User, "Hi")];
        for src in [
            // Sequence and string repeats, iterated or materialised.
            "{% for x in (1,) * 10**7 %}{% endfor %}",
            "{% for x in [1] * 10**8 %}{% endfor %}",
            "{{ ([1] * 10**8) | list | length }}",
            "{{ 'x' * 10**8 }}",
            "{{ ('x' * 10**7) * 10 }}",
            "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
            // Big joins, in Jinja and in Python.
            "{{ (['x' * 10**6] * 10**4) | join }}",
            "{{ (['ab'] * 10**8) | join(',') }}",
            "{{ ('x' * 10**6).join(['a'] * 10**4) }}",
            // Width and precision.
            "{{ '{:>1000000000}'.format(1) }}",
            "{{ '{:.1000000000f}'.format(1.0) }}",
            "{{ '%1000000000s' | format(1) }}",
            "{{ messages | tojson(indent=10**18) }}",
            // Text of a repeated or shared value.
            "{{ (['x' * 10**6] * 10**4) | tojson }}",
            "{{ (['x' * 10**6] * 10**4) | string }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l | pprint }}",
            "{{ raise_exception(['x' * 10**6] * 10**4) }}",
            // Many pieces from one string.
            "{{ ('x ' * 10**7).split() | length }}",
            "{{ ('x\n' * 10**7) | lines | length }}",
            // Exponential macro recursion.
            "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% else %}x{% endif %}{% endmacro %}{{ f(40) }}",
        ] {
            let t = ChatTemplate::new(src, "", "").unwrap();
            let start = std::time::Instant::now();
            let err = t.render(&msgs, false).unwrap_err().to_string();
            assert_over_budget(&err);
            assert!(start.elapsed().as_secs() < 5, "{src}: {:?}", start.elapsed());
        }
        // minijinja's own caps: a range of 100,000 items, 500 nested calls.
        for (src, limit) in [
            ("{{ range(10**12) | list }}", "range has too many elements"),
            (
                "{% for x in () * 10**15 %}{% endfor %}{% for x in [1] * 10**15 %}{% endfor %}",
                "repeated sequence is too large",
            ),
            (
                "{% macro f(n) %}{{ f(n+1) }}{% endmacro %}{{ f(0) }}",
                "recursion limit exceeded",
            ),
        ] {
            let err = ChatTemplate::new(src, "", "")
                .unwrap()
                .render(&msgs, false)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("cannot render the chat template") && err.contains(limit),
                "{src}: {err}"
            );
        }
        // Deep nesting: 100,000 levels render on the render thread's stack
        // (it overflowed a 2 MiB one); tojson stops at 256 levels.
        let deep = "{% set ns = namespace(x=[]) %}{% for i in range(99999) %}{% set ns.x = [ns.x] %}{% endfor %}";
        let out = ChatTemplate::new(&format!("{deep}{{{{ ns.x }}}}"), "", "")
            .unwrap()
            .render(&msgs, false)
            .unwrap();
        assert_eq!(out.len(), 200_000);
        let err = ChatTemplate::new(&format!("{deep}{{{{ ns.x | tojson }}}}"), "", "")
            .unwrap()
            .render(&msgs, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested deeper than 256 levels"), "{err}");
    }

    /// The filters afinar replaces keep Jinja's results.
    #[test]
    fn chat_template_replaced_filters_match_jinja() {
        let t = ChatTemplate::new(
            "{{ [1, 'a', none] | join('-') }}|{{ messages | join(', ', attribute='role') }}|{{ messages | map(attribute='content') | join }}|{{ [1, [2]] | string }}|{{ 'a b  c' | split | length }}|{{ 'a,b' | split(',') | last }}|{{ 'x\ny' | lines | first }}|{{ 'a b'.split() | length }}|{{ '-'.join(['a', 'b']) }}|{{ '{}+{:>3}'.format(1, 2) }}|{{ {'a': [1]} | pprint | length > 0 }}",
            "",
            "",
        )
        .unwrap();
        let msgs = [
            Message::new(Role::User, "q"),
            Message::new(Role::Assistant, "a"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "1-a-None|user, assistant|qa|[1, [2]]|3|b|x|2|a-b|1+  2|True"
        );
    }
}
