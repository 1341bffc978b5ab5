//! Untrusted text in errors and logs: escaped and cut short.
//!
//! Rule: a value that came from a request (a volume ID, a path, a reference) reaches a message
//! or a log line only through [`shown`] or [`Shown`]: control characters are escaped (a
//! newline in a volume ID cannot forge a log line, an ESC cannot drive a terminal) and the
//! value is cut to a bounded length (one call cannot write a megabyte to the log, and an error
//! stays small enough for every gRPC client to receive it).

use std::fmt;

/// How many characters of an untrusted value are shown.
pub const SHOWN_CHARS: usize = 160;
/// The longest message a gRPC status carries (clients refuse large metadata).
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// `text` quoted, with control characters escaped, cut to [`SHOWN_CHARS`] characters.
pub fn shown(text: &str) -> String {
    Shown(text).to_string()
}

/// Displays untrusted text as [`shown`] does, without allocating.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for (count, c) in self.0.chars().enumerate() {
            if count == SHOWN_CHARS {
                return write!(f, "…\" ({} bytes)", self.0.len());
            }
            write!(f, "{}", c.escape_debug())?;
        }
        f.write_str("\"")
    }
}

/// A whole message made safe to log and to send: control characters other than none are
/// escaped and the text is cut to `max_bytes` (on a character boundary).
pub fn bounded(message: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(message.len().min(max_bytes));
    for c in message.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > max_bytes {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// An error and its causes as one line, `a: b: c`, leaving out a cause whose text the line
/// already holds (many errors print their source in their own message).
pub fn chain<'a>(
    errors: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut line = String::new();
    for error in errors {
        let text = error.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_say_each_cause_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "transport error: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = std::io::Error::from_raw_os_error(2);
        let outer = Outer(std::io::Error::from_raw_os_error(2));
        let errors: Vec<&(dyn std::error::Error + 'static)> = vec![&outer, &inner];
        assert_eq!(
            chain(errors),
            "transport error: No such file or directory (os error 2)"
        );
        let other = std::io::Error::from_raw_os_error(13);
        let errors: Vec<&(dyn std::error::Error + 'static)> = vec![&outer, &other];
        assert!(chain(errors).ends_with(": Permission denied (os error 13)"));
    }

    #[test]
    fn control_characters_are_escaped_and_length_is_bounded() {
        assert_eq!(shown("pvc-1"), "\"pvc-1\"");
        assert_eq!(shown("a\nb\u{1b}[31m"), "\"a\\nb\\u{1b}[31m\"");
        let long = "x".repeat(1 << 20);
        let cut = shown(&long);
        assert!(cut.len() < 200, "{}", cut.len());
        assert!(cut.ends_with("(1048576 bytes)"), "{cut}");
        assert_eq!(bounded("line\nforged", 100), "line\\nforged");
        let message = bounded(&"é".repeat(5000), MAX_MESSAGE_BYTES);
        assert!(message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(!message.contains('\n'));
    }
}
