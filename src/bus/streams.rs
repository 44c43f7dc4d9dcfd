//! Connecting, and the JetStream streams and KV buckets Agora needs.
//!
//! Streams: `ORDERS_<MARKET>` (one per market, created with the market: the source of truth),
//! `EVENTS` (the journals), `EXECS` (execution reports), `TRADES` (the tape). The shared streams
//! keep a duplicate window well above any failover time, so republished outputs with the same
//! `Nats-Msg-Id` are dropped. Buckets: `agora_markets` (specs), `agora_placement` (owners),
//! `agora_nodes` (heartbeats, short TTL). Creating is idempotent: an existing stream or bucket
//! is opened as it is. This module must never delete an existing stream, nor reconfigure one
//! beyond a market's order stream's subjects (detached at `market.remove`, so publishing to a
//! removed market fails at once, and attached again at `market.add`) and the shared streams'
//! capture subjects, transform and republishing (given to streams of older builds).

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use super::error::BusError;
use super::subjects::Subjects;

/// Storage settings shared by Agora's streams (from configuration).
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// File storage (the default) survives a server restart; memory is for tests and benches.
    pub memory: bool,
    /// Replicas of each stream (R3 in production; 1 on a single server).
    pub replicas: usize,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop duplicates.
    pub duplicate_window: Duration,
    /// How long a node heartbeat lives in `agora_nodes` without renewal.
    pub heartbeat_ttl: Duration,
    /// Messages older than this leave the streams (zero: kept forever).
    pub max_age: Duration,
    /// Each stream keeps at most this many bytes, oldest dropped first (0: no limit).
    pub max_bytes: u64,
}

impl Default for StreamSettings {
    fn default() -> StreamSettings {
        StreamSettings {
            memory: false,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            heartbeat_ttl: Duration::from_secs(3),
            max_age: Duration::ZERO,
            max_bytes: 0,
        }
    }
}

impl StreamSettings {
    fn storage(&self) -> stream::StorageType {
        if self.memory {
            stream::StorageType::Memory
        } else {
            stream::StorageType::File
        }
    }
}

/// Connects to `url` (one or more, comma-separated) with no credentials, failing at once
/// with a message naming the address when nothing answers. See `connect_with` for the rest.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, BusError> {
    super::connect::connect_with(url, name, &super::connect::NatsOptions::default()).await
}

fn stream_config(name: String, subjects: Vec<String>, settings: &StreamSettings) -> stream::Config {
    stream::Config {
        name,
        subjects,
        storage: settings.storage(),
        num_replicas: settings.replicas,
        duplicate_window: settings.duplicate_window,
        max_age: settings.max_age,
        max_bytes: if settings.max_bytes == 0 {
            -1
        } else {
            i64::try_from(settings.max_bytes).unwrap_or(i64::MAX)
        },
        ..Default::default()
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    name: String,
    subjects: Vec<String>,
    settings: &StreamSettings,
) -> Result<stream::Stream, BusError> {
    ensure_stream_with(js, stream_config(name, subjects, settings)).await
}

async fn ensure_stream_with(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, BusError> {
    let name = config.name.clone();
    let created = js.get_or_create_stream(config).await;
    match created {
        Ok(stream) => Ok(stream),
        // Created meanwhile by another node (nodes starting together race): open it.
        Err(e) => js.get_stream(&name).await.map_err(|_| BusError::Stream {
            name,
            reason: e.to_string(),
        }),
    }
}

/// The subjects a market's order stream listens on while the market exists.
fn market_subjects(subjects: &Subjects, market: &str) -> Vec<String> {
    vec![
        subjects.orders(market),
        format!("{}.*", subjects.orders(market)),
        subjects.admin(market),
    ]
}

/// The order stream of one market: `ORDERS_<MARKET>` on `<prefix>.orders.<MARKET>` and
/// `<prefix>.orders.<MARKET>.<ACCOUNT>` (clients) and `<prefix>.admin.<MARKET>` (operators).
/// A stream kept from a removed market (`detach_market_stream`) gets its subjects back.
pub async fn ensure_market_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    market: &str,
    settings: &StreamSettings,
) -> Result<stream::Stream, BusError> {
    Subjects::check_token("market", market)?;
    let wanted = market_subjects(subjects, market);
    let name = subjects.orders_stream(market);
    let stream = ensure_stream(js, name.clone(), wanted.clone(), settings).await?;
    if stream.cached_info().config.subjects != wanted {
        let mut config = stream.cached_info().config.clone();
        config.subjects = wanted;
        js.update_stream(config)
            .await
            .map_err(|e| BusError::Stream {
                name: name.clone(),
                reason: format!("cannot give the kept stream its subjects back: {e}"),
            })?;
        return js.get_stream(&name).await.map_err(|e| BusError::Stream {
            name,
            reason: e.to_string(),
        });
    }
    Ok(stream)
}

/// Detaches a removed market's order stream from the market's subjects (it listens on
/// `<prefix>.removed.<MARKET>` instead, which nobody publishes to), so that publishing to the
/// market fails at once ("no responders") instead of being stored for a market nobody runs.
/// The stream and what it holds are kept: history, and `market.add` attaches it again.
/// Answers the stream's last sequence; `None` when the market has no stream.
pub async fn detach_market_stream(
    js: &jetstream::Context,
    subjects: &Subjects,
    market: &str,
) -> Result<Option<u64>, BusError> {
    Subjects::check_token("market", market)?;
    let name = subjects.orders_stream(market);
    let mut stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Ok(None);
        }
        Err(e) => {
            return Err(BusError::Stream {
                name,
                reason: e.to_string(),
            });
        }
    };
    let info = stream.info().await.map_err(|e| BusError::Stream {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    let mut config = info.config.clone();
    let last = info.state.last_sequence;
    config.subjects = vec![format!("{}.removed.{market}", subjects.prefix())];
    js.update_stream(config)
        .await
        .map_err(|e| BusError::Stream {
            name,
            reason: format!("cannot detach the stream of the removed market: {e}"),
        })?;
    Ok(Some(last))
}

/// The shared streams: journals, execution reports, the trade tape. Each listens on its
/// capture subjects (`<prefix>.capture.<kind>.>`, where only the engine publishes), stores a
/// message under its public subject (`<prefix>.<kind>.>`: consumers filter on it, and the fence
/// of the journal checks it) and republishes what it stored there, once: a plain subscriber of
/// a public subject sees each stored message once however often the engine sent it, with
/// `Nats-Sequence` and `Nats-Last-Sequence` to see a gap.
///
/// A stream created by an older build (listening on the public subjects) is given this
/// configuration in place; what it holds stays, under the same subjects.
pub async fn ensure_core_streams(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> Result<(), BusError> {
    for (name, kind) in [
        (subjects.events_stream(), "events"),
        (subjects.execs_stream(), "execs"),
        (subjects.trades_stream(), "trades"),
    ] {
        let (capture, public) = subjects.capture_and_public(kind);
        let wanted = |config: &mut stream::Config| {
            config.subjects = vec![capture.clone()];
            config.subject_transform = Some(stream::SubjectTransform {
                source: capture.clone(),
                destination: public.clone(),
            });
            config.republish = Some(stream::Republish {
                source: public.clone(),
                destination: public.clone(),
                headers_only: false,
            });
        };
        let mut config = stream_config(name.clone(), Vec::new(), settings);
        wanted(&mut config);
        let stream = ensure_stream_with(js, config).await?;
        let mut have = stream.cached_info().config.clone();
        let before = have.clone();
        wanted(&mut have);
        if have.subjects != before.subjects
            || have.subject_transform != before.subject_transform
            || have.republish != before.republish
        {
            tracing::info!(stream = %name, "giving the stream capture subjects and republishing (a stream of an older build)");
            js.update_stream(have).await.map_err(|e| BusError::Stream {
                name: name.clone(),
                reason: format!(
                    "cannot give it capture subjects and republishing: {e}; stop every node of an older build first"
                ),
            })?;
        }
    }
    Ok(())
}

/// The buckets: market specs, placement, node heartbeats.
#[derive(Clone)]
pub struct Buckets {
    pub markets: kv::Store,
    pub placement: kv::Store,
    pub nodes: kv::Store,
}

pub async fn ensure_buckets(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> Result<Buckets, BusError> {
    let open = |name: &str, history: i64, max_age: Duration| {
        let bucket = subjects.bucket(name);
        let config = kv::Config {
            bucket: bucket.clone(),
            history,
            max_age,
            storage: settings.storage(),
            num_replicas: settings.replicas,
            ..Default::default()
        };
        async move {
            match js.get_key_value(bucket.clone()).await {
                Ok(store) => Ok(store),
                Err(_) => match js.create_key_value(config).await {
                    Ok(store) => Ok(store),
                    // Created meanwhile by another node (nodes starting together race).
                    Err(e) => {
                        js.get_key_value(bucket.clone())
                            .await
                            .map_err(|_| BusError::Bucket {
                                bucket,
                                reason: e.to_string(),
                            })
                    }
                },
            }
        }
    };
    Ok(Buckets {
        markets: open("markets", 5, Duration::ZERO).await?,
        placement: open("placement", 5, Duration::ZERO).await?,
        nodes: open("nodes", 1, settings.heartbeat_ttl).await?,
    })
}

/// A key's last value in a KV bucket, as `bucket_entries` reads it.
#[derive(Clone, Debug)]
pub struct BucketEntry {
    pub key: String,
    pub value: bytes::Bytes,
    pub revision: u64,
    /// When it was written (the server's time), Unix milliseconds.
    pub created_ms: u64,
}

/// The last value of every key of a KV bucket that holds one (deleted and purged keys left
/// out), in one pass over the bucket's stream: one consumer delivering the last message of
/// each key, instead of a listing and then one request a key (the consumer goes on with what
/// is written meanwhile, up to the stream's last message; a key written twice gives its
/// newer value). Retried like `bucket_keys`; a delivery that stalls (a value expiring under
/// it, as node records do) starts it again. In no particular order.
/// `client` is the connection whose inbox the values are delivered to.
pub async fn bucket_entries(
    client: &async_nats::Client,
    store: &kv::Store,
) -> Result<Vec<BucketEntry>, BusError> {
    three_tries(store, "reading its entries", || {
        read_entries(client, store, Read::Values)
    })
    .await
}

/// What a reading of a bucket delivers.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    Values,
    /// The keys only (`BucketEntry::value` left empty).
    Keys,
}

/// `attempt` until it succeeds, at most three times; the last error names the bucket.
async fn three_tries<T, F, Fut>(
    store: &kv::Store,
    doing: &str,
    mut attempt: F,
) -> Result<T, BusError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let mut last_error = String::new();
    for _ in 0..3 {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) => last_error = e,
        }
    }
    Err(BusError::Bucket {
        bucket: store.name.clone(),
        reason: format!("{doing} failed three times: {last_error}"),
    })
}

/// One reading of a bucket: an ordered consumer over the last message of each key, then
/// everything written after, until it has delivered the stream's last message.
///
/// The end is not taken from the consumer's count of pending messages alone: when a key is
/// written again, its previous message is deleted (one value a key), and nats-server 2.15 can
/// then count one message short for a moment and deliver a message with "0 pending" while a
/// newer one is already stored. A reading that stopped there left out the key whose older
/// value it had not reached yet (three keys rewritten every 5 ms: one reading in 30). So
/// "0 pending" is checked against the stream's last sequence; while that is further on, the
/// reading goes on until it has delivered a message at or past it. Every key's newest value
/// at that moment is at or before it and was still stored when the consumer passed it, so it
/// was delivered.
async fn read_entries(
    client: &async_nats::Client,
    store: &kv::Store,
    read: Read,
) -> Result<Vec<BucketEntry>, String> {
    use futures::StreamExt;
    const STALL: Duration = Duration::from_secs(2);
    let consumer = store
        .stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            description: Some("agora bucket read".to_string()),
            filter_subject: format!("{}>", store.prefix),
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            headers_only: read == Read::Keys,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut out = std::collections::HashMap::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(Vec::new());
    }
    // The stream's last sequence when the consumer last said "0 pending" and was behind it.
    let mut until: Option<u64> = None;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    loop {
        let message = match tokio::time::timeout(STALL, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("the consumer ended early".to_string()),
            Err(_) => return Err(format!("no message for {STALL:?} before the last")),
        };
        let info = message.info().map_err(|e| e.to_string())?;
        let (pending, revision) = (info.pending, info.stream_sequence);
        let created_ms =
            u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let operation = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .map(|v| v.as_str().to_string());
        // A key written again while the read goes on comes again, later: the newer wins.
        if let Some(key) = message.subject.as_str().strip_prefix(&store.prefix) {
            if operation.is_none_or(|op| op == "PUT") {
                out.insert(
                    key.to_string(),
                    BucketEntry {
                        key: key.to_string(),
                        value: message.payload.clone(),
                        revision,
                        created_ms,
                    },
                );
            } else {
                out.remove(key);
            }
        }
        let past_the_end = until.is_some_and(|last| revision >= last);
        if past_the_end {
            return Ok(out.into_values().collect());
        }
        if pending == 0 {
            let last = store
                .stream
                .get_info()
                .await
                .map_err(|e| format!("cannot read the stream's last sequence: {e}"))?
                .state
                .last_sequence;
            if revision >= last {
                return Ok(out.into_values().collect());
            }
            until = Some(last);
        }
    }
}

/// Every key of a KV bucket (deleted and purged keys left out), read like `bucket_entries`
/// without the values. A listing that fails part way (its consumer reset under load, a lost
/// heartbeat) would otherwise end early and silently leave keys out, so a failed listing is
/// started again, three times at most. (The client library's own listing stops at the first
/// "0 pending", which can leave out a key written during the listing: see `read_entries`.)
pub async fn bucket_keys(
    client: &async_nats::Client,
    store: &kv::Store,
) -> Result<Vec<String>, BusError> {
    let entries = three_tries(store, "listing its keys", || {
        read_entries(client, store, Read::Keys)
    })
    .await?;
    Ok(entries.into_iter().map(|e| e.key).collect())
}
