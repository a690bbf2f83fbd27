//! One connection of a writer or reader thread, with pipelining of the
//! statements that need no answer of their own.
//!
//! A batch's `BEGIN`, each command's `SAVEPOINT`, a refused command's
//! `ROLLBACK TO`, the appends of messages, the batch's `NOTIFY` and its
//! `COMMIT` return nothing the rules decide on: they are queued
//! ([`Conn::defer`], [`Conn::defer_statement`]) and sent in the same round
//! trip as the next statement whose answer is needed, or the `COMMIT`. A
//! batch of sends is then two round trips to PostgreSQL however many
//! messages it holds, and those round trips are what a batch's length, and
//! so the time it holds its queue locks, is made of
//! (docs/benchmarks/journal.md, "Several nodes on PostgreSQL").
//!
//! An error in a queued statement shows up with the next request; it
//! poisons the connection's transaction ([`Conn::poisoned`]): it cannot be
//! told apart from the statement the caller is running, so the whole batch
//! is rolled back.
//!
//! `tokio-postgres` pipelines requests issued together; a current-thread
//! runtime owned by the thread drives the connection while a call waits,
//! as the synchronous `postgres` crate does internally.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::super::StoreError;

/// A parameter a queued statement owns until it is sent.
pub(super) type Param = Box<dyn ToSql + Send + Sync>;

/// A statement waiting to go out with the next request.
enum Deferred {
    /// Simple statements, no parameters.
    Simple(String),
    /// A prepared statement and its parameters.
    Prepared(Statement, Vec<Param>),
}

/// Where the queue of deferred statements stood: see [`Conn::mark`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Mark {
    len: usize,
    requests: u64,
}

/// A connection, its prepared statements, and the statements waiting to go
/// out with the next request.
pub(super) struct Conn {
    runtime: tokio::runtime::Runtime,
    client: Client,
    statements: HashMap<&'static str, Statement>,
    deferred: Vec<Deferred>,
    /// Requests sent so far, each taking every deferred statement along.
    requests: u64,
    /// A deferred statement failed since the last
    /// [`Self::discard_deferred`].
    poisoned: bool,
}

impl Conn {
    /// Connects with `config`, set up for the node. Must run on a thread
    /// without a runtime (the connection brings its own).
    pub(super) fn connect(config: &tokio_postgres::Config) -> Result<Conn, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Thread)?;
        let (client, connection) = runtime.block_on(config.connect(NoTls)).map_err(classify)?;
        // Polled whenever a call below waits: the thread has no other work.
        drop(runtime.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("PostgreSQL connection ended: {e}");
            }
        }));
        let mut conn = Conn {
            runtime,
            client,
            statements: HashMap::new(),
            deferred: Vec::new(),
            requests: 0,
            poisoned: false,
        };
        // A statement stuck behind a lock (say, of a node that hangs) fails
        // instead of holding a writer for ever. Every statement of the node
        // looks up one key in an index; a queue table that was nearly empty
        // when last analysed (a busy node acks as fast as it enqueues) makes
        // the planner prefer scanning it whole, through every dead row:
        // measured, a queue read went from 0.014 ms to 0.48 ms that way.
        conn.batch_execute("SET statement_timeout = '30s'; SET enable_seqscan = off")
            .map_err(classify)?;
        Ok(conn)
    }

    /// Whether the connection is gone.
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Queues `sql` (simple statements, no parameters, no rows) to go out
    /// ahead of the next request.
    pub(super) fn defer(&mut self, sql: &str) {
        self.deferred.push(Deferred::Simple(sql.to_owned()));
    }

    /// Queues the prepared `sql` with `params` to go out ahead of the next
    /// request (preparing it now if it is new).
    pub(super) fn defer_statement(
        &mut self,
        sql: &'static str,
        params: Vec<Param>,
    ) -> Result<(), tokio_postgres::Error> {
        let statement = self.prepared(sql)?;
        self.deferred.push(Deferred::Prepared(statement, params));
        Ok(())
    }

    /// Where the queue stands now.
    pub(super) fn mark(&self) -> Mark {
        Mark {
            len: self.deferred.len(),
            requests: self.requests,
        }
    }

    /// Whether everything queued since `mark` is still queued (no request
    /// went out since).
    pub(super) fn unsent_since(&self, mark: Mark) -> bool {
        self.requests == mark.requests && self.deferred.len() >= mark.len
    }

    /// Drops what was queued since `mark`, which must still be unsent.
    pub(super) fn unqueue_since(&mut self, mark: Mark) {
        self.deferred.truncate(mark.len);
    }

    /// Drops the one statement queued right at `mark` (still unsent).
    pub(super) fn unqueue_at(&mut self, mark: Mark) {
        if mark.len < self.deferred.len() {
            self.deferred.remove(mark.len);
        }
    }

    /// Forgets what was deferred (the transaction is being rolled back).
    pub(super) fn discard_deferred(&mut self) {
        self.deferred.clear();
        self.poisoned = false;
    }

    /// Whether a deferred statement failed: the transaction is aborted
    /// and what was answered inside it cannot be trusted.
    pub(super) fn poisoned(&self) -> bool {
        self.poisoned
    }

    fn prepared(&mut self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.runtime.block_on(self.client.prepare(sql))?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Takes the deferred statements for a request about to go out.
    fn take_deferred(&mut self) -> Vec<Deferred> {
        self.requests += 1;
        std::mem::take(&mut self.deferred)
    }

    /// The answer of a request: an error of a deferred statement comes
    /// first, and poisons the connection.
    fn settle<T>(
        &mut self,
        (ahead, answer): (Option<tokio_postgres::Error>, Result<T, tokio_postgres::Error>),
    ) -> Result<T, tokio_postgres::Error> {
        if let Some(error) = ahead {
            self.poisoned = true;
            return Err(error);
        }
        answer
    }

    /// Runs the deferred statements and the prepared `sql` in one round
    /// trip.
    pub(super) fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.prepared(sql)?;
        let deferred = self.take_deferred();
        let sent = send(
            &self.runtime,
            &self.client,
            &deferred,
            self.client.query(&statement, params),
        );
        self.settle(sent)
    }

    /// [`Self::query`] for a statement whose rows are not wanted; returns
    /// how many rows it changed.
    pub(super) fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.prepared(sql)?;
        let deferred = self.take_deferred();
        let sent = send(
            &self.runtime,
            &self.client,
            &deferred,
            self.client.execute(&statement, params),
        );
        self.settle(sent)
    }

    /// Runs the deferred statements, then `sql` (simple statements).
    pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let deferred = self.take_deferred();
        let sent = send(
            &self.runtime,
            &self.client,
            &deferred,
            self.client.batch_execute(sql),
        );
        self.settle(sent)
    }

    /// Sends the deferred statements, `notify` (a prepared statement with
    /// its one parameter) if any, and `COMMIT`, in one round trip. An
    /// error in any of them means the transaction did not commit
    /// (PostgreSQL turns the `COMMIT` of an aborted transaction into a
    /// rollback), unless it is the `COMMIT`'s own, which may also mean the
    /// connection broke while committing.
    pub(super) fn commit(
        &mut self,
        notify: Option<(&'static str, &str)>,
    ) -> Result<(), tokio_postgres::Error> {
        if let Some((sql, payload)) = notify {
            self.defer_statement(sql, vec![Box::new(payload.to_owned())])?;
        }
        self.batch_execute("COMMIT")
    }
}

/// Sends every statement of `deferred`, then `last`, in one round trip, and
/// waits for all their answers: the first error of `deferred`, and `last`'s.
fn send<T>(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    deferred: &[Deferred],
    last: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> (Option<tokio_postgres::Error>, Result<T, tokio_postgres::Error>) {
    type Ahead<'a> =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + 'a>>;
    runtime.block_on(async {
        let mut ahead: Vec<Ahead<'_>> = deferred
            .iter()
            .map(|item| -> Ahead<'_> {
                Box::pin(async move {
                    match item {
                        Deferred::Simple(sql) => client.batch_execute(sql).await,
                        Deferred::Prepared(statement, params) => {
                            let params: Vec<&(dyn ToSql + Sync)> = params
                                .iter()
                                .map(|param| param.as_ref() as &(dyn ToSql + Sync))
                                .collect();
                            client.execute(statement, &params).await.map(drop)
                        }
                    }
                })
            })
            .collect();
        let mut last = std::pin::pin!(last);
        // A call sends its request when first polled, before it waits: poll
        // each once, in order, and the requests go out in the order they
        // were queued, all before any answer is awaited.
        let mut early: Vec<Option<Result<(), tokio_postgres::Error>>> = Vec::with_capacity(ahead.len());
        for call in &mut ahead {
            early.push(match futures::poll!(call.as_mut()) {
                std::task::Poll::Ready(result) => Some(result),
                std::task::Poll::Pending => None,
            });
        }
        let last_early = futures::poll!(last.as_mut());
        // The answers come back in the same order.
        let mut first_error = None;
        for (call, early) in ahead.iter_mut().zip(early) {
            let result = match early {
                Some(result) => result,
                None => call.await,
            };
            if let Err(error) = result {
                first_error.get_or_insert(error);
            }
        }
        let answer = match last_early {
            std::task::Poll::Ready(answer) => answer,
            std::task::Poll::Pending => last.await,
        };
        (first_error, answer)
    })
}

/// A database error's full text: the server's message and detail, not only
/// "db error".
pub(super) fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

/// Whether `error` means the server is gone (stopped, restarting,
/// unreachable) rather than that it refused a statement.
pub(super) fn is_unavailable(error: &postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        // Class 08: connection exception; 57P01–57P03: shutting down,
        // crash, cannot connect now.
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57P")
        }
        // No SQLSTATE: the socket failed (or a value did not convert,
        // which these statements never do).
        None => std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>()),
    }
}

/// `StoreError` for a PostgreSQL failure.
pub(super) fn classify(error: postgres::Error) -> StoreError {
    if is_unavailable(&error) {
        StoreError::Unavailable(describe(&error))
    } else {
        StoreError::Postgres(error)
    }
}
