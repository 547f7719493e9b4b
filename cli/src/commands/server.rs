//! What a NATS server needs for cbus. `cbus permissions` prints the NATS permissions a cbus role
//! needs as nats-server configuration, so a server is configured from the same sets the code
//! relies on (`protocol::permissions`) rather than from a copy that drifts; `cbus registry init`
//! creates the registry bucket with the configuration those sets rely on.

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
