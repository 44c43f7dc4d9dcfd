//! A request responder shared by the services that answer in a queue group (the nodes' query
//! front, `agora history`'s queries): subscribed and flushed before the caller says it is
//! ready, each request answered on a task of its own so a slow answer delays only its asker,
//! and unsubscribed when told to stop. `subscribe_flushed` is the first step alone, for the
//! services that read their requests themselves (the control service, a node's agent).

use std::future::Future;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::BusError;

/// Subscribes to `subject` (in queue group `group`, if any), then flushes: once this returns,
/// the server routes the subject's messages here (a service says it is ready only after).
pub async fn subscribe_flushed(
    client: &async_nats::Client,
    subject: &str,
    group: Option<&str>,
) -> Result<async_nats::Subscriber, BusError> {
    let subscription = subscribe_to(client, subject, group).await?;
    flushed(client, subject).await?;
    Ok(subscription)
}

async fn subscribe_to(
    client: &async_nats::Client,
    subject: &str,
    group: Option<&str>,
) -> Result<async_nats::Subscriber, BusError> {
    let subscribed = match group {
        Some(group) => {
            client
                .queue_subscribe(subject.to_string(), group.to_string())
                .await
        }
        None => client.subscribe(subject.to_string()).await,
    };
    subscribed.map_err(|e| BusError::Subscribe {
        subject: subject.to_string(),
        reason: e.to_string(),
    })
}

/// Waits until the server has what this client sent, its subscriptions to `subjects` among it.
async fn flushed(client: &async_nats::Client, subjects: &str) -> Result<(), BusError> {
    client.flush().await.map_err(|e| BusError::Subscribe {
        subject: subjects.to_string(),
        reason: e.to_string(),
    })
}

/// Subscriptions to some subjects in one queue group, not yet served.
pub struct Responder {
    client: async_nats::Client,
    subscriptions: Vec<async_nats::Subscriber>,
}

impl Responder {
    /// Subscribes to every subject in `group`, then flushes: once this returns, the server
    /// routes requests here.
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &[String],
        group: &str,
    ) -> Result<Responder, BusError> {
        let mut subscriptions = Vec::with_capacity(subjects.len());
        for subject in subjects {
            subscriptions.push(subscribe_to(client, subject, Some(group)).await?);
        }
        flushed(client, &subjects.join(", ")).await?;
        Ok(Responder {
            client: client.clone(),
            subscriptions,
        })
    }

    /// Answers every request that has a reply subject with `answer`'s bytes, each on a task of
    /// its own, until `stop` changes or the subscriptions end; then unsubscribes.
    pub async fn serve<A, F>(self, mut stop: watch::Receiver<bool>, answer: A)
    where
        A: Fn(async_nats::Message) -> F + Clone + Send + 'static,
        F: Future<Output = Bytes> + Send + 'static,
    {
        let Responder {
            client,
            subscriptions,
        } = self;
        let mut requests = futures::stream::select_all(subscriptions);
        loop {
            let message = tokio::select! {
                _ = stop.changed() => break,
                m = requests.next() => m,
            };
            let Some(message) = message else { break };
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            let (answer, client) = (answer.clone(), client.clone());
            tokio::spawn(async move {
                let bytes = answer(message).await;
                let _ = client.publish(reply, bytes).await;
            });
        }
        for mut subscription in requests.into_iter() {
            let _ = subscription.unsubscribe().await;
        }
    }
}
