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
    .replace("$AGORA_OPERATOR_PASSWORD", "\"operator-secret\"")
    .replace("$AGORA_ALICE_PASSWORD", "\"alice-secret\"");
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
    // A wrong password through the same options is refused with what to check.
    let e = Client::connect(&url, &login("alice", "nope"), "agora")
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("refused the credentials"), "{e}");
}
