//! Helpers for tests/it/operations.rs: an OpenMetrics text parser for the scrape, and the self-tests of the parsers the
//! log and metrics tests lean on.

use std::collections::BTreeMap;

// --- OpenMetrics ----------------------------------------------------------------------------------------

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: `# TYPE` lines by family, and every sample in order.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// The samples named `name` whose labels include every pair in `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The single sample named `name` with exactly these labels; panics (showing the scrape) otherwise.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .find(name, labels)
            .into_iter()
            .filter(|s| s.labels.len() == labels.len())
            .collect();
        match found.as_slice() {
            [one] => one.value,
            _ => panic!(
                "expected exactly one sample {name}{labels:?}, found {}\n--- scrape ---\n{}",
                found.len(),
                self.text
            ),
        }
    }
}

/// Parses the OpenMetrics text format (the subset a Prometheus client writes); panics on a line it cannot read.
pub fn parse_openmetrics(text: &str) -> Scrape {
    let mut scrape = Scrape {
        text: text.to_owned(),
        ..Scrape::default()
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            scrape.types.insert(family.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name = line[..name_end].to_owned();
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices();
            let mut key = String::new();
            loop {
                let (i, c) = chars
                    .next()
                    .unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
                match c {
                    '}' => {
                        rest = &inner[i + 1..];
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(
                            chars.next().map(|(_, c)| c),
                            Some('"'),
                            "label value not quoted in {line:?}"
                        );
                        let mut value = String::new();
                        loop {
                            match chars.next().map(|(_, c)| c) {
                                Some('"') => break,
                                Some('\\') => match chars.next().map(|(_, c)| c) {
                                    Some('n') => value.push('\n'),
                                    Some(c) => value.push(c),
                                    None => panic!("unterminated escape in {line:?}"),
                                },
                                Some(c) => value.push(c),
                                None => panic!("unterminated label value in {line:?}"),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            }
        }
        let value_text = rest.trim().split(' ').next().unwrap_or("");
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad sample value in {line:?}")),
        };
        scrape.samples.push(Sample { name, labels, value });
    }
    scrape
}

/// The parsers are what the log and metrics tests lean on: pin that they refuse what they must.
mod self_tests {
    use super::*;
    use crate::harness::json::{Json, parse_json};

    #[test]
    fn json_parser_is_strict() {
        let v = parse_json(r#"{"a":"q\"b\\n\n\u0001\u00e9\ud83d\ude00","n":-1.5e3,"l":[true,false,null]}"#).unwrap();
        assert_eq!(v.get("a").and_then(Json::as_str), Some("q\"b\\n\n\u{1}é😀"));
        assert_eq!(v.get("n"), Some(&Json::Number("-1.5e3".into())));
        for bad in [
            "{\"a\":\"raw\nnewline\"}",
            "{\"a\":\"raw\u{1}control\"}",
            r#"{"a":"\x41"}"#,
            r#"{"a":"\ud83d"}"#,
            r#"{"a":1,}"#,
            r#"{"a":01}"#,
            r#"{"a":1} x"#,
            r#"{"a":"unterminated}"#,
            "method=GET path=/",
        ] {
            assert!(parse_json(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn openmetrics_parser_reads_labels_and_values() {
        let s = parse_openmetrics(
            "# TYPE x_requests counter\nx_requests_total{class=\"2xx\",q=\"a\\\"b\"} 5\nx_bucket{le=\"+Inf\"} 7\nx_up 1.5\n# EOF\n",
        );
        assert_eq!(s.types.get("x_requests").map(String::as_str), Some("counter"));
        assert_eq!(s.value("x_requests_total", &[("class", "2xx"), ("q", "a\"b")]), 5.0);
        assert_eq!(s.value("x_bucket", &[("le", "+Inf")]), 7.0);
        assert_eq!(s.value("x_up", &[]), 1.5);
    }
}
