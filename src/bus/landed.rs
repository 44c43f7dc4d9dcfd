//! Which of a batch's views are already stored: what a recovering owner asks before it
//! republishes the journal's last batches, so that a view is stored (and republished on its
//! public subject) once even when the market comes back later than the streams' duplicate
//! window.
//!
//! It rests on how the driver publishes: a batch's views go out only once every view of the
//! batch before is acknowledged, so on any one subject the views of earlier batches are all
//! there, and a view of a batch is there exactly when the subject's last stored message is of
//! that batch or a later one (its `Nats-Msg-Id` names the batch: `<MARKET>:<last seq>:...`).

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use futures::StreamExt;

use super::error::BusError;
use super::outputs::{BatchOutputs, Outgoing};
use super::subjects::Subjects;

/// The batch a view or journal Msg-Id belongs to: `<MARKET>:<last seq>[:...]`.
pub fn batch_of(msg_id: &str) -> Option<u64> {
    msg_id.split(':').nth(1)?.parse().ok()
}

/// The stored subject of a message published on a capture subject: the same without
/// `capture.` after the prefix.
fn stored_subject(subjects: &Subjects, capture: &str) -> Option<String> {
    let prefix = subjects.prefix();
    capture
        .strip_prefix(prefix)?
        .strip_prefix(".capture.")
        .map(|rest| format!("{prefix}.{rest}"))
}

/// The reports and tape streams, to look up what landed.
pub struct Landed {
    subjects: Subjects,
    execs: jetstream::stream::Stream,
    trades: jetstream::stream::Stream,
}

impl Landed {
    pub async fn open(js: &jetstream::Context, subjects: &Subjects) -> Result<Landed, BusError> {
        let open = |name: String| async move {
            js.get_stream(&name).await.map_err(|e| BusError::Stream {
                name,
                reason: e.to_string(),
            })
        };
        Ok(Landed {
            subjects: subjects.clone(),
            execs: open(subjects.execs_stream()).await?,
            trades: open(subjects.trades_stream()).await?,
        })
    }

    /// Whether `view` (a report or tape message of a batch) is stored.
    async fn stored(
        &self,
        stream: &jetstream::stream::Stream,
        view: &Outgoing,
    ) -> Result<bool, BusError> {
        let (Some(batch), Some(subject)) = (
            view.msg_id.as_deref().and_then(batch_of),
            stored_subject(&self.subjects, &view.subject),
        ) else {
            return Ok(false);
        };
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(last) => Ok(last
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .and_then(|id| batch_of(id.as_str()))
                .is_some_and(|stored| stored >= batch)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(BusError::Stream {
                name: stream.cached_info().config.name.clone(),
                reason: format!("reading the last message on {subject}: {e}"),
            }),
        }
    }

    /// Drops from `out` the reports and tape already stored; answers how many it dropped.
    /// Looks up to 32 subjects up at once.
    pub async fn drop_stored(&self, out: &mut BatchOutputs) -> Result<usize, BusError> {
        let execs = std::mem::take(&mut out.execs);
        let checked: Vec<(Outgoing, Result<bool, BusError>)> = futures::stream::iter(execs)
            .map(|view| async move {
                let stored = self.stored(&self.execs, &view).await;
                (view, stored)
            })
            .buffered(32)
            .collect()
            .await;
        let mut dropped = 0;
        for (view, stored) in checked {
            if stored? {
                dropped += 1;
            } else {
                out.execs.push(view);
            }
        }
        if let Some(tape) = out.trades.take() {
            if self.stored(&self.trades, &tape).await? {
                dropped += 1;
            } else {
                out.trades = Some(tape);
            }
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_batch_and_capture_subjects_their_stored_subject() {
        assert_eq!(batch_of("BTC-USDC:42:x:acct-1"), Some(42));
        assert_eq!(batch_of("BTC-USDC:42:t"), Some(42));
        assert_eq!(batch_of("BTC-USDC:42"), Some(42));
        assert_eq!(batch_of("a-cid"), None);
        let s = Subjects::default();
        assert_eq!(
            stored_subject(&s, &s.capture_execs("a", "BTC-USDC")).as_deref(),
            Some("agora.execs.a.BTC-USDC")
        );
        assert_eq!(
            stored_subject(&s, &s.capture_trades("BTC-USDC")).as_deref(),
            Some("agora.trades.BTC-USDC")
        );
        assert_eq!(stored_subject(&s, "agora.execs.a.B"), None);
    }
}
