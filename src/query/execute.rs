//! Execute a planned query as a stream of batches in the promised schema.
//!
//! The stream holds an execution slot for as long as it lives and ends with a
//! `ResourceExhausted` error when the query timeout passes. Batches are passed on one at
//! a time as DataFusion produces them. [`QueryStream::detach`] runs it in a task of its
//! own that cancels the query (freeing its slot and memory) when the client stops
//! reading.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use datafusion::arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::execute_stream;
use futures::Stream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use super::PlannedQuery;
use crate::error::{Error, Phase, Result};
use crate::session::Sessions;

/// How a query's stream ended, for the audit log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub rows: u64,
    /// Bytes of Arrow data passed on (`quota::batch_bytes`).
    pub bytes: u64,
    /// The stream was stopped by the principal's daily quota (`QUOTA_EXCEEDED`).
    pub quota_exceeded: bool,
    /// Groups the threshold suppressed.
    pub groups_suppressed: u64,
    /// Every batch was produced (not cancelled, failed or timed out).
    pub completed: bool,
}

type Finish = Box<dyn FnOnce(Outcome) + Send>;

/// A running query.
pub struct QueryStream {
    schema: SchemaRef,
    inner: SendableRecordBatchStream,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    finished: bool,
    failed: bool,
    rows: u64,
    bytes: u64,
    quota_exceeded: bool,
    suppressed: Vec<Arc<std::sync::atomic::AtomicU64>>,
    finish: Option<Finish>,
    /// The principal's open release: counts batches against the daily quota and holds
    /// one of their concurrent-query slots.
    quota: Option<crate::quota::Release>,
    _slot: OwnedSemaphorePermit,
}

impl QueryStream {
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Counts every batch against the principal's daily quota before it is passed on;
    /// the stream stops with `QUOTA_EXCEEDED` before a batch that would cross it.
    /// Replaces the stream of batches (same schema) by what `f` makes of it: timeout,
    /// quota, conformance and the outcome still apply to what it yields.
    pub fn map_batches(
        mut self,
        f: impl FnOnce(SendableRecordBatchStream) -> SendableRecordBatchStream,
    ) -> Self {
        let inner = std::mem::replace(
            &mut self.inner,
            Box::pin(datafusion::physical_plan::EmptyRecordBatchStream::new(
                Arc::clone(&self.schema),
            )),
        );
        self.inner = f(inner);
        self
    }

    pub fn with_quota(mut self, release: crate::quota::Release) -> Self {
        self.quota = Some(release);
        self
    }

    /// Calls `f` once when the stream is done with (ended, failed or dropped).
    pub fn on_finish(mut self, f: impl FnOnce(Outcome) + Send + 'static) -> Self {
        self.finish = Some(Box::new(f));
        self
    }
}

impl Drop for QueryStream {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f(Outcome {
                rows: self.rows,
                bytes: self.bytes,
                quota_exceeded: self.quota_exceeded,
                groups_suppressed: self
                    .suppressed
                    .iter()
                    .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                    .sum(),
                completed: self.finished && !self.failed,
            });
        }
    }
}

impl QueryStream {
    /// Runs the query in a task of its own and hands its batches over a channel of one.
    /// When the consumer (the client, through gRPC flow control) has not taken a batch for
    /// `idle`, or has gone away, the query is dropped: its slot and memory are free at
    /// once, and its finish callback runs with `completed: false`. The consumer then sees
    /// a `ResourceExhausted` error after the batches it already had.
    pub fn detach(self, idle: Duration) -> impl Stream<Item = Result<RecordBatch>> + Send {
        use futures::StreamExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(1);
        let idled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&idled);
        tokio::spawn(async move {
            let mut query = self;
            while let Some(item) = query.next().await {
                match tokio::time::timeout(idle, tx.send(item)).await {
                    Ok(Ok(())) => {}
                    // The consumer is gone: the client cancelled or disconnected.
                    Ok(Err(_)) => break,
                    Err(_) => {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                            idle = %humantime::format_duration(idle),
                            "result stream not read; query cancelled"
                        );
                        break;
                    }
                }
            }
            drop(query);
        });
        let ended = futures::stream::once(async move {
            idled.load(std::sync::atomic::Ordering::Relaxed).then(|| {
                Err(Error::ResourceExhausted(format!(
                    "the result was not read for {}; the query was cancelled",
                    humantime::format_duration(idle)
                )))
            })
        })
        .filter_map(futures::future::ready);
        tokio_stream::wrappers::ReceiverStream::new(rx).chain(ended)
    }
}

/// Starts executing `query`: waits for a slot (within the timeout), plans physically and
/// opens the stream.
pub async fn execute(query: &PlannedQuery, sessions: &Sessions) -> Result<QueryStream> {
    use tracing::Instrument;
    start(query, sessions)
        .instrument(tracing::info_span!("execute"))
        .await
}

async fn start(query: &PlannedQuery, sessions: &Sessions) -> Result<QueryStream> {
    let timeout = sessions.limits().query_timeout;
    let deadline = Instant::now() + timeout;
    let slot = tokio::time::timeout_at(deadline, Arc::clone(sessions.slots()).acquire_owned())
        .await
        .map_err(|_| {
            Error::ResourceExhausted(format!(
                "no query slot became free within {}",
                humantime::format_duration(timeout)
            ))
        })?
        .map_err(|_| Error::Internal("query slots closed".into()))?;
    let state = &query.session.state;
    let physical = tokio::time::timeout_at(
        deadline,
        state
            .query_planner()
            .create_physical_plan(&query.plan, state),
    )
    .await
    .map_err(|_| timed_out(timeout))?
    .map_err(|e| Error::from_datafusion(e, Phase::Planning))?;
    let suppressed = crate::rewrite::boundary::suppression_counters(&physical);
    let inner = execute_stream(physical, sessions.task_context(&query.session))
        .map_err(|e| Error::from_datafusion(e, Phase::Execution))?;
    Ok(QueryStream {
        schema: Arc::clone(&query.schema),
        inner,
        deadline: Box::pin(tokio::time::sleep_until(deadline)),
        timeout,
        finished: false,
        failed: false,
        rows: 0,
        bytes: 0,
        quota_exceeded: false,
        suppressed,
        finish: None,
        quota: None,
        _slot: slot,
    })
}

fn timed_out(timeout: Duration) -> Error {
    Error::ResourceExhausted(format!(
        "query exceeded its time limit of {}",
        humantime::format_duration(timeout)
    ))
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.finished = true;
            self.failed = true;
            return Poll::Ready(Some(Err(timed_out(self.timeout))));
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.finished = true;
                self.failed = true;
                Poll::Ready(Some(Err(Error::from_datafusion(e, Phase::Execution))))
            }
            Poll::Ready(Some(Ok(batch))) => {
                let adapted = conform(batch, &self.schema).and_then(|b| {
                    match self.quota.as_ref().map(|q| q.admit(&b)) {
                        Some(Err(refusal)) => {
                            self.quota_exceeded = true;
                            Err(Error::Refused(refusal))
                        }
                        _ => Ok(b),
                    }
                });
                match &adapted {
                    Ok(b) => {
                        self.rows += b.num_rows() as u64;
                        self.bytes += crate::quota::batch_bytes(b);
                    }
                    Err(_) => {
                        self.finished = true;
                        self.failed = true;
                    }
                }
                Poll::Ready(Some(adapted))
            }
        }
    }
}

/// Puts a batch into the promised schema: same columns, promised types and field flags.
fn conform(batch: RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema_ref() == schema {
        return Ok(batch);
    }
    if batch.num_columns() != schema.fields().len() {
        return Err(Error::Internal(format!(
            "batch has {} columns, schema {}",
            batch.num_columns(),
            schema.fields().len()
        )));
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(c, f)| {
            if c.data_type() == f.data_type() {
                Ok(Arc::clone(c))
            } else {
                cast(c, f.data_type()).map(|a| a as ArrayRef)
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("cannot conform batch: {e}")))?;
    RecordBatch::try_new_with_options(
        Arc::clone(schema),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )
    .map_err(|e| Error::Internal(format!("cannot conform batch: {e}")))
}
