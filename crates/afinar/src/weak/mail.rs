//! Internet mail (RFC 5322 + MIME, RFC 2045-2047) read into the parts
//! SpamAssassin's rules test: header fields (decoded and raw), the rendered
//! body text, the decoded raw body and the links. Also what a model reads
//! of a mail (`Mail::model_text`: subject and body text, no headers).
//!
//! A reader for corpora, not a mail client: multipart parts are walked
//! recursively; base64 and quoted-printable are decoded; UTF-8, US-ASCII
//! and Latin-1 / Windows-1252 text are decoded, other charsets as Latin-1;
//! HTML is turned to text by dropping tags, `<style>` and `<script>` and
//! decoding the common entities. Nothing here fails: a malformed mail gives
//! what could be read.

use base64::Engine;

/// One header field.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    /// As in the message, folding kept.
    pub raw: String,
}

/// A parsed mail.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub fields: Vec<Field>,
    /// Decoded text parts, HTML as is, parts separated by a blank line.
    pub raw_body: String,
    /// Rendered text: the subject, then each paragraph of the text parts
    /// (HTML turned to text) on one line.
    pub body: String,
    /// The links of the body (`http://`, `https://`, `ftp://`, `mailto:`,
    /// `www.`), in order, each once.
    pub uris: Vec<String>,
}

impl Mail {
    pub fn parse(msg: &str) -> Mail {
        let (fields, body) = split_header(msg);
        let mut mail = Mail {
            fields,
            ..Default::default()
        };
        let mut texts: Vec<(String, bool)> = Vec::new();
        walk(&mail.fields, body, &mut texts, 0);
        let mut raw = String::new();
        let mut rendered = String::new();
        for (t, html) in &texts {
            if !raw.is_empty() {
                raw.push_str("\n\n");
            }
            raw.push_str(t);
            let txt = if *html { html_to_text(t) } else { t.clone() };
            if !rendered.is_empty() {
                rendered.push_str("\n\n");
            }
            rendered.push_str(&txt);
        }
        let mut body = mail.header("Subject").unwrap_or_default();
        for p in paragraphs(&rendered) {
            if !body.is_empty() {
                body.push('\n');
            }
            body.push_str(&p);
        }
        mail.uris = uris(&raw);
        mail.raw_body = raw;
        mail.body = body;
        mail
    }

    /// Every field called `name` (case-insensitive), decoded and unfolded,
    /// joined by newlines; None when there is none.
    pub fn header(&self, name: &str) -> Option<String> {
        let v: Vec<String> = self
            .fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| decode_words(&unfold(&f.raw)))
            .collect();
        (!v.is_empty()).then(|| v.join("\n"))
    }

    /// As [`Mail::header`], without MIME word decoding and with folding kept.
    pub fn header_raw(&self, name: &str) -> Option<String> {
        let v: Vec<&str> = self
            .fields
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.raw.as_str())
            .collect();
        (!v.is_empty()).then(|| v.join("\n"))
    }

    /// Every field as `Name: value` lines.
    pub fn all_headers(&self, raw: bool) -> String {
        let mut s = String::new();
        for f in &self.fields {
            s.push_str(&f.name);
            s.push_str(": ");
            if raw {
                s.push_str(&f.raw);
            } else {
                s.push_str(&decode_words(&unfold(&f.raw)));
            }
            s.push('\n');
        }
        s
    }

    /// What a classifier reads: the subject, a blank line, the body text.
    pub fn model_text(&self) -> String {
        self.body.clone()
    }
}

/// Header fields and the body of a message or a part.
fn split_header(msg: &str) -> (Vec<Field>, &str) {
    let mut fields: Vec<Field> = Vec::new();
    let mut rest = msg;
    let mut first = true;
    loop {
        let (line, next) = match rest.find('\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let line_t = line.trim_end_matches('\r');
        if line_t.is_empty() {
            return (fields, next);
        }
        // An mbox `From ` line starts some corpus files.
        if first && line_t.starts_with("From ") {
            first = false;
            rest = next;
            continue;
        }
        first = false;
        if line_t.starts_with([' ', '\t']) {
            if let Some(f) = fields.last_mut() {
                f.raw.push('\n');
                f.raw.push_str(line_t);
            }
        } else if let Some((n, v)) = line_t.split_once(':') {
            if n.is_empty() || n.contains(char::is_whitespace) {
                // Not a header: the body starts here.
                return (fields, rest);
            }
            fields.push(Field {
                name: n.to_string(),
                raw: v.trim_start().to_string(),
            });
        } else {
            return (fields, rest);
        }
        if next.is_empty() {
            return (fields, "");
        }
        rest = next;
    }
}

fn unfold(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\n', "")
}

fn field<'a>(fields: &'a [Field], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name))
        .map(|f| f.raw.as_str())
}

/// A parameter of a structured field (`boundary`, `charset`).
fn param(value: &str, key: &str) -> Option<String> {
    let v = unfold(value);
    let lower = v.to_ascii_lowercase();
    let mut from = 0;
    while let Some(i) = lower[from..].find(key) {
        let at = from + i;
        let before_ok = at == 0 || matches!(lower.as_bytes()[at - 1], b';' | b' ' | b'\t');
        let after = lower[at + key.len()..].trim_start();
        if before_ok && after.starts_with('=') {
            let start = v.len() - after.len() + 1;
            let raw = v[start..].trim_start();
            let val = if let Some(q) = raw.strip_prefix('"') {
                q.split('"').next().unwrap_or("")
            } else {
                raw.split([';', ' ', '\t']).next().unwrap_or("")
            };
            return Some(val.to_string());
        }
        from = at + key.len();
    }
    None
}

/// Collect the text parts of a part (recursing into multiparts).
fn walk(fields: &[Field], body: &str, out: &mut Vec<(String, bool)>, depth: usize) {
    let ctype = field(fields, "Content-Type").unwrap_or("text/plain");
    let mime = unfold(ctype)
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime.starts_with("multipart/") && depth < 20 {
        if let Some(b) = param(ctype, "boundary") {
            let delim = format!("--{b}");
            let mut parts = body.split(delim.as_str());
            parts.next(); // the preamble
            for p in parts {
                if p.starts_with("--") {
                    break; // the closing delimiter
                }
                let p = p
                    .strip_prefix("\r\n")
                    .or_else(|| p.strip_prefix('\n'))
                    .unwrap_or(p);
                let (f, b) = split_header(p);
                walk(&f, b, out, depth + 1);
            }
            return;
        }
    }
    let mime = if mime.starts_with("multipart/") {
        "text/plain".to_string() // no boundary: read as text
    } else {
        mime
    };
    if mime.starts_with("message/rfc822") && depth < 20 {
        let (f, b) = split_header(body);
        walk(&f, b, out, depth + 1);
        return;
    }
    if !(mime.is_empty() || mime.starts_with("text/")) {
        return; // attachments: images, applications
    }
    let cte = field(fields, "Content-Transfer-Encoding")
        .map(|s| s.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let bytes: Vec<u8> = match cte.as_str() {
        "base64" => {
            let clean: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            base64::engine::general_purpose::STANDARD
                .decode(clean.trim_end_matches('='))
                .or_else(|_| {
                    base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(clean.trim_end_matches('='))
                })
                .unwrap_or_else(|_| body.as_bytes().to_vec())
        }
        "quoted-printable" => quoted_printable(body),
        _ => body.as_bytes().to_vec(),
    };
    let charset = param(ctype, "charset").unwrap_or_default();
    out.push((decode_charset(&bytes, &charset), mime == "text/html"));
}

fn decode_charset(bytes: &[u8], charset: &str) -> String {
    let c = charset.to_ascii_lowercase();
    if c.is_empty() || c == "utf-8" || c == "utf8" || c == "us-ascii" {
        if let Ok(s) = std::str::from_utf8(bytes) {
            return s.to_string();
        }
    }
    // Latin-1 for the rest (and for broken UTF-8): every byte is a char.
    bytes.iter().map(|&b| b as char).collect()
}

fn hexval(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn quoted_printable(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if i + 2 < b.len() + 1 && b.get(i + 1) == Some(&b'\n') {
                i += 2;
                continue;
            }
            if b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hexval(c)),
                b.get(i + 2).and_then(|&c| hexval(c)),
            ) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// RFC 2047 encoded words (`=?charset?B|Q?text?=`) decoded.
pub fn decode_words(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    let mut last_was_word = false;
    while let Some(i) = rest.find("=?") {
        let before = &rest[..i];
        let tail = &rest[i + 2..];
        let parsed = (|| {
            let (cs, t) = tail.split_once('?')?;
            let (enc, t) = t.split_once('?')?;
            let end = t.find("?=")?;
            let text = &t[..end];
            let bytes = match enc.to_ascii_lowercase().as_str() {
                "b" => base64::engine::general_purpose::STANDARD
                    .decode(text.trim_end_matches('='))
                    .or_else(|_| {
                        base64::engine::general_purpose::STANDARD_NO_PAD
                            .decode(text.trim_end_matches('='))
                    })
                    .ok()?,
                "q" => quoted_printable(&text.replace('_', " ")),
                _ => return None,
            };
            Some((decode_charset(&bytes, cs), cs.len() + enc.len() + end + 4))
        })();
        match parsed {
            Some((text, used)) => {
                // Whitespace between two encoded words is dropped.
                if !(last_was_word && before.trim().is_empty()) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &tail[used..];
                last_was_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = tail;
                last_was_word = false;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Paragraphs (runs of non-blank lines) joined into one line each, with
/// runs of whitespace squeezed, as SpamAssassin's rendered body.
fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        for w in line.split_whitespace() {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(w);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// HTML to text: tags dropped (block tags end a paragraph), `<style>`,
/// `<script>` and comments dropped, entities decoded.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let lower = html.to_ascii_lowercase();
    let b = html.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'<' {
            if lower[i..].starts_with("<!--") {
                i = lower[i..].find("-->").map_or(b.len(), |j| i + j + 3);
                continue;
            }
            for skip in ["style", "script"] {
                if lower[i + 1..].starts_with(skip) {
                    let close = format!("</{skip}");
                    if let Some(j) = lower[i..].find(&close) {
                        i += j;
                    }
                }
            }
            let end = lower[i..].find('>').map_or(b.len(), |j| i + j + 1);
            let tag = &lower[i..end];
            let name: String = tag
                .trim_start_matches(['<', '/'])
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if matches!(
                name.as_str(),
                "p" | "div" | "br" | "tr" | "li" | "table" | "h1" | "h2" | "h3" | "h4" | "td"
            ) {
                out.push_str(if name == "br" || name == "td" {
                    " "
                } else {
                    "\n\n"
                });
            } else {
                out.push(' ');
            }
            i = end;
            continue;
        }
        if b[i] == b'&' {
            if let Some(j) = html[i..].find(';').filter(|&j| j <= 10) {
                let ent = &html[i + 1..i + j];
                let c = match ent {
                    "nbsp" => Some(' '),
                    "amp" => Some('&'),
                    "lt" => Some('<'),
                    "gt" => Some('>'),
                    "quot" => Some('"'),
                    "apos" => Some('\''),
                    _ => ent
                        .strip_prefix("#x")
                        .or_else(|| ent.strip_prefix("#X"))
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .or_else(|| ent.strip_prefix('#').and_then(|d| d.parse().ok()))
                        .and_then(char::from_u32),
                };
                if let Some(c) = c {
                    out.push(c);
                    i += j + 1;
                    continue;
                }
            }
        }
        let c = html[i..].chars().next().unwrap_or(' ');
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Links in a text (plain or HTML), each once, in order.
fn uris(text: &str) -> Vec<String> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(r#"(?i)\b(?:https?://|ftp://|mailto:|www\.)[^\s<>"'`()\[\]{}]+"#)
            .expect("a valid pattern")
    });
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for m in re.find_iter(text) {
        let u = m
            .as_str()
            .trim_end_matches(['.', ',', ';', '!', '?'])
            .to_string();
        if seen.insert(u.clone()) {
            out.push(u);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIL: &str = "From bob@x.com  Thu Aug 22 12:36:23 2002\n\
Return-Path: <bob@x.com>\n\
From: =?iso-8859-1?Q?Jos=E9?= <jose@example.com>\n\
Subject: Cheap =?utf-8?B?bWVkcw==?= now\n\
Received: from a\n\tby b\n\
Received: from c\n\
Content-Type: multipart/alternative; boundary=\"XX\"\n\
\n\
preamble\n\
--XX\n\
Content-Type: text/plain; charset=iso-8859-1\n\
Content-Transfer-Encoding: quoted-printable\n\
\n\
Caf=E9 deals at http://cheap.example/offer.\n\
Second line of the =\n\
same paragraph.\n\
\n\
New paragraph.\n\
--XX\n\
Content-Type: text/html\n\
Content-Transfer-Encoding: base64\n\
\n\
PHA+SGVsbG8gJmFtcDsgPGEgaHJlZj0iaHR0cHM6Ly93d3cuZXhhbXBsZS5vcmcvIj5saW5rPC9hPjwvcD48c3R5bGU+cHtjb2xvcjpyZWR9PC9zdHlsZT4=\n\
--XX--\n";

    #[test]
    fn headers_parts_and_text() {
        let m = Mail::parse(MAIL);
        assert_eq!(m.header("subject").unwrap(), "Cheap meds now");
        assert_eq!(m.header("From").unwrap(), "José <jose@example.com>");
        assert_eq!(
            m.header_raw("From").unwrap(),
            "=?iso-8859-1?Q?Jos=E9?= <jose@example.com>"
        );
        assert_eq!(m.header("Received").unwrap(), "from a\tby b\nfrom c");
        assert!(m.header("X-Nothing").is_none());
        // Subject first, then one line per paragraph, HTML rendered.
        let lines: Vec<&str> = m.body.lines().collect();
        assert_eq!(
            lines,
            [
                "Cheap meds now",
                "Café deals at http://cheap.example/offer. Second line of the same paragraph.",
                "New paragraph.",
                "Hello & link",
            ]
        );
        assert!(m.raw_body.contains("<a href=\"https://www.example.org/\">"));
        assert_eq!(
            m.uris,
            ["http://cheap.example/offer", "https://www.example.org/"]
        );
        assert!(m
            .all_headers(false)
            .starts_with("Return-Path: <bob@x.com>\nFrom: José"));
    }

    #[test]
    fn malformed_mail_gives_what_can_be_read() {
        let m = Mail::parse("no header here\njust text");
        assert!(m.fields.is_empty());
        assert_eq!(m.body, "no header here just text");
        let m = Mail::parse("Subject: x\nContent-Type: multipart/mixed\n\nbody without boundary");
        assert_eq!(m.body, "x\nbody without boundary");
        let m = Mail::parse("");
        assert_eq!(m.body, "");
        assert_eq!(decode_words("=?bad"), "=?bad");
        assert_eq!(decode_words("=?utf-8?X?abc?= tail"), "=?utf-8?X?abc?= tail");
    }
}
