//! Text that a plugin or a producer supplies, made safe to print: a log line or a
//! terminal must show it, never obey it. A newline inside it would forge a whole log
//! line; ESC, CR or backspace would rewrite what an operator's terminal shows.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character (C0, DEL and C1) written as a visible escape:
/// `\n`, `\r`, `\t`, `\\`, or `\x1b` / `\u{85}`. Other text, non-ASCII included, is
/// left as it is; a backslash is doubled only when the text needed escaping, so an
/// escaped text cannot be mistaken for a plain one.
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\\' => escaped.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => {
                let _ = write!(escaped, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(escaped, "\\u{{{:x}}}", c as u32);
            }
            c => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_and_plain_text_is_untouched() {
        assert!(matches!(escape_controls("plain, é ✓"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\nFAKE ERROR\r\x1b[2J\u{85}\\"),
            "a\\nFAKE ERROR\\r\\x1b[2J\\u{85}\\\\"
        );
    }
}
