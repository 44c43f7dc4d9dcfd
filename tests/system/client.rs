//! The shell commands (`agora order`, `agora watch`) and the Rust client against an `agora
//! node` and a nats-server started by the test: place, retry, fill, amend, cancel, cancel-all;
//! reports, trades and the book watched while it happens; an unknown market and bad input
//! refused with what to fix.

use crate::common;

use std::time::Duration;

use agora::bus::{LocalServer, NatsOptions};
use agora::client::{BookUpdate, Client, NewOrderRequest, Target};
use common::{Agora, run};
use serde_json::Value;

const CONFIG: &str =
    "node_id = \"n1\"\n[[markets]]\nsymbol = \"TEST-USD\"\nprice_decimals = 2\nsize_decimals = 0\n";
const WAIT: Duration = Duration::from_secs(20);

fn order(url: &str, verb: &str, account: &str, rest: &[&str]) -> (bool, Vec<Value>, String) {
    let mut args = vec![
        "order",
        verb,
        "--nats-url",
        url,
        "--market",
        "TEST-USD",
        "--account",
        account,
    ];
    args.extend_from_slice(rest);
    run(&args)
}

fn types(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .skip(1)
        .map(|r| r["type"].as_str().unwrap_or("?"))
        .collect()
}

#[test]
fn the_shell_places_retries_amends_cancels_and_watches() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let _node = Agora::node(&url, dir.path(), CONFIG);
    let trades = Agora::spawn(&[
        "watch",
        "trades",
        "--market",
        "TEST-USD",
        "--nats-url",
        &url,
    ]);
    trades.wait_err_line(|l| l.contains("watching"), WAIT);
    let book = Agora::spawn(&[
        "watch",
        "book",
        "--market",
        "TEST-USD",
        "--levels",
        "3",
        "--nats-url",
        &url,
    ]);
    let first = book.next_json(WAIT);
    assert_eq!(first["bids"], serde_json::json!([]), "{first}");
    let reports = Agora::spawn(&["watch", "reports", "--account", "bob", "--nats-url", &url]);
    reports.wait_err_line(|l| l.contains("watching"), WAIT);

    // alice rests a sell; the reports of the command come back with the stream sequence.
    let (ok, lines, err) = order(
        &url,
        "place",
        "alice",
        &[
            "--side", "sell", "--price", "10.00", "--qty", "5", "--cid", "a1",
        ],
    );
    assert!(ok, "{err}");
    let seq = lines[0]["sent"]["seq"].as_u64().expect("seq");
    assert_eq!(lines[0]["sent"]["oid"].as_u64(), Some(seq * 1000));
    assert_eq!(types(&lines), ["accepted"]);
    assert_eq!(lines[1]["seq"].as_u64(), Some(seq));

    // The same cid again, as a retry: stored as a message of its own and refused
    // `duplicate_cid` by the market; alice's order stands as it was.
    let (ok, lines, err) = order(
        &url,
        "place",
        "alice",
        &[
            "--side", "sell", "--price", "10.00", "--qty", "5", "--cid", "a1",
        ],
    );
    assert!(!ok, "a refused command exits non-zero: {err}");
    assert_eq!(lines[0]["sent"]["seq"].as_u64(), Some(seq + 1));
    assert_eq!(types(&lines), ["rejected"]);
    assert_eq!(lines[1]["reason"], "duplicate_cid", "{:?}", lines[1]);

    // bob takes 2 of them.
    let (ok, lines, err) = order(
        &url,
        "place",
        "bob",
        &[
            "--side", "buy", "--price", "10.00", "--qty", "2", "--cid", "b1",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(types(&lines), ["accepted", "fill"]);
    assert_eq!(lines[2]["liquidity"], "taker");
    assert_eq!(lines[2]["price"], "10.00");
    let trade = trades.next_json(WAIT);
    assert_eq!(trade["market"], "TEST-USD");
    assert_eq!(
        (&trade["trade"]["price"], &trade["trade"]["qty"]),
        (&"10.00".into(), &"2".into())
    );
    let watched = reports.next_json(WAIT);
    assert_eq!(
        (&watched["type"], &watched["cid"]),
        (&"accepted".into(), &"b1".into())
    );
    assert_eq!(reports.next_json(WAIT)["type"], "fill");

    // alice amends her total down to 4 (2 filled, 2 left), then cancels.
    let (ok, lines, err) = order(&url, "amend", "alice", &["--cid", "a1", "--qty", "4"]);
    assert!(ok, "{err}");
    assert_eq!(types(&lines), ["amended"]);
    assert_eq!(lines[1]["leaves"], "2");
    let top = book.wait_line(|l| l.contains("\"qty\":\"2\""), WAIT);
    assert!(top.contains("10.00"), "{top}");
    let (ok, lines, err) = order(
        &url,
        "cancel",
        "alice",
        &["--oid", &(seq * 1000).to_string()],
    );
    assert!(ok, "{err}");
    assert_eq!(types(&lines), ["cancelled"]);
    let top = book.wait_line(|l| l.contains("\"asks\":[]"), WAIT);
    assert!(top.contains("\"bids\":[]"), "{top}");

    // Bad input: a clear rejection report, not silence, and a failed exit status.
    let (ok, lines, err) = order(
        &url,
        "place",
        "alice",
        &["--side", "sell", "--price", "10.001", "--qty", "1"],
    );
    assert!(!ok, "a rejected command exits non-zero");
    assert!(
        err.contains("TEST-USD: the command was rejected (invalid_field)"),
        "{err}"
    );
    assert_eq!(types(&lines), ["rejected"]);
    assert!(
        lines[1]["message"]
            .as_str()
            .unwrap_or("")
            .contains("decimals"),
        "{}",
        lines[1]
    );
    let (ok, lines, err) = order(&url, "cancel-all", "alice", &[]);
    assert!(ok, "{err}");
    assert!(lines[0]["sent"]["seq"].as_u64().is_some());
    assert!(err.contains("no open orders"), "{err}");
    order(
        &url,
        "place",
        "bob",
        &["--side", "buy", "--price", "9.00", "--qty", "1"],
    );
    order(
        &url,
        "place",
        "bob",
        &["--side", "buy", "--price", "8.00", "--qty", "1"],
    );
    let (ok, lines, err) = order(&url, "cancel-all", "bob", &[]);
    assert!(ok, "{err}");
    assert_eq!(types(&lines), ["cancelled", "cancelled"]);
    assert_eq!(lines[1]["reason"], "cancel_all");

    // An unknown market fails at once and says what to do; a cancel needs its target.
    let (ok, _, err) = run(&[
        "order",
        "place",
        "--nats-url",
        &url,
        "--market",
        "NOPE-USD",
        "--account",
        "alice",
        "--side",
        "buy",
        "--price",
        "1.00",
        "--qty",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("NOPE-USD does not take orders") && err.contains("market.list"),
        "{err}"
    );
    let (ok, _, err) = order(&url, "cancel", "alice", &[]);
    assert!(!ok);
    assert!(err.contains("--cid") && err.contains("--oid"), "{err}");
    let (ok, _, err) = run(&[
        "order",
        "place",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--market",
        "TEST-USD",
        "--account",
        "a",
        "--side",
        "buy",
        "--qty",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("cannot reach NATS at nats://127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test]
async fn the_rust_client_keeps_a_book_equal_to_the_engines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = LocalServer::start(&dir.path().join("nats")).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();
    let _node = Agora::node(&url, dir.path(), CONFIG);
    let client = Client::connect(&url, &NatsOptions::default(), "agora")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut feed = client
        .book("TEST-USD", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut reports = client
        .reports("mm", Some("TEST-USD"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut last = 0;
    for i in 0..40u32 {
        let (side, price) = if i % 2 == 0 {
            ("buy", format!("{}.00", 90 + i % 7))
        } else {
            ("sell", format!("{}.00", 100 + i % 5))
        };
        let order =
            NewOrderRequest::limit(side, &price, &format!("{}", 1 + i % 3)).cid(&format!("q{i}"));
        last = client
            .place("TEST-USD", "mm", &order)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .seq;
    }
    let sent = client
        .cancel("TEST-USD", "mm", &Target::Cid("q4".into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mine = reports
        .for_seq(sent.seq, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (mine[0].kind.as_str(), mine[0].cid.as_deref()),
        ("cancelled", Some("q4"))
    );
    assert!(sent.seq > last);
    while feed.book().seq < sent.seq {
        let update = tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("book updates")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            update,
            Some(BookUpdate::Delta(_) | BookUpdate::Resynced(_))
        ));
    }
    let engine = client
        .book_snapshot("TEST-USD", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(engine.seq, sent.seq);
    assert_eq!(feed.book().bids(usize::MAX), engine.bids);
    assert_eq!(feed.book().asks(usize::MAX), engine.asks);
    assert!(!engine.bids.is_empty() && !engine.asks.is_empty());
}
