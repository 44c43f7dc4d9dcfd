//! The client's queries (DESIGN section 11): an account's open orders and one order's state,
//! asked of the nodes' query fronts (and, for a closed order, through them, of the history
//! store), again when a stalled node swallowed the request.

use std::time::Duration;

use super::{Client, ClientError, Target, decode};
use crate::bus::Subjects;

/// An account's open orders across markets (`Client::open_orders`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OpenOrders {
    pub orders: Vec<crate::wire::query::OrderView>,
    /// The stream sequence each market's answer reflects.
    pub as_of: std::collections::BTreeMap<String, u64>,
    /// Markets that did not answer in time: their orders are not in `orders`.
    pub missing: Vec<String>,
}

#[derive(serde::Deserialize)]
struct OpenOrdersPage {
    orders: Vec<crate::wire::query::OrderView>,
    as_of: std::collections::BTreeMap<String, u64>,
    missing: Vec<String>,
    truncated: bool,
    next: Option<String>,
}

/// One order and the input sequence the answer reflects (its market's book for an open
/// order, the history store's progress for a closed one).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OrderStatus {
    pub order: crate::wire::query::OrderView,
    pub as_of: u64,
}

impl Client {
    /// The account's open orders (resting and stops waiting for their trigger) in every
    /// market, or in `market`, from the books themselves, every page of them. Markets that did
    /// not answer in time are named in `missing` (their orders are not listed); `as_of` says
    /// which stream sequence each market's answer reflects.
    pub async fn open_orders(
        &self,
        account: &str,
        market: Option<&str>,
        timeout: Duration,
    ) -> Result<OpenOrders, ClientError> {
        Subjects::check_token("account", account)?;
        if let Some(m) = market {
            Subjects::check_token("market", m)?;
        }
        let subject = self.subjects.query(account, "orders");
        let mut all = OpenOrders::default();
        let mut after: Option<String> = None;
        loop {
            let mut body = serde_json::json!({"timeout_ms": timeout.as_millis() as u64});
            if let Some(m) = market {
                body["market"] = m.into();
            }
            if let Some(a) = &after {
                body["after"] = a.clone().into();
            }
            let page: OpenOrdersPage = self.query(&subject, &body, timeout).await?;
            all.orders.extend(page.orders);
            all.as_of.extend(page.as_of);
            for m in page.missing {
                if !all.missing.contains(&m) {
                    all.missing.push(m);
                }
            }
            match page.next {
                Some(next) if page.truncated => after = Some(next),
                _ => return Ok(all),
            }
        }
    }

    /// One order of the account in `market`, by cid or oid: an open one from the books; a
    /// closed one (`filled`, `cancelled`, `expired`, `rejected`, with `reason` and
    /// `avg_price`) from the history store when `agora history` runs. `None` when no order is
    /// known (never placed, or closed without a history store).
    pub async fn order_status(
        &self,
        account: &str,
        market: &str,
        target: &Target,
        timeout: Duration,
    ) -> Result<Option<OrderStatus>, ClientError> {
        Subjects::check_token("account", account)?;
        Subjects::check_token("market", market)?;
        let subject = self.subjects.query(account, "order");
        let mut body =
            serde_json::json!({"market": market, "timeout_ms": timeout.as_millis() as u64});
        match target {
            Target::Cid(cid) => body["cid"] = cid.clone().into(),
            Target::Oid(oid) => body["oid"] = (*oid).into(),
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            order: crate::wire::query::HistoryOrder,
            as_of: u64,
        }
        match self.query::<Answer>(&subject, &body, timeout).await {
            Ok(a) => Ok(Some(OrderStatus {
                order: a.order.into_view(),
                as_of: a.as_of,
            })),
            Err(ClientError::Refused { error, .. }) if error == "not_open" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A query request (MessagePack) and its reply: the value, or the refusal.
    async fn query<T: serde::de::DeserializeOwned>(
        &self,
        subject: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let payload = rmp_serde::to_vec_named(body).map_err(|e| ClientError::Publish {
            subject: subject.to_string(),
            reason: e.to_string(),
        })?;
        // The markets have `timeout` to answer; the front a little more to put it together.
        // A query changes nothing, so one that got no answer (its node stalled: the nodes
        // share the subject in a queue group) is asked again, up to three times.
        let waited = timeout + Duration::from_secs(1);
        let payload = bytes::Bytes::from(payload);
        let mut attempt = 0;
        let reply = loop {
            attempt += 1;
            let asked = self.nats.request(subject.to_string(), payload.clone());
            let error = match tokio::time::timeout(waited, asked).await {
                Ok(Ok(reply)) => break reply,
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    ClientError::Timeout {
                        subject: subject.to_string(),
                        waited,
                        hint: "no node answers queries: is a node running? (a trader's NATS user may ask only on her own account's subject)",
                    }
                }
                Ok(Err(_)) | Err(_) => ClientError::Timeout {
                    subject: subject.to_string(),
                    waited,
                    hint: "asked three times: is a node running? (`agora ctl market.list`)",
                },
            };
            if attempt == 3 {
                return Err(error);
            }
        };
        #[derive(serde::Deserialize)]
        struct Status {
            ok: bool,
            #[serde(default)]
            error: String,
            #[serde(default)]
            message: String,
        }
        let status: Status = decode(subject, &reply.payload)?;
        if !status.ok {
            return Err(ClientError::Refused {
                subject: subject.to_string(),
                error: status.error,
                message: status.message,
                retry_after: None,
            });
        }
        decode(subject, &reply.payload)
    }
}

/// Why a history query (`Client::ask_history`) got no answer to use.
#[derive(Debug)]
pub enum HistoryAskError {
    /// Nothing subscribes there: no `agora history` runs.
    NotRunning { subject: String },
    /// No answer within the time given.
    Timeout { subject: String, waited: Duration },
    /// It answered `{ok: false, error, message}`: that answer.
    Refused(serde_json::Value),
    /// The connection failed, or the answer is not JSON.
    Failed { subject: String, reason: String },
}

impl std::fmt::Display for HistoryAskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HistoryAskError::NotRunning { subject } => write!(
                f,
                "nothing answers {subject}: agora history is not running; start it beside the nodes"
            ),
            HistoryAskError::Timeout { subject, waited } => write!(
                f,
                "no answer on {subject} within {waited:?}: is agora history running and its database up?"
            ),
            HistoryAskError::Refused(v) => write!(
                f,
                "{}: {}",
                v["error"].as_str().unwrap_or("refused"),
                v["message"].as_str().unwrap_or("")
            ),
            HistoryAskError::Failed { subject, reason } => write!(f, "asking {subject}: {reason}"),
        }
    }
}

impl std::error::Error for HistoryAskError {}

impl Client {
    /// Asks a history query, `<prefix>.query.<what>` (`trades.BTC-USDC`, `alice.history`, ...),
    /// in JSON: its `{ok: true, ...}` answer.
    pub async fn ask_history(
        &self,
        what: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value, HistoryAskError> {
        let subject = format!("{}.query.{what}", self.subjects.prefix());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Content-Type", "application/json");
        let asked =
            self.nats
                .request_with_headers(subject.clone(), headers, body.to_string().into());
        let reply = match tokio::time::timeout(timeout, asked).await {
            Err(_) => {
                return Err(HistoryAskError::Timeout {
                    subject,
                    waited: timeout,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(HistoryAskError::NotRunning { subject });
            }
            Ok(Err(e)) => {
                return Err(HistoryAskError::Failed {
                    subject,
                    reason: e.to_string(),
                });
            }
            Ok(Ok(reply)) => reply,
        };
        match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
            Ok(v) if v["ok"] == serde_json::Value::Bool(true) => Ok(v),
            Ok(v) => Err(HistoryAskError::Refused(v)),
            Err(e) => Err(HistoryAskError::Failed {
                subject,
                reason: format!("the answer is not JSON: {e}"),
            }),
        }
    }
}
