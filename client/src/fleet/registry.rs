//! Who is out there: the registry read (with a ping where there is no JetStream), and the
//! registry bucket kept closed to writers that may touch only their own key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use async_nats::jetstream::context::CreateStreamErrorKind;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, ErrorCode as JsErrorCode};
use async_nats::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use tokio::time::{timeout_at, Instant};

use cbus_protocol::codec;
use cbus_protocol::maintenance::Maintenance;
use cbus_protocol::presence::{self, PresenceEvent, RegistrySpec};
use cbus_protocol::subject;

use super::kv::replay_latest;
use super::maintenance::attach_maintenance;
use super::{flush_until, status_from, AgentStatus, Fleet, FleetError, Rejected, Selector};

/// The most machines a selection looks up one by one ([`Fleet::select_within`]); a larger one
/// reads the whole registry.
const LOOKUP_MAX: usize = 256;

fn registry_err(message: String) -> FleetError {
    FleetError::Registry {
        bucket: presence::REGISTRY_BUCKET,
        message,
    }
}

/// By hostname, then nkey: the order every listing of machines uses. Unstable, as no two
/// agents share an nkey: a stable sort copies half the (large) entries aside first.
fn sort_by_host(agents: &mut [AgentStatus]) {
    agents.sort_unstable_by(|a, b| {
        (a.info.hostname.as_str(), a.info.nkey.as_str())
            .cmp(&(b.info.hostname.as_str(), b.info.nkey.as_str()))
    });
}

/// Attaches the maintenance marks read beside the registry. Without them a machine under
/// maintenance is waited for like any other, which is slower but never wrong, so a failed read
/// only warns.
fn apply_marks(
    agents: &mut [AgentStatus],
    marks: Result<HashMap<String, Maintenance>, FleetError>,
) {
    match marks {
        Ok(marks) => attach_maintenance(agents, &marks),
        Err(e) => tracing::warn!(error = %e, "cannot read maintenance marks; none applied"),
    }
}

/// What a selection read: the machines a lookup found, or the whole registry.
enum Read {
    Looked(Vec<AgentStatus>),
    Whole(Result<Vec<AgentStatus>, FleetError>),
}

/// What a selection found ([`Fleet::select_within`]).
#[derive(Debug)]
pub struct Selection {
    pub agents: Vec<AgentStatus>,
    /// How many agents the read knew: the whole registry, or the machines looked up.
    pub known: usize,
    /// Why the registry could not be read, when it exists: the agents are then those that
    /// answered a ping in its window, so machines that are slow, frozen or stopped are missing
    /// rather than listed as such. `None` after a registry read, and after a ping on a server
    /// without a registry (there a ping is the only way to know).
    pub unread: Option<FleetError>,
}

/// How long a failed bucket create waits for another client's create of the same bucket.
const BUCKET_RACE_WAIT: Duration = Duration::from_secs(2);

/// The least time the maintenance read beside the registry read gets.
const MAINTENANCE_WAIT_MIN: Duration = Duration::from_millis(500);

/// The longest a registry read takes before it fails (a read of 50,000 entries takes ~1 s).
const REGISTRY_WAIT: Duration = Duration::from_secs(5);

/// How long the maintenance read beside a registry read given `registry_wait` may take: as
/// long, and at least a short while (an empty bucket is one round trip).
fn marks_wait(registry_wait: Duration) -> Duration {
    registry_wait.min(REGISTRY_WAIT).max(MAINTENANCE_WAIT_MIN)
}

impl Fleet {
    /// Every agent in the registry with its state, sorted by hostname. Falls back to a ping
    /// (collecting answers for `ping_window`) when the server has no JetStream or no registry.
    pub async fn agents(&self, ping_window: Duration) -> Result<Vec<AgentStatus>, FleetError> {
        self.agents_within(REGISTRY_WAIT, ping_window).await
    }

    /// Like [`Fleet::agents`], giving the registry read at most `registry_wait` before the
    /// ping: on a cluster the bucket's stream has no leader for a few seconds after its
    /// leader's node died, and a read that waited it out would leave a command no time.
    pub async fn agents_within(
        &self,
        registry_wait: Duration,
        ping_window: Duration,
    ) -> Result<Vec<AgentStatus>, FleetError> {
        // The marks beside the registry, not after it: one round trip fewer before a command
        // can ask anything.
        let (read, marks) = tokio::join!(
            self.registry_within(registry_wait),
            self.maintenance_within(marks_wait(registry_wait)),
        );
        let (agents, unread) = self.agents_from(read, marks, ping_window).await?;
        if let Some(e) = unread {
            tracing::warn!(error = %e, "the agents listed are those that answered a ping");
        }
        Ok(agents)
    }

    /// The agents from a registry `read` (or, when it failed, a ping) with the maintenance
    /// `marks` read beside it attached, sorted by hostname; with the read's error when the
    /// registry exists and could not be read ([`Selection::unread`]).
    async fn agents_from(
        &self,
        read: Result<Vec<AgentStatus>, FleetError>,
        marks: Result<HashMap<String, Maintenance>, FleetError>,
        ping_window: Duration,
    ) -> Result<(Vec<AgentStatus>, Option<FleetError>), FleetError> {
        let mut unread = None;
        let (mut agents, marks) = match read {
            Ok(agents) => (agents, marks),
            Err(e) => {
                tracing::debug!(error = %e, "registry unavailable; falling back to ping");
                if !matches!(e, FleetError::NoRegistry { .. }) {
                    unread = Some(e);
                }
                match marks {
                    Ok(marks) => (self.ping(ping_window).await?, Ok(marks)),
                    // The marks are in JetStream too, and as likely to be slow now: read them
                    // again beside the ping, within its window, so the fallback costs one
                    // window.
                    Err(_) => {
                        let (found, marks) = tokio::join!(
                            self.ping(ping_window),
                            self.maintenance_within(ping_window)
                        );
                        (found?, marks)
                    }
                }
            }
        };
        apply_marks(&mut agents, marks);
        sort_by_host(&mut agents);
        Ok((agents, unread))
    }

    /// Reads the last presence event of every agent from the KV bucket, sorted by nkey.
    pub async fn registry(&self) -> Result<Vec<AgentStatus>, FleetError> {
        self.registry_within(REGISTRY_WAIT).await
    }

    /// [`Fleet::registry`], given up after `wait`.
    pub async fn registry_within(&self, wait: Duration) -> Result<Vec<AgentStatus>, FleetError> {
        let deadline = Instant::now() + wait.min(REGISTRY_WAIT);
        let now = presence::now_ms();
        // Entries in arrival order, and where each nkey's is: an entry rewritten by a heartbeat
        // during the read comes again and replaces the first (so a writer rewriting its entry
        // fast during the read still holds one place, not one per write). Not a map of the entries: an
        // ordered map moved every (large) entry around as it grew, a tenth of a 10,000-machine
        // read's own CPU (perf, docs/benchmarks.md).
        let mut agents: Vec<AgentStatus> = Vec::new();
        let mut at: HashMap<String, usize> = HashMap::new();
        self.replay(
            presence::registry_entries_filter(),
            deadline,
            |subject, published_ms, payload| {
                if let Some(status) = self.entry_status(subject, published_ms, payload?, now) {
                    match at.get(&status.info.nkey) {
                        Some(&i) => agents[i] = status,
                        None => {
                            at.insert(status.info.nkey.clone(), agents.len());
                            agents.push(status);
                        }
                    }
                }
                Some(())
            },
        )
        .await?;
        // The list grew by doubling: up to twice its length, 4 MB of a 50,000-entry read kept
        // through the whole command (a large block shrinks in place, without a copy).
        agents.shrink_to_fit();
        agents.sort_unstable_by(|a, b| a.info.nkey.cmp(&b.info.nkey));
        Ok(agents)
    }

    /// The agents `selector` picks, sorted by hostname, and how many agents are known. A
    /// selection by nkeys, or by hostnames without wildcards, reads only those machines'
    /// entries, found through the host index ([`presence::HOST_INDEX`]); it falls back to
    /// reading the whole registry (then to a ping, as [`Fleet::agents_within`]) when a name or
    /// nkey is not found that way (a machine whose agent predates the index, or a name no
    /// machine has) or the lookup fails. `known` is the registry's size when it was read
    /// whole, else the number of machines looked up.
    pub async fn select_within(
        &self,
        selector: &Selector,
        registry_wait: Duration,
        ping_window: Duration,
    ) -> Result<Selection, FleetError> {
        let started = Instant::now();
        // A third for the lookup, so that a registry that cannot answer (a cluster electing
        // its stream's leader) leaves the full read and the ping their time. The whole
        // registry is read when the lookup cannot decide. The marks are read beside both.
        let read = async {
            match self.lookup(selector, started + registry_wait / 3).await {
                Ok(Some(agents)) => return Read::Looked(agents),
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "registry lookup failed; reading it whole"),
            }
            Read::Whole(
                self.registry_within(registry_wait.saturating_sub(started.elapsed()))
                    .await,
            )
        };
        let (read, marks) = tokio::join!(read, self.maintenance_within(marks_wait(registry_wait)));
        match read {
            Read::Looked(mut agents) => {
                apply_marks(&mut agents, marks);
                sort_by_host(&mut agents);
                Ok(Selection {
                    known: agents.len(),
                    agents,
                    unread: None,
                })
            }
            Read::Whole(read) => {
                let (all, unread) = self.agents_from(read, marks, ping_window).await?;
                let known = all.len();
                Ok(Selection {
                    agents: selector.select_owned(all)?,
                    known,
                    unread,
                })
            }
        }
    }

    /// The selected agents from their own entries, or `None` when the selection cannot be
    /// looked up (see [`Fleet::select_within`]).
    async fn lookup(
        &self,
        selector: &Selector,
        deadline: Instant,
    ) -> Result<Option<Vec<AgentStatus>>, FleetError> {
        let hosts = selector.literal_hosts();
        let mut candidates: BTreeSet<String> = selector.nkeys.iter().cloned().collect();
        let by_name = hosts
            .as_ref()
            .filter(|h| !h.is_empty() && h.len() <= LOOKUP_MAX);
        // Nothing to look up (the whole fleet, or a glob): no round trip for the stream.
        if candidates.is_empty() && by_name.is_none() {
            return Ok(None);
        }
        let stream = self.registry_stream(deadline).await?;
        if candidates.is_empty() {
            let Some(hosts) = by_name else {
                return Ok(None);
            };
            let filters: Option<Vec<String>> = hosts
                .iter()
                .map(|h| presence::host_index_filter(h))
                .collect();
            let Some(filters) = filters else {
                return Ok(None);
            };
            // The index keys under each name, listed by the server (a stream-info request with
            // a subject filter): nats-server 2.9 scans every subject of the stream once for it,
            // where an ordered consumer on the same filter scanned them three times (start,
            // pending count, info) and then delivered the keys (docs/benchmarks.md, "the
            // registry read at 10,000 and 50,000"). The subjects are what the server holds:
            // each was written under its nkey's permissions. A deleted index key still lists;
            // it leads to its machine only if the entry names the name asked for, as any does.
            let reads = filters.into_iter().map(|filter| {
                let stream = &stream;
                async move {
                    let mut keys = timeout_at(deadline, stream.info_with_subjects(filter))
                        .await
                        .map_err(|_| registry_err("timed out while looking up".into()))?
                        .map_err(|e| registry_err(e.to_string()))?;
                    let mut nkeys = Vec::new();
                    while let Some(key) = timeout_at(deadline, keys.next())
                        .await
                        .map_err(|_| registry_err("timed out while looking up".into()))?
                    {
                        let (subject, _) = key.map_err(|e| registry_err(e.to_string()))?;
                        if let Some(nkey) = presence::host_index_nkey_of(&subject) {
                            nkeys.push(nkey.to_owned());
                        }
                        // More than a lookup takes: the whole read decides.
                        if nkeys.len() > LOOKUP_MAX {
                            break;
                        }
                    }
                    Ok::<_, FleetError>(nkeys)
                }
            });
            for nkeys in futures::future::try_join_all(reads).await? {
                candidates.extend(nkeys);
            }
        }
        if candidates.len() > LOOKUP_MAX {
            return Ok(None);
        }
        let now = presence::now_ms();
        let gets = candidates.iter().map(|nkey| {
            let stream = &stream;
            async move {
                let subject = presence::registry_entry_subject(nkey);
                match timeout_at(
                    deadline,
                    stream.direct_get_last_for_subject(subject.clone()),
                )
                .await
                {
                    Err(_) => Err(registry_err("timed out while looking up".into())),
                    Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
                    Ok(Err(e)) => Err(registry_err(e.to_string())),
                    Ok(Ok(m)) => {
                        let published_ms = (m.time.unix_timestamp_nanos() / 1_000_000).max(0);
                        let deleted = m.headers.get("KV-Operation").is_some();
                        let payload = (!deleted).then_some(&m.payload[..]);
                        Ok(payload
                            .and_then(|p| self.entry_status(&subject, published_ms as u64, p, now)))
                    }
                }
            }
        });
        let found: Vec<AgentStatus> = futures::future::try_join_all(gets)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let selected = selector.select(&found)?;
        // Every nkey named has an entry and every name named a machine; otherwise the whole
        // registry decides (it may hold machines the index does not, or say "no such machine").
        let complete = selector
            .nkeys
            .iter()
            .all(|n| found.iter().any(|a| &a.info.nkey == n))
            && hosts.is_none_or(|hosts| {
                hosts
                    .iter()
                    .all(|h| selected.iter().any(|a| a.info.hostname == *h))
            });
        Ok(complete.then_some(selected))
    }

    async fn registry_stream(
        &self,
        deadline: Instant,
    ) -> Result<jetstream::stream::Stream<()>, FleetError> {
        let js = jetstream::new(self.client.clone());
        timeout_at(
            deadline,
            js.get_stream_no_info(format!("KV_{}", presence::REGISTRY_BUCKET)),
        )
        .await
        .map_err(|_| registry_err("timed out".into()))?
        .map_err(|e| registry_err(e.to_string()))
    }

    /// An agent's status from its registry entry on `subject`, or `None` (logged, and counted
    /// when forged) when the entry is malformed or names another machine than its key.
    fn entry_status(
        &self,
        subject: &str,
        published_ms: u64,
        payload: &[u8],
        now: u64,
    ) -> Option<AgentStatus> {
        // The key is the nkey whose permissions allowed the write; the body only claims one.
        let key = presence::registry_key_of(subject).unwrap_or_default();
        match serde_json::from_slice::<PresenceEvent>(payload) {
            Ok(event) if event.agent.nkey != key => {
                Rejected::count(&self.rejected.registry);
                tracing::warn!(
                    key,
                    claims = %codec::quote(&event.agent.nkey),
                    "ignoring a registry entry that names another machine"
                );
                None
            }
            Ok(event) => Some(status_from(event, published_ms, now)),
            Err(e) => {
                tracing::warn!(subject, error = %e, "ignoring malformed registry entry");
                None
            }
        }
    }

    /// Replays the last entry of every registry key matching `filter`, calling
    /// `each(subject, published_ms, body)` with `None` for a deleted key, until the replay is
    /// complete or `deadline`.
    async fn replay(
        &self,
        filter: String,
        deadline: Instant,
        mut each: impl FnMut(&str, u64, Option<&[u8]>) -> Option<()>,
    ) -> Result<(), FleetError> {
        let stream = self.registry_stream(deadline).await?;
        replay_latest(&self.client, &stream, filter, deadline, |entry| {
            let payload = (!entry.deleted).then_some(&entry.message.payload[..]);
            let _ = each(&entry.message.subject, entry.published_ms, payload);
        })
        .await
        .map_err(|e| {
            if e.absent {
                FleetError::NoRegistry {
                    bucket: presence::REGISTRY_BUCKET,
                    message: e.message,
                }
            } else {
                registry_err(e.message)
            }
        })
    }

    /// Asks every connected agent for its info; waits `window` for answers. Agents answer on
    /// their own presence subject, which only each agent may publish to, so a machine found
    /// here is vouched for by the server's permissions: the nkey comes from the subject, and a
    /// body naming another nkey is dropped (a reply inbox would be shared by all agents, and
    /// its bodies mere claims). Any presence event in the window counts: a heartbeat is as good
    /// an answer as the ping's, and a goodbye means stopped.
    pub async fn ping(&self, window: Duration) -> Result<Vec<AgentStatus>, FleetError> {
        let nats = |e: &dyn std::fmt::Display| FleetError::Nats(format!("ping: {e}"));
        let deadline = Instant::now() + window;
        let mut answers = timeout_at(deadline, self.client.subscribe(subject::PRESENCE_ALL))
            .await
            .map_err(|_| nats(&"no connection to subscribe on"))?
            .map_err(|e| nats(&e))?;
        // The inbox only hears the server's "no responders" (no agent at all), to end early.
        let inbox = self.client.new_inbox();
        let mut none = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| nats(&e))?;
        // No flush needed before the ping: the server takes the subscriptions and the ping in
        // the order this one connection sent them, so they are in place before any answer.
        // The window bounds the publish and flush too: while the client reconnects, both wait
        // for a connection that may never come back.
        timeout_at(
            deadline,
            self.client
                .publish_with_reply(subject::PING, inbox, Bytes::new()),
        )
        .await
        .map_err(|_| nats(&"no connection to publish on"))?
        .map_err(|e| nats(&e))?;
        flush_until(&self.client, deadline).await?;
        let mut found = BTreeMap::new();
        let mut inbox_open = true;
        loop {
            let msg = tokio::select! {
                m = answers.next() => m,
                m = none.next(), if inbox_open => match m {
                    Some(m) if m.status == Some(StatusCode::NO_RESPONDERS) => break,
                    Some(_) => continue,
                    None => {
                        inbox_open = false;
                        continue;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            };
            let Some(msg) = msg else { break };
            if let Some((nkey, status)) = pong(&msg.subject, &msg.payload) {
                found.insert(nkey, status);
            }
        }
        Ok(found.into_values().collect())
    }
}

/// A machine's status from a presence event that came on `subject`: `None` for one that does
/// not parse or whose body names another machine than the subject.
fn pong(subject: &str, payload: &[u8]) -> Option<(String, AgentStatus)> {
    let nkey = subject::nkey_of(subject)?;
    let ev = serde_json::from_slice::<PresenceEvent>(payload).ok()?;
    if ev.agent.nkey != nkey {
        tracing::debug!(subject, claimed = %ev.agent.nkey, "presence naming another machine dropped");
        return None;
    }
    // Heard just now: running, or stopped after a goodbye, as a registry entry would say.
    let now = presence::now_ms();
    Some((nkey.to_owned(), status_from(ev, now, now)))
}

/// The registry bucket's stream configuration, as [`presence::registry_spec`] specifies it, with
/// `replicas` copies: 1 on a single server, 3 on a cluster (a registry that survives a node).
pub fn registry_config(replicas: usize) -> jetstream::stream::Config {
    kv_stream_config(presence::registry_spec(), replicas)
}

/// A KV bucket's stream configuration from its specification, with `replicas` copies.
pub(super) fn kv_stream_config(spec: RegistrySpec, replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        num_replicas: replicas.max(1),
        name: spec.stream,
        subjects: spec.subjects,
        max_messages_per_subject: spec.max_messages_per_subject,
        max_age: spec.max_age,
        max_message_size: spec.max_message_size,
        discard: if spec.discard_new {
            jetstream::stream::DiscardPolicy::New
        } else {
            jetstream::stream::DiscardPolicy::Old
        },
        allow_rollup: spec.allow_rollup,
        deny_delete: spec.deny_delete,
        deny_purge: spec.deny_purge,
        allow_direct: spec.allow_direct,
        ..Default::default()
    }
}

/// Whether an existing bucket's configuration has what [`registry_config`] guarantees, with at
/// least `replicas` copies.
fn registry_is_closed(config: &jetstream::stream::Config, replicas: usize) -> bool {
    config.num_replicas >= replicas
        && presence::registry_is_closed(
            config.allow_rollup,
            config.deny_delete,
            config.deny_purge,
            config.max_message_size,
        )
}

/// Creates the registry bucket, or closes an existing one that an older cbus (or anyone with
/// the rights) left open to rollups and purges. For the gateway and operators: agents have no
/// permission to change the bucket (`cbus_protocol::permissions`). A bucket with fewer than `replicas`
/// copies is given more (a fleet that grew from one server to a cluster); one with more keeps
/// them. Returns whether the bucket changed.
pub async fn close_registry(js: &jetstream::Context, replicas: usize) -> Result<bool, FleetError> {
    let mut config = registry_config(replicas);
    match js.get_stream(&config.name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| registry_err(e.to_string()))?;
            if registry_is_closed(&info.config, replicas) {
                return Ok(false);
            }
            config.num_replicas = config.num_replicas.max(info.config.num_replicas);
            js.update_stream(config)
                .await
                .map_err(|e| registry_err(format!("cannot close the bucket: {e}")))?;
            tracing::info!(
                replicas,
                "registry bucket closed to rollups and purges (it was created by an older cbus \
                 or with fewer replicas)"
            );
            Ok(true)
        }
        Err(_) => ensure_registry(js, replicas).await.map(|_| true),
    }
}

/// Opens the registry bucket, creating it when missing (where the server's permissions let this
/// client create it: agents may not, see [`cbus_protocol::permissions`]) with `replicas` copies.
///
/// async-nats 0.51's `create_key_value` first asks for account info, whose reply from
/// nats-server 2.9 it cannot parse; so the bucket's stream is created directly
/// ([`registry_config`]).
pub async fn ensure_registry(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<jetstream::kv::Store, FleetError> {
    if let Ok(store) = js.get_key_value(presence::REGISTRY_BUCKET).await {
        return Ok(store);
    }
    let bucket = presence::REGISTRY_BUCKET;
    let created = js.get_or_create_stream(registry_config(replicas)).await;
    let Err(create_error) = created else {
        return js
            .get_key_value(bucket)
            .await
            .map_err(|e| registry_err(e.to_string()));
    };
    // Agents that start together all find no bucket and all create it. nats-server 2.9 checks a
    // new stream's name and its subjects under two separate locks, so a create that races
    // another's identical one can fail with "subjects overlap with an existing stream". The
    // bucket is there all the same, so such an error only counts when the bucket does not show.
    let lost_race = matches!(
        create_error.kind(),
        CreateStreamErrorKind::JetStream(e)
            if matches!(e.error_code(), JsErrorCode::STREAM_SUBJECT_OVERLAP | JsErrorCode::STREAM_NAME_EXIST)
    );
    if !lost_race {
        return Err(registry_err(format!(
            "cannot create the bucket: {create_error}"
        )));
    }
    let deadline = Instant::now() + BUCKET_RACE_WAIT;
    loop {
        if let Ok(store) = js.get_key_value(bucket).await {
            return Ok(store);
        }
        if Instant::now() >= deadline {
            return Err(registry_err(format!(
                "cannot create the bucket: {create_error}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
