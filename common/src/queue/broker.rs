//! One RabbitMQ connection per process, kept alive by a supervisor task, with a small pool of
//! confirm-mode channels that every publisher shares.
//!
//! On a cluster, `AMQP_URL` lists every node (comma-separated). lapin takes one URI and its own
//! recovery only ever reconnects to that URI, so the rotation is ours: the supervisor starts at a
//! random node (so a fleet spreads over the cluster) and moves to the next one whenever a connect
//! fails or the link is lost. Connecting (TCP, handshake, topology) and every publisher confirm are
//! bounded by timeouts, so a wedged node becomes a reconnect or a 503, never a stuck request.
//!
//! Why this shape: a channel per request would cost a round trip per webhook and exhaust the
//! broker's channel limit under load; one channel would serialise everything behind one confirm
//! stream. A few channels with many publishes pipelined on each is what RabbitMQ recommends.
//! Callers never wait for a reconnect: while the link is down `publish` fails at once, which
//! ingest turns into a fast 503 so Calendly retries later.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::{Outgoing, Topology};
use crate::config::AmqpArgs;
use crate::retry;

/// How long one connection attempt (TCP + AMQP handshake + topology) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor checks that the connection is still up.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// A publish channel is replaced at most this often, however many of its publishes are nacked.
const REOPEN_SPACING: Duration = Duration::from_millis(500);
/// Confirm waits that time out in a row before the node counts as wedged and we move to the next.
const TIMEOUTS_BEFORE_FAILOVER: usize = 3;

#[derive(Clone)]
pub struct BrokerConfig {
    pub url: SecretString,
    pub topology: Topology,
    /// Confirm-mode channels in the publish pool (0 for a consume-only process).
    pub publish_channels: usize,
    /// Longest wait for a publisher confirm before the publish counts as failed.
    pub confirm_timeout: Duration,
    /// Shown in the RabbitMQ management UI, so operators can tell ingest from workers.
    pub connection_name: String,
}

impl BrokerConfig {
    /// A process's broker from its `AMQP_URL` / `AMQP_TOPOLOGY_PREFIX`, named `connection_name`,
    /// with a small publish pool and a 10 s confirm wait (ingest sets its own).
    pub fn from_args(amqp: &AmqpArgs, connection_name: &str) -> Self {
        Self {
            url: amqp.amqp_url.clone(),
            topology: Topology::new(amqp.amqp_topology_prefix.clone()),
            publish_channels: 2,
            confirm_timeout: Duration::from_secs(10),
            connection_name: connection_name.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    Unavailable,
    #[error("RabbitMQ has blocked publishing (memory or disk alarm)")]
    Blocked,
    #[error("RabbitMQ did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ could not route the message (missing queue or binding)")]
    Unroutable,
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("publishing failed: {0}")]
    Channel(#[source] lapin::Error),
}

struct Link {
    /// Held for its lifetime: dropping a lapin `Connection` closes it.
    conn: Connection,
    /// `host:port` of the node this link is to (for readiness and logs).
    node: String,
    publish: Vec<PublishChannel>,
    /// Wakes the supervisor when a publish saw this link fail before its health poll did. Per
    /// link, so a wake-up meant for a dead link can never tear down its replacement.
    broken: Notify,
    /// Confirm waits that timed out in a row on this link (reset by any ack).
    timeouts_in_a_row: AtomicUsize,
    /// When this link last heard a confirm (ack or nack), in ms since `opened`.
    last_confirm_ms: AtomicU64,
    opened: Instant,
}

impl Link {
    fn heard_confirm(&self) {
        self.last_confirm_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether the node has confirmed nothing at all for `window`: wedged, as opposed to slow.
    fn silent_for(&self, window: Duration) -> bool {
        let last = Duration::from_millis(self.last_confirm_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last) >= window
    }
}

/// One confirm-mode channel of the publish pool, replaceable in place.
///
/// Why replaceable: on RabbitMQ 3.10 a channel opened while a quorum queue has no leader (right
/// after the leader's node died, before the election ends) keeps addressing the dead leader, and
/// every publish on it is nacked until that node comes back (20 s and more; RABBITMQ-NOTES.md).
/// Ingest reconnects within milliseconds of losing its node, so its new channels are exactly those.
/// A channel that sees a nack is therefore replaced by a fresh one; the nacked publish itself was
/// never acknowledged to Calendly (503), so nothing is lost either way.
struct PublishChannel {
    channel: RwLock<Channel>,
    /// Set while a replacement is under way and for [`REOPEN_SPACING`] after it, so a burst of
    /// nacks replaces the channel once.
    reopening: AtomicBool,
}

impl PublishChannel {
    fn new(channel: Channel) -> Self {
        Self { channel: RwLock::new(channel), reopening: AtomicBool::new(false) }
    }

    fn current(&self) -> Channel {
        self.channel.read().expect("publish channel lock poisoned").clone()
    }
}

struct Inner {
    config: BrokerConfig,
    link: RwLock<Option<Arc<Link>>>,
    /// Round-robin cursor over the publish channels.
    next: AtomicUsize,
    /// Counts established links; consumers watch it to re-subscribe after a reconnect.
    generation: watch::Sender<u64>,
    stop: CancellationToken,
}

/// Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl Broker {
    /// Starts the supervisor, which connects (and keeps reconnecting) in the background. Returns
    /// at once: a process must be able to start, and answer 503, while the broker is down.
    pub fn start(config: BrokerConfig) -> Self {
        let inner = Arc::new(Inner {
            config,
            link: RwLock::new(None),
            next: AtomicUsize::new(0),
            generation: watch::channel(0).0,
            stop: CancellationToken::new(),
        });
        tokio::spawn(supervise(inner.clone()));
        Self { inner }
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.config.topology
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.inner.link.read().expect("broker link lock poisoned").clone()
    }

    /// Connected and not blocked by a resource alarm.
    pub fn is_ready(&self) -> bool {
        self.current().is_some_and(|l| l.conn.status().connected() && !l.conn.status().blocked())
    }

    /// `host:port` of the node currently connected to, if any.
    pub fn current_node(&self) -> Option<String> {
        self.current().filter(|l| l.conn.status().connected()).map(|l| l.node.clone())
    }

    /// Waits until connected, up to `deadline`.
    pub async fn wait_ready(&self, deadline: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(deadline, async {
            while !self.is_ready() {
                tokio::select! {
                    _ = rx.changed() => {},
                    _ = tokio::time::sleep(HEALTH_POLL) => {},
                }
            }
        })
        .await
        .is_ok()
    }

    /// A receiver whose value changes each time a new link is established.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    /// Opens a fresh channel on the current link (for consumers, which want their own).
    pub async fn open_channel(&self) -> Result<Channel, PublishError> {
        let link = self.current().ok_or(PublishError::Unavailable)?;
        link.conn.create_channel().await.map_err(|e| {
            self.mark_broken(&link);
            PublishError::Channel(e)
        })
    }

    /// Publishes to the main exchange and waits for the broker's confirm. `Ok` means the broker
    /// holds the message in a durable queue; anything else means it may not.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), PublishError> {
        let exchange = self.inner.config.topology.exchange();
        self.publish_to(&exchange, message).await
    }

    /// Publishes to any exchange (the default one is `""`), with confirm and the mandatory flag.
    pub async fn publish_to(&self, exchange: &str, message: &Outgoing) -> Result<(), PublishError> {
        let link = self.current().ok_or(PublishError::Unavailable)?;
        if link.publish.is_empty() {
            return Err(PublishError::Unavailable);
        }
        if link.conn.status().blocked() {
            return Err(PublishError::Blocked);
        }
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed) % link.publish.len();
        let channel = link.publish[slot].current();
        // mandatory: an unroutable message comes back to us (and becomes a 503) instead of being
        // silently dropped by the exchange.
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        let timeout = self.inner.config.confirm_timeout;
        let confirm = async {
            channel
                .basic_publish(
                    exchange.into(),
                    message.routing_key.as_str().into(),
                    options,
                    &message.body,
                    message.properties.clone(),
                )
                .await?
                .await
        };
        let outcome = match tokio::time::timeout(timeout, confirm).await {
            Err(_) => {
                // One slow confirm is a 503. Several in a row with no confirm at all meanwhile mean
                // the node is wedged: move on. A node that is only slow (overloaded, a long fsync)
                // keeps confirming: leaving it would abandon every publish in flight on this link,
                // answering 503 for hundreds of messages it is about to hold (each one a duplicate
                // Calendly then sends again).
                if link.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_BEFORE_FAILOVER
                    && link.silent_for(timeout)
                {
                    tracing::warn!(node = %link.node, "RabbitMQ stopped confirming; moving to the next node");
                    self.mark_broken(&link);
                }
                return Err(PublishError::Timeout(timeout));
            }
            Ok(Err(e)) => {
                self.mark_broken(&link);
                return Err(PublishError::Channel(e));
            }
            Ok(Ok(confirmation)) => confirmation,
        };
        link.timeouts_in_a_row.store(0, Ordering::Relaxed);
        link.heard_confirm();
        match outcome {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable),
            Confirmation::Nack(_) => {
                reopen(&link, slot, &channel, timeout);
                Err(PublishError::Nacked)
            }
            // Every pool channel is put in confirm mode before it is shared.
            Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }

    /// Publishes `messages` in this order on one channel (so they reach the exchange in this order)
    /// and waits for every confirm. Without the mandatory flag: an exchange nobody has bound a
    /// queue to is not an error. `Ok` means the broker took every one of them.
    pub async fn publish_in_order(&self, exchange: &str, messages: &[Outgoing]) -> Result<(), PublishError> {
        let link = self.current().ok_or(PublishError::Unavailable)?;
        let Some(pool_channel) = link.publish.first() else { return Err(PublishError::Unavailable) };
        if link.conn.status().blocked() {
            return Err(PublishError::Blocked);
        }
        let channel = pool_channel.current();
        let timeout = self.inner.config.confirm_timeout;
        let confirms = async {
            let publishes = messages.iter().map(|message| {
                channel.basic_publish(
                    exchange.into(),
                    message.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    message.properties.clone(),
                )
            });
            let pending = all_in_order(publishes.collect()).await?;
            let mut outcomes = Vec::with_capacity(pending.len());
            for confirm in pending {
                outcomes.push(confirm.await?);
            }
            Ok::<_, lapin::Error>(outcomes)
        };
        let outcomes = match tokio::time::timeout(timeout, confirms).await {
            Err(_) => return Err(PublishError::Timeout(timeout)),
            Ok(Err(e)) => {
                self.mark_broken(&link);
                return Err(PublishError::Channel(e));
            }
            Ok(Ok(outcomes)) => outcomes,
        };
        if outcomes.iter().all(|c| matches!(c, Confirmation::Ack(_))) {
            Ok(())
        } else {
            reopen(&link, 0, &channel, timeout);
            Err(PublishError::Nacked)
        }
    }

    fn mark_broken(&self, link: &Link) {
        link.broken.notify_one();
    }

    /// Stops reconnecting and closes the connection. Call after the last publish has finished.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let link = self.inner.link.write().expect("broker link lock poisoned").take();
        if let Some(link) = link {
            let _ = tokio::time::timeout(Duration::from_secs(2), link.conn.close(200, "shutdown".into())).await;
        }
    }
}

/// Runs `futures` together and returns their results in the same order, polling the unfinished
/// ones in that order every time. For publishes this keeps their order on the wire while letting
/// their writes overlap: lapin queues a publish's frames on the first poll of `basic_publish`,
/// before its first await (which only waits for the frames to be written), so the first pass
/// queues every message in order and one socket write carries many of them — instead of a write,
/// and a wake-up of this task, per message when each publish is awaited before the next.
/// (`futures_util::future::join_all` does not promise that first-poll order for long lists: past
/// 30 futures it polls through `FuturesOrdered`.) Each wake-up re-polls every unfinished one; a
/// round is at most the publisher's batch (500), and the measured CPU per change fell with it.
async fn all_in_order<F, T, E>(futures: Vec<F>) -> Result<Vec<T>, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (future, result) in futures.iter_mut().zip(done.iter_mut()) {
            if result.is_some() {
                continue;
            }
            match future.as_mut().poll(cx) {
                std::task::Poll::Ready(Ok(value)) => *result = Some(value),
                std::task::Poll::Ready(Err(error)) => return std::task::Poll::Ready(Err(error)),
                std::task::Poll::Pending => waiting = true,
            }
        }
        if waiting { std::task::Poll::Pending } else { std::task::Poll::Ready(Ok(())) }
    })
    .await?;
    Ok(done.into_iter().map(|value| value.expect("every future finished")).collect())
}

/// The nodes of `AMQP_URL`: one URI, or a comma-separated list of a cluster's nodes.
fn nodes(url: &SecretString) -> Vec<SecretString> {
    let nodes: Vec<SecretString> = url
        .expose_secret()
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(|node| SecretString::from(node.to_owned()))
        .collect();
    if nodes.is_empty() { vec![url.clone()] } else { nodes }
}

/// `host:port` of a node, for logs (never the credentials in its URI).
fn node_name(node: &SecretString) -> String {
    url::Url::parse(node.expose_secret())
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port().unwrap_or(5672))))
        .unwrap_or_else(|| "(unparseable AMQP URL)".into())
}

async fn connect(config: &BrokerConfig, node: &SecretString) -> lapin::Result<Link> {
    let props = ConnectionProperties::default().with_connection_name(config.connection_name.as_str().into());
    let conn = Connection::connect(node.expose_secret(), props).await?;
    config.topology.declare(&conn).await?;
    let mut publish = Vec::with_capacity(config.publish_channels);
    for _ in 0..config.publish_channels {
        publish.push(PublishChannel::new(confirm_channel(&conn).await?));
    }
    Ok(Link {
        conn,
        node: node_name(node),
        publish,
        broken: Notify::new(),
        timeouts_in_a_row: AtomicUsize::new(0),
        last_confirm_ms: AtomicU64::new(0),
        opened: Instant::now(),
    })
}

async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// Replaces publish channel `slot` of `link`, which nacked a publish on `nacked` (see
/// [`PublishChannel`]), unless it was replaced already or is being replaced. The old channel is
/// closed only after `confirm_wait`, so publishes still waiting on it get their own answer instead
/// of a closed channel (which would count as a lost link).
fn reopen(link: &Arc<Link>, slot: usize, nacked: &Channel, confirm_wait: Duration) {
    let publish = &link.publish[slot];
    if publish.current().id() != nacked.id() || publish.reopening.swap(true, Ordering::AcqRel) {
        return;
    }
    let link = link.clone();
    tokio::spawn(async move {
        let publish = &link.publish[slot];
        match confirm_channel(&link.conn).await {
            Ok(fresh) => {
                let old =
                    std::mem::replace(&mut *publish.channel.write().expect("publish channel lock poisoned"), fresh);
                tracing::info!(node = %link.node, "a publish was nacked; replaced its channel");
                tokio::spawn(async move {
                    tokio::time::sleep(confirm_wait).await;
                    let _ = old.close(200, "replaced after a nack".into()).await;
                });
            }
            Err(error) => {
                tracing::warn!(node = %link.node, %error, "could not replace a nacking channel; reconnecting");
                link.broken.notify_one();
            }
        }
        tokio::time::sleep(REOPEN_SPACING).await;
        publish.reopening.store(false, Ordering::Release);
    });
}

async fn supervise(inner: Arc<Inner>) {
    let nodes = nodes(&inner.config.url);
    let mut backoff = retry::reconnect();
    let mut was_up = false;
    // A random first node spreads a fleet over the cluster; then round the list.
    let mut node = rand::random_range(0..nodes.len());
    let mut failed_in_a_row = 0;
    while !inner.stop.is_cancelled() {
        let name = node_name(&nodes[node]);
        match tokio::time::timeout(CONNECT_TIMEOUT, connect(&inner.config, &nodes[node])).await {
            Ok(Ok(link)) => {
                backoff.reset();
                failed_in_a_row = 0;
                let link = Arc::new(link);
                *inner.link.write().expect("broker link lock poisoned") = Some(link.clone());
                inner.generation.send_modify(|g| *g += 1);
                tracing::info!(connection = %inner.config.connection_name, node = %name, "connected to RabbitMQ");
                was_up = true;
                watch_link(&inner, &link).await;
                inner.link.write().expect("broker link lock poisoned").take();
                if inner.stop.is_cancelled() {
                    break;
                }
                tracing::warn!(node = %name, "lost the RabbitMQ connection; reconnecting");
                let _ = tokio::time::timeout(Duration::from_secs(1), link.conn.close(320, "reconnecting".into())).await;
                // Straight to the next node: the one we lost is the least likely to be back.
                node = (node + 1) % nodes.len();
                continue;
            }
            Ok(Err(error)) => {
                if was_up {
                    tracing::warn!(node = %name, %error, "cannot reach RabbitMQ yet");
                } else {
                    tracing::warn!(node = %name, %error, "cannot connect to RabbitMQ; retrying in the background");
                }
            }
            Err(_) => tracing::warn!(node = %name, "connecting to RabbitMQ timed out; trying the next node"),
        }
        node = (node + 1) % nodes.len();
        failed_in_a_row += 1;
        // Try every node once before waiting; then back off between rounds.
        if failed_in_a_row % nodes.len() != 0 {
            continue;
        }
        let delay = backoff.next_delay().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = inner.stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {},
        }
    }
}

/// Returns when the link is no longer usable (or on stop).
async fn watch_link(inner: &Inner, link: &Link) {
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = link.broken.notified() => return,
            _ = tokio::time::sleep(HEALTH_POLL) => {
                let channels_ok = link.publish.iter().all(|c| c.current().status().connected());
                if !link.conn.status().connected() || !channels_ok {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amqp_url_may_list_a_clusters_nodes_and_logs_name_them_without_credentials() {
        let list = SecretString::from("amqp://u:secret@a:5672/%2f, amqp://u:secret@b:5673/%2f,".to_owned());
        let listed = nodes(&list);
        assert_eq!(listed.len(), 2);
        assert_eq!(node_name(&listed[1]), "b:5673");
        assert!(!node_name(&listed[0]).contains("secret"));
        assert_eq!(nodes(&SecretString::from("amqp://localhost".to_owned())).len(), 1);
    }
}
