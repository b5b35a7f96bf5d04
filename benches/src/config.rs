//! `BenchConfig`: the settings of one `shardline bench` run, resolved and
//! checked (targets found, custom SQL read), so the runner never fails on a
//! bad argument halfway through. It is also the `settings` of `report.json`.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::scenario::Scenario;

/// The most clients per target: each is a server connection.
pub const CLIENTS_MAX: u32 = 1000;
/// The most rounds; each runs every target once.
pub const ROUNDS_MAX: u32 = 100;
/// The longest measured time per target per round.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

/// A checked bench configuration.
#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    /// The first is the baseline.
    pub targets: Vec<Target>,
    pub scenario: Scenario,
    pub clients: u32,
    pub load: Load,
    /// Measured time per target per round.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Time per target per round before measuring starts (not recorded).
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    pub rounds: u32,
    /// Rows of `shardline_bench` (ids 1..=rows).
    pub rows: i64,
    /// Whether to (re)create and load `shardline_bench` before running.
    pub init: bool,
    /// Metadata group in which `--init` declares the table sharded.
    pub meta: Vec<String>,
    /// Where the report files go.
    pub out: PathBuf,
}

/// One system under test.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    /// A `postgres://` URL; its password is left out of reports.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: String,
}

impl Target {
    /// The URL without its password, for reports and messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

/// How operations arrive.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Load {
    /// Each client sends its next operation when the previous one returns.
    Closed,
    /// Operations start on a fixed schedule, `rate` per second over all
    /// clients; latency counts from the scheduled start, so a stall shows
    /// as the queueing it causes (no coordinated omission).
    Open { rate: f64 },
}

/// `url` with the password of its user info replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

fn serialize_redacted<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact(url))
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        for (url, want) in [
            (
                "postgres://u:secret@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db", "postgres://h/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            ("host=h user=u", "host=h user=u"),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
    }
}
