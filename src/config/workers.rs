//! `--workers` and `--max-workers`: a number, or `auto` for one worker per CPU this process may use (see
//! `resources`), resolved into the floor and the ceiling of the worker count. Each reload resolves `auto` again.

use crate::resources::Cpus;

use super::error::ConfigError;

/// The most workers a count may name.
const MOST: u32 = 1024;

/// `--workers` or `--max-workers` as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerCount {
    Auto,
    Fixed(u32),
}

impl WorkerCount {
    /// A count from 1 to 1024, or `auto`.
    pub(crate) fn parse(s: &str) -> Result<WorkerCount, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(WorkerCount::Auto);
        }
        match s.trim().parse::<u32>() {
            Ok(n) if (1..=MOST).contains(&n) => Ok(WorkerCount::Fixed(n)),
            _ => Err(format!(
                "{s:?} is not a worker count: give a number from 1 to {MOST}, or auto (one per usable CPU)"
            )),
        }
    }
}

impl serde::Serialize for WorkerCount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            WorkerCount::Auto => s.serialize_str("auto"),
            WorkerCount::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

/// The worker counts, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    /// `--workers`: how many start, and with `--max-workers` the fewest there are.
    pub(crate) count: usize,
    /// `--max-workers`: the most there may be.
    pub(crate) max: Option<usize>,
    /// What `auto` found, when either count was `auto`.
    pub(crate) auto: Option<Cpus>,
    /// The options given as `auto`: `workers`, `max-workers`.
    pub(crate) auto_options: Vec<String>,
    /// `--workers auto` found more than `--max-workers`, this many, and was lowered to it.
    pub(crate) clamped_from: Option<usize>,
}

/// Resolves the counts; `cpus` is asked once, only when a count is `auto`. A ceiling below the floor is refused.
pub(crate) fn resolve(
    workers: WorkerCount,
    max: Option<WorkerCount>,
    cpus: impl FnOnce() -> Cpus,
) -> Result<Counts, ConfigError> {
    let max_given = max;
    let uses_auto = workers == WorkerCount::Auto || max == Some(WorkerCount::Auto);
    let auto = uses_auto.then(cpus);
    let value = |c: WorkerCount| match (c, &auto) {
        (WorkerCount::Fixed(n), _) => n as usize,
        // At most MOST, like a number given.
        (WorkerCount::Auto, Some(cpus)) => cpus.count.clamp(1, MOST as usize),
        (WorkerCount::Auto, None) => 1,
    };
    let mut count = value(workers);
    let max = max.map(value);
    let mut clamped_from = None;
    if let Some(max) = max.filter(|&max| count > max) {
        // Both `auto` would be equal: a floor above the ceiling is `auto` against a number, or two numbers.
        if workers != WorkerCount::Auto {
            let found = auto
                .as_ref()
                .map(|cpus| format!(" (auto: {})", cpus.source))
                .unwrap_or_default();
            return Err(ConfigError::MaxWorkersBelowWorkers {
                max: format!("{max}{found}"),
                workers: count,
            });
        }
        clamped_from = Some(count);
        count = max;
    }
    let auto_options = [("workers", Some(workers)), ("max-workers", max_given)]
        .into_iter()
        .filter(|(_, c)| *c == Some(WorkerCount::Auto))
        .map(|(option, _)| option.to_owned())
        .collect();
    Ok(Counts {
        count,
        max,
        auto,
        auto_options,
        clamped_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_cpus() -> Cpus {
        Cpus {
            count: 2,
            source: "cpu quota 200000/100000".into(),
        }
    }

    #[test]
    fn counts_are_numbers_or_auto() {
        assert_eq!(WorkerCount::parse("auto"), Ok(WorkerCount::Auto));
        assert_eq!(WorkerCount::parse("AUTO"), Ok(WorkerCount::Auto));
        assert_eq!(WorkerCount::parse("4"), Ok(WorkerCount::Fixed(4)));
        for bad in ["0", "1025", "-1", "four", ""] {
            let error = WorkerCount::parse(bad).unwrap_err();
            assert!(error.contains("from 1 to 1024, or auto"), "{error}");
        }
    }

    #[test]
    fn auto_resolves_from_the_cpus_and_only_when_asked() {
        let fixed = resolve(WorkerCount::Fixed(3), None, || panic!("no auto, no detection")).unwrap();
        assert_eq!((fixed.count, fixed.max, fixed.auto), (3, None, None));
        let auto = resolve(WorkerCount::Auto, None, two_cpus).unwrap();
        assert_eq!((auto.count, auto.auto), (2, Some(two_cpus())));
        let ceiling = resolve(WorkerCount::Fixed(1), Some(WorkerCount::Auto), two_cpus).unwrap();
        assert_eq!((ceiling.count, ceiling.max), (1, Some(2)));
    }

    #[test]
    fn a_ceiling_below_the_floor_is_refused_but_auto_is_clamped_to_it() {
        let error = resolve(WorkerCount::Fixed(4), Some(WorkerCount::Fixed(2)), two_cpus).unwrap_err();
        assert!(
            error.to_string().starts_with("--max-workers 2 is below --workers 4"),
            "{error}"
        );
        let error = resolve(WorkerCount::Fixed(4), Some(WorkerCount::Auto), two_cpus).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("--max-workers 2 (auto: cpu quota 200000/100000) is below --workers 4"),
            "{error}"
        );
        let clamped = resolve(WorkerCount::Auto, Some(WorkerCount::Fixed(1)), two_cpus).unwrap();
        assert_eq!(
            (clamped.count, clamped.max, clamped.clamped_from),
            (1, Some(1), Some(2))
        );
        let both = resolve(WorkerCount::Auto, Some(WorkerCount::Auto), two_cpus).unwrap();
        assert_eq!((both.count, both.max, both.clamped_from), (2, Some(2), None));
    }
}
