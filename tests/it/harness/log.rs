//! Reading ferrule's text log: counting a needle, the `key=value` fields of a tracing line, and the master's
//! lines about its workers.

/// How many times `needle` occurs in `text`.
pub fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// The value of `key=` in one tracing line (unquoted; a quoted value keeps its quotes off).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.split('"').next();
    }
    rest.split_whitespace().next()
}

/// A master log line about one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLine {
    pub id: u32,
    pub pid: u32,
    pub generation: Option<u32>,
}

/// Every master line containing `message` (e.g. "worker started", "worker ready"), with its worker id and pid.
pub fn worker_lines(log: &str, message: &str) -> Vec<WorkerLine> {
    log.lines()
        .filter(|l| l.contains("ferrule::master") && l.contains(&format!("{message} worker=")))
        .filter_map(|l| {
            Some(WorkerLine {
                id: field(l, "worker")?.parse().ok()?,
                pid: field(l, "pid")?.parse().ok()?,
                generation: field(l, "generation").and_then(|g| g.parse().ok()),
            })
        })
        .collect()
}
