//! The ceiling of the machine: the bench's payloads through JetStream alone (publish and pull
//! consume, no engine between), measured the same way as the phases through the node.

use super::*;

/// Phase 1: the same payloads through JetStream alone (publish + pull consume), no engine.
pub(super) async fn raw_phase(
    run: &mut Run<'_>,
    js: &jetstream::Context,
    pace: Option<f64>,
) -> Result<PhaseResult, BenchError> {
    let (name, label) = match pace {
        None => ("raw", "raw JetStream, as fast as possible".to_string()),
        Some(rate) => ("raw_paced", format!("raw JetStream at {rate:.0}/s")),
    };
    let stream_name = run.raw_stream.clone();
    let raw_subject = |market: &str| format!("{}.raw.{market}", run.subjects.prefix());
    let stream = js
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![format!("{}.raw.>", run.subjects.prefix())],
            storage: if run.options.memory {
                stream::StorageType::Memory
            } else {
                stream::StorageType::File
            },
            num_replicas: run.options.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| BenchError::new(format!("cannot create the stream {stream_name}: {e}")))?;
    let counts: Vec<usize> = run.flows.iter().map(|f| f.commands.len()).collect();
    let total: u64 = counts.iter().map(|&n| n as u64).sum();
    let mut consumers = Vec::new();
    for market in &run.max_markets {
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: raw_subject(market),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                BenchError::new(format!("cannot create a consumer on {stream_name}: {e}"))
            })?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(RAW_FETCH_MAX)
            .messages()
            .await
            .map_err(|e| BenchError::new(format!("cannot consume {stream_name}: {e}")))?;
        consumers.push(messages);
    }
    let cpu_before = Cpu::read(&run.pids);
    let shared = Shared::new(
        &counts,
        run.options.window,
        run.options.latency_log.is_some(),
    );
    let collector = {
        let shared = shared.clone();
        let counts = counts.clone();
        tokio::spawn(async move {
            let mut tasks = JoinSet::new();
            for (m, mut messages) in consumers.into_iter().enumerate() {
                let shared = shared.clone();
                let count = counts[m];
                tasks.spawn(async move {
                    let mut histogram = histogram();
                    let mut last = Instant::now();
                    for k in 0..count {
                        match messages.next().await {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                return Err(BenchError::new(format!(
                                    "reading the raw stream: {e}"
                                )));
                            }
                            None => return Err(BenchError::new("the raw consumer ended early")),
                        }
                        last = Instant::now();
                        if let Some(us) = shared.latency_us(m, k, last) {
                            histogram.saturating_record(us.max(1));
                        }
                        shared.answered(m);
                    }
                    Ok::<_, BenchError>(Collected { histogram, last })
                });
            }
            merge(tasks).await
        })
    };
    let mut publishers = JoinSet::new();
    let start = tokio::time::Instant::now();
    let per_market_rate = pace.map(|rate| rate / run.flows.len() as f64);
    for (m, flow) in run.flows.iter().enumerate() {
        publishers.spawn(publish(
            Publish {
                js: js.clone(),
                subject: raw_subject(&run.max_markets[m]),
                market: m,
                payloads: flow.commands.clone(),
                first_seq: None,
                release_on_ack: false,
                pace: per_market_rate.map(|per_sec| Pace { start, per_sec }),
            },
            shared.clone(),
        ));
    }
    let collected = wait_phase(&label, total, &shared, &mut publishers, collector, run.node).await;
    let cpu_after = Cpu::read(&run.pids);
    if let Err(e) = js.delete_stream(&stream_name).await {
        eprintln!("agora bench: could not delete the stream {stream_name}: {e}");
    }
    let collected = collected?;
    if let Some(path) = &run.options.latency_log {
        append_latency_log(path, name, &shared)?;
    }
    Ok(phase_result(
        name,
        pace,
        total,
        &shared,
        &collected,
        (cpu_before, cpu_after),
        Written::default(),
    ))
}
