//! CPU time spent during a measurement, per process group, from `/proc` (Linux): this
//! bench process (writers, relay, consumer, and the mock cluster when it is the broker),
//! the database server's processes and the broker's. A steady-rate latency run on a
//! 2-core machine is limited by how much CPU each event costs all of them together,
//! which the percentiles alone do not show.
//!
//! Each group's figure is the sum of `utime + stime + cutime + cstime` over its
//! processes: a database backend that exits during the measurement is reaped by the
//! server's main process, whose `cutime`/`cstime` then hold its whole lifetime, so the
//! difference between two samples still counts what it used in between.

/// The process groups, by `comm` (the bench itself by pid).
const DATABASES: [&str; 2] = ["postgres", "mariadbd"];
const BROKERS: [&str; 1] = ["tansu"];

/// CPU seconds used so far by each group, at one instant.
#[derive(Clone, Copy)]
pub(crate) struct Sample {
    bench: f64,
    database: f64,
    broker: f64,
}

/// CPU used between two samples, in milliseconds per 1,000 events.
#[derive(Clone, Copy, Default)]
pub(crate) struct PerEvents {
    pub(crate) bench: f64,
    pub(crate) database: f64,
    pub(crate) broker: f64,
}

impl PerEvents {
    /// All three groups together.
    pub(crate) fn total(&self) -> f64 {
        self.bench + self.database + self.broker
    }

    /// `total (bench / database / broker)`, for a table cell.
    pub(crate) fn cell(&self) -> String {
        format!(
            "{:.0} ({:.0} / {:.0} / {:.0})",
            self.total(),
            self.bench,
            self.database,
            self.broker
        )
    }

    /// The median of each group over `runs`.
    pub(crate) fn median(runs: &[PerEvents]) -> PerEvents {
        let med =
            |f: fn(&PerEvents) -> f64| super::median(&mut runs.iter().map(f).collect::<Vec<_>>());
        PerEvents {
            bench: med(|r| r.bench),
            database: med(|r| r.database),
            broker: med(|r| r.broker),
        }
    }
}

impl Sample {
    /// Reads `/proc` now. Processes that vanish while it reads are skipped; off Linux
    /// every group reads 0.
    pub(crate) fn take() -> Sample {
        let tick = ticks_per_second();
        let me = std::process::id();
        let (mut bench, mut database, mut broker) = (0u64, 0u64, 0u64);
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Some((comm, ticks)) = read_stat(pid) else {
                    continue;
                };
                if pid == me {
                    bench += ticks;
                } else if DATABASES.contains(&comm.as_str()) {
                    database += ticks;
                } else if BROKERS.contains(&comm.as_str()) {
                    broker += ticks;
                }
            }
        }
        Sample {
            bench: bench as f64 / tick,
            database: database as f64 / tick,
            broker: broker as f64 / tick,
        }
    }

    /// CPU used from `self` to `later`, per 1,000 of `events`.
    pub(crate) fn per_events(&self, later: &Sample, events: usize) -> PerEvents {
        let per = 1_000_000.0 / events.max(1) as f64; // seconds → ms, per 1,000 events
        PerEvents {
            bench: (later.bench - self.bench).max(0.0) * per,
            database: (later.database - self.database).max(0.0) * per,
            broker: (later.broker - self.broker).max(0.0) * per,
        }
    }
}

/// `comm` and `utime + stime + cutime + cstime` (clock ticks) of `pid`.
fn read_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ...`: comm may hold spaces and parentheses, so split at the
    // last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // Fields after comm: state is field 3, utime 14 … cstime 17 (1-based).
    let rest: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).and_then(|s| s.parse::<u64>().ok());
    Some((comm, field(14)? + field(15)? + field(16)? + field(17)?))
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on; read from `getconf` once
/// in case it is not.
fn ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// How the CPU columns are measured, for a section's note.
pub(crate) const NOTE: &str = "CPU per 1,000 events: the CPU time (user + system, from \
    `/proc`) used from the first publish until the last event arrived, by this bench \
    process (writers, relay, consumer), the database server's processes and the broker's \
    (tansu; the mock cluster runs inside the bench process), divided by the events \
    published; medians over repeats, per group. At R events/s the whole 2-core machine \
    is 2,000,000 / R ms per 1,000 events (400 at 5,000/s, 1,000 at 2,000/s); with the \
    CPU hog (section j), half that is left.";
