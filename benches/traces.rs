//! What tracing costs one stream message on the engine's path (`telemetry::traces`): with
//! tracing off; on, for a message without `traceparent`; on, for an unsampled one; and on, for
//! a sampled one (its four spans made, ended and queued for export). `cargo bench --bench
//! traces`; the results go into BENCHMARKS.md. The exporter points at a closed port: spans are
//! queued and dropped as they would be with a collector down, so nothing here waits on I/O.

use std::hint::black_box;

use async_nats::HeaderMap;
use criterion::{Criterion, criterion_group, criterion_main};

use agora::bus::outputs::Outgoing;
use agora::config::TracingConfig;
use agora::telemetry::traces::{self, Matching, PublishSpans};

fn headers(traceparent: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "a1");
    if let Some(value) = traceparent {
        headers.insert("traceparent", value);
    }
    headers
}

fn bench(c: &mut Criterion) {
    let plain = headers(None);
    let unsampled = headers(Some(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    ));
    let sampled = headers(Some(
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ));
    let journal = Outgoing {
        subject: "agora.events.BTC-USDC".into(),
        msg_id: Some("BTC-USDC:7".into()),
        payload: Default::default(),
    };
    let mut group = c.benchmark_group("traces");
    group.bench_function("off", |b| {
        b.iter(|| traces::command_span("BTC-USDC", 7, Some(black_box(&sampled))))
    });

    // The node's set-up: the OTLP/gRPC exporter inside a tokio runtime.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let config = TracingConfig {
        endpoint: "http://127.0.0.1:9".into(),
        ..TracingConfig::default()
    };
    let tracing = runtime
        .block_on(async { traces::init(&config, None) })
        .expect("tracing starts");
    group.bench_function("on, no traceparent", |b| {
        b.iter(|| traces::command_span("BTC-USDC", 7, Some(black_box(&plain))))
    });
    group.bench_function("on, unsampled traceparent", |b| {
        b.iter(|| traces::command_span("BTC-USDC", 7, Some(black_box(&unsampled))))
    });
    group.bench_function("on, sampled: command, match and publish spans", |b| {
        b.iter(|| {
            let traced = traces::command_span("BTC-USDC", 7, Some(black_box(&sampled)));
            let traced: Vec<_> = traced.into_iter().collect();
            Matching::start("BTC-USDC", &traced, 1).finish(&[]);
            drop(PublishSpans::journal(&traced, &journal));
            drop(PublishSpans::reports(&traced, 2));
            traced
        })
    });
    group.finish();
    runtime.block_on(tracing.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
