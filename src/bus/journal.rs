//! The one reader of the journal (`EVENTS`, a subject per market): where a market's journal
//! ends, the batches there, and whether it covers a command yet. Market recovery, the control
//! plane, the bench and the tests all read the journal through it.
//!
//! It reads only the heads of journal messages (`first_seq`, `last_seq`) and their headers;
//! the events themselves are decoded by whoever needs them. This module must never write.

use std::time::{Duration, Instant};

use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::{
    self,
    message::StreamMessage,
    stream::{LastRawMessageErrorKind, RawMessageErrorKind},
};
use serde::Deserialize;

use super::{BusError, Subjects};
use crate::book::Seq;

/// The head of a journal message: which input sequences its batch covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct BatchHead {
    pub first_seq: Seq,
    pub last_seq: Seq,
}

/// The end of a market's journal: its last batch (and the stream sequence of its message),
/// and the batch before it. A batch's views may still be unacknowledged while the next
/// batch's journal message lands (the driver collects a batch's acknowledgements while it
/// processes and journals the next one), so a new owner rebuilds and republishes both.
#[derive(Clone, Copy, Debug)]
pub struct JournalTail {
    /// The `EVENTS` stream sequence of the last message.
    pub seq: u64,
    pub head: BatchHead,
    /// `None` for a market's first batch (or when the message before it is gone or was not
    /// read).
    pub prev: Option<BatchHead>,
    /// The stream sequence of the message before (from the last one's fence header), 0 if none.
    pub prev_seq: u64,
}

impl JournalTail {
    /// The batches whose views may be unacknowledged, oldest first.
    pub fn unsettled(&self) -> impl Iterator<Item = BatchHead> {
        self.prev.into_iter().chain(std::iter::once(self.head))
    }

    /// The first command of the batches a new owner rebuilds.
    pub fn rebuild_from(&self) -> Seq {
        self.prev.map_or(self.head.first_seq, |p| p.first_seq)
    }
}

/// The journal's last message on a market's subject: where it is, and its `Nats-Msg-Id`.
#[derive(Clone, Debug)]
pub struct Written {
    pub seq: u64,
    pub msg_id: Option<String>,
}

/// Reads the journal stream.
#[derive(Clone)]
pub struct Journal {
    events: jetstream::stream::Stream,
    subjects: Subjects,
}

fn read_err(market: &str, what: &'static str, e: impl std::fmt::Display) -> BusError {
    BusError::Market {
        market: market.to_string(),
        what,
        reason: e.to_string(),
    }
}

impl Journal {
    /// Opens the journal stream.
    pub async fn open(js: &jetstream::Context, subjects: &Subjects) -> Result<Journal, BusError> {
        let name = subjects.events_stream();
        let events = js.get_stream(&name).await.map_err(|e| BusError::Stream {
            name,
            reason: e.to_string(),
        })?;
        Ok(Journal::of(events, subjects))
    }

    /// The reader of an open journal stream.
    pub fn of(events: jetstream::stream::Stream, subjects: &Subjects) -> Journal {
        Journal {
            events,
            subjects: subjects.clone(),
        }
    }

    /// The market's last journal message, if it has one.
    async fn last(&self, market: &str) -> Result<Option<StreamMessage>, BusError> {
        match self
            .events
            .get_last_raw_message_by_subject(&self.subjects.events(market))
            .await
        {
            Ok(last) => Ok(Some(last)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(read_err(market, "reading the journal", e)),
        }
    }

    fn head(market: &str, m: &StreamMessage, what: &'static str) -> Result<BatchHead, BusError> {
        rmp_serde::from_slice(&m.payload).map_err(|e| read_err(market, what, e))
    }

    /// The stream sequence of the journal message before `m` on its subject (its fence
    /// header), 0 when it is the first.
    fn fence(m: &StreamMessage) -> u64 {
        m.headers
            .get(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE)
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .unwrap_or(0)
    }

    /// The last input sequence the market's journal covers (0: none yet).
    pub async fn last_seq(&self, market: &str) -> Result<Seq, BusError> {
        match self.last(market).await? {
            Some(m) => Ok(Self::head(market, &m, "reading the journal's last batch")?.last_seq),
            None => Ok(0),
        }
    }

    /// The market's last journal message: its stream sequence and message id (`None`: none).
    pub async fn last_written(&self, market: &str) -> Result<Option<Written>, BusError> {
        Ok(self.last(market).await?.map(|m| Written {
            seq: m.sequence,
            msg_id: m
                .headers
                .get(NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_string()),
        }))
    }

    /// The journal's last two batches (`None`: the journal is empty). The batch before the
    /// last is found through the last message's fence header, and taken from `seen` when that
    /// already names it; with `read_prev` false it is not read from the stream otherwise.
    pub async fn tail(
        &self,
        market: &str,
        seen: Option<JournalTail>,
        read_prev: bool,
    ) -> Result<Option<JournalTail>, BusError> {
        let Some(last) = self.last(market).await? else {
            return Ok(None);
        };
        let head = Self::head(market, &last, "reading the journal's last batch")?;
        let prev_seq = Self::fence(&last);
        let prev = match seen {
            Some(t) if t.seq == last.sequence => t.prev,
            Some(t) if t.seq == prev_seq => Some(t.head),
            _ if prev_seq == 0 || !read_prev => None,
            _ => self.batch_at(market, prev_seq).await?,
        };
        // Batches are contiguous; anything else is not the batch before this one.
        let prev = prev.filter(|p| p.last_seq + 1 == head.first_seq);
        Ok(Some(JournalTail {
            seq: last.sequence,
            head,
            prev,
            prev_seq,
        }))
    }

    /// The market's journal batch at stream sequence `seq`, if it is still there and is the
    /// market's.
    pub async fn batch_at(&self, market: &str, seq: u64) -> Result<Option<BatchHead>, BusError> {
        match self.events.get_raw_message(seq).await {
            Ok(m) if m.subject.as_str() == self.subjects.events(market) => {
                Self::head(market, &m, "reading the journal's batch before the last").map(Some)
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(read_err(market, "reading the journal", e)),
        }
    }

    /// The payload of the journal message whose batch covers input `seq`, looking back at
    /// most `look_back` messages from the last (`None`: not found among them, or the journal
    /// does not reach `seq` yet).
    pub async fn batch_covering(
        &self,
        market: &str,
        seq: Seq,
        look_back: usize,
    ) -> Result<Option<Vec<u8>>, BusError> {
        let Some(mut at) = self.last(market).await? else {
            return Ok(None);
        };
        for _ in 0..look_back {
            let head = Self::head(market, &at, "reading a journal batch")?;
            if head.last_seq < seq {
                return Ok(None);
            }
            if head.first_seq <= seq {
                return Ok(Some(at.payload.to_vec()));
            }
            let previous = Self::fence(&at);
            if previous == 0 {
                return Ok(None);
            }
            at = match self.events.get_raw_message(previous).await {
                Ok(m) => m,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(e) => return Err(read_err(market, "reading the journal", e)),
            };
        }
        Ok(None)
    }

    /// Waits until the market's journal covers input `seq`, reading it every `poll`; answers
    /// whether it did within `timeout`. A failed read is tried again until then.
    pub async fn wait_covers(
        &self,
        market: &str,
        seq: Seq,
        timeout: Duration,
        poll: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.last_seq(market).await.is_ok_and(|last| last >= seq) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(poll).await;
        }
    }
}
