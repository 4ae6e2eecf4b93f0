//! Chat templates: the Jinja template a Hugging Face tokenizer config carries, rendered with
//! `minijinja` the way `transformers`' `apply_chat_template` renders it.
//!
//! What matches `transformers`: blocks trim their trailing newline and leading indentation
//! (`trim_blocks`, `lstrip_blocks`), `{% break %}`/`{% continue %}`, the variables `messages`,
//! `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`), `raise_exception(message)`, a `tojson` filter that writes what Python's
//! `json.dumps` writes (`indent`, `sort_keys`, `separators`, `ensure_ascii` keyword
//! arguments), and the `{% generation %}` tag (it only marks assistant text for training
//! masks; Huginn's template uses it), plus everything core minijinja has (loop variables,
//! `namespace`, the Jinja filters and tests). Not available: Python methods on values
//! (`.strip()`, `.items()`, `.startswith()`; they need minijinja-contrib's `pycompat`: use the
//! filters `|trim`, `|items`, or the test `is startingwith`), `strftime_now`, tools and documents.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use thiserror::Error as ThisError;

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The name templates compare against.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A message is the map `{"role": …, "content": …}` in templates, keys in that order (as
/// `tojson` shows them).
impl Object for Message {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str()? {
            "role" => Some(Value::from(self.role.as_str())),
            "content" => Some(Value::from(self.content.as_str())),
            _ => None,
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// The special tokens a template may refer to, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
}

#[derive(Debug, ThisError)]
pub enum ChatError {
    #[error("invalid chat template: {0}")]
    Template(Error),
    #[error("chat template failed: {0}")]
    Render(Error),
    #[error("a message contains U+{0:04X}, which marks the assistant's text when training")]
    Marker(u32),
}

/// A compiled chat template with the special tokens it renders.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special: SpecialTokens,
}

const NAME: &str = "chat_template";
/// The same template with `{% generation %}` bodies wrapped in [`OPEN`] and [`CLOSE`].
const MARKED: &str = "chat_template_marked";
/// Private-use characters around the assistant's text in a [`MARKED`] rendering.
const OPEN: char = '\u{F8FE}';
const CLOSE: char = '\u{F8FF}';

impl ChatTemplate {
    pub fn new(source: &str, special: SpecialTokens) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(syntax.build().map_err(ChatError::Template)?);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_filter("assistant_text", |body: String| format!("{OPEN}{body}{CLOSE}"));
        env.add_template_owned(NAME, rewrite_generation_tags(source, "if true", "endif"))
            .map_err(ChatError::Template)?;
        env.add_template_owned(
            MARKED,
            rewrite_generation_tags(source, "filter assistant_text", "endfilter"),
        )
        .map_err(ChatError::Template)?;
        Ok(Self { env, special })
    }

    /// The whole conversation as training text, with the byte ranges of the assistant's text:
    /// what the template's `{% generation %}` tags enclose (`transformers`' assistant mask).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>), ChatError> {
        if let Some(c) = messages
            .iter()
            .flat_map(|m| m.content.chars())
            .find(|c| [OPEN, CLOSE].contains(c))
        {
            return Err(ChatError::Marker(c as u32));
        }
        let marked = self.render_named(MARKED, messages, false)?;
        let (mut text, mut spans, mut start) = (String::with_capacity(marked.len()), Vec::new(), None);
        for c in marked.chars() {
            match c {
                OPEN => start = Some(text.len()),
                CLOSE => spans.extend(start.take().map(|s| s..text.len())),
                c => text.push(c),
            }
        }
        Ok((text, spans))
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        self.render_named(NAME, messages, add_generation_prompt)
    }

    fn render_named(&self, name: &str, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let messages: Vec<Value> = messages.iter().map(|m| Value::from_object(m.clone())).collect();
        let mut context = BTreeMap::from([
            ("messages", Value::from(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        // As in `transformers`, a special token the tokenizer lacks is undefined, not none.
        let s = &self.special;
        for (name, token) in [
            ("bos_token", &s.bos),
            ("eos_token", &s.eos),
            ("pad_token", &s.pad),
            ("unk_token", &s.unk),
        ] {
            if let Some(token) = token {
                context.insert(name, Value::from(token.as_str()));
            }
        }
        let template = self.env.get_template(name).map_err(ChatError::Template)?;
        template.render(context).map_err(ChatError::Render)
    }
}

/// `transformers` renders `{% generation %}…{% endgeneration %}` as its body and records which
/// characters are the assistant's. Here the tags become `open` and `close` (an always-true
/// `if` to render, a filter block to mark), keeping their whitespace control.
fn rewrite_generation_tags(source: &str, open: &str, close: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let trimmed = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let replacement = match trimmed {
            "generation" => Some(open),
            "endgeneration" => Some(close),
            _ => None,
        };
        match replacement {
            Some(word) => {
                out.push_str("{%");
                out.push_str(&inner.replacen(trimmed, word, 1));
                out.push_str("%}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Templates call this to reject conversations they cannot format.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// `transformers`' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ));
        }
        // Python drops the space after commas when indenting.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let json = Json {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item,
        key,
    };
    let mut out = String::new();
    json.write(&mut out, value, 0)?;
    Ok(Value::from_safe_string(out))
}

struct Json {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item: String,
    key: String,
}

impl Json {
    fn write(&self, out: &mut String, value: &Value, depth: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => match value.as_i64() {
                Some(i) if value.is_integer() => write!(out, "{i}").expect("writing to a String"),
                _ => {
                    let f = f64::try_from(value.clone())?;
                    write!(out, "{f:?}").expect("writing to a String")
                }
            },
            ValueKind::String => self.string(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.container(out, '[', ']', &items, depth, |out, v| self.write(out, v, depth + 1))?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, '{', '}', &keys, depth, |out, k| {
                    self.string(out, &k.to_string());
                    out.push_str(&self.key);
                    self.write(out, &value.get_item(k)?, depth + 1)
                })?;
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a {}", value.kind()),
                ));
            }
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        items: &[Value],
        depth: usize,
        mut each: impl FnMut(&mut String, &Value) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item);
            }
            newline(out, depth + 1);
            each(out, item)?;
        }
        newline(out, depth);
        out.push(close);
        Ok(())
    }

    /// A JSON string as Python escapes it.
    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !c.is_ascii()) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        write!(out, "\\u{unit:04x}").expect("writing to a String");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Huginn-0125's template, as `evaluate_raven/checkpoint_to_hf_converter.py` uploads it
    /// with the tokenizer.
    pub(crate) const HUGINN_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set start_content = '<|begin_header|>' %}{% set end_content = message['content'] | trim  + '<|end_turn|>' %}{% if loop.index0 == 0 %}{% set start_content = bos_token + start_content %}{% endif %}{% if message['role'] == 'Huginn' or message['role'] == 'assistant' %}{% set start_content = start_content + 'Huginn<|end_header|>\\n\\n' %}{{ start_content }}{% generation %}{{ end_content }}{% endgeneration %}{% else %}{% set start_content = start_content + message['role'] + '<|end_header|>\\n\\n' %}{{ start_content }}{{ end_content }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|begin_header|>Huginn<|end_header|>\\n\\n' }}{% else %}{{ '<|end_text|>' }}{% endif %}";

    fn huginn() -> ChatTemplate {
        let special = SpecialTokens {
            bos: Some("<|begin_text|>".into()),
            eos: Some("<|end_text|>".into()),
            pad: Some("<|pad|>".into()),
            unk: None,
        };
        ChatTemplate::new(HUGINN_TEMPLATE, special).unwrap()
    }

    #[test]
    fn huginns_template_renders_as_the_reference() {
        let messages = [
            Message::new(Role::System, "You are a helpful assistant."),
            Message::new(Role::User, "  What is 2+2?\n"),
        ];
        assert_eq!(
            huginn().render(&messages, true).unwrap(),
            "<|begin_text|><|begin_header|>system<|end_header|>\n\nYou are a helpful assistant.<|end_turn|>\
             <|begin_header|>user<|end_header|>\n\nWhat is 2+2?<|end_turn|>\
             <|begin_header|>Huginn<|end_header|>\n\n"
        );
        // The assistant speaks as Huginn; a finished conversation ends the text.
        let messages = [Message::new(Role::User, "Hi"), Message::new(Role::Assistant, "Hello.")];
        assert_eq!(
            huginn().render(&messages, false).unwrap(),
            "<|begin_text|><|begin_header|>user<|end_header|>\n\nHi<|end_turn|>\
             <|begin_header|>Huginn<|end_header|>\n\nHello.<|end_turn|><|end_text|>"
        );
    }

    #[test]
    fn assistant_spans_are_what_the_generation_tags_enclose() {
        let messages = [
            Message::new(Role::User, "Hi"),
            Message::new(Role::Assistant, " Hello. "),
            Message::new(Role::User, "Bye"),
            Message::new(Role::Assistant, "Bye!"),
        ];
        let (text, spans) = huginn().render_with_assistant_spans(&messages).unwrap();
        assert_eq!(text, huginn().render(&messages, false).unwrap());
        let marked: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(marked, ["Hello.<|end_turn|>", "Bye!<|end_turn|>"]);
        // Without the tags nothing is the assistant's; a marker in a message is refused.
        let plain = ChatTemplate::new("{{ messages[0].content }}", SpecialTokens::default()).unwrap();
        assert!(plain.render_with_assistant_spans(&messages).unwrap().1.is_empty());
        let err = huginn()
            .render_with_assistant_spans(&[Message::new(Role::User, "a\u{F8FF}")])
            .unwrap_err();
        assert!(err.to_string().contains("U+F8FF"), "{err}");
    }

    #[test]
    fn blocks_trim_like_transformers_and_loop_controls_work() {
        let source = "{% for m in messages %}\n  {% if m.role == 'system' %}{% continue %}{% endif %}\n[{{ loop.index }}/{{ loop.length }} {{ m.role }}] {{ m.content }}\n{% endfor %}\n{%- if add_generation_prompt %}>{% endif %}";
        let t = ChatTemplate::new(source, SpecialTokens::default()).unwrap();
        let messages = [
            Message::new(Role::System, "s"),
            Message::new(Role::User, "u"),
            Message::new(Role::Assistant, "a"),
        ];
        assert_eq!(t.render(&messages, true).unwrap(), "[2/3 user] u\n[3/3 assistant] a\n>");
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            rewrite_generation_tags(
                "a {%- generation +%} b {% endgeneration -%} {% if x %}",
                "if true",
                "endif"
            ),
            "a {%- if true +%} b {% endif -%} {% if x %}"
        );
        assert_eq!(
            rewrite_generation_tags("{% generation", "if true", "endif"),
            "{% generation"
        );
    }

    #[test]
    fn raise_exception_and_bad_templates_are_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversations must start with the user') }}{% endif %}",
            SpecialTokens::default(),
        )
        .unwrap();
        let err = t.render(&[Message::new(Role::System, "s")], false).unwrap_err();
        assert!(
            err.to_string().contains("Conversations must start with the user"),
            "{err}"
        );
        let err = ChatTemplate::new("{% for m in messages %}", SpecialTokens::default()).unwrap_err();
        assert!(err.to_string().starts_with("invalid chat template: "), "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let render = |source: &str| {
            ChatTemplate::new(source, SpecialTokens::default())
                .unwrap()
                .render(&[Message::new(Role::User, "say \"hé\"\n<b>")], false)
                .unwrap()
        };
        assert_eq!(
            render("{{ messages | tojson }}"),
            r#"[{"role": "user", "content": "say \"hé\"\n<b>"}]"#
        );
        assert_eq!(
            render("{{ messages[0].content | tojson(ensure_ascii=true) }}"),
            r#""say \"h\u00e9\"\n<b>""#
        );
        assert_eq!(
            render("{{ {'b': [1, 2.5, none, true], 'a': {}} | tojson(indent=2, sort_keys=true) }}"),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
        );
        assert_eq!(render("{{ [1, 2] | tojson(separators=[',', ':']) }}"), "[1,2]");
    }
}
