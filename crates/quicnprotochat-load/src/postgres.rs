//! PostgreSQL's CPU time, read from `/proc`: the nodes of a PostgreSQL run
//! hand part of their work to the database server, so their own CPU time
//! alone would flatter them. PostgreSQL runs one process per connection
//! plus a few helpers, none of them ours, so they are found by name: every
//! process whose command name (`comm`) is `postgres`.

use std::collections::HashMap;
use std::time::Duration;

use crate::LoadError;

/// The command name of every PostgreSQL server process: backends and
/// helpers rename themselves only in their command line, not in `comm`.
const POSTGRES_COMM: &str = "postgres";

/// The CPU time so far of every process named `postgres`, each keyed by its
/// pid and start time (a pid reused by a new process is a new process).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresSnapshot {
    ticks: HashMap<(u32, u64), u64>,
}

impl PostgresSnapshot {
    /// Reads `/proc/*/stat` of every process now.
    pub fn take() -> Result<PostgresSnapshot, LoadError> {
        let mut stats = Vec::new();
        for entry in std::fs::read_dir("/proc").map_err(LoadError::Io)? {
            let entry = entry.map_err(LoadError::Io)?;
            // Only the numbered entries are processes.
            if !entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            // A process may exit between the listing and the read, or be
            // hidden from us; either way it does not count.
            if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) {
                stats.push(stat);
            }
        }
        Ok(PostgresSnapshot::from_stat_lines(
            stats.iter().map(String::as_str),
        ))
    }

    /// The snapshot of these `/proc/PID/stat` contents; lines that do not
    /// parse or belong to other programs are left out.
    pub fn from_stat_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> PostgresSnapshot {
        let ticks = lines
            .into_iter()
            .filter_map(ProcessStat::parse)
            .filter(|stat| stat.comm == POSTGRES_COMM)
            .map(|stat| ((stat.pid, stat.start_time), stat.cpu_ticks))
            .collect();
        PostgresSnapshot { ticks }
    }

    /// Whether no PostgreSQL process was seen (PostgreSQL on another host,
    /// or in a PID namespace this process cannot see).
    pub fn is_empty(&self) -> bool {
        self.ticks.is_empty()
    }

    /// The CPU time PostgreSQL used from `before` to `self`: a process in
    /// both counts its difference, one that started in between counts all
    /// of its time. One that exited in between is lost (its time goes to
    /// its parent's `cutime`, which would also bring time from before the
    /// window), so this can undercount, never overcount.
    pub fn since(&self, before: &PostgresSnapshot) -> Duration {
        let ticks: u64 = self
            .ticks
            .iter()
            .map(|(process, &now)| now.saturating_sub(before.ticks.get(process).copied().unwrap_or(0)))
            .sum();
        ticks_to_duration(ticks)
    }
}

/// Clock ticks as time: USER_HZ is 100 on every Linux architecture the
/// node targets (as for the node's own CPU time).
pub(crate) fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_millis(ticks.saturating_mul(10))
}

/// The fields of one `/proc/PID/stat` line this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcessStat {
    pid: u32,
    comm: String,
    /// utime + stime, clock ticks.
    cpu_ticks: u64,
    /// Clock ticks after boot when the process started.
    start_time: u64,
}

impl ProcessStat {
    /// Parses `pid (comm) state ppid …`; `None` for anything else. The
    /// command name may hold spaces and parentheses, so it runs from the
    /// first `(` to the last `)`.
    fn parse(line: &str) -> Option<ProcessStat> {
        let (pid, rest) = line.split_once(" (")?;
        let (comm, fields) = rest.rsplit_once(')')?;
        let fields: Vec<&str> = fields.split_whitespace().collect();
        // Field 3 (state) is at index 0: utime, stime and starttime are
        // fields 14, 15 and 22.
        let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
        Some(ProcessStat {
            pid: pid.trim().parse().ok()?,
            comm: comm.to_owned(),
            cpu_ticks: field(14)?.checked_add(field(15)?)?,
            start_time: field(22)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // in tests, a failed unwrap is a failed test

    use super::*;

    /// A `/proc/PID/stat` line with these fields; the rest as Linux 6 writes
    /// them for an idle backend.
    fn stat(pid: u32, comm: &str, utime: u64, stime: u64, start: u64) -> String {
        format!(
            "{pid} ({comm}) S 812 812 812 0 -1 4194624 1043 0 0 0 {utime} {stime} 0 0 20 0 1 0 {start} \
             226811904 4718 18446744073709551615 1 1 0 0 0 0 4194304 19935232 536883847 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0"
        )
    }

    #[test]
    fn a_stat_line_gives_its_cpu_ticks_and_start_time() {
        let parsed = ProcessStat::parse(&stat(4711, "postgres", 250, 31, 9_000)).unwrap();
        assert_eq!(
            parsed,
            ProcessStat {
                pid: 4711,
                comm: "postgres".into(),
                cpu_ticks: 281,
                start_time: 9_000,
            }
        );
    }

    #[test]
    fn a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let parsed = ProcessStat::parse(&stat(7, "a) (b c", 1, 2, 3)).unwrap();
        assert_eq!(parsed.comm, "a) (b c");
        assert_eq!((parsed.cpu_ticks, parsed.start_time), (3, 3));
    }

    #[test]
    fn lines_that_are_not_stat_lines_are_left_out() {
        for line in [
            "",
            "garbage",
            "12 (postgres) S 1 2",
            "x (postgres) S",
            "12 postgres S",
        ] {
            assert_eq!(ProcessStat::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn only_postgres_processes_count_and_new_ones_count_in_full() {
        let before = [
            stat(100, "postgres", 1_000, 200, 50),
            stat(101, "postgres", 10, 5, 60),
            stat(102, "postgres", 7, 0, 70), // exits in the window: lost
            stat(200, "quicnprotochat-", 5_000, 900, 80),
            stat(201, "postgres: wal", 9, 9, 81), // not `postgres`
        ];
        let after = [
            stat(100, "postgres", 1_030, 210, 50), // +40 ticks
            stat(101, "postgres", 10, 5, 60),      // idle: +0
            stat(103, "postgres", 12, 3, 500),     // new: all 15
            stat(200, "quicnprotochat-", 9_000, 1_900, 80),
            stat(201, "postgres: wal", 99, 99, 81),
        ];
        let before = PostgresSnapshot::from_stat_lines(before.iter().map(String::as_str));
        let after = PostgresSnapshot::from_stat_lines(after.iter().map(String::as_str));
        assert_eq!(after.since(&before), Duration::from_millis(550));
    }

    #[test]
    fn a_reused_pid_is_a_new_process() {
        let before = [stat(300, "postgres", 900, 100, 10)];
        // Same pid, later start: the old backend exited, a new one has 4
        // ticks, and the old one's 1,000 must not be subtracted.
        let after = [stat(300, "postgres", 3, 1, 7_000)];
        let before = PostgresSnapshot::from_stat_lines(before.iter().map(String::as_str));
        let after = PostgresSnapshot::from_stat_lines(after.iter().map(String::as_str));
        assert_eq!(after.since(&before), Duration::from_millis(40));
    }

    #[test]
    fn no_postgres_processes_make_an_empty_snapshot() {
        let lines = [stat(1, "systemd", 5, 5, 1)];
        assert!(PostgresSnapshot::from_stat_lines(lines.iter().map(String::as_str)).is_empty());
    }

    #[test]
    fn this_machine_can_be_scanned() {
        // Whether or not PostgreSQL runs here, the scan itself must work.
        PostgresSnapshot::take().unwrap();
    }
}
