//! Queries as a trading client sees them: an account's open orders across three markets on
//! two nodes, equal to an offline replay of the order streams, also while a market moves; a
//! market whose node is stalled is named in `missing`; the state of resting, partly filled and
//! untriggered stop orders by oid and by cid.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agora::client::{Client, OpenOrders, Target};
use agora::query::OrderView;
use futures::StreamExt;

use crate::common::{offline_replay, stored_spec};
use crate::{Cluster, JOURNAL_WAIT, load, workload};

const MARKETS: [&str; 3] = ["A-USD", "B-USD", "C-USD"];
const ACCOUNTS: [&str; 6] = ["acct-0", "acct-1", "acct-2", "acct-3", "acct-4", "acct-5"];

/// What every account's open orders are after an offline replay of each market's stream,
/// in (market, oid) order, and each market's last sequence.
async fn expected(cluster: &Cluster) -> (BTreeMap<String, Vec<OrderView>>, BTreeMap<String, u64>) {
    let mut by_account: BTreeMap<String, Vec<OrderView>> = BTreeMap::new();
    let mut last = BTreeMap::new();
    for market in MARKETS {
        let spec = stored_spec(&cluster.js, market).await;
        let offline = offline_replay(&cluster.js, &agora::bus::Subjects::default(), &spec).await;
        last.insert(market.to_string(), offline.msgs.len() as u64);
        for account in ACCOUNTS {
            let account_id = agora::book::Account::new(account).expect("account");
            let (orders, _) = offline.book.open_orders(&account_id, None, usize::MAX);
            by_account
                .entry(account.to_string())
                .or_default()
                .extend(orders.iter().map(|o| OrderView::new(&spec, o)));
        }
    }
    (by_account, last)
}

fn of_market<'a>(open: &'a OpenOrders, market: &str) -> Vec<&'a OrderView> {
    open.orders.iter().filter(|o| o.market == market).collect()
}

#[tokio::test]
async fn open_orders_and_order_status_answer_from_the_books_across_nodes() {
    let cluster = Cluster::start(2, "").await;
    // n1 places the configured A-USD and B-USD; C-USD, added now, goes to n2.
    let spec = cluster.dir.path().join("c.toml");
    std::fs::write(
        &spec,
        "symbol = \"C-USD\"\nprice_decimals = 2\nsize_decimals = 0\n",
    )
    .expect("write");
    let (ok, reply) = cluster.ctl(&["market.add", "--spec", spec.to_str().expect("utf-8")]);
    assert!(ok, "{reply}");
    assert_eq!(reply["node"], "n2", "{reply}");

    let mut flows = Vec::new();
    for (i, market) in MARKETS.iter().enumerate() {
        let commands = workload(40 + i as u64, 500);
        flows.push((
            *market,
            commands.len() as u64,
            load(&cluster.js, market, commands, 2000, Arc::default()),
        ));
    }
    for (market, total, flow) in flows {
        flow.await.expect("load");
        cluster.wait_journal(market, total, JOURNAL_WAIT).await;
    }
    // A stop that waits for its trigger, far above every price of the flow.
    let client = Client::connect(&cluster.url(), &Default::default(), "agora")
        .await
        .expect("client");
    let stop = agora::client::NewOrderRequest {
        order_type: Some("stop_market".into()),
        tif: Some("ioc".into()),
        stop_price: Some("9000.00".into()),
        ..agora::client::NewOrderRequest::market("buy", "3")
    }
    .cid("waiting-stop");
    let sent = client
        .place("A-USD", "acct-0", &stop)
        .await
        .expect("stop sent");
    cluster.wait_journal("A-USD", sent.seq, JOURNAL_WAIT).await;

    let (expected, last) = expected(&cluster).await;
    let timeout = Duration::from_secs(5);
    let mut orders_seen = 0;
    for account in ACCOUNTS {
        let open = client
            .open_orders(account, None, timeout)
            .await
            .expect("open orders");
        assert!(open.missing.is_empty(), "{account}: {:?}", open.missing);
        assert_eq!(
            open.as_of, last,
            "{account}: each market answers at its last sequence"
        );
        assert!(
            open.orders == expected[account],
            "{account}: the open orders are not those of an offline replay:\n  got {:?}\n want {:?}",
            open.orders,
            expected[account]
        );
        orders_seen += open.orders.len();
        // One market only.
        let only_b = client
            .open_orders(account, Some("B-USD"), timeout)
            .await
            .expect("open orders of B-USD");
        let want: Vec<&OrderView> = expected[account]
            .iter()
            .filter(|o| o.market == "B-USD")
            .collect();
        assert_eq!(only_b.orders.iter().collect::<Vec<_>>(), want);
        assert_eq!(only_b.as_of.keys().collect::<Vec<_>>(), ["B-USD"]);
    }
    assert!(
        orders_seen > 30,
        "the flows left only {orders_seen} open orders"
    );

    // Order status: resting untouched, partly filled, and the untriggered stop, by oid and cid.
    let all: Vec<&OrderView> = expected.values().flatten().collect();
    let untouched = all
        .iter()
        .find(|o| o.status == "open" && o.filled.trim_start_matches(['0', '.']).is_empty())
        .expect("a resting order with nothing filled");
    let partly = all
        .iter()
        .find(|o| o.status == "open" && !o.filled.trim_start_matches(['0', '.']).is_empty())
        .expect("a partly filled resting order");
    let waiting = all
        .iter()
        .find(|o| o.cid.as_deref() == Some("waiting-stop"))
        .expect("the stop is open");
    assert_eq!(waiting.status, "untriggered");
    assert_eq!(waiting.last_seq, sent.seq);
    for order in [untouched, partly, waiting] {
        let by_oid = client
            .order_status(
                &order.account,
                &order.market,
                &Target::Oid(order.oid),
                timeout,
            )
            .await
            .expect("order status")
            .expect("open");
        assert_eq!(&by_oid.order, *order);
        assert_eq!(by_oid.as_of, last[&order.market]);
        if let Some(cid) = &order.cid {
            let by_cid = client
                .order_status(
                    &order.account,
                    &order.market,
                    &Target::Cid(cid.clone()),
                    timeout,
                )
                .await
                .expect("order status")
                .expect("open");
            assert_eq!(&by_cid.order, *order);
        }
        // Another account does not see it.
        let other = if order.account == "acct-0" {
            "acct-1"
        } else {
            "acct-0"
        };
        let stranger = client
            .order_status(other, &order.market, &Target::Oid(order.oid), timeout)
            .await
            .expect("order status");
        assert_eq!(stranger, None, "{other} sees an order of {}", order.account);
    }
    // A closed (or never placed) order is not open; an unknown market is refused by name.
    let closed = client
        .order_status("acct-0", "A-USD", &Target::Oid(1), timeout)
        .await
        .expect("order status");
    assert_eq!(closed, None);
    let unknown = client
        .open_orders("acct-0", Some("NOPE-USD"), timeout)
        .await
        .expect_err("unknown market");
    assert!(unknown.to_string().contains("unknown_market"), "{unknown}");

    // While B-USD moves from n1 to n2, every answer either shows its orders as they are or
    // names it missing; it is never silently left out.
    let mut status = cluster
        .client
        .subscribe("agora.status.B-USD")
        .await
        .expect("subscribe to B-USD's status");
    cluster.client.flush().await.expect("flush");
    let url = cluster.url();
    let mut mover = tokio::process::Command::new(env!("CARGO_BIN_EXE_agora"))
        .args([
            "ctl",
            "market.move",
            "B-USD",
            "--to",
            "n2",
            "--nats-url",
            &url,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("agora ctl market.move");
    let want_b: Vec<&OrderView> = expected["acct-1"]
        .iter()
        .filter(|o| o.market == "B-USD")
        .collect();
    let (mut answered, mut missing) = (0, 0);
    let moved = loop {
        let open = client
            .open_orders("acct-1", None, Duration::from_millis(500))
            .await
            .expect("open orders during the move");
        match (
            open.as_of.get("B-USD"),
            open.missing.iter().any(|m| m == "B-USD"),
        ) {
            (Some(seq), false) => {
                assert_eq!(*seq, last["B-USD"]);
                assert_eq!(of_market(&open, "B-USD"), want_b);
                answered += 1;
            }
            (None, true) => missing += 1,
            other => panic!("B-USD is neither answered nor missing once: {other:?}"),
        }
        if let Some(status) = mover.try_wait().expect("mover") {
            break status;
        }
    };
    assert!(moved.success(), "the move failed");
    assert_eq!(cluster.placed("B-USD").await.0, "n2");
    println!("during the move: {answered} answers with B-USD, {missing} naming it missing");
    // The old owner's query responder ends just before it announces `released` (on the same
    // connection): until then it may still answer for B-USD, as of where it stopped. The stall
    // below wants n2 alone to hold B-USD.
    let released = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(m) = status.next().await {
            let s: serde_json::Value = rmp_serde::from_slice(&m.payload).expect("status");
            if s["state"] == "released" && s["node"] == "n1" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(released, Ok(true), "n1 never announced B-USD released");

    // n2 (B-USD and C-USD) stalls: its markets are named missing, n1's still answer. The
    // stall stays well under the lease (no failover), and the nodes share the query subject in
    // a queue group, so a request that went to n2's own front gets no answer: stall again.
    let request = br#"{"timeout_ms": 250}"#.to_vec();
    let mut answer = None;
    for _ in 0..20 {
        cluster.signal("n2", libc::SIGSTOP);
        let asked = tokio::time::timeout(
            Duration::from_millis(600),
            cluster
                .client
                .request("agora.query.acct-2.orders", request.clone().into()),
        )
        .await;
        cluster.signal("n2", libc::SIGCONT);
        if let Ok(Ok(reply)) = asked {
            answer = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for market in ["B-USD", "C-USD"] {
        assert_eq!(
            cluster.placed(market).await.0,
            "n2",
            "{market} failed over during the stall: the test stalled n2 past its lease"
        );
    }
    let reply: serde_json::Value =
        serde_json::from_slice(&answer.expect("n1's front answered").payload)
            .expect("a JSON request gets a JSON reply");
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        reply["missing"],
        serde_json::json!(["B-USD", "C-USD"]),
        "{reply}"
    );
    assert_eq!(
        reply["as_of"],
        serde_json::json!({"A-USD": last["A-USD"]}),
        "{reply}"
    );
    let got_a: Vec<OrderView> = serde_json::from_value(reply["orders"].clone()).expect("orders");
    let want_a: Vec<OrderView> = expected["acct-2"]
        .iter()
        .filter(|o| o.market == "A-USD")
        .cloned()
        .collect();
    assert_eq!(got_a, want_a);
}
