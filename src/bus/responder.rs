//! A request responder shared by the services that answer in a queue group (the nodes' query
//! front, `agora history`'s queries): subscribed and flushed before the caller says it is
//! ready, each request answered on a task of its own so a slow answer delays only its asker,
//! and unsubscribed when told to stop.

use std::future::Future;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::BusError;

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
            let subscription = client
                .queue_subscribe(subject.clone(), group.to_string())
                .await
                .map_err(|e| BusError::Subscribe {
                    subject: subject.clone(),
                    reason: e.to_string(),
                })?;
            subscriptions.push(subscription);
        }
        client.flush().await.map_err(|e| BusError::Subscribe {
            subject: subjects.join(", "),
            reason: e.to_string(),
        })?;
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
