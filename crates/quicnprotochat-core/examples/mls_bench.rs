//! MLS operation benchmark: what each group operation costs at several group
//! sizes, in memory (no network, no disk).
//!
//! Run (default sizes 10 100 1000 10000; building the 10,000-member group
//! alone takes over a minute, the whole run a few minutes):
//!
//! ```sh
//! cargo run --release -p quicnprotochat-core --example mls_bench
//! cargo run --release -p quicnprotochat-core --example mls_bench -- 10 100 1000
//! MLS_SUITE=mlkem768x25519 cargo run --release -p quicnprotochat-core --example mls_bench
//! ```
//!
//! `MLS_SUITE` picks the ciphersuite by its short name (`x25519`, the
//! default, or `mlkem768x25519`); the output starts with the suite and the
//! size of one of its KeyPackages.
//!
//! The project's setup: [`quicnprotochat_core::CIPHERSUITE`], openmls with
//! `openmls_rust_crypto` and its memory storage (group state is serialised on
//! every change, never written to disk), the ratchet tree in the Welcome,
//! handshake messages as PrivateMessages, all through [`GroupMember`].
//!
//! For each size N the group is built once, as cheaply as possible: the
//! creator adds the other N − 1 members in one commit and the last of them
//! joins from the Welcome; the others never act. Then each operation runs
//! several times — after a warm-up run where that is cheap — and each cell
//! reads "median (min–max)" over the runs shown:
//! - add 1 / 10 / 100: the creator makes the Commit and Welcome adding fresh
//!   members (KeyPackages validated, path encrypted, both messages encoded),
//!   then discards the pending commit, so every run starts from the same
//!   N-member group; sizes are those of the encoded Commit and Welcome;
//! - join: a newcomer joins from the Welcome of an add-1 run (validating the
//!   whole tree of N + 1 members);
//! - encrypt / decrypt: the creator encrypts a 1 KiB application message and
//!   the last joiner decrypts it;
//! - self-update: the creator makes a commit with fresh leaf keys (merged
//!   outside the timing); "process" is the last joiner receiving, validating
//!   and merging that commit;
//! - process add 1: the creator adds one member and merges; the last joiner
//!   receives, validates and merges that commit. These merges grow the group
//!   by one member per run, by 11 at most.
//!
//! Only the creator ever commits, so the tree stays sparse: every commit's
//! path is encrypted to each of the other members, not to about log₂ N
//! subtrees as in a tree that members' own commits have filled. Commit times
//! and sizes are therefore those of a group one admin built in one go, the
//! worst case; filling the tree would take N commits, each processed by
//! everyone.
//!
//! Progress goes to stderr; stdout is only the Markdown tables, ready to
//! paste into BENCHMARKS.md or its journal (docs/benchmarks/journal.md,
//! "MLS operations").

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that fails should stop loudly

use std::process::ExitCode;
use std::time::{Duration, Instant};

use openmls_rust_crypto::OpenMlsRustCrypto;
use quicnprotochat_core::{
    GroupMember, IdentityKeypair, KeyPackageOptions, Received, Suite, generate_key_package_with,
};

const DEFAULT_SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
/// How many members one commit adds, for each "add" column.
const ADD_COUNTS: [usize; 3] = [1, 10, 100];
const PAYLOAD: [u8; 1024] = [0x42; 1024];

fn main() -> ExitCode {
    let sizes = match sizes(std::env::args().skip(1)) {
        Ok(sizes) => sizes,
        Err(e) => {
            eprintln!("{e}\nusage: mls_bench [SIZE ...]   (default: 10 100 1000 10000; each at least 2)");
            return ExitCode::from(2);
        }
    };

    let started = Instant::now();
    let create = phase("any size", "create a group", bench_create);
    let reports: Vec<SizeReport> = sizes.into_iter().map(bench_size).collect();
    print_tables(&create, &reports);
    eprintln!("total: {}", duration(started.elapsed()));
    ExitCode::SUCCESS
}

/// The suite under test, from `MLS_SUITE` (default x25519).
fn suite() -> Suite {
    static SUITE: std::sync::LazyLock<Suite> = std::sync::LazyLock::new(|| {
        let name = std::env::var("MLS_SUITE").unwrap_or_else(|_| Suite::X25519.name().to_owned());
        Suite::from_name(&name)
            .unwrap_or_else(|| panic!("MLS_SUITE={name:?} is not x25519 or mlkem768x25519"))
    });
    *SUITE
}

/// A fresh KeyPackage of the suite under test.
fn key_package(
    provider: &OpenMlsRustCrypto,
    identity: &IdentityKeypair,
) -> Result<Vec<u8>, quicnprotochat_core::CoreError> {
    let options = KeyPackageOptions {
        suite: suite(),
        ..KeyPackageOptions::default()
    };
    generate_key_package_with(provider, identity, options)
}

/// Group sizes from the command line, or the defaults.
fn sizes(args: impl Iterator<Item = String>) -> Result<Vec<usize>, String> {
    let sizes = args
        .map(|arg| match arg.replace(['_', ','], "").parse::<usize>() {
            Ok(size) if size >= 2 => Ok(size),
            _ => Err(format!(
                "bad group size {arg:?}: need a number of members, at least 2 (the creator and a receiver)"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if sizes.is_empty() {
        DEFAULT_SIZES.to_vec()
    } else {
        sizes
    })
}

/// A user: an identity and its own provider (its private storage).
struct Person {
    identity: IdentityKeypair,
    provider: OpenMlsRustCrypto,
}

impl Person {
    fn new() -> Self {
        Self {
            identity: IdentityKeypair::generate(),
            provider: OpenMlsRustCrypto::default(),
        }
    }
}

/// How often to run an operation.
#[derive(Debug, Clone, Copy)]
struct Runs {
    warm_up: usize,
    measured: usize,
}

impl Runs {
    /// For operations that cost nearly the same at any size.
    const CHEAP: Self = Self {
        warm_up: 10,
        measured: 100,
    };

    /// For commits and joins, whose cost grows with the group: fewer runs,
    /// and no warm-up, for big groups.
    fn for_commits(size: usize) -> Self {
        match size {
            0..=1_000 => Self {
                warm_up: 1,
                measured: 10,
            },
            1_001..=3_000 => Self {
                warm_up: 1,
                measured: 5,
            },
            _ => Self {
                warm_up: 0,
                measured: 3,
            },
        }
    }

    /// The results of the measured runs (warm-up results are dropped).
    fn repeat<T>(self, mut run: impl FnMut() -> T) -> Vec<T> {
        for _ in 0..self.warm_up {
            run();
        }
        (0..self.measured).map(|_| run()).collect()
    }
}

/// The measured durations of one operation.
struct Timings(Vec<Duration>);

impl Timings {
    fn from_runs<T>(runs: &[T], field: impl Fn(&T) -> Duration) -> Self {
        Self(runs.iter().map(field).collect())
    }

    /// "median (min–max)", all three in the median's unit.
    fn cell(&self) -> String {
        let mut sorted = self.0.clone();
        sorted.sort();
        let (Some(&min), Some(&max)) = (sorted.first(), sorted.last()) else {
            return "–".into();
        };
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2
        };
        let (unit, per_second, decimals) = unit(median);
        let number = |d: Duration| number(d.as_secs_f64() * per_second, decimals);
        format!("{} {unit} ({}–{})", number(median), number(min), number(max))
    }
}

/// What one commit adding some members cost.
struct AddReport {
    create: Timings,
    commit_lens: Vec<usize>,
    welcome_lens: Vec<usize>,
}

/// Everything measured at one group size.
struct SizeReport {
    size: usize,
    commit_runs: usize,
    adds: Vec<AddReport>,
    join: Timings,
    encrypt: Timings,
    decrypt: Timings,
    message_lens: Vec<usize>,
    self_update: Timings,
    self_update_lens: Vec<usize>,
    process_self_update: Timings,
    process_add: Timings,
}

fn bench_create() -> Timings {
    let runs = Runs::CHEAP.repeat(|| {
        // A fresh user each time: its first group, in empty storage.
        let creator = Person::new();
        let (group, took) = time(|| {
            GroupMember::create_with_suite(
                &creator.provider,
                &creator.identity,
                &quicnprotochat_core::GroupId::new(b"mls-bench".to_vec()).unwrap(),
                suite(),
            )
        });
        assert_eq!(group.unwrap().members().len(), 1);
        took
    });
    Timings(runs)
}

fn bench_size(size: usize) -> SizeReport {
    let commit_runs = Runs::for_commits(size);
    let label = format!("{} members", thousands(&size.to_string()));
    let mut group = phase(&label, "build the group (one add commit, one join)", || {
        Group::build(size)
    });
    let mut join = None;
    let adds = ADD_COUNTS
        .iter()
        .map(|&count| {
            phase(&label, &format!("add {count} (discarded)"), || {
                let (add, joined) = group.measure_add(count, commit_runs);
                join = join.take().or(joined);
                add
            })
        })
        .collect();
    let messages = phase(&label, "encrypt and decrypt", || group.measure_messages());
    let self_updates = phase(&label, "self-update and process it", || {
        group.measure_self_update(commit_runs)
    });
    let process_add = phase(&label, "add 1 (merged) and process it", || {
        group.measure_process_add(commit_runs)
    });

    SizeReport {
        size,
        commit_runs: commit_runs.measured,
        adds,
        join: join.expect("the add-1 runs measure joining"),
        encrypt: Timings::from_runs(&messages, |run| run.0),
        decrypt: Timings::from_runs(&messages, |run| run.1),
        message_lens: messages.iter().map(|run| run.2).collect(),
        self_update: Timings::from_runs(&self_updates, |run| run.0),
        self_update_lens: self_updates.iter().map(|run| run.2).collect(),
        process_self_update: Timings::from_runs(&self_updates, |run| run.1),
        process_add,
    }
}

/// A group of some size and the two members who act in it.
struct Group {
    size: usize,
    creator: Person,
    creator_group: GroupMember,
    /// The last member added: receives everything the creator sends.
    receiver: Person,
    receiver_group: GroupMember,
}

impl Group {
    /// The creator adds everyone in one commit, the receiver joins.
    fn build(size: usize) -> Self {
        let creator = Person::new();
        let receiver = Person::new();
        // Members who never act share one provider for their KeyPackage keys.
        let silent = OpenMlsRustCrypto::default();
        let mut packages: Vec<Vec<u8>> = (2..size)
            .map(|_| key_package(&silent, &IdentityKeypair::generate()).unwrap())
            .collect();
        packages.push(key_package(&receiver.provider, &receiver.identity).unwrap());

        let mut creator_group = GroupMember::create_with_suite(
            &creator.provider,
            &creator.identity,
            &quicnprotochat_core::GroupId::new(b"mls-bench".to_vec()).unwrap(),
            suite(),
        )
        .unwrap();
        let added = creator_group
            .add_members(
                &creator.provider,
                &creator.identity,
                &packages,
                &quicnprotochat_core::NoDeviceLists,
            )
            .unwrap();
        creator_group.merge_pending_commit(&creator.provider).unwrap();
        let tree = creator_group.ratchet_tree().unwrap();
        let receiver_group = GroupMember::join(
            &receiver.provider,
            &added.welcome,
            Some(&tree),
            &quicnprotochat_core::NoDeviceLists,
        )
        .unwrap();
        assert_eq!(receiver_group.members().len(), size);
        Self {
            size,
            creator,
            creator_group,
            receiver,
            receiver_group,
        }
    }

    /// Adds `count` fresh members and discards the commit each run; for one
    /// member, a newcomer also joins from the Welcome (the Welcome of a
    /// discarded commit is as valid as any other).
    fn measure_add(&mut self, count: usize, runs: Runs) -> (AddReport, Option<Timings>) {
        let epoch = self.creator_group.epoch();
        let results = runs.repeat(|| {
            // Fresh KeyPackages (each is single use), in one throwaway
            // storage: the first newcomer's, so it can join.
            let newcomers = OpenMlsRustCrypto::default();
            let packages: Vec<Vec<u8>> = (0..count)
                .map(|_| key_package(&newcomers, &IdentityKeypair::generate()).unwrap())
                .collect();

            let (added, create) = time(|| {
                self.creator_group
                    .add_members(
                        &self.creator.provider,
                        &self.creator.identity,
                        &packages,
                        &quicnprotochat_core::NoDeviceLists,
                    )
                    .unwrap()
            });
            // Welcomes carry no tree; the joiner gets it from the node.
            let tree = self
                .creator_group
                .pending_ratchet_tree(&self.creator.provider)
                .unwrap();
            self.creator_group
                .discard_pending_commit(&self.creator.provider)
                .unwrap();
            assert_eq!(self.creator_group.epoch(), epoch);

            let join = (count == 1).then(|| {
                let (joined, took) = time(|| {
                    GroupMember::join(
                        &newcomers,
                        &added.welcome,
                        Some(&tree),
                        &quicnprotochat_core::NoDeviceLists,
                    )
                    .unwrap()
                });
                assert_eq!(joined.members().len(), self.size + 1);
                took
            });
            (create, join, added.commit.len(), added.welcome.len())
        });
        assert_eq!(self.creator_group.members().len(), self.size);

        let report = AddReport {
            create: Timings::from_runs(&results, |run| run.0),
            commit_lens: results.iter().map(|run| run.2).collect(),
            welcome_lens: results.iter().map(|run| run.3).collect(),
        };
        let joins: Vec<Duration> = results.iter().filter_map(|run| run.1).collect();
        (report, (!joins.is_empty()).then_some(Timings(joins)))
    }

    /// (encrypt, decrypt, message length) per run.
    fn measure_messages(&mut self) -> Vec<(Duration, Duration, usize)> {
        Runs::CHEAP.repeat(|| {
            let (message, encrypt) = time(|| {
                self.creator_group
                    .send(&self.creator.provider, &self.creator.identity, &PAYLOAD)
                    .unwrap()
            });
            let (received, decrypt) = time(|| {
                self.receiver_group
                    .receive(
                        &self.receiver.provider,
                        &message,
                        &quicnprotochat_core::NoDeviceLists,
                    )
                    .unwrap()
            });
            assert!(matches!(received, Received::Application { plaintext, .. } if plaintext == PAYLOAD));
            (encrypt, decrypt, message.len())
        })
    }

    /// (create the commit, process it, commit length) per run.
    fn measure_self_update(&mut self, runs: Runs) -> Vec<(Duration, Duration, usize)> {
        runs.repeat(|| {
            let (commit, create) = time(|| {
                self.creator_group
                    .self_update(&self.creator.provider, &self.creator.identity)
                    .unwrap()
            });
            self.creator_group
                .merge_pending_commit(&self.creator.provider)
                .unwrap();
            let process = self.process(&commit);
            (create, process, commit.len())
        })
    }

    /// Processing a commit that adds one member; the group grows each run.
    fn measure_process_add(&mut self, runs: Runs) -> Timings {
        Timings(runs.repeat(|| {
            let newcomer = Person::new();
            let package = key_package(&newcomer.provider, &newcomer.identity).unwrap();
            let added = self
                .creator_group
                .add_members(
                    &self.creator.provider,
                    &self.creator.identity,
                    &[package],
                    &quicnprotochat_core::NoDeviceLists,
                )
                .unwrap();
            self.creator_group
                .merge_pending_commit(&self.creator.provider)
                .unwrap();
            self.process(&added.commit)
        }))
    }

    /// The receiver processes one of the creator's (merged) commits.
    fn process(&mut self, commit: &[u8]) -> Duration {
        let (received, took) = time(|| {
            self.receiver_group
                .receive(
                    &self.receiver.provider,
                    commit,
                    &quicnprotochat_core::NoDeviceLists,
                )
                .unwrap()
        });
        let epoch = self.creator_group.epoch();
        assert_eq!(received, Received::Commit { epoch });
        assert_eq!(self.receiver_group.epoch(), epoch);
        took
    }
}

fn print_tables(create: &Timings, reports: &[SizeReport]) {
    let package = key_package(&OpenMlsRustCrypto::default(), &IdentityKeypair::generate()).unwrap();
    println!(
        "Ciphersuite {} ({}); one KeyPackage: {}.",
        suite().name(),
        suite().full_name(),
        bytes(package.len())
    );
    println!();
    println!(
        "Each cell: median (min–max) over the runs shown, after {} warm-up runs for messages and one for \
         commits and joins in groups of up to 3,000 members.",
        Runs::CHEAP.warm_up
    );
    println!();
    println!(
        "Create a group (the creator alone, fresh storage): {} over {} runs.",
        create.cell(),
        Runs::CHEAP.measured
    );
    println!();

    println!(
        "Adding members (Commit and Welcome created, then discarded) and joining from the add-1 Welcome:"
    );
    println!();
    let mut header = String::from("| members | runs |");
    let mut rule = String::from("|---:|---:|");
    for count in ADD_COUNTS {
        header.push_str(&format!(" add {count} |"));
        rule.push_str("---:|");
    }
    header.push_str(" join |");
    rule.push_str("---:|");
    for count in ADD_COUNTS {
        header.push_str(&format!(" commit + welcome, add {count} |"));
        rule.push_str("---:|");
    }
    println!("{header}\n{rule}");
    for report in reports {
        let mut row = format!(
            "| {} | {} |",
            thousands(&report.size.to_string()),
            report.commit_runs
        );
        for add in &report.adds {
            row.push_str(&format!(" {} |", add.create.cell()));
        }
        row.push_str(&format!(" {} |", report.join.cell()));
        for add in &report.adds {
            row.push_str(&format!(
                " {} + {} |",
                sizes_cell(&add.commit_lens),
                sizes_cell(&add.welcome_lens)
            ));
        }
        println!("{row}");
    }
    println!();

    println!(
        "Application messages, 1 KiB, creator → last joiner ({} runs):",
        Runs::CHEAP.measured
    );
    println!();
    println!("| members | encrypt | decrypt | message size |\n|---:|---:|---:|---:|");
    for report in reports {
        println!(
            "| {} | {} | {} | {} |",
            thousands(&report.size.to_string()),
            report.encrypt.cell(),
            report.decrypt.cell(),
            sizes_cell(&report.message_lens),
        );
    }
    println!();

    println!("Commits: the creator's, processed (validated and merged) by the last joiner:");
    println!();
    println!(
        "| members | runs | create self-update | self-update size | process self-update | process add-1 |\n\
         |---:|---:|---:|---:|---:|---:|"
    );
    for report in reports {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            thousands(&report.size.to_string()),
            report.commit_runs,
            report.self_update.cell(),
            sizes_cell(&report.self_update_lens),
            report.process_self_update.cell(),
            report.process_add.cell(),
        );
    }
}

fn time<T>(op: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let value = op();
    (value, started.elapsed())
}

/// Runs one phase of the benchmark, reporting it on stderr.
fn phase<T>(label: &str, what: &str, op: impl FnOnce() -> T) -> T {
    eprint!("{label}: {what}…");
    let (value, took) = time(op);
    eprintln!(" {}", duration(took));
    value
}

/// The unit to show `median` in: its name, how many per second, decimals.
fn unit(median: Duration) -> (&'static str, f64, usize) {
    let seconds = median.as_secs_f64();
    let (unit, per_second) = if seconds < 1e-3 {
        ("µs", 1e6)
    } else if seconds < 1.0 {
        ("ms", 1e3)
    } else {
        ("s", 1.0)
    };
    // Whole microseconds are precise enough; otherwise three significant digits.
    let decimals = match seconds * per_second {
        _ if unit == "µs" => 0,
        value if value < 10.0 => 2,
        value if value < 100.0 => 1,
        _ => 0,
    };
    (unit, per_second, decimals)
}

fn duration(took: Duration) -> String {
    let (unit, per_second, decimals) = unit(took);
    format!("{} {unit}", number(took.as_secs_f64() * per_second, decimals))
}

/// Byte counts of several runs: one number if they all agree.
fn sizes_cell(lens: &[usize]) -> String {
    let min = lens.iter().min().copied().unwrap_or_default();
    let max = lens.iter().max().copied().unwrap_or_default();
    if min == max {
        bytes(min)
    } else {
        format!("{}–{}", bytes(min), bytes(max))
    }
}

fn bytes(n: usize) -> String {
    const KIB: f64 = 1024.0;
    let n_f64 = n as f64;
    if n < 10 * 1024 {
        format!("{} B", thousands(&n.to_string()))
    } else if n < 10 * 1024 * 1024 {
        format!("{} KiB", number(n_f64 / KIB, 0))
    } else {
        format!("{} MiB", number(n_f64 / (KIB * KIB), 1))
    }
}

fn number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    match text.split_once('.') {
        Some((whole, fraction)) => format!("{}.{fraction}", thousands(whole)),
        None => thousands(&text),
    }
}

/// "12345" → "12,345".
fn thousands(digits: &str) -> String {
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}
