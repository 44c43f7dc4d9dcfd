//! Answers `<prefix>.market.<MARKET>.orders`: an account's open orders in this market, or one
//! of them, for the nodes' query fronts (`query`). The book is read by the actor between
//! batches (one mailbox message, O(the account's open orders), at most `query::LIMIT_MAX`
//! copied), and the reply is formatted and encoded here, off the market's thread.

use futures::StreamExt;
use tokio::sync::watch;

use super::driver::Driver;
use super::{AccountOrders, MarketError, nats_err};
use crate::wire::query::{MarketAnswer, MarketRequest, OrderView};

/// Answers queries until `stop`.
pub(super) async fn serve_queries(
    driver: &Driver,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, MarketError> {
    let mut requests = driver
        .client
        .subscribe(driver.subjects.market_orders(&driver.market))
        .await
        .map_err(|e| nats_err(&driver.market, "subscribing to order queries", e))?;
    let (client, addr) = (driver.client.clone(), driver.addr.clone());
    Ok(actix_rt::spawn(async move {
        loop {
            let request = tokio::select! {
                _ = stop.changed() => break,
                r = requests.next() => r,
            };
            let Some(request) = request else { break };
            let Some(reply) = request.reply else { continue };
            let read = rmp_serde::from_slice::<MarketRequest>(&request.payload)
                .map_err(|e| e.to_string())
                .and_then(|r| r.read());
            let answer = match read {
                Err(e) => MarketAnswer::refused("bad_request", e),
                Ok((account, query)) => {
                    let Ok((seq, spec, orders, more)) =
                        addr.send(AccountOrders { account, query }).await
                    else {
                        break;
                    };
                    MarketAnswer {
                        ok: true,
                        seq,
                        orders: orders.iter().map(|o| OrderView::new(&spec, o)).collect(),
                        more,
                        error: None,
                        message: None,
                    }
                }
            };
            let payload = rmp_serde::to_vec_named(&answer).unwrap_or_default();
            let _ = client.publish(reply, payload.into()).await;
        }
        let _ = requests.unsubscribe().await;
    }))
}
