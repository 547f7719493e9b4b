//! What a NATS server needs for cbus. `cbus permissions` prints the NATS permissions a cbus role
//! needs as nats-server configuration, so a server is configured from the same sets the code
//! relies on (`protocol::permissions`) rather than from a copy that drifts; `cbus registry init`
//! creates the registry bucket with the configuration those sets rely on; `cbus streams init`
//! the history streams (`cbus_protocol::streams`).

use cbus_protocol::permissions::Role;

use crate::args::PermissionRole;
use crate::error::{usage, Failure};

pub fn permissions(
    role: PermissionRole,
    nkey: Option<&str>,
    js_domain: Option<&str>,
) -> Result<(), Failure> {
    let role = match role {
        PermissionRole::Agent => Role::Agent,
        PermissionRole::Gateway => Role::Gateway,
        PermissionRole::Operator => Role::Operator,
    };
    match (role, nkey) {
        (Role::Agent, Some(nkey)) => {
            cbus_protocol::subject::validate_nkey(nkey).map_err(usage)?;
        }
        (Role::Agent, None) => return Err(usage("an agent's permissions need its nkey")),
        (_, Some(_)) => return Err(usage("only an agent's permissions take an nkey")),
        (_, None) => {}
    }
    if js_domain.is_some() && role != Role::Agent {
        return Err(usage("only an agent's permissions take a JetStream domain"));
    }
    // A domain is one subject token: it is spliced into `$JS.<domain>.API.…`.
    let bad_token = |d: &str| {
        d.is_empty()
            || d.chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
    };
    if js_domain.is_some_and(bad_token) {
        return Err(usage(
            "--js-domain must be one subject token: no dots, wildcards or spaces",
        ));
    }
    let permissions = match (role, nkey) {
        (Role::Agent, Some(nkey)) => cbus_protocol::permissions::agent_in_domain(nkey, js_domain),
        _ => role
            .permissions(nkey)
            .ok_or_else(|| usage("an agent's permissions need its nkey"))?,
    };
    println!("{}", permissions.to_config());
    Ok(())
}

/// `cbus registry init`: creates the registry bucket, or closes one an older cbus left open to
/// rollups and purges, and creates the maintenance bucket with as many replicas. The gateway does this when it starts; this is for fleets without one, and
/// for the dev fleet, whose agents may not create the bucket (and would wait for a gateway).
pub async fn registry_init(ctx: &crate::fanout::Context, replicas: usize) -> Result<(), Failure> {
    let fleet = ctx.fleet().await?;
    let js = async_nats::jetstream::new(fleet.client().clone());
    let changed = ctx
        .bounded(
            "creating the registry",
            cbus_client::fleet::close_registry(&js, replicas),
        )
        .await?
        .map_err(|e| Failure::Connection(e.to_string()))?;
    ctx.bounded(
        "creating the maintenance bucket",
        cbus_client::fleet::ensure_maintenance(&js, replicas),
    )
    .await?
    .map_err(|e| Failure::Connection(e.to_string()))?;
    let bucket = cbus_protocol::presence::REGISTRY_BUCKET;
    crate::output::line(&if changed {
        format!(
            "registry bucket {bucket} created, or closed to rollups and purges, with at least \
             {replicas} replicas"
        )
    } else {
        format!(
            "registry bucket {bucket} already closed to rollups and purges, with at least \
             {replicas} replicas"
        )
    })
}

/// The limits `cbus streams init` was given.
pub struct StreamLimits<'a> {
    pub audit_max_age: &'a str,
    pub audit_max_bytes: &'a str,
    /// `None`: no signal stream.
    pub signals: Option<(&'a str, &'a str)>,
    pub replicas: usize,
    pub js_domain: Option<&'a str>,
}

/// `cbus streams init`: creates the audit stream (and the signal stream), or gives existing
/// ones these limits. Agents publish on the streams' subjects without the JetStream API, so
/// creating them later loses nothing but the history before.
pub async fn streams_init(
    ctx: &crate::fanout::Context,
    limits: StreamLimits<'_>,
) -> Result<(), Failure> {
    use cbus_protocol::streams::{audit_stream, parse_bytes, signal_stream};
    let age = |flag: &str, v: &str| {
        crate::fanout::parse_duration(v).map_err(|e| usage(format!("--{flag}: {e}")))
    };
    let bytes = |flag: &str, v: &str| parse_bytes(v).map_err(|e| usage(format!("--{flag}: {e}")));
    let mut specs = vec![audit_stream(
        age("audit-max-age", limits.audit_max_age)?,
        bytes("audit-max-bytes", limits.audit_max_bytes)?,
    )];
    if let Some((max_age, max_bytes)) = limits.signals {
        specs.push(signal_stream(
            age("signals-max-age", max_age)?,
            bytes("signals-max-bytes", max_bytes)?,
        ));
    }
    let client = ctx.fleet().await?.client().clone();
    let js = cbus_client::streams::context(client, limits.js_domain);
    for spec in &specs {
        let change = ctx
            .bounded(
                "creating the streams",
                cbus_client::streams::ensure_stream(&js, spec, limits.replicas),
            )
            .await?
            .map_err(|e| Failure::Connection(e.to_string()))?;
        let what = match change {
            cbus_client::streams::StreamChange::Created => "created",
            cbus_client::streams::StreamChange::Updated => "updated",
            cbus_client::streams::StreamChange::Unchanged => "unchanged",
        };
        crate::output::line(&format!(
            "stream {} {what}: {}, at most {} old and {} bytes, {} replica(s)",
            spec.name,
            spec.subjects.join(" "),
            crate::render::duration(spec.max_age),
            spec.max_bytes,
            limits.replicas
        ))?;
    }
    Ok(())
}
