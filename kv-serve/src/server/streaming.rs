//! Server-Sent Events: a job's events as OpenAI's stream chunks, in OpenAI's order, the
//! request's in-flight slots held until the stream ends.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kv_generate::engine::Usage as EngineUsage;
use kv_generate::{FinishReason, TokenLogprobs};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::ReceiverStream;

use super::jobs::{usage, Prepared};
use crate::error::ApiError;
use crate::openai::{StreamChunk, Usage};
use crate::worker::{InFlight, JobEvent};

/// A streamed job: its events, its in-flight slots (held until the stream ends), and what the
/// usage chunk counts.
pub(super) struct Streaming {
    events: UnboundedReceiver<JobEvent>,
    slots: InFlight,
    prompts: Vec<Vec<u32>>,
    n: usize,
    include_usage: bool,
}

impl Streaming {
    pub(super) fn new(
        prepared: &Prepared,
        events: UnboundedReceiver<JobEvent>,
        slots: InFlight,
    ) -> Self {
        Self {
            events,
            slots,
            prompts: prepared.prompts.clone(),
            n: prepared.n,
            include_usage: prepared.include_usage,
        }
    }
}

/// How one kind of response turns events into stream chunks.
pub(super) trait Chunks: Send + 'static {
    /// One chunk's body.
    type Chunk: Serialize + Send;
    /// Chunks sent before any event (chat's role deltas, completions' echoes).
    fn opening(&self) -> Vec<Self::Chunk>;
    /// The chunk for a token of choice `choice`, if it shows anything.
    fn token(
        &self,
        choice: usize,
        text: &str,
        logprobs: Option<&TokenLogprobs>,
        offset: usize,
    ) -> Option<Self::Chunk>;
    /// The chunk that says why choice `choice` ended.
    fn finish(&self, choice: usize, reason: FinishReason) -> Self::Chunk;
    /// The body of the final chunk, which carries the usage: no choices.
    fn closing(&self) -> Self::Chunk;
}

/// Streams `chunks`'s events as Server-Sent Events, in OpenAI's order: the opening chunks,
/// content deltas, each choice's finish chunk, the usage chunk when asked, `[DONE]`. A
/// client that goes away stops the task, which drops the job's receiver: the engine cancels
/// its requests.
pub(super) fn stream<C: Chunks>(chunks: C, job: Streaming) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let Streaming {
            mut events,
            slots: _slots,
            prompts,
            n,
            include_usage,
        } = job;
        let choices = prompts.len() * n;
        // Every chunk but the last says `"usage": null` when the client asked for usage.
        let event = |body: C::Chunk, usage: Option<Usage>| {
            let chunk = StreamChunk {
                body,
                usage: include_usage.then_some(usage),
            };
            Event::default().json_data(chunk).expect("chunks serialise")
        };
        for chunk in chunks.opening() {
            if tx.send(Ok(event(chunk, None))).await.is_err() {
                return;
            }
        }
        let mut usages = vec![EngineUsage::default(); choices];
        let mut offsets = vec![0usize; choices];
        let mut open = choices;
        while open > 0 {
            let chunk = match events.recv().await {
                Some(JobEvent::Token {
                    choice,
                    text,
                    logprobs,
                    ..
                }) => {
                    let chunk = chunks.token(choice, &text, logprobs.as_ref(), offsets[choice]);
                    offsets[choice] += text.len();
                    match chunk {
                        Some(chunk) => chunk,
                        None => continue,
                    }
                }
                Some(JobEvent::Finished {
                    choice,
                    reason,
                    usage,
                }) => {
                    usages[choice] = usage;
                    open -= 1;
                    chunks.finish(choice, reason)
                }
                Some(JobEvent::Failed(e)) => {
                    let _ = tx.send(Ok(error_event(&e))).await;
                    return;
                }
                None => {
                    let e = ApiError::Engine("the engine stopped mid-request".into());
                    let _ = tx.send(Ok(error_event(&e))).await;
                    return;
                }
            };
            if tx.send(Ok(event(chunk, None))).await.is_err() {
                return;
            }
        }
        if include_usage {
            let usage = usage(&prompts, n, &usages);
            if tx
                .send(Ok(event(chunks.closing(), Some(usage))))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// An error in the middle of a stream, as OpenAI's error body.
fn error_event(e: &ApiError) -> Event {
    Event::default()
        .json_data(e.body())
        .expect("error bodies serialise")
}
