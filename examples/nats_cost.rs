//! What nats-server spends on one execution-report message, and on what.
//!
//! ```sh
//! cargo run --release --example nats_cost -- [messages] [batch] [rounds] [all|atomic]
//! ```
//!
//! Starts a nats-server (file storage, a temporary directory), and for each variant creates a
//! fresh stream, subscribes to its public subject, and publishes `messages` messages of 200
//! bytes in batches of `batch`, waiting for each batch's acknowledgements before the next, as a
//! market publishes a batch's reports. It prints nats-server's CPU (from `/proc`) per 1,000
//! messages. Variants, alternated `rounds` times:
//!
//! - `Today`: the shared streams' set-up (capture subject, transform, republish onto the public
//!   subject), a `Nats-Msg-Id` and an acknowledgement per message: what the node does.
//! - `NoMsgId`: the same without `Nats-Msg-Id`.
//! - `AckLast`: the same, only the last message of a batch asking for an acknowledgement.
//! - `NoAck`: no acknowledgement at all (nothing waits, so publishing is one stream of bytes).
//! - `Plain`: a stream on the public subject itself, no transform or republish.
//! - `Atomic` (`atomic`): each batch as a JetStream atomic batch (`allow_atomic`), the first
//!   and the committing message asking for an answer.

use std::time::{Duration, Instant};

use agora::bus::server::LocalServer;
use agora::telemetry::process::cpu_ms;
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use futures::StreamExt;

type Error = Box<dyn std::error::Error>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    Today,
    NoMsgId,
    AckLast,
    NoAck,
    Plain,
    Atomic,
}

fn arg(n: usize, name: &str, default: usize) -> Result<usize, Error> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| format!("{name} must be a whole number, not {s:?}").into()),
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let total = arg(1, "messages", 100_000)?.max(1);
    let batch = arg(2, "batch", 30)?.max(1);
    let rounds = arg(3, "rounds", 3)?;
    let variants = match std::env::args().nth(4).as_deref() {
        None | Some("all") => vec![
            Variant::Today,
            Variant::NoMsgId,
            Variant::AckLast,
            Variant::NoAck,
            Variant::Plain,
        ],
        Some("atomic") => vec![Variant::Today, Variant::Atomic],
        Some(other) => return Err(format!("unknown set {other:?}: all or atomic").into()),
    };
    let dir = tempfile::tempdir()?;
    let server = LocalServer::start(dir.path())?;
    let client = async_nats::connect(server.url()).await?;
    let js = jetstream::new(client.clone());
    let mut n = 0;
    for round in 0..rounds {
        for &variant in &variants {
            n += 1;
            let per_1000 = run(&client, &js, server.pid(), variant, n, total, batch).await?;
            println!("round {round} {variant:?}: nats-server {per_1000:.2} ms CPU per 1,000");
        }
    }
    Ok(())
}

/// One variant on a fresh stream `S<n>`: nats-server's CPU ms per 1,000 messages.
async fn run(
    client: &async_nats::Client,
    js: &jetstream::Context,
    pid: Option<u32>,
    variant: Variant,
    n: usize,
    total: usize,
    batch: usize,
) -> Result<f64, Error> {
    let name = format!("S{n}");
    let capture = format!("cap{n}.>");
    let public = format!("pub{n}.>");
    let mut config = stream::Config {
        name: name.clone(),
        duplicate_window: Duration::from_secs(120),
        allow_atomic_publish: variant == Variant::Atomic,
        ..Default::default()
    };
    if variant == Variant::Plain {
        config.subjects = vec![public.clone()];
    } else {
        config.subjects = vec![capture.clone()];
        config.subject_transform = Some(stream::SubjectTransform {
            source: capture,
            destination: public.clone(),
        });
        config.republish = Some(stream::Republish {
            source: public.clone(),
            destination: public.clone(),
            headers_only: false,
        });
    }
    let mut stream = js.create_stream(config).await?;
    let mut sub = client.subscribe(public).await?;
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
            got += 1;
        }
        got
    });
    let inbox = client.new_inbox();
    let mut acks = client.subscribe(format!("{inbox}.*")).await?;
    client.flush().await?;
    let subject = if variant == Variant::Plain {
        format!("pub{n}.a")
    } else {
        format!("cap{n}.a")
    };
    let payload = Bytes::from(vec![b'x'; 200]);
    let cpu0 = cpu_ms(pid).ok_or("cannot read nats-server's CPU")?;
    let started = Instant::now();
    let (mut seq, mut sent, mut batch_no) = (0u64, 0usize, 0u64);
    while sent < total {
        let k = batch.min(total - sent);
        batch_no += 1;
        let mut answers = 0;
        for i in 0..k {
            seq += 1;
            let last = i + 1 == k;
            let mut headers = HeaderMap::new();
            if variant != Variant::NoMsgId {
                let id = format!("BENCH-USD:{seq}:x:account-{i}");
                headers.insert("Nats-Msg-Id", HeaderValue::from(id));
            }
            if variant == Variant::Atomic {
                let id = format!("b{n}-{batch_no}");
                headers.insert("Nats-Batch-Id", HeaderValue::from(id));
                headers.insert(
                    "Nats-Batch-Sequence",
                    HeaderValue::from((i + 1).to_string()),
                );
                if last {
                    headers.insert("Nats-Batch-Commit", HeaderValue::from("1"));
                }
            }
            let ask = match variant {
                Variant::NoAck => false,
                Variant::AckLast => last,
                Variant::Atomic => i == 0 || last,
                _ => true,
            };
            if ask {
                answers += 1;
                let reply = format!("{inbox}.{seq}");
                client
                    .publish_with_reply_and_headers(
                        subject.clone(),
                        reply,
                        headers,
                        payload.clone(),
                    )
                    .await?;
            } else {
                client
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await?;
            }
        }
        for _ in 0..answers {
            let ack = tokio::time::timeout(Duration::from_secs(5), acks.next())
                .await?
                .ok_or("the acknowledgement subscription ended")?;
            if ack.payload.starts_with(b"{\"error") {
                return Err(String::from_utf8_lossy(&ack.payload).into_owned().into());
            }
        }
        sent += k;
    }
    if variant == Variant::NoAck {
        // Nothing answers these: wait until the stream holds them all, or say what is missing
        // (a publisher this fast can be cut off as a slow consumer of its own subscription).
        client.flush().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let stored = stream.info().await?.state.messages as usize;
            if stored >= total {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{variant:?}: the stream holds {stored} of {total} messages after 30 s \
                     (nats-server dropped the rest; its log says why)"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_ms(pid).ok_or("cannot read nats-server's CPU")? - cpu0;
    let stored = stream.info().await?.state.messages;
    drop(acks);
    let delivered = reader.await?;
    if stored as usize != total || delivered != total {
        return Err(
            format!("{variant:?}: {stored} stored, {delivered} delivered of {total}").into(),
        );
    }
    eprintln!("{variant:?}: {:.0} messages/s", total as f64 / seconds);
    js.delete_stream(&name).await?;
    Ok(cpu / total as f64 * 1000.0)
}
