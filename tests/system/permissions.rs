//! `config/nats/permissions.conf` against a real nats-server: a trader sends orders and reads
//! her own reports, but is refused on `agora.ctl.>` and `agora.admin.>` and cannot read another
//! account's `agora.execs`; an operator may send operator commands.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agora::bus::{self, LocalServer, StreamSettings, Subjects};
use async_nats::jetstream;

/// The documented configuration, with literal passwords instead of environment variables.
fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/nats/permissions.conf"
    ))
    .expect("the documented configuration exists")
    .replace("$AGORA_NODE_PASSWORD", "\"node-secret\"")
    .replace("$AGORA_HISTORY_PASSWORD", "\"history-secret\"")
    .replace("$AGORA_OPERATOR_PASSWORD", "\"operator-secret\"")
    .replace("$AGORA_ALICE_PASSWORD", "\"alice-secret\"")
    .replace("$AGORA_BOB_PASSWORD", "\"bob-secret\"");
    let path = dir.join("permissions.conf");
    std::fs::write(&path, text).expect("write");
    path
}

/// A connection as `user`, keeping every error the server sends it.
async fn connect(
    url: &str,
    user: &str,
    password: &str,
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let sink = errors.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        // Each user's replies go to her own inbox, the only one she may read.
        .custom_inbox_prefix(format!("_INBOX_{user}"))
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    sink.lock().map(|mut v| v.push(e.to_string())).unwrap_or(());
                }
            }
        })
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"));
    (client, errors)
}

/// Waits until the server has reported a permissions violation mentioning `subject`.
async fn refused(errors: &Arc<Mutex<Vec<String>>>, subject: &str) {
    let started = Instant::now();
    loop {
        let seen = errors.lock().map(|v| v.clone()).unwrap_or_default();
        if seen
            .iter()
            .any(|e| e.to_lowercase().contains("permissions violation") && e.contains(subject))
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no permissions violation for {subject}; errors: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_trader_is_refused_what_is_not_hers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start_with_config(&dir.path().join("nats"), &config(dir.path()))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();

    let (node, _) = connect(&url, "agora-node", "node-secret").await;
    let js = jetstream::new(node.clone());
    let (subjects, settings) = (Subjects::default(), StreamSettings::default());
    bus::ensure_core_streams(&js, &subjects, &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    bus::ensure_market_stream(&js, &subjects, "TEST-USD", &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let (alice, errors) = connect(&url, "alice", "alice-secret").await;
    // Allowed: an order on her own subject, acknowledged by JetStream.
    let ack = jetstream::new(alice.clone())
        .publish("agora.orders.TEST-USD.alice", b"{}".to_vec().into())
        .await
        .expect("sent")
        .await
        .expect("alice may send orders");
    assert_eq!(ack.stream, "ORDERS_TEST-USD");
    // Refused: the shared subject and bob's (where she could name any account), control,
    // operator commands, another account's reports.
    for subject in ["agora.orders.TEST-USD", "agora.orders.TEST-USD.bob"] {
        alice.publish(subject, "".into()).await.expect("sent");
        refused(&errors, subject).await;
    }
    alice
        .publish("agora.ctl.market.list", "".into())
        .await
        .expect("sent");
    refused(&errors, "agora.ctl.market.list").await;
    alice
        .publish("agora.admin.TEST-USD", "".into())
        .await
        .expect("sent");
    refused(&errors, "agora.admin.TEST-USD").await;
    // Queries about another account (open orders and history), a market's own query
    // responder and the history's order lookup (nodes only).
    for subject in [
        "agora.query.bob.orders",
        "agora.query.bob.history",
        "agora.market.TEST-USD.orders",
        "agora.history.order",
    ] {
        alice.publish(subject, "".into()).await.expect("sent");
        refused(&errors, subject).await;
    }
    let _bob = alice
        .subscribe("agora.execs.bob.>")
        .await
        .expect("subscribe sent");
    refused(&errors, "agora.execs.bob.>").await;
    let _own = alice
        .subscribe("agora.execs.alice.>")
        .await
        .expect("her own reports");
    alice.flush().await.expect("flush");
    let seen = errors.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(
        !seen.iter().any(|e| e.contains("agora.execs.alice")),
        "{seen:?}"
    );

    // The operator may send operator commands into the market's stream.
    let (operator, _) = connect(&url, "operator", "operator-secret").await;
    let ack = jetstream::new(operator)
        .publish("agora.admin.TEST-USD", b"{}".to_vec().into())
        .await
        .expect("sent")
        .await
        .expect("the operator may send operator commands");
    assert_eq!(ack.stream, "ORDERS_TEST-USD");
    // A wrong password is refused outright.
    let wrong = async_nats::ConnectOptions::with_user_and_password("alice".into(), "nope".into())
        .connect(&url)
        .await;
    assert!(wrong.is_err(), "a wrong password must be refused");
}

/// The `agora node` binary logs in as the documented node user (`[nats]` user and password)
/// and runs under those permissions (streams, KV, snapshots); alice, through the Rust client
/// with her own user, trades and gets her reports.
#[tokio::test]
async fn a_node_and_a_trader_work_under_the_documented_permissions() {
    use agora::client::{Client, NewOrderRequest};
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start_with_config(&dir.path().join("nats"), &config(dir.path()))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let _node = common::Agora::node(
        &url,
        dir.path(),
        "node_id = \"n1\"\n[nats]\nuser = \"agora-node\"\npassword = \"node-secret\"\n[snapshots]\nevery_commands = 1\n[[markets]]\nsymbol = \"TEST-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
    );
    let login = |user: &str, password: &str| agora::bus::NatsOptions {
        user: Some(user.into()),
        password: Some(password.into()),
        ..Default::default()
    };
    let alice = Client::connect(&url, &login("alice", "alice-secret"), "agora")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reports = alice
        .reports("alice", Some("TEST-USD"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sent = alice
        .place(
            "TEST-USD",
            "alice",
            &NewOrderRequest::limit("buy", "10.00", "1").cid("a1"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mine = reports
        .for_seq(sent.seq, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mine[0].kind, "accepted");
    // She asks what she has open, and is told, from the book.
    let open = alice
        .open_orders("alice", None, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(open.missing.is_empty(), "{:?}", open.missing);
    assert_eq!(open.orders.len(), 1);
    assert_eq!(open.orders[0].cid.as_deref(), Some("a1"));
    assert_eq!(open.orders[0].price.as_deref(), Some("10.00"));
    let status = alice
        .order_status(
            "alice",
            "TEST-USD",
            &agora::client::Target::Cid("a1".into()),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .expect("a1 is open");
    assert_eq!(status.order.status, "open");
    assert_eq!(status.order.last_seq, sent.seq);
    // A cancel-all with nothing open has no report; she can still see it applied.
    let sent = alice
        .send(
            "TEST-USD",
            &agora::wire::WireCommandOut {
                op: "cancel_all".into(),
                account: "alice".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    alice
        .wait_applied("TEST-USD", sent.seq, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The node wrote a snapshot under its permissions (every command here).
    let (node_client, _) = connect(&url, "operator", "operator-secret").await;
    let store = agora::bus::SnapshotStore::open(
        &jetstream::new(node_client),
        &Subjects::default(),
        &StreamSettings::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    while store.load("TEST-USD").await.ok().flatten().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no snapshot written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `agora history` runs as its own user: alice reads her history and the public tape
    // through it, and cannot read bob's.
    let config = dir.path().join("history.toml");
    std::fs::write(
        &config,
        "[nats]\nuser = \"agora-history\"\npassword = \"history-secret\"\n",
    )
    .expect("config");
    let history = common::Agora::spawn(&[
        "history".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--nats-url".as_ref(),
        url.as_ref(),
        "--data-dir".as_ref(),
        dir.path().join("history").as_os_str(),
    ]);
    history.wait_line(|l| l.contains("writing"), Duration::from_secs(30));
    let (alice_raw, errors) = connect(&url, "alice", "alice-secret").await;
    let ask = |subject: &'static str| {
        let alice_raw = alice_raw.clone();
        async move {
            let started = Instant::now();
            loop {
                let reply = alice_raw
                    .request(subject, "{}".into())
                    .await
                    .unwrap_or_else(|e| panic!("{subject}: {e}"));
                let v: serde_json::Value = serde_json::from_slice(&reply.payload)
                    .unwrap_or_else(|_| rmp_serde::from_slice(&reply.payload).expect("reply"));
                let empty = v["orders"].as_array().is_some_and(Vec::is_empty);
                if !empty || started.elapsed() > Duration::from_secs(20) {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mine = ask("agora.query.alice.history").await;
    assert_eq!(mine["ok"], true, "{mine}");
    assert_eq!(mine["orders"][0]["cid"], "a1", "{mine}");
    let ticker = ask("agora.query.ticker.TEST-USD").await;
    assert_eq!(ticker["ok"], true, "{ticker}");
    alice_raw
        .publish("agora.query.bob.history", "{}".into())
        .await
        .expect("sent");
    refused(&errors, "agora.query.bob.history").await;
    drop(history);

    // A wrong password through the same options is refused with what to check.
    let e = Client::connect(&url, &login("alice", "nope"), "agora")
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("refused the credentials"), "{e}");
}

/// A client of the product's own, logged in as `user` (so its inbox is `_INBOX_<user>`).
async fn client_as(url: &str, user: &str, password: &str) -> agora::client::Client {
    let login = agora::bus::NatsOptions {
        user: Some(user.into()),
        password: Some(password.into()),
        ..Default::default()
    };
    agora::client::Client::connect(url, &login, "agora")
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

/// Every message a connection receives on `subjects`, as (subject, payload as JSON text).
async fn collect_all(
    client: &async_nats::Client,
    subjects: &[&str],
) -> Arc<Mutex<Vec<(String, String)>>> {
    use futures::StreamExt;
    let seen = Arc::new(Mutex::new(Vec::new()));
    for subject in subjects {
        let mut sub = client
            .subscribe(subject.to_string())
            .await
            .expect("subscribe sent");
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let text = rmp_serde::from_slice::<serde_json::Value>(&m.payload)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|_| String::from_utf8_lossy(&m.payload).into_owned());
                seen.lock()
                    .map(|mut v| v.push((m.subject.to_string(), text)))
                    .unwrap_or(());
            }
        });
    }
    client.flush().await.expect("flush");
    seen
}

/// Two traders under the documented permissions, with a node that is restarted and a NATS
/// server that goes away for a few seconds while they trade: alice replays her own reports
/// from a sequence and from a time, her live reader comes back after the outage with every
/// report once, and nothing of bob's (orders, reports, journal, snapshots, replies) reaches
/// her on any subject she may subscribe to. She cannot read another account's reports or
/// replies, the journal or the order streams, get messages directly from a stream, or publish
/// on report, tape, journal or capture subjects.
#[tokio::test]
async fn a_trader_replays_her_own_reports_and_sees_nothing_of_anyone_else() {
    use agora::client::{NewOrderRequest, ReportsFrom};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = LocalServer::start_with_config(&dir.path().join("nats"), &config(dir.path()))
        .unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let node_config = "node_id = \"n1\"\n[nats]\nuser = \"agora-node\"\npassword = \"node-secret\"\n[snapshots]\nevery_commands = 5\n[[markets]]\nsymbol = \"TEST-USD\"\nprice_decimals = 2\nsize_decimals = 0\n";
    let mut node = common::Agora::node(&url, dir.path(), node_config);

    // alice listens to everything she may, as a hostile trader would.
    let (spy, spy_errors) = connect(&url, "alice", "alice-secret").await;
    let everything = collect_all(
        &spy,
        &[
            "agora.execs.alice.>",
            "agora.trades.>",
            "agora.book.>",
            "agora.status.>",
            "_INBOX_alice.>",
        ],
    )
    .await;
    let started = time_now();
    let alice = client_as(&url, "alice", "alice-secret").await;
    let bob = client_as(&url, "bob", "bob-secret").await;
    let mut live = alice
        .reports("alice", None)
        .await
        .unwrap_or_else(|e| panic!("alice's reader: {e}"));

    // Trading: bob rests, alice takes; bob asks for the book too (its reply is his).
    let trade_round = |round: u32| {
        let (alice, bob) = (&alice, &bob);
        async move {
            for i in 0..5 {
                let cid = format!("bob-secret-cid-{round}-{i}");
                bob.place(
                    "TEST-USD",
                    "bob",
                    &NewOrderRequest::limit("sell", "10.00", "2").cid(&cid),
                )
                .await
                .unwrap_or_else(|e| panic!("bob places: {e}"));
                alice
                    .place(
                        "TEST-USD",
                        "alice",
                        &NewOrderRequest::limit("buy", "10.00", "1").cid(&format!("a-{round}-{i}")),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("alice places: {e}"));
            }
            // (A market just restarted may not answer yet.)
            let deadline = Instant::now() + Duration::from_secs(20);
            while let Err(e) = bob.book_snapshot("TEST-USD", Duration::from_secs(5)).await {
                assert!(Instant::now() < deadline, "bob's book request: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    trade_round(0).await;
    // The node restarts (recovery reads the journal, the stream and its snapshot)...
    assert!(node.terminate(Duration::from_secs(20)).success());
    node = common::Agora::node(&url, dir.path(), node_config);
    trade_round(1).await;
    // ...and NATS goes away for a few seconds while they trade.
    server.kill_now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again().unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = bob
            .place(
                "TEST-USD",
                "bob",
                &NewOrderRequest::limit("sell", "10.00", "2").cid("bob-after"),
            )
            .await;
        if again.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "NATS did not come back: {again:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    trade_round(2).await;
    let last = alice
        .place(
            "TEST-USD",
            "alice",
            &NewOrderRequest::limit("buy", "1.00", "1").cid("a-last"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // What EXECS holds for alice, read by the operator.
    let (operator, _) = connect(&url, "operator", "operator-secret").await;
    let mut execs = jetstream::new(operator)
        .get_stream("EXECS")
        .await
        .expect("EXECS");
    let wait_until = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let n = execs.info().await.expect("info").state.last_sequence;
        let mut mine = Vec::new();
        for seq in 1..=n {
            if let Ok(m) = execs.get_raw_message(seq).await
                && m.subject.as_str().starts_with("agora.execs.alice.")
            {
                mine.extend(common::exec_reports(&m.payload));
            }
        }
        if mine.iter().any(|r| r.contains("\"a-last\"")) {
            break mine;
        }
        assert!(
            Instant::now() < wait_until,
            "alice's last order was never reported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stored.len() >= 31,
        "alice has her reports: {}",
        stored.len()
    );

    // The live reader, across the restart and the outage: each report once, in order.
    let mut got = Vec::new();
    while got.len() < stored.len() {
        match tokio::time::timeout(Duration::from_secs(20), live.next()).await {
            Ok(Ok(Some(mut r))) => {
                r.stream_seq = None;
                got.push(serde_json::to_value(&r).expect("json"));
            }
            other => {
                let log = std::fs::read_to_string(dir.path().join("nats/nats-server.log"))
                    .unwrap_or_default();
                let tail = &log[log.len().saturating_sub(4000)..];
                panic!(
                    "alice's live reader stopped after {} of {}: {other:?}\nnats-server log:\n{tail}",
                    got.len(),
                    stored.len()
                )
            }
        }
    }
    let as_stored: Vec<serde_json::Value> = stored
        .iter()
        .map(|r| serde_json::from_str(r).expect("json"))
        .collect();
    assert_eq!(
        got, as_stored,
        "the live reader's reports are not EXECS's, once each, in order"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), live.next())
            .await
            .is_err(),
        "the live reader yielded a report again"
    );

    // Replays: from the start, and from a time before it all.
    for from in [ReportsFrom::Seq(1), ReportsFrom::Time(started)] {
        let mut replay = alice
            .reports_from("alice", Some("TEST-USD"), from)
            .await
            .unwrap_or_else(|e| panic!("alice replays: {e}"));
        let mut n = 0;
        while n < stored.len() {
            let r = tokio::time::timeout(Duration::from_secs(20), replay.next())
                .await
                .expect("replayed in time")
                .expect("reads")
                .expect("a report");
            assert_eq!(r.account.as_deref(), Some("alice"));
            n += 1;
        }
        assert!(replay.stream_seq() > 0);
    }
    let _ = last;

    // Refused: another account's reports, the journal, the order streams, direct gets.
    let e = alice
        .reports_from("bob", None, ReportsFrom::Seq(1))
        .await
        .err()
        .expect("alice may not read bob's reports");
    assert!(e.to_string().contains("permission"), "{e}");
    for subject in [
        "$JS.API.CONSUMER.CREATE.EXECS.x.agora.execs.bob.>",
        "$JS.API.CONSUMER.CREATE.EVENTS.x.agora.events.>",
        "$JS.API.CONSUMER.CREATE.ORDERS_TEST-USD.x.agora.orders.>",
        "$JS.API.DIRECT.GET.EXECS",
        "$JS.API.STREAM.MSG.GET.EVENTS",
        "agora.capture.execs.alice.TEST-USD",
        "agora.execs.alice.TEST-USD",
        "agora.trades.TEST-USD",
        "agora.events.TEST-USD",
    ] {
        spy.publish(subject, "{}".into()).await.expect("sent");
        refused(&spy_errors, subject).await;
    }
    for subject in [
        "_INBOX.>",
        "_INBOX_bob.>",
        "agora.events.>",
        "agora.capture.>",
    ] {
        let _s = spy.subscribe(subject).await.expect("subscribe sent");
        refused(&spy_errors, subject).await;
    }

    // Nothing of bob's reached alice on anything she may subscribe to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = everything.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(
        seen.len() > 20,
        "alice's subscriptions saw the public data: {}",
        seen.len()
    );
    let leaks: Vec<_> = seen
        .iter()
        .filter(|(_, text)| text.contains("bob"))
        .collect();
    assert!(leaks.is_empty(), "bob's data reached alice: {leaks:?}");
    drop(node);
}

/// Five seconds ago, as JetStream takes a start time.
fn time_now() -> async_nats::datetime::DateTime {
    async_nats::datetime::DateTime::now_utc() - Duration::from_secs(5)
}
