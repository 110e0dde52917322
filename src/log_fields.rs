//! How the text log writes the fields of spans and events: the same text as tracing-subscriber's default
//! (`name=value`, separated by spaces, the message bare), written without its styling machinery when the log
//! has no colours, which is every log that is not a terminal.
//!
//! The fields of a span are formatted when the span is made, whether or not a line is ever written inside it
//! (a request's span is made only when needed: see `log_scope`, but a TCP connection's is made for each). The
//! default formatter paints each field name and `=` (with empty styles when colours are off) through a nested
//! `write!`; that was a tenth of a worker's instructions per request on a small response. This one writes the
//! name and `=` directly and only the value through `fmt`.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};

/// The fields' formatter of the text log: [`DefaultFields`]' text, without its cost when there is no colour.
#[derive(Debug, Default)]
pub(crate) struct PlainFields;

impl<'w> MakeVisitor<Writer<'w>> for PlainFields {
    type Visitor = PlainVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> PlainVisitor<'w> {
        PlainVisitor {
            colours: target.has_ansi_escapes(),
            writer: target,
            is_empty: true,
            result: Ok(()),
        }
    }
}

/// Writes fields as [`DefaultVisitor`] does; the fields it treats specially (the message, raw identifiers,
/// `log.` metadata, errors) and every field of a coloured log are handed to a [`DefaultVisitor`], so their
/// text is the default's by construction.
pub(crate) struct PlainVisitor<'w> {
    writer: Writer<'w>,
    colours: bool,
    /// Nothing was written yet: the next field needs no separating space.
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Whether `DefaultVisitor` must write this field for the text to be the default's.
    fn special(&self, name: &str) -> bool {
        self.colours || name == "message" || name.starts_with("r#") || name.starts_with("log.")
    }

    /// Lets a [`DefaultVisitor`] write one field, continuing where this one is.
    fn delegate(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut inner = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut inner);
        self.result = inner.finish();
        // A `log.` field is metadata the default skips: it writes nothing, so no separator is owed after it.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if self.special(field.name()) {
            self.delegate(field, |v| v.record_str(field, value));
        } else {
            // As the default: a str value is written with Debug, quoted.
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        self.delegate(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if self.special(name) {
            self.delegate(field, |v| v.record_debug(field, value));
            return;
        }
        let writer = &mut self.writer;
        self.result = (|| {
            if !self.is_empty {
                writer.write_char(' ')?;
            }
            writer.write_str(name)?;
            writer.write_char('=')?;
            write!(writer, "{value:?}")
        })();
        self.is_empty = false;
    }
}

impl VisitOutput<fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::DefaultFields;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failure")]
    struct Outer(#[source] std::io::Error);

    /// Logs the same spans and events through a subscriber with the given fields' formatter.
    fn log_with<N>(fields: N, ansi: bool) -> String
    where
        N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(fields)
            .with_ansi(ansi)
            .without_time()
            .with_writer(lines.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let path = String::from("/a b?q=\u{e9}");
            let conn = tracing::info_span!("conn", peer = "unix", listener = "/run/app.sock");
            let _c = conn.enter();
            let request = tracing::info_span!("request", method = %"GET", path = %path, r#type = 3);
            let _r = request.enter();
            tracing::info!(status = 200, bytes = 11u64, ok = true, ratio = 0.5, "GET {path}");
            tracing::warn!(error = %"a \"quoted\" display", "closing connection");
            let error = Outer(std::io::Error::other("inner cause"));
            tracing::error!(error = &error as &(dyn std::error::Error + 'static), debug = ?Some("x"), "failed");
            tracing::info!(empty = "", "\u{1b}[31mescaped message\u{1b}[0m");
            tracing::info!(only = 1);
        });
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_text_is_the_default_formatters() {
        for ansi in [false, true] {
            let ours = log_with(PlainFields, ansi);
            let default = log_with(DefaultFields::new(), ansi);
            assert_eq!(ours, default, "ansi={ansi}");
            assert_eq!(ours.lines().count(), 5, "{ours}");
        }
        let plain = log_with(PlainFields, false);
        assert!(
            plain.contains(
                "conn{peer=\"unix\" listener=\"/run/app.sock\"}:request{method=GET path=/a b?q=\u{e9} type=3}"
            ),
            "{plain}"
        );
    }
}
