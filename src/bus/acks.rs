//! `AckedPublisher`: JetStream publishes whose acknowledgements come back on one subscription
//! of the publisher's own, instead of one request (an inbox, a channel, a timer and a boxed
//! future) per message. A market publishes a batch's execution reports and tape with it, then
//! waits for all their acknowledgements at once; the waiting can be put off, so the next batch
//! is matched meanwhile.
//!
//! Each publish carries the reply subject `<inbox>.<n>`, `n` counting the publisher's messages;
//! `wait` returns once every message published since the last `wait` is acknowledged, or with
//! the first error JetStream answered. Acknowledgements of earlier messages (after an error or a
//! time-out) are ignored. This module must never retry a publish: a message JetStream refused is
//! the market's to recover (its recovery republishes with the same `Nats-Msg-Id`s).

use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::{HeaderMap, HeaderValue, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;

/// Why a batch of publishes was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("the connection to NATS refused the message: {0}")]
    Send(String),
    #[error("JetStream refused message {subject}: {message}")]
    Refused { subject: String, message: String },
    #[error("no stream takes subject {0} (is the stream there?)")]
    NoStream(String),
    #[error(
        "{missing} of {sent} messages were not acknowledged within {timeout:?}; NATS is slow or unreachable"
    )]
    TimedOut {
        missing: usize,
        sent: usize,
        timeout: Duration,
    },
    #[error("the acknowledgement subscription ended (the connection closed)")]
    Closed,
}

/// How long `wait` waits for the last acknowledgement; the JetStream context's default.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AckedPublisher {
    client: async_nats::Client,
    /// `<inbox>.`: reply subjects are this plus the message's number.
    prefix: String,
    acks: async_nats::Subscriber,
    /// Number of the first message not yet acknowledged by a `wait`.
    base: u64,
    /// Subjects of the messages `base..` (for error messages), and whether each is acknowledged.
    pending: Vec<(Subject, bool)>,
    acked: usize,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    description: String,
    #[serde(default)]
    err_code: u64,
}

#[derive(Deserialize)]
struct AckBody {
    error: Option<ApiError>,
}

impl AckedPublisher {
    /// Subscribes to a new inbox of `client`'s for the acknowledgements.
    pub async fn new(client: async_nats::Client) -> Result<AckedPublisher, AckError> {
        let inbox = client.new_inbox();
        let acks = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| AckError::Send(e.to_string()))?;
        Ok(AckedPublisher {
            client,
            prefix: format!("{inbox}."),
            acks,
            base: 0,
            pending: Vec::new(),
            acked: 0,
        })
    }

    /// Messages published and not yet acknowledged by a `wait`.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Publishes `payload` on `subject` (a subject of a JetStream stream), with `Nats-Msg-Id`
    /// when given. Its acknowledgement is awaited by the next `wait`.
    pub async fn publish(
        &mut self,
        subject: String,
        msg_id: Option<String>,
        payload: Bytes,
    ) -> Result<(), AckError> {
        let n = self.base + self.pending.len() as u64;
        let mut reply = String::with_capacity(self.prefix.len() + 20);
        reply.push_str(&self.prefix);
        reply.push_str(crate::wire::ShortStr::decimal(n, 0).as_str());
        let mut headers = HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert(NATS_MESSAGE_ID, HeaderValue::from(id));
        }
        let subject = Subject::from(subject);
        self.pending.push((subject.clone(), false));
        self.client
            .publish_with_reply_and_headers(subject, reply, headers, payload)
            .await
            .map_err(|e| AckError::Send(e.to_string()))
    }

    /// Waits until every message published since the last `wait` is acknowledged. On an error
    /// the messages still pending are forgotten (their late acknowledgements are ignored).
    pub async fn wait(&mut self, timeout: Duration) -> Result<(), AckError> {
        let result = tokio::time::timeout(timeout, self.collect())
            .await
            .unwrap_or_else(|_| {
                Err(AckError::TimedOut {
                    missing: self.pending.len() - self.acked,
                    sent: self.pending.len(),
                    timeout,
                })
            });
        self.base += self.pending.len() as u64;
        self.pending.clear();
        self.acked = 0;
        result
    }

    async fn collect(&mut self) -> Result<(), AckError> {
        while self.acked < self.pending.len() {
            let Some(ack) = self.acks.next().await else {
                return Err(AckError::Closed);
            };
            // `<inbox>.<n>`: which message it answers.
            let Some(n) = ack
                .subject
                .as_str()
                .rsplit_once('.')
                .and_then(|(_, n)| n.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(i) = n
                .checked_sub(self.base)
                .and_then(|i| usize::try_from(i).ok())
                .filter(|i| *i < self.pending.len())
            else {
                continue;
            };
            let (subject, done) = &mut self.pending[i];
            if *done {
                continue;
            }
            if ack.status == Some(StatusCode::NO_RESPONDERS) {
                return Err(AckError::NoStream(subject.to_string()));
            }
            // `{"stream":...,"seq":...}` (maybe `"duplicate":true`), or `{"error":{...}}`.
            if !ack.payload.starts_with(b"{\"stream\"") {
                let body: Option<AckBody> = serde_json::from_slice(&ack.payload).ok();
                match body {
                    Some(AckBody { error: None }) => {}
                    Some(AckBody { error: Some(e) }) => {
                        return Err(AckError::Refused {
                            subject: subject.to_string(),
                            message: format!("{} (error {})", e.description, e.err_code),
                        });
                    }
                    None => {
                        return Err(AckError::Refused {
                            subject: subject.to_string(),
                            message: format!(
                                "unreadable acknowledgement {:?}",
                                String::from_utf8_lossy(&ack.payload)
                            ),
                        });
                    }
                }
            }
            *done = true;
            self.acked += 1;
        }
        Ok(())
    }
}
