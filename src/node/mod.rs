//! `agora node`: one node of the runtime. Connects to NATS (or starts its own nats-server when
//! none is configured), creates the shared streams and buckets, creates the configured markets
//! if missing, joins the cluster (heartbeat, agent, rebalancer: the markets placed on this node
//! run under its `Supervisor`), and on SIGINT/SIGTERM stops every market at a batch boundary
//! with its outputs published, leaves the cluster, then exits.
//!
//! This module must never match orders or build messages: it wires configuration, bus and
//! actors together and reports what it did.

pub mod http;

use std::future::Future;
use std::path::PathBuf;

use actix::Actor;
use async_nats::jetstream;

use crate::actors::{Held, MarketBus, MarketSettings, Shutdown, SnapshotBudget, Supervisor};
use crate::book::{MarketSpec, MarketSpecInput};
use crate::bus::{self, BusError, LocalServer, SnapshotStore};
use crate::cluster::agent::Agent;
use crate::cluster::placement::{Placement, PlacementState};
use crate::cluster::rebalancer::Rebalancer;
use crate::cluster::{Lease, membership};
use crate::config::{Config, ConfigError};
use crate::control::Control;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("{0}")]
    Market(String),
}

/// Where the node's NATS is, and the server it started if it started one.
struct Nats {
    url: String,
    local: Option<LocalServer>,
}

async fn nats(config: &Config) -> Result<Nats, NodeError> {
    if !config.nats_url.is_empty() {
        return Ok(Nats {
            url: config.nats_url.clone(),
            local: None,
        });
    }
    let dir: PathBuf = config.data_dir.join("nats");
    // Started on this thread (the node's main thread, for the node's whole life), tied to it:
    // even a node killed with SIGKILL takes its server with it, so no orphan keeps writing to
    // the data directory. Nothing else runs yet, so the wait blocks nobody.
    let server = LocalServer::start_embedded(&dir, &config.embedded_nats.addr)?;
    say!(
        "started nats-server at {} (JetStream data in {}); it stops with this node",
        server.url(),
        dir.display()
    );
    Ok(Nats {
        url: server.url(),
        local: Some(server),
    })
}

/// The market's stored spec if it has one (it may have been changed since), else the
/// configured one, stored. Nodes starting together race to store it: one creates it, the
/// others find it there ("already exists") and read it.
async fn spec_for(
    store: &jetstream::kv::Store,
    configured: MarketSpec,
) -> Result<MarketSpec, NodeError> {
    let key = configured.symbol.clone();
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        NodeError::Market(format!("{key}: {what} the stored spec: {e}"))
    };
    // Two rounds: read; if missing, create; if another node created it meanwhile, read again.
    for _ in 0..2 {
        match store.get(&key).await {
            Ok(Some(bytes)) => {
                let input: MarketSpecInput =
                    serde_json::from_slice(&bytes).map_err(|e| fail("cannot read", &e))?;
                let stored = input.validate().map_err(|e| fail("cannot use", &e))?;
                if stored != configured {
                    tracing::warn!(market = %key, "the stored spec differs from the configuration; keeping the stored one (market.update changes it)");
                }
                return Ok(stored);
            }
            Ok(None) => {
                let bytes = serde_json::to_vec(&configured.to_input())
                    .map_err(|e| fail("cannot encode", &e))?;
                match store.create(&key, bytes.into()).await {
                    Ok(_) => return Ok(configured),
                    Err(e) if e.kind() == jetstream::kv::CreateErrorKind::AlreadyExists => {}
                    Err(e) => return Err(fail("cannot store", &e)),
                }
            }
            Err(e) => return Err(fail("cannot read", &e)),
        }
    }
    Err(NodeError::Market(format!(
        "{key}: the stored spec was created and then removed while this node started; start it again"
    )))
}

/// Every spec in the markets bucket, read in one pass.
async fn stored_specs(
    client: &async_nats::Client,
    store: &jetstream::kv::Store,
) -> Result<Vec<MarketSpec>, NodeError> {
    let entries = crate::bus::bucket_entries(client, store)
        .await
        .map_err(|e| NodeError::Market(format!("cannot list the stored markets: {e}")))?;
    let mut specs = Vec::new();
    for entry in entries {
        match serde_json::from_slice::<MarketSpecInput>(&entry.value).map(|i| i.validate()) {
            Ok(Ok(spec)) => specs.push(spec),
            _ => tracing::warn!(market = %entry.key, "the stored spec cannot be used; skipped"),
        }
    }
    // A reading comes in no particular order: start them in the order of their names.
    specs.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    Ok(specs)
}

/// Waits (at most `SETTLE_TIMEOUT`) until every known market is placed and the ones placed
/// here run; answers the markets running here.
async fn settle(
    placement: &jetstream::kv::Store,
    supervisor: &actix::Addr<Supervisor>,
    node_id: &str,
    known: &[String],
) -> Vec<String> {
    const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
    let started = std::time::Instant::now();
    // Only the markets not settled yet are looked at again (one KV read each: with thousands
    // of markets, reading them all every round would itself take seconds).
    let mut waiting: Vec<&String> = known.iter().collect();
    loop {
        let held = supervisor.send(Held).await.unwrap_or_default();
        let running: std::collections::HashSet<&str> = held
            .iter()
            .filter(|(_, r)| *r)
            .map(|(s, _)| s.as_str())
            .collect();
        let mut still = Vec::new();
        for market in waiting {
            let placed = match placement.get(market).await {
                Ok(Some(bytes)) => Placement::decode(&bytes),
                _ => None,
            };
            let settled = match placed {
                Some(p) if p.node == node_id => running.contains(market.as_str()),
                Some(p) => p.state == PlacementState::Active,
                None => false,
            };
            if !settled {
                still.push(market);
            }
        }
        waiting = still;
        let settled = waiting.is_empty();
        if settled || started.elapsed() > SETTLE_TIMEOUT {
            if !settled {
                tracing::warn!(
                    "not every market is placed and running after {SETTLE_TIMEOUT:?}; going on (market.list shows where they are)"
                );
            }
            let mut here: Vec<String> = held
                .into_iter()
                .filter(|(_, r)| *r)
                .map(|(s, _)| s)
                .collect();
            here.sort();
            return here;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Connects to NATS, waiting while nothing answers (NATS may start after the node, as it
/// does under an orchestrator): tries again 0.5 s later, doubling up to 5 s, saying each time
/// what it waits for. A refusal or a bad setting fails at once. `None` when `shutdown` came
/// first.
async fn connect_waiting(
    url: &str,
    name: &str,
    options: &bus::NatsOptions,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<async_nats::Client>, NodeError> {
    let mut wait = std::time::Duration::from_millis(500);
    loop {
        match bus::connect_with(url, name, options).await {
            Ok(client) => return Ok(Some(client)),
            Err(BusError::Connect {
                url: shown,
                reason,
                retry: true,
            }) => {
                say!(
                    "waiting for NATS at {shown} ({reason}); trying again in {:.1} s",
                    wait.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.as_mut() => return Ok(None),
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs the node until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    let node_id = config.node_id()?;
    // The HTTP port first: a taken port stops the node before it touches anything. The
    // recorder goes in before any market starts, so they all record into it.
    let (listener, metrics) = if config.http_port == 0 {
        (None, None)
    } else {
        let listener = http::bind(&config.http_addr, config.http_port)
            .await
            .map_err(NodeError::Market)?;
        (Some(listener), crate::telemetry::install_metrics())
    };
    let mut nats = nats(&config).await?;
    // The embedded server has no users: the [nats] credentials are for a configured one.
    let options = if nats.local.is_some() {
        bus::NatsOptions::default()
    } else {
        config.nats.clone()
    };
    let Some(client) = connect_waiting(
        &nats.url,
        &format!("agora-node-{node_id}"),
        &options,
        &mut shutdown,
    )
    .await?
    else {
        say!("agora node {node_id} stopped before NATS answered");
        return Ok(());
    };
    let js = jetstream::new(client.clone());
    let nats_reachable = watch_connection(&client);
    let shutdown_timeout = std::time::Duration::from_secs(config.shutdown_timeout_secs);
    let subjects = config.subjects();
    let streams = config.stream_settings();
    bus::ensure_core_streams(&js, &subjects, &streams).await?;
    let buckets = bus::ensure_buckets(&js, &subjects, &streams).await?;
    let snapshots = SnapshotStore::open(&js, &subjects, &streams).await?;
    let cluster = config.cluster_settings();
    let lease = Lease::new();
    let settings = MarketSettings {
        fetch_max: config.market.fetch_max,
        backlog_wait: std::time::Duration::from_micros(config.market.backlog_wait_us),
        batch_max: config.market.batch_max,
        node_id: node_id.clone(),
        snapshot_every_commands: config.snapshots.every_commands,
        snapshot_every: std::time::Duration::from_secs(config.snapshots.every_secs),
        snapshot_budget: SnapshotBudget::per_second(config.snapshots.max_bytes_per_sec),
        snapshot_format: config.snapshot_format()?,
        lease: Some(lease.clone()),
        takeover: Default::default(),
    };
    let bus = MarketBus {
        client: client.clone(),
        js: js.clone(),
        subjects: subjects.clone(),
        snapshots: Some(snapshots),
        pull_cap: crate::bus::PullCap::new(),
    };
    let supervisor = Supervisor::new(bus, settings, config.market.arbiters)
        .with_own_connections(
            &nats.url,
            &options,
            &format!("agora-node-{node_id}-markets"),
        )
        .start();
    let mut specs = Vec::new();
    for configured in config.market_specs() {
        specs.push(spec_for(&buckets.markets, configured).await?);
    }
    // Markets added at run time (market.add) are in the bucket too: they come back.
    for spec in stored_specs(&client, &buckets.markets).await? {
        if !specs.iter().any(|s| s.symbol == spec.symbol) {
            specs.push(spec);
        }
    }
    let mut known = Vec::new();
    for spec in specs {
        bus::ensure_market_stream(&js, &subjects, &spec.symbol, &streams).await?;
        known.push(spec.symbol.clone());
    }
    // The cluster: the heartbeat (and with it the lease), the agent that runs what placement
    // gives this node, and the rebalancer (active on one node at a time).
    let (stop_cluster, cluster_stopped) = tokio::sync::watch::channel(false);
    let (stop_heartbeat, heartbeat_stopped) = tokio::sync::watch::channel(false);
    let heartbeat_status = membership::HeartbeatStatus::default();
    let heartbeat = actix_rt::spawn(membership::heartbeat(
        buckets.nodes.clone(),
        node_id.clone(),
        supervisor.clone(),
        lease.clone(),
        cluster.clone(),
        heartbeat_status.clone(),
        heartbeat_stopped,
    ));
    let agent = Agent {
        node: node_id.clone(),
        client: client.clone(),
        subjects: subjects.clone(),
        placement: buckets.placement.clone(),
        markets: buckets.markets.clone(),
        supervisor: supervisor.clone(),
        lease: lease.clone(),
        settings: cluster.clone(),
        specs: Default::default(),
    };
    let agent = actix_rt::spawn(agent.listen().await?.run(cluster_stopped.clone()));
    let rebalancer = Rebalancer {
        node: node_id.clone(),
        client: client.clone(),
        subjects: subjects.clone(),
        nodes: buckets.nodes.clone(),
        placement: buckets.placement.clone(),
        markets: buckets.markets.clone(),
        settings: cluster.clone(),
    };
    let rebalancer = actix_rt::spawn(rebalancer.run(cluster_stopped));
    let symbols = settle(&buckets.placement, &supervisor, &node_id, &known).await;
    // Ready means joined: this node's record is in the nodes bucket (its first renewal is
    // acknowledged), so `node.list` and `market.move --to` see it once the ready line is out.
    // A node with markets has waited for that already; without, the wait is one KV put. If
    // the heartbeat fails, its own warnings say why and the node goes on after 5 s.
    let joining = std::time::Instant::now();
    while !lease.valid() && joining.elapsed() < std::time::Duration::from_secs(5) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let http = if let Some(listener) = listener {
        let probes = http::Probes {
            client: client.clone(),
            js: js.clone(),
            subjects: subjects.clone(),
            supervisor: supervisor.clone(),
            metrics: metrics.clone(),
            lease: lease.clone(),
            heartbeat: heartbeat_status.clone(),
            web: crate::web::Web::new(crate::web::Hub::new(
                client.clone(),
                subjects.clone(),
                buckets.clone(),
                node_id.clone(),
                cluster.lease,
            )),
        };
        Some((listener, probes))
    } else {
        None
    };
    let (stop_control, control_stopped) = tokio::sync::watch::channel(false);
    let http = http.map(|(listener, probes)| {
        actix_rt::spawn(http::serve(listener, probes, control_stopped.clone()))
    });
    let control = Control {
        js: js.clone(),
        client: client.clone(),
        subjects: subjects.clone(),
        streams: streams.clone(),
        markets: buckets.markets.clone(),
        placement: buckets.placement.clone(),
        nodes: buckets.nodes.clone(),
        lease: cluster.lease,
        node: node_id.clone(),
        heartbeat: heartbeat_status.clone(),
        market_defaults: config.market_defaults.clone(),
    };
    let queries = crate::query::QueryFront {
        client: client.clone(),
        subjects: subjects.clone(),
        markets: buckets.markets.clone(),
    };
    let queries = actix_rt::spawn(queries.listen().await?.serve(control_stopped.clone()));
    let control = actix_rt::spawn(control.listen().await?.serve(control_stopped));
    let health = if config.http_port == 0 {
        String::new()
    } else {
        format!(
            "; /metrics, /health and /ready on http port {} ({})",
            config.http_port, config.http_addr
        )
    };
    let here = if symbols.is_empty() {
        "none yet".to_string()
    } else {
        symbols.join(", ")
    };
    say!(
        "agora node {node_id} ready: NATS at {}; markets here: {here}; send orders to {}.orders.<MARKET>{health}",
        bus::redact(&nats.url),
        subjects.prefix()
    );
    shutdown.as_mut().await;
    bus::closing();
    say!("agora node {node_id} stopping: finishing the current batches");
    // Each step says what it waits for, so a stop cut short by the bound can say what was
    // left: with NATS unreachable, flushing could otherwise wait for ever.
    let step = std::rc::Rc::new(std::cell::Cell::new("the control service"));
    let waiting = step.clone();
    let stopping = async move {
        let _ = stop_control.send(true);
        let _ = control.await;
        let _ = queries.await;
        if let Some(http) = http {
            waiting.set("the HTTP port");
            let _ = http.await;
        }
        // No new claims; the markets finish their batches while the lease is still renewed;
        // then the node's record goes, so the others take its markets over at once.
        let _ = stop_cluster.send(true);
        waiting.set("the cluster agent");
        if let Ok(Err(e)) = agent.await {
            tracing::warn!("cluster agent: {e}");
        }
        waiting.set("the rebalancer");
        if let Ok(Err(e)) = rebalancer.await {
            tracing::warn!("rebalancer: {e}");
        }
        waiting.set("the markets' last batches and snapshots");
        let _ = supervisor.send(Shutdown).await;
        waiting.set("the heartbeat's removal of this node's record");
        let _ = stop_heartbeat.send(true);
        let _ = heartbeat.await;
        waiting.set("the last publishes to NATS");
        let _ = client.flush().await;
        drop(client);
    };
    if tokio::time::timeout(shutdown_timeout, stopping)
        .await
        .is_err()
    {
        tracing::error!(
            "stopping took over {shutdown_timeout:?} (shutdown_timeout_secs), waiting for {}, NATS {}; exiting without it. Nothing is lost: every command stays in its order stream, and the next owner of each market republishes its last outputs",
            step.get(),
            if nats_reachable.load(std::sync::atomic::Ordering::Relaxed) {
                "reachable"
            } else {
                "unreachable"
            }
        );
    }
    if let Some(mut server) = nats.local.take() {
        let _ = tokio::task::spawn_blocking(move || server.stop()).await;
    }
    say!("agora node {node_id} stopped");
    Ok(())
}

/// Whether `client`'s connection is up, kept current in the returned flag (for what the node
/// says when it stops).
fn watch_connection(client: &async_nats::Client) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (client, up) = (client.clone(), flag.clone());
    actix_rt::spawn(async move {
        loop {
            up.store(
                client.connection_state() == async_nats::connection::State::Connected,
                std::sync::atomic::Ordering::Relaxed,
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    flag
}
