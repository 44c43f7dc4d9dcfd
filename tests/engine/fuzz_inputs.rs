//! Runs the fuzz target's body (`agora::fuzzing::decode_and_apply`) on seeded random and
//! structured inputs, so CI exercises what `cargo fuzz` explores at length.

use agora::fuzzing::decode_and_apply;
use proptest::prelude::*;

fn message(json: bool, ts_step: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![(ts_step << 1) | u8::from(json)];
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// Mostly well-formed JSON commands with fields drawn from small sets (including bad values),
/// so the decoder and every rule of the book are reached.
fn json_command() -> impl Strategy<Value = String> {
    let op = prop::sample::select(vec![
        "new",
        "new",
        "new",
        "cancel",
        "amend",
        "cancel_all",
        "halt",
        "resume",
        "batch",
        "bogus",
    ]);
    let account = prop::sample::select(vec!["a", "b", "c", "bad.acct"]);
    let side = prop::sample::select(vec!["buy", "sell", "up"]);
    let kind = prop::sample::select(vec![
        "limit",
        "limit",
        "market",
        "stop_limit",
        "stop_market",
    ]);
    let tif = prop::sample::select(vec!["gtc", "ioc", "fok", "gtd", "post_only"]);
    let price = prop::sample::select(vec![
        "99.95", "100", "100.05", "100.10", "100.07", "0", "-1", "1e2", "120.00", "80.00",
    ]);
    let qty = prop::sample::select(vec!["0.02", "0.05", "1", "0.015", "0", "2000", "0.5"]);
    (op, account, side, kind, tif, price, qty, 0u8..8, 0u8..4).prop_map(
        |(op, account, side, kind, tif, price, qty, cid, extra)| {
            let cid = format!("c{cid}");
            let extra = match extra {
                0 => String::new(),
                1 => ",\"display_qty\":\"0.02\",\"stp\":\"decrement_and_cancel\"".to_string(),
                2 => format!(",\"stop_price\":\"{price}\",\"expire_at\":5000"),
                _ => ",\"oid\":1000".to_string(),
            };
            match op {
                "batch" => format!(
                    "{{\"op\":\"batch\",\"account\":\"{account}\",\"commands\":[{{\"op\":\"new\",\"side\":\"{side}\",\"price\":\"{price}\",\"qty\":\"{qty}\"}},{{\"op\":\"cancel_all\"}}]}}"
                ),
                "cancel" => format!("{{\"op\":\"cancel\",\"account\":\"{account}\",\"cid\":\"{cid}\"}}"),
                "amend" => format!("{{\"op\":\"amend\",\"account\":\"{account}\",\"cid\":\"{cid}\",\"price\":\"{price}\",\"qty\":\"{qty}\"}}"),
                _ => format!(
                    "{{\"op\":\"{op}\",\"account\":\"{account}\",\"cid\":\"{cid}\",\"side\":\"{side}\",\"type\":\"{kind}\",\"tif\":\"{tif}\",\"price\":\"{price}\",\"qty\":\"{qty}\"{extra}}}"
                ),
            }
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_break_the_book(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_and_apply(&data);
    }

    #[test]
    fn structured_commands_never_break_the_book(
        commands in prop::collection::vec((json_command(), any::<bool>(), 0u8..6), 1..120)
    ) {
        let mut data = Vec::new();
        for (json, as_msgpack, ts_step) in commands {
            if as_msgpack {
                // The same command as a MessagePack map.
                let value: serde_json::Value = serde_json::from_str(&json).expect("generated JSON parses");
                let bytes = rmp_serde::to_vec_named(&value).expect("encode msgpack");
                data.extend(message(false, ts_step, &bytes));
            } else {
                data.extend(message(true, ts_step, json.as_bytes()));
            }
        }
        decode_and_apply(&data);
    }
}
