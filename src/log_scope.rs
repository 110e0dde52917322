//! A request's span, made only when something needs it: a log line written while the request runs, a span made
//! inside it, or a watchdog that may log for it later. Most requests log nothing, and making, entering and
//! closing a span per request (the registry's slab, the filter's scope, the fields' text) was measured to cost
//! a worker about a fifteenth of its CPU per request on a small Flask view, far more than its instruction count
//! suggests, since that code runs cold between two calls into Python.
//!
//! A [`LogScope`] holds either a span already made or what the request span needs: its parent, the
//! connection's span ([`ConnSpan`]: a Unix listener's, made once and shared, or a TCP peer's, itself made only
//! when needed), and the method and path. While an app thread runs the request it is entered
//! ([`LogScope::enter`]): the deferred span is parked in a thread-local, and [`Deferring`], the subscriber
//! wrapped around the log's, makes and enters it there just before the first event or span that would have
//! been inside it, so every line is written exactly as it would have been with the span made up front.

use std::any::TypeId;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tracing::callsite::{DefaultCallsite, Identifier};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{FieldSet, display};
use tracing::level_filters::LevelFilter;
use tracing::metadata::Kind;
use tracing::span::{Attributes, EnteredSpan, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Level, Metadata, Span, Subscriber};
use tracing_core::span::Current;

/// The target of the connection's and the request's spans: the module that made them before they were
/// deferred, so a `RUST_LOG` directive that names it keeps matching.
const REQUEST_TARGET: &str = "ferrule::connection::read::open";

/// A span's callsite and metadata, as the span macros make them, for a span of two fields.
macro_rules! span_site {
    ($site:ident, $callsite:ident, $meta:ident, $name:literal, [$first:literal, $second:literal]) => {
        static $callsite: DefaultCallsite = DefaultCallsite::new(&$meta);
        static $meta: Metadata<'static> = Metadata::new(
            $name,
            REQUEST_TARGET,
            Level::INFO,
            Some(file!()),
            Some(line!()),
            Some(REQUEST_TARGET),
            FieldSet::new(&[$first, $second], Identifier(&$callsite)),
            Kind::SPAN,
        );
        static $site: SpanSite = SpanSite {
            callsite: &$callsite,
            meta: &$meta,
        };
    };
}

span_site!(CONN, CONN_CALLSITE, CONN_META, "conn", ["peer", "listener"]);
span_site!(REQUEST, REQUEST_CALLSITE, REQUEST_META, "request", ["method", "path"]);

/// Where the spans of one kind are made: their callsite and its metadata.
struct SpanSite {
    callsite: &'static DefaultCallsite,
    meta: &'static Metadata<'static>,
}

impl SpanSite {
    /// Makes a span with its two fields' values, inside `parent` (a root span without one), through
    /// `dispatch`; disabled when the log's filter leaves it out, as the span macros decide it.
    fn make(&self, parent: Option<&Span>, values: [&dyn tracing::Value; 2], dispatch: &Dispatch) -> Span {
        let interest = self.callsite.interest();
        let wanted = Level::INFO <= LevelFilter::current()
            && !interest.is_never()
            && (interest.is_always() || dispatch.enabled(self.meta));
        let fields = self.meta.fields();
        let mut names = fields.iter();
        let (true, Some(first), Some(second)) = (wanted, names.next(), names.next()) else {
            return Span::none();
        };
        let values = [(&first, Some(values[0])), (&second, Some(values[1]))];
        Span::child_of_with(
            parent.and_then(Span::id),
            self.meta,
            &fields.value_set(&values),
            dispatch,
        )
    }
}

/// Registers the spans' callsites, so the log's filter has seen them (and made any matcher a directive on
/// them needs). Only atomic loads after the first call. Called before a span may be made, and never from
/// inside a call to the subscriber: registering looks up the current subscriber, which is not available there
/// when the subscriber is a scoped one.
fn register_callsites() {
    REQUEST_CALLSITE.interest();
    CONN_CALLSITE.interest();
}

/// Makes the span of one connection, `conn{peer=.. listener=..}` (a Unix socket's peer is `"unix"`), a root
/// span, through `dispatch`.
fn make_conn_span(peer: Option<SocketAddr>, listener: &str, dispatch: &Dispatch) -> Span {
    let tcp_peer = peer.map(display);
    let peer: &dyn tracing::Value = match &tcp_peer {
        Some(addr) => addr,
        None => &"unix",
    };
    CONN.make(None, [peer, &listener], dispatch)
}

/// Makes the span of one connection now.
pub(crate) fn conn_span(peer: Option<SocketAddr>, listener: &str) -> Span {
    register_callsites();
    tracing::dispatcher::get_default(|dispatch| make_conn_span(peer, listener, dispatch))
}

/// A connection's span: made already (a Unix listener's, shared by all its connections), or a TCP peer's,
/// made only when needed.
#[derive(Clone)]
pub(crate) enum ConnSpan {
    Made(Arc<Span>),
    Tcp { peer: SocketAddr, listener: Arc<str> },
}

impl ConnSpan {
    /// The span, made now if it was not (for a connection that is read on the async side, in its span).
    pub(crate) fn span(&self) -> Span {
        register_callsites();
        tracing::dispatcher::get_default(|dispatch| self.make(dispatch))
    }

    fn make(&self, dispatch: &Dispatch) -> Span {
        match self {
            ConnSpan::Made(span) => Span::clone(span),
            ConnSpan::Tcp { peer, listener } => make_conn_span(Some(*peer), listener, dispatch),
        }
    }
}

/// Makes the span of one request, `request{method=.. path=..}`, inside `parent`, through `dispatch`.
fn make_request_span(parent: &Span, method: &[u8], path: &[u8], dispatch: &Dispatch) -> Span {
    let method = String::from_utf8_lossy(method);
    let path = String::from_utf8_lossy(path);
    REQUEST.make(Some(parent), [&display(&method), &display(&path)], dispatch)
}

/// Makes the span of one request now, inside `parent` (a request read on the async side, which runs in it).
pub(crate) fn request_span(parent: &Span, method: &[u8], path: &[u8]) -> Span {
    register_callsites();
    tracing::dispatcher::get_default(|dispatch| make_request_span(parent, method, path, dispatch))
}

/// What a request span needs to be made later.
struct Deferred {
    /// The connection's span, the request span's parent.
    parent: ConnSpan,
    method: Bytes,
    path: Bytes,
}

impl Deferred {
    /// Makes the request span (and its connection's, for a TCP peer: the request span keeps it open).
    fn make(&self, dispatch: &Dispatch) -> Span {
        make_request_span(&self.parent.make(dispatch), &self.method, &self.path, dispatch)
    }
}

/// The span a request's log lines go in: made already, or made when first needed.
pub(crate) struct LogScope(Scope);

enum Scope {
    Made(Span),
    Deferred(Deferred),
}

impl LogScope {
    /// A span made already.
    pub(crate) fn made(span: Span) -> LogScope {
        LogScope(Scope::Made(span))
    }

    /// The request span `request{method=.. path=..}` inside `parent`, made only when needed.
    pub(crate) fn deferred(parent: ConnSpan, method: Bytes, path: Bytes) -> LogScope {
        register_callsites();
        LogScope(Scope::Deferred(Deferred { parent, method, path }))
    }

    /// The span, made now if it was deferred (for a holder on another thread, such as the watchdog).
    pub(crate) fn span(&mut self) -> Span {
        if let Scope::Deferred(deferred) = &self.0 {
            let span = tracing::dispatcher::get_default(|dispatch| deferred.make(dispatch));
            self.0 = Scope::Made(span);
        }
        match &self.0 {
            Scope::Made(span) => span.clone(),
            Scope::Deferred(_) => Span::none(),
        }
    }

    /// Enters the scope on this thread until the guard is dropped: a made span is entered; a deferred one is
    /// made and entered by [`Deferring`] if a line is written or a span made on this thread meanwhile.
    pub(crate) fn enter(self) -> Entered {
        match self.0 {
            Scope::Made(span) => Entered(Some(span.entered())),
            Scope::Deferred(deferred) => {
                PENDING.with(|pending| {
                    *pending.borrow_mut() = Some(Pending {
                        deferred,
                        entered: None,
                    })
                });
                Entered(None)
            }
        }
    }
}

/// A request's scope entered on this thread (see [`LogScope::enter`]); leaving it exits and closes a span
/// made for it.
pub(crate) struct Entered(Option<EnteredSpan>);

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.is_none() {
            // Taken out first, so the span's exit and close run with the cell free.
            let pending = PENDING.with(|pending| pending.borrow_mut().take());
            drop(pending);
        }
    }
}

/// The deferred scope this thread is in, and its span once made and entered.
struct Pending {
    deferred: Deferred,
    entered: Option<EnteredSpan>,
}

thread_local! {
    static PENDING: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

/// Makes and enters this thread's deferred request span, if there is one not made yet; true if it did. Does
/// nothing while the cell is busy (the span being made calls back into the subscriber).
fn make_pending(dispatch: &OnceLock<WeakDispatch>) -> bool {
    PENDING
        .try_with(|pending| {
            let Ok(mut pending) = pending.try_borrow_mut() else {
                return false;
            };
            let Some(pending) = pending.as_mut().filter(|p| p.entered.is_none()) else {
                return false;
            };
            let Some(dispatch) = dispatch.get().and_then(WeakDispatch::upgrade) else {
                return false;
            };
            pending.entered = Some(pending.deferred.make(&dispatch).entered());
            true
        })
        .unwrap_or(false)
}

/// The log's subscriber, which makes a deferred request span (see the module doc) before the first event or
/// span that belongs inside it, and otherwise passes everything to `S`.
pub(crate) struct Deferring<S> {
    inner: S,
    /// This subscriber's own dispatch, to make spans through without looking up the current one (which, inside
    /// an event being dispatched, is not available).
    dispatch: OnceLock<WeakDispatch>,
}

impl<S> Deferring<S> {
    pub(crate) fn new(inner: S) -> Deferring<S> {
        Deferring {
            inner,
            dispatch: OnceLock::new(),
        }
    }
}

impl<S: Subscriber> Subscriber for Deferring<S> {
    fn on_register_dispatch(&self, dispatch: &Dispatch) {
        let _ = self.dispatch.set(dispatch.downgrade());
        self.inner.on_register_dispatch(dispatch);
    }

    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        self.inner.register_callsite(metadata)
    }

    /// Asked only of what the filter decides case by case. A filter that looks at the spans entered (a
    /// directive such as `[request]=debug`) may say yes once the deferred span is there: it is made and the
    /// filter asked again.
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata) || (make_pending(&self.dispatch) && self.inner.enabled(metadata))
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        self.inner.max_level_hint()
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        if span.is_contextual() {
            make_pending(&self.dispatch);
        }
        self.inner.new_span(span)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        self.inner.record(span, values);
    }

    fn record_follows_from(&self, span: &Id, follows: &Id) {
        self.inner.record_follows_from(span, follows);
    }

    fn event_enabled(&self, event: &Event<'_>) -> bool {
        self.inner.event_enabled(event)
    }

    fn event(&self, event: &Event<'_>) {
        if event.is_contextual() {
            make_pending(&self.dispatch);
        }
        self.inner.event(event);
    }

    fn enter(&self, span: &Id) {
        self.inner.enter(span);
    }

    fn exit(&self, span: &Id) {
        self.inner.exit(span);
    }

    fn clone_span(&self, id: &Id) -> Id {
        self.inner.clone_span(id)
    }

    fn try_close(&self, id: Id) -> bool {
        self.inner.try_close(id)
    }

    fn current_span(&self) -> Current {
        make_pending(&self.dispatch);
        self.inner.current_span()
    }

    unsafe fn downcast_raw(&self, id: TypeId) -> Option<*const ()> {
        if id == TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: the inner subscriber answers for its own types, as this method's contract requires.
            unsafe { self.inner.downcast_raw(id) }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tracing_subscriber::layer::{Context, SubscriberExt};
    use tracing_subscriber::{Layer, Registry};

    use super::*;

    /// Collects what the log writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Counts the spans made.
    #[derive(Clone, Default)]
    struct Made(Arc<AtomicUsize>);

    impl<S: Subscriber> Layer<S> for Made {
        fn on_new_span(&self, _: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The log as a worker has it (text or JSON lines, wrapped in [`Deferring`]), its output, and a count of
    /// the spans it made.
    fn log(json: bool) -> (Dispatch, Lines, Made) {
        log_with(json, "info")
    }

    fn log_with(json: bool, filter: &str) -> (Dispatch, Lines, Made) {
        let filter = || tracing_subscriber::EnvFilter::new(filter);
        let lines = Lines::default();
        let made = Made::default();
        let writer = {
            let lines = lines.clone();
            move || lines.clone()
        };
        let fmt = tracing_subscriber::fmt::layer().with_ansi(false).without_time();
        let dispatch = if json {
            let fmt = fmt
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_writer(writer);
            Dispatch::new(Deferring::new(
                Registry::default().with(filter()).with(made.clone()).with(fmt),
            ))
        } else {
            let fmt = fmt.fmt_fields(crate::log_fields::PlainFields).with_writer(writer);
            Dispatch::new(Deferring::new(
                Registry::default().with(filter()).with(made.clone()).with(fmt),
            ))
        };
        (dispatch, lines, made)
    }

    /// A Unix listener's connection span, made up front as the acceptor makes it.
    fn conn() -> ConnSpan {
        ConnSpan::Made(Arc::new(conn_span(None, "/run/app.sock")))
    }

    fn tcp_conn() -> ConnSpan {
        ConnSpan::Tcp {
            peer: "10.0.0.7:41234".parse().unwrap(),
            listener: Arc::from("0.0.0.0:3031"),
        }
    }

    const METHOD: &[u8] = b"GET";
    const PATH: &[u8] = b"/a b?q=\xe9";

    /// What the same lines look like with the request span made up front, as before it was deferred.
    fn made_up_front(json: bool, conn: fn() -> ConnSpan, lines_in_request: impl Fn()) -> String {
        let (dispatch, lines, _) = log(json);
        tracing::dispatcher::with_default(&dispatch, || {
            let conn = conn().span();
            let request = request_span(&conn, METHOD, PATH);
            let _in = request.enter();
            lines_in_request();
        });
        lines.text()
    }

    fn deferred(json: bool, conn: fn() -> ConnSpan, lines_in_request: impl Fn()) -> (String, usize) {
        let (dispatch, lines, made) = log(json);
        tracing::dispatcher::with_default(&dispatch, || {
            let conn = conn();
            let scope = LogScope::deferred(conn, Bytes::from_static(METHOD), Bytes::from_static(PATH));
            let _in = scope.enter();
            lines_in_request();
        });
        (lines.text(), made.0.load(Ordering::SeqCst))
    }

    fn two_lines() {
        tracing::warn!(status = 413, "too big");
        let inner = tracing::info_span!("body", bytes = 5);
        let _in = inner.enter();
        tracing::error!("cannot spool");
    }

    #[test]
    fn a_request_that_logs_nothing_makes_no_span() {
        let (text, made) = deferred(false, conn, || {});
        assert_eq!(text, "");
        // The Unix listener's connection span only, made up front.
        assert_eq!(made, 1);
        // A TCP connection's span is deferred too.
        let (text, made) = deferred(false, tcp_conn, || {});
        assert_eq!((text.as_str(), made), ("", 0));
    }

    #[test]
    fn a_directive_on_the_request_span_still_applies() {
        let (dispatch, lines, _) = log_with(false, "warn,[request]=debug");
        tracing::dispatcher::with_default(&dispatch, || {
            let scope = LogScope::deferred(conn(), Bytes::from_static(METHOD), Bytes::from_static(PATH));
            let _in = scope.enter();
            tracing::debug!("in a request");
        });
        tracing::dispatcher::with_default(&dispatch, || tracing::debug!("outside"));
        let text = lines.text();
        assert!(
            text.contains("DEBUG request{method=GET path=/a b?q=\u{fffd}}: ferrule::log_scope::tests: in a request"),
            "{text}"
        );
        assert!(!text.contains("outside"), "{text}");
    }

    #[test]
    fn a_line_in_a_deferred_request_reads_as_with_the_span_made_up_front() {
        for json in [false, true] {
            for conn in [conn, tcp_conn] {
                let (text, made) = deferred(json, conn, two_lines);
                assert_eq!(text, made_up_front(json, conn, two_lines), "json: {json}");
                assert_eq!(made, 3, "conn, request (made once for both lines), body");
            }
        }
        let (text, _) = deferred(false, tcp_conn, two_lines);
        assert!(
            text.contains(
                "conn{peer=10.0.0.7:41234 listener=\"0.0.0.0:3031\"}:request{method=GET path=/a b?q=\u{fffd}}: \
                 ferrule::log_scope::tests: too big status=413"
            ),
            "{text}"
        );
        let (text, _) = deferred(false, conn, two_lines);
        assert!(
            text.contains(
                "conn{peer=\"unix\" listener=\"/run/app.sock\"}:request{method=GET path=/a b?q=\u{fffd}}: \
                 ferrule::log_scope::tests: too big status=413"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_span_is_left_with_the_request() {
        let (dispatch, lines, made) = log(false);
        tracing::dispatcher::with_default(&dispatch, || {
            let conn = conn();
            {
                let scope = LogScope::deferred(conn.clone(), Bytes::from_static(METHOD), Bytes::from_static(PATH));
                let _in = scope.enter();
                tracing::info!("inside");
            }
            tracing::info!("after");
            let mut scope = LogScope::deferred(conn, Bytes::from_static(METHOD), Bytes::from_static(PATH));
            // Made for a holder elsewhere, then entered as a made span.
            let span = scope.span();
            assert!(!span.is_disabled());
            let _in = scope.enter();
            tracing::info!("made early");
        });
        let text = lines.text();
        let after = text.lines().find(|l| l.ends_with("after")).unwrap();
        assert!(!after.contains("request{"), "{text}");
        let early = text.lines().find(|l| l.ends_with("made early")).unwrap();
        assert!(early.contains(":request{method=GET path=/a b?q=\u{fffd}}:"), "{text}");
        assert_eq!(made.0.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_filter_that_leaves_requests_out_leaves_them_out() {
        let (dispatch, lines, _) = log_with(false, "warn");
        tracing::dispatcher::with_default(&dispatch, || {
            let scope = LogScope::deferred(conn(), Bytes::from_static(METHOD), Bytes::from_static(PATH));
            let _in = scope.enter();
            tracing::warn!("no spans at warn");
        });
        let text = lines.text();
        assert!(text.contains("ferrule::log_scope::tests: no spans at warn"), "{text}");
        assert!(!text.contains("request{"), "{text}");
    }
}
