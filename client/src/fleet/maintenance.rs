//! Maintenance marks ([`cbus_protocol::maintenance`]): read with the fleet, so a fan-out neither
//! waits for nor fails on a machine expected to be away, and set or cleared by operators.
//!
//! The bucket is small (one entry per machine under maintenance, usually none), so a read is one
//! stream-info request when it is empty and one short replay otherwise.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, context::GetStreamErrorKind};
use bytes::Bytes;
use tokio::time::{timeout_at, Instant};

use cbus_protocol::maintenance::{
    maintenance_key_of, maintenance_spec, Maintenance, MAINTENANCE_BUCKET,
};
use cbus_protocol::presence;

use super::kv::{absent, replay_latest};
use super::registry::kv_stream_config;
use super::{AgentStatus, Fleet, FleetError};

/// The most marks a read takes: a fleet of 50,000 all under maintenance, and then some. A bucket
/// that holds more was not written by cbus.
const MAX_MARKS: usize = 100_000;

fn maintenance_err(message: impl Into<String>) -> FleetError {
    FleetError::Registry {
        bucket: MAINTENANCE_BUCKET,
        message: message.into(),
    }
}

impl Fleet {
    /// The marks in force now, by nkey; none when the bucket does not exist (no machine was ever
    /// marked). Expired marks are left out.
    pub async fn maintenance_within(
        &self,
        wait: Duration,
    ) -> Result<HashMap<String, Maintenance>, FleetError> {
        let deadline = Instant::now() + wait;
        let js = jetstream::new(self.client.clone());
        let spec = maintenance_spec();
        let stream = match timeout_at(deadline, js.get_stream(&spec.stream)).await {
            Err(_) => return Err(maintenance_err("timed out")),
            Ok(Err(e)) => {
                // No bucket (no machine was ever marked) or no JetStream: no marks.
                let code = match e.kind() {
                    GetStreamErrorKind::JetStream(js) => Some(js.error_code()),
                    _ => None,
                };
                return if absent(code, std::error::Error::source(&e)) {
                    Ok(HashMap::new())
                } else {
                    Err(maintenance_err(e.to_string()))
                };
            }
            Ok(Ok(stream)) => stream,
        };
        let expected = stream.cached_info().state.messages;
        if expected == 0 {
            return Ok(HashMap::new());
        }
        let now = presence::now_ms();
        let mut marks = HashMap::new();
        let mut malformed = 0usize;
        replay_latest(
            &self.client,
            &stream,
            format!("$KV.{MAINTENANCE_BUCKET}.>"),
            deadline,
            |entry| {
                let Some(key) = maintenance_key_of(&entry.message.subject) else {
                    return;
                };
                let mark = (!entry.deleted)
                    .then(|| Maintenance::decode(&entry.message.payload))
                    .and_then(|m| m.inspect_err(|_| malformed += 1).ok())
                    .filter(|m| m.active_at(now));
                match mark {
                    Some(mark) if marks.len() < MAX_MARKS => {
                        marks.insert(key.to_owned(), mark);
                    }
                    _ => {
                        marks.remove(key);
                    }
                }
            },
        )
        .await
        .map_err(|e| maintenance_err(e.message))?;
        if malformed > 0 {
            tracing::warn!(malformed, "ignored malformed maintenance marks");
        }
        Ok(marks)
    }

    /// Marks the machine `nkey` (creating the bucket with `replicas` copies when missing).
    pub async fn set_maintenance(
        &self,
        nkey: &str,
        mark: &Maintenance,
        replicas: usize,
    ) -> Result<(), FleetError> {
        let store = self.maintenance_store(replicas).await?;
        store
            .put(nkey, Bytes::from(mark.encode()))
            .await
            .map_err(|e| maintenance_err(format!("cannot mark {nkey}: {e}")))?;
        Ok(())
    }

    /// Clears the mark of `nkey`; clearing a machine that has none is not an error.
    pub async fn clear_maintenance(&self, nkey: &str) -> Result<(), FleetError> {
        let js = jetstream::new(self.client.clone());
        let store = match js.get_key_value(MAINTENANCE_BUCKET).await {
            Ok(store) => store,
            // No bucket: nothing was ever marked.
            Err(_) => return Ok(()),
        };
        store
            .delete(nkey)
            .await
            .map_err(|e| maintenance_err(format!("cannot clear {nkey}: {e}")))
    }

    async fn maintenance_store(&self, replicas: usize) -> Result<jetstream::kv::Store, FleetError> {
        let js = jetstream::new(self.client.clone());
        if let Ok(store) = js.get_key_value(MAINTENANCE_BUCKET).await {
            return Ok(store);
        }
        ensure_maintenance(&js, replicas).await?;
        js.get_key_value(MAINTENANCE_BUCKET)
            .await
            .map_err(|e| maintenance_err(e.to_string()))
    }
}

/// Creates the maintenance bucket when missing, with `replicas` copies (for operators: nobody
/// else may). An existing bucket is left as it is.
pub async fn ensure_maintenance(
    js: &jetstream::Context,
    replicas: usize,
) -> Result<(), FleetError> {
    js.get_or_create_stream(kv_stream_config(maintenance_spec(), replicas))
        .await
        .map(|_| ())
        .map_err(|e| maintenance_err(format!("cannot create the bucket: {e}")))
}

/// Attaches each agent's mark in force, if any.
pub fn attach_maintenance(agents: &mut [AgentStatus], marks: &HashMap<String, Maintenance>) {
    for agent in agents {
        agent.maintenance = marks.get(&agent.info.nkey).cloned();
    }
}
