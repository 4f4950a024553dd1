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
//! Limits: transformers' `{% generation %}` tag is not supported (afinar masks
//! assistant turns from rendering spans instead, see `data::sft`);
//! `strftime_now` uses UTC, not the local time zone, and knows the common
//! directives only (`%Y %y %m %d %e %B %b %A %a %H %I %M %S %p %j %%`).

use crate::{Error, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, ErrorKind};
use std::time::{SystemTime, UNIX_EPOCH};

const NAME: &str = "chat_template";
/// Prefix of the error `raise_exception` returns, so it can be told apart.
const RAISED: &str = "raise_exception: ";
/// Instructions one render may execute. Real chat templates use a few
/// hundred per message; nested loops in a hostile template (each `range` is
/// capped at 100,000 items, their product is not) would otherwise run for
/// hours. About a second of rendering.
pub const FUEL: u64 = 20_000_000;

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
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{msg}"),
                ))
            },
        );
        env.add_filter("tojson", tojson);
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
            move |fmt: String| -> Result<String, minijinja::Error> {
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
    /// assistant turn (what generation continues from).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error("chat template", &e))?;
        tmpl.render(context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            tools => Value::from(()),
            documents => Value::from(()),
        })
        .map_err(|e| template_error("cannot render the chat template", &e))
    }
}

/// "chat template raised: Conversation roles must alternate ..." for
/// `raise_exception`, else minijinja's message with the template line.
fn template_error(what: &str, e: &minijinja::Error) -> Error {
    // The raised message sits in the error itself or in one it wraps (a call
    // inside a macro or an include).
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(m) = err.downcast_ref::<minijinja::Error>() {
            if let Some(msg) = m.detail().and_then(|d| d.strip_prefix(RAISED)) {
                return Error::Data(format!("chat template raised an exception: {msg}"));
            }
        }
        cur = err.source();
    }
    let line = e
        .line()
        .map(|l| format!(" (template line {l})"))
        .unwrap_or_default();
    Error::Data(format!("{what}: {e}{line}"))
}

/// `json.dumps(x, ensure_ascii=False, indent=None, sort_keys=False)`, the filter
/// transformers installs in place of Jinja's HTML-escaping `tojson`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Accepted for compatibility; output is never ASCII-escaped.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
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
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

fn write_json(
    v: &Value,
    o: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = o.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let json_str = |s: &str| serde_json::to_string(s).expect("a string serialises");
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let x = f64::try_from(v.clone())?;
                // Python's float repr keeps a ".0" on integral values.
                out.push_str(&format!("{x:?}"));
            }
        }
        ValueKind::String => out.push_str(&json_str(v.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(item, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if o.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&json_str(&k.to_string()));
                out.push_str(&o.key_sep);
                write_json(&v.get_item(k)?, o, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
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

    /// Nested loops stay under the 100,000-item cap of each `range` but not
    /// in their product: without fuel this render ran for about 10^15 steps
    /// (fuzz/regressions/chat_template/nested-ranges).
    #[test]
    fn chat_template_render_is_bounded() {
        let src = "{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}{% endfor %}{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let start = std::time::Instant::now();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(
            err.contains("cannot render the chat template") && err.contains("fuel"),
            "{err}"
        );
        assert!(start.elapsed().as_secs() < 30, "{:?}", start.elapsed());
        // A real template on a long chat is far from the limit.
        let msgs: Vec<Message> = (0..2000)
            .map(|i| {
                let role = if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                };
                Message::new(role, format!("turn {i}"))
            })
            .collect();
        let smollm2 = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let out = ChatTemplate::new(smollm2, "", "")
            .unwrap()
            .render(&msgs, true)
            .unwrap();
        assert!(out.contains("turn 1999"));
    }
}
